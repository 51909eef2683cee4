"""What a policy file (and site.yaml) may hold: every byte of it either loads or gives one
error naming the file and the line, and never another exception; large files are refused
before they are parsed; a link to nothing is an error of its own."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dvx_dr.errors import UserError
from dvx_dr.policies.loader import (
    PolicyError,
    load_policy_dir,
    load_policy_file,
    named_sites,
    policy_files,
)
from dvx_dr.site.config import load_site_config
from tests.unit.policies.test_policies import GOOD

SITES = {"dr-east"}

SITE_YAML = """\
name: site-a
store: store
listen: 127.0.0.1:8443
tls: {cert: a.crt, key: a.key, ca: ca.crt}
admin_socket: admin.sock
"""


def _error(path: Path) -> str:
    with pytest.raises(PolicyError) as caught:
        load_policy_file(path, SITES)
    assert caught.value.path == path
    return str(caught.value)


# --- characters YAML does not allow -----------------------------------------------------------


@pytest.mark.parametrize(("char", "name"), [
    ("\x00", "#x0000 (NUL)"),
    ("\x01", "#x0001 (control character ^A)"),
    ("\x0c", "#x000c (form feed, ^L)"),
    ("\x1b", "#x001b (escape, ^[)"),
    ("\x7f", "#x007f (delete, DEL)"),
    ("\x9b", "#x009b (C1 control character)"),
])
def test_a_control_character_is_one_error_naming_line_column_and_character(
        tmp_path: Path, char: str, name: str) -> None:
    """PyYAML's reader refuses these as the loader is made, which was outside the try that
    turns YAML errors into policy errors: the ReaderError went through ``pg validate`` (a
    traceback), the reload of a running site (an internal error, no group reloaded) and its
    start (the site did not come up)."""
    path = tmp_path / "bad.yaml"
    text = GOOD.format(name="bad", members="vm1").replace("keep_last: 4", f"keep_last: 4{char}")
    path.write_text(text)
    assert _error(path) == (f"policy {path} line 5 column 27: not valid YAML: unacceptable "
                            f"character {name}; remove it")


def test_a_form_feed_in_a_comment_after_windows_line_ends_is_on_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"# finance\r\n# page two\x0c\r\n" + GOOD.format(
        name="bad", members="vm1").encode())
    assert _error(path).startswith(f"policy {path} line 2 column 11: not valid YAML: "
                                   "unacceptable character #x000c (form feed, ^L)")


def test_a_file_with_a_control_character_does_not_stop_the_others(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(GOOD.format(name="alpha", members="a-1"))
    bad = tmp_path / "b.yaml"
    bad.write_text("name: bad\x01\nmembers: [x]\n")
    (tmp_path / "c.yaml").write_text(GOOD.format(name="gamma", members="c-1"))
    policies, errors = load_policy_dir(tmp_path, SITES, ["a-1", "c-1"])
    assert sorted(policies) == ["alpha", "gamma"]
    assert [(e.path, str(e)) for e in errors] == [
        (bad, f"policy {bad} line 1 column 10: not valid YAML: unacceptable character #x0001 "
              "(control character ^A); remove it")]


@pytest.mark.parametrize(("value", "message"), [
    ("2024-13-01", "line 2: not valid YAML: cannot read '2024-13-01' as a timestamp "
                   "(month must be in 1..12)"),
    ("[!!int abc]", "line 2: not valid YAML: cannot read 'abc' as an int"),
    ("{x: !!timestamp soon}", "line 2: not valid YAML: cannot read 'soon' as a timestamp"),
])
def test_a_value_pyyaml_cannot_construct_is_a_policy_error(
        tmp_path: Path, value: str, message: str) -> None:
    """PyYAML raises ValueError (or AttributeError) for these instead of a YAML error; they
    went through the loader like the control characters."""
    path = tmp_path / "g.yaml"
    path.write_text(f"name: g\nextra: {value}\n")
    assert _error(path).startswith(f"policy {path} {message}")


# --- size ---------------------------------------------------------------------------------


def test_a_large_policy_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    """A 1 MB file of list items held a site's event loop for 21 s and 400 MB before the value
    bound refused it (6 MB: 292 s, 2.1 GB); a 24 MB file of globs was accepted."""
    path = tmp_path / "huge.yaml"
    text = "name: huge\nmembers: [" + "1," * 3_000_000 + "]\n"
    path.write_text(text)
    started = time.monotonic()
    assert _error(path) == (f"policy {path} is {len(text)} bytes; a policy file may hold at "
                            "most 256 KiB")
    assert time.monotonic() - started < 1


def test_a_policy_file_of_the_limit_loads(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    text = GOOD.format(name="g", members="vm1")
    path.write_text(text + "#" * (256 * 1024 - len(text) - 1) + "\n")
    assert path.stat().st_size == 256 * 1024
    assert load_policy_file(path, SITES).name == "g"
    path.write_text(path.read_text() + "\n")
    assert "a policy file may hold at most 256 KiB" in _error(path)


def test_many_values_are_refused_while_parsing(tmp_path: Path) -> None:
    """Within the byte limit, the value bound stops the parser part way (it was checked only
    once the whole file had been parsed)."""
    path = tmp_path / "g.yaml"
    path.write_text("name: g\nmembers: [" + "a," * 120_000 + "]\n")
    started = time.monotonic()
    assert _error(path) == (f"policy {path} line 2: more than 100000 values (a file may "
                            "hold at most 100000)")
    assert time.monotonic() - started < 10


# --- lines ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["name", "members", "snapshot"])
def test_a_missing_top_level_field_names_the_line_of_the_mapping(
        tmp_path: Path, field: str) -> None:
    lines = GOOD.format(name="g", members="vm1").splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith(field)]
    if field == "snapshot":
        kept = [line for line in kept if not line.startswith("  s") and "keep_last" not in line]
    path = tmp_path / "g.yaml"
    path.write_text("".join(kept))
    assert _error(path) == f"policy {path} line 1: {field}: required field is missing"
    path.write_text("# the finance group\n\n" + "".join(kept))
    assert _error(path) == f"policy {path} line 3: {field}: required field is missing"


def test_a_byte_that_is_not_utf8_is_reported_with_its_line(tmp_path: Path) -> None:
    """It was reported as a byte offset in the file."""
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: g\nmembers: [caf\xe9]\n")
    assert _error(path) == (f"policy {path} line 2: not UTF-8 text: byte 0xe9 at column 14; "
                            "save the file as UTF-8")
    path.write_bytes("name: g\nmembers: [café, ".encode() + b"caf\xe9]\n")
    assert _error(path).startswith(f"policy {path} line 2: not UTF-8 text: byte 0xe9 at "
                                   "column 20;")


# --- links ----------------------------------------------------------------------------------


def test_a_link_to_nothing_is_an_error_of_its_file(tmp_path: Path) -> None:
    """A policy file that was a symbolic link whose target went away (an unmounted share)
    was skipped as if it were not there: its group unloaded without a word."""
    share = tmp_path / "share"
    share.mkdir()
    policies = tmp_path / "policies"
    policies.mkdir()
    (share / "g.yaml").write_text(GOOD.format(name="g", members="vm1"))
    link = policies / "g.yaml"
    link.symlink_to(share / "g.yaml")
    (policies / "h.yaml").write_text(GOOD.format(name="h", members="vm2"))
    assert sorted(load_policy_dir(policies, SITES, ["vm1", "vm2"])[0]) == ["g", "h"]

    (share / "g.yaml").unlink()
    loaded, errors = load_policy_dir(policies, SITES, ["vm1", "vm2"])
    message = f"policy {link} is a symbolic link to {share / 'g.yaml'}, which does not exist"
    assert (sorted(loaded), [(e.path, str(e)) for e in errors]) == (["h"], [(link, message)])
    assert _error(link) == message

    loop = policies / "loop.yaml"
    loop.symlink_to("loop.yaml")
    _, errors = load_policy_dir(policies, SITES, ["vm1", "vm2"])
    assert [str(e) for e in errors][1] == (
        f"policy {loop} is a symbolic link to loop.yaml, which cannot be followed: "
        f"{os.strerror(40)}")


def test_policy_files_lists_links_to_nothing_but_not_directories_or_hidden_files(
        tmp_path: Path) -> None:
    """What ``pg validate --config`` checks should be what the site loads."""
    (tmp_path / "a.yaml").write_text("name: a\n")
    (tmp_path / "b.yml").symlink_to(tmp_path / "gone.yaml")
    (tmp_path / "c.yaml").mkdir()
    (tmp_path / ".d.yaml").write_text("name: d\n")
    (tmp_path / "e.yaml~").write_text("name: e\n")
    assert policy_files(tmp_path) == [tmp_path / "a.yaml", tmp_path / "b.yml"]


def test_named_sites_reads_within_the_policy_bounds(tmp_path: Path) -> None:
    """``pg validate`` without a site reads the target names first: with ``yaml.safe_load``,
    a date like 2024-13-01 was a traceback there, and a large file was parsed in full."""
    path = tmp_path / "g.yaml"
    path.write_text(GOOD.format(name="g", members="vm1"))
    assert named_sites(path) == {"dr-east"}
    path.write_text(GOOD.format(name="g", members="vm1") + "x: 2024-13-01\n")
    assert named_sites(path) == set()
    path.write_text("name: huge\nmembers: [" + "1," * 3_000_000 + "]\n")
    started = time.monotonic()
    assert named_sites(path) == set()
    assert time.monotonic() - started < 1


# --- site.yaml ------------------------------------------------------------------------------


def _site_error(path: Path) -> str:
    with pytest.raises(UserError) as caught:
        load_site_config(path)
    return str(caught.value)


def test_site_yaml_with_a_form_feed_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(SITE_YAML + "# peers below\x0c\npeers: {}\n")
    assert _site_error(path) == (f"{path} line 6 column 14: not valid YAML: unacceptable "
                                 "character #x000c (form feed, ^L); remove it")


def test_a_large_site_yaml_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    text = SITE_YAML + "# " + "x" * 1024 * 1024 + "\n"
    path.write_text(text)
    assert _site_error(path) == (f"{path} is {len(text)} bytes; a configuration file may "
                                 "hold at most 1 MiB")
    path.write_text(SITE_YAML)
    assert load_site_config(path).name == "site-a"
