"""The command line's start-up: commands that talk to a running site load only what they use."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dvx_dr.cli import build_parser
from dvx_dr.cli.replicate import (
    _config_relative,
    _socket_from_simple_lines,
    admin_socket,
    quick_args,
    socket_from_config,
)
from dvx_dr.errors import UserError
from dvx_dr.site.config import load_site_config
from tests.conftest import cli_env

SITE_YAML = """\
name: site-a
store: store
listen: 127.0.0.1:8443
tls: {cert: a.crt, key: a.key, ca: ca.crt}
admin_socket: %s
"""


@pytest.mark.parametrize("socket", ["run/admin.sock", "/run/dvx-dr/a.sock", "~/a.sock"])
def test_admin_socket_from_config_matches_the_validated_config(tmp_path: Path,
                                                               socket: str) -> None:
    path = tmp_path / "conf" / "site.yaml"
    path.parent.mkdir()
    path.write_text(SITE_YAML % socket)
    assert socket_from_config(path) == str(load_site_config(path).admin_socket)


def test_config_without_admin_socket_gets_the_full_validation_error(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(textwrap.dedent(SITE_YAML % "x").replace("admin_socket: x\n", ""))
    with pytest.raises(UserError, match="admin_socket"):
        socket_from_config(path)


HEAVY = ("aiohttp", "pydantic", "cryptography", "zstandard", "sqlite3", "tqdm", "http",
         "email", "ssl")


def loaded_modules(args: list[str]) -> tuple[int, str, list[str]]:
    """Run ``dvx-dr ARGS`` in a fresh interpreter: its exit code, stderr and the modules it
    had loaded when it returned."""
    probe = textwrap.dedent(f"""
        import json, sys
        from dvx_dr.cli import main
        code = main({args!r})
        print(json.dumps([code, sorted(sys.modules)]))
    """)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=cli_env(), timeout=60, check=True)
    code, modules = json.loads(proc.stdout.splitlines()[-1])
    return code, proc.stderr, modules


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in HEAVY
            or m in ("dvx_dr.site.store", "dvx_dr.replicator.server", "asyncio")]


def test_status_command_loads_no_store_server_http_or_pydantic_code(tmp_path: Path) -> None:
    """``dvx-dr status`` against a site: the run fails (no site listens on the socket), and
    the modules it loaded on the way are listed."""
    path = tmp_path / "site.yaml"
    path.write_text(SITE_YAML % "admin.sock")
    code, stderr, modules = loaded_modules(["status", "--config", str(path)])
    assert code == 2, stderr  # UserError: no site is running (no admin socket)
    assert "no site is running at" in stderr
    assert heavy(modules) == []


def test_status_named_by_store_does_not_load_pyyaml(tmp_path: Path) -> None:
    """``--store``: the running site is found through the store's lock file, so PyYAML
    (about 19 ms of start-up) is not loaded. With ``--config`` of a store no site serves, it
    is (the file's lines are not confirmed by a lock file)."""
    (tmp_path / "store").mkdir()
    code, stderr, modules = loaded_modules(["status", "--store", str(tmp_path / "store")])
    assert code == 2, stderr  # UserError: no site is running on the store
    assert "no site is running on store" in stderr
    assert heavy(modules) == []
    assert "yaml" not in modules
    path = tmp_path / "site.yaml"
    path.write_text(SITE_YAML % "admin.sock")
    assert "yaml" in loaded_modules(["status", "--config", str(path)])[2]


def serving(config: Path, store: str, socket: str) -> None:
    """Make the lock file of ``store`` (relative to ``config``'s directory) say what a running
    site's says: its pid, then its admin socket."""
    lock = config.parent / store / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(f"4242\n{socket}\n")


SIMPLE_FORMS = [
    ("store: store\nadmin_socket: run/a.sock\n", "store", "run/a.sock"),
    ('store: "store"\nadmin_socket: "/run/dvx dr/a.sock"  # quoted\n', "store",
     "/run/dvx dr/a.sock"),
    ("admin_socket: '~/a.sock'\nstore: ./store\n", "store", "~/a.sock"),
]


@pytest.mark.parametrize(("lines", "store", "socket"), SIMPLE_FORMS)
def test_config_read_without_yaml_when_the_lock_file_confirms_it(
        tmp_path: Path, lines: str, store: str, socket: str) -> None:
    """Simple ``store`` and ``admin_socket`` lines, confirmed by the store's lock file, are
    read without PyYAML, and give the socket the validated config gives."""
    path = tmp_path / "site.yaml"
    path.write_text("name: site-a\nlisten: 127.0.0.1:8443\n"
                    "tls: {cert: a.crt, key: a.key, ca: ca.crt}\n" + lines)
    expected = str(load_site_config(path).admin_socket)
    serving(path, store, expected)
    assert socket_from_config(path) == expected
    code, stderr, modules = loaded_modules(["status", "--config", str(path)])
    assert code == 2, stderr  # the socket it found has no site listening: none is running
    assert expected in stderr
    assert "yaml" not in modules


@pytest.mark.parametrize("text", [
    # The lines look simple, but YAML reads another socket (or the site refuses the file):
    # they are not taken, though the lock file confirms the first socket; the file is parsed.
    SITE_YAML % "run/a.sock" + "admin_socket: run/b.sock\n",  # a duplicate key
    SITE_YAML.replace("store: store", "store: store#x") % "run/a.sock",  # no comment
    SITE_YAML % '"run/a\\x2esock"',  # an escape
    SITE_YAML % "run/a.sock" + "---\nadmin_socket: run/b.sock\n",  # a second document
    SITE_YAML % "run/a.sock" + "x: [1,\nadmin_socket: run/b.sock\n]\n",  # in a flow list
    # The only simple line is inside a quoted scalar; the real key is a folded scalar.
    SITE_YAML.replace("admin_socket: %s", "admin_socket: >-\n  run/a.sock\n"
                      'note: "x\nadmin_socket: run/b.sock\n"'),
    # Both simple lines are inside a quoted scalar (and name a store whose lock file confirms
    # them); the real keys are written with escapes.
    'name: site-a\nstore: "st\\x6fre-real"\nlisten: 127.0.0.1:8443\n'
    "tls: {cert: a.crt, key: a.key, ca: ca.crt}\n"
    'admin_socket: "run/re\\x61l.sock"\npolicy_dir: "policies\nstore: store\n'
    'admin_socket: run/a.sock\n"\n',
])
def test_config_lines_that_yaml_reads_otherwise_are_parsed(tmp_path: Path, text: str) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    serving(path, "store", str(tmp_path / "run/a.sock"))
    assert _socket_from_simple_lines(path, text) is None
    try:
        expected = str(load_site_config(path).admin_socket)
    except UserError:
        return  # the site refuses the file, so no site serves it
    assert socket_from_config(path) == expected


LIGHT = ("argparse", "pathlib", "typing", "yaml")


@pytest.mark.parametrize("args", [
    ["status", "--json"],
    ["replicate", "vm1@a", "--to", "site-b", "--json"],
    ["replicate", "--volume", "vm1", "--to=site-b"],
])
def test_replicate_and_status_do_not_load_argparse_pathlib_or_typing(tmp_path: Path,
                                                                     args: list[str]) -> None:
    """The commands scripts run most start on ``json`` and ``socket`` alone (about 15 ms less
    than with argparse, pathlib and typing on this project's machine)."""
    (tmp_path / "store").mkdir()
    code, stderr, modules = loaded_modules([*args, "--store", str(tmp_path / "store")])
    assert code == 2, stderr  # UserError: no site is running on the store
    assert "no site is running on store" in stderr
    assert [m for m in modules if m.split(".")[0] in LIGHT] == []
    assert heavy(modules) == []


QUICK_FORMS = [
    ["status"],
    ["status", "--json", "--config", "site.yaml"],
    ["status", "--metrics", "--store=/srv/store"],
    ["status", "--store", "s", "--json", "--metrics"],
    ["replicate", "vm1@a", "--to", "site-b"],
    ["replicate", "--to", "site-b", "vm1@a", "--json", "--config=c.yaml"],
    ["replicate", "--volume", "vm1", "--to=site-b", "--store", "st"],
    ["replicate", "pg1@x", "--group", "--to", "site-b", "--json"],
    ["replicate", "--to", "a=b", "--volume=v=w"],
    ["replicate", "vm1@a", "--volume", "vm1", "--to", "b"],  # cmd_replicate refuses both
]


@pytest.mark.parametrize("argv", QUICK_FORMS)
def test_quick_args_read_a_command_line_as_the_full_parser_does(argv: list[str]) -> None:
    quick = quick_args(argv)
    assert quick is not None
    assert vars(quick) == vars(build_parser(argv).parse_args(argv))


@pytest.mark.parametrize("argv", [
    ["status", "--help"],
    ["status", "--js"],  # an abbreviation: argparse takes it
    ["status", "extra"],
    ["status", "--json", "--json"],
    ["replicate", "vm1@a"],  # no --to: argparse says so
    ["replicate", "vm1@a", "--to"],
    ["replicate", "vm1@a", "--to", "-x"],
    ["replicate", "vm1@a", "--to="],
    ["replicate", "vm1@a", "--to", "b", "--to", "c"],
    ["replicate", "a", "b", "--to", "c"],
    ["replicate", "--", "vm1@a", "--to", "c"],
    ["replicate", "", "--to", "c"],
    ["volume", "list"],
    [],
])
def test_quick_args_leave_other_command_lines_to_the_full_parser(argv: list[str]) -> None:
    assert quick_args(argv) is None


TOKENS = ["status", "replicate", "vm1@a", "x", "-x", "", "--", "--json", "--js", "--group",
          "--metrics", "--to", "--to=b", "--to=", "--volume", "--volume=v", "--config",
          "--config=c.yaml", "--store", "--store=s", "-h", "--help", "=", "--to=-y"]


@given(st.lists(st.sampled_from(TOKENS), max_size=7), st.sampled_from(["status", "replicate"]))
@settings(max_examples=400, deadline=None)
def test_quick_args_never_differ_from_the_full_parser(rest: list[str], command: str) -> None:
    """Any command line ``quick_args`` reads, the full parser reads the same way (and does not
    refuse)."""
    argv = [command, *rest]
    quick = quick_args(argv)
    if quick is not None:
        assert vars(quick) == vars(build_parser(argv).parse_args(argv))


PATH_PIECES = ["", ".", "..", "a", "b c", "~", "//", "///"]


@given(st.lists(st.sampled_from(PATH_PIECES), max_size=6), st.sampled_from(["", "/", "//"]),
       st.sampled_from(["site.yaml", "conf/./site.yaml", "../c/site.yaml", "/etc/d/site.yaml",
                        "//srv/site.yaml", "/site.yaml"]))
@settings(max_examples=400, deadline=None)
def test_config_paths_are_resolved_as_the_site_writes_them(pieces: list[str], root: str,
                                                           config: str) -> None:
    """The socket and store paths read from site.yaml's text are, character for character,
    the ones the site derives with pathlib (and writes to its lock file)."""
    value = root + "/".join(pieces) or "x"
    expanded = Path(value).expanduser()
    site = expanded if expanded.is_absolute() else Path(config).absolute().parent / expanded
    assert _config_relative(config, value) == str(site)


def test_site_options_win_over_the_environment_and_may_not_be_empty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--store`` names the site even with ``DVX_DR_CONFIG`` set, and an empty ``--config``
    (an unset shell variable) is refused rather than replaced by the environment's site."""
    other = tmp_path / "other.yaml"
    other.write_text(SITE_YAML % "other.sock")
    serving(other, "store", str(tmp_path / "other.sock"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "lock").write_text(f"4242\n{tmp_path / 'mine.sock'}\n")
    monkeypatch.setenv("DVX_DR_CONFIG", str(other))
    assert admin_socket(quick_args(["status", "--store", str(mine)])) == str(
        tmp_path / "mine.sock")
    assert admin_socket(quick_args(["status"])) == str(tmp_path / "other.sock")
    for argv in (["status", "--config", ""], ["status", "--config="], ["status", "--store", ""]):
        with pytest.raises(UserError, match="is empty; give the path"):
            admin_socket(build_parser(argv).parse_args(argv))
