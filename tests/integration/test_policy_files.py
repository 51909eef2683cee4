"""Policy files and site.yaml a running ``dvx-dr site serve`` cannot use: a control character,
a file too large to parse, a link to nothing. Each is one error about its file, in ``pg
apply``, in the status and in the log; the other groups load, and the site keeps running and
starts again."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dvx_dr.cli import remote
from tests.integration.sites import Site, SiteNotReady, Sites

POLICY = """\
name: {name}
members: [{volume}]
snapshot: {{schedule: 1h, retention: {{keep_last: 2}}}}
"""


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with Sites(tmp_path / "sites") as sites:
        a = sites.add("site-a")
        (a.root / "policies").mkdir()
        with a.config.open("a") as f:
            f.write(f"policy_dir: {str(a.root / 'policies')!r}\n")
        sites.start()
        for volume in ("vm1", "vm2", "vm3"):
            remote.call_op(str(a.admin_socket), "volume.create",
                           {"name": volume, "size": 256 * 1024})
        yield a


def status(site: Site) -> dict[str, Any]:
    return remote.status(str(site.admin_socket))


def apply(site: Site) -> tuple[int, list[str], str]:
    """``pg apply``: exit code, error lines (without the ``dvx-dr: error:`` prefix), stdout."""
    proc = site.cli("pg", "apply", check=False)
    errors = [line.removeprefix("dvx-dr: error: ") for line in proc.stderr.decode().splitlines()]
    return proc.returncode, errors, proc.stdout.decode()


def wait_for_groups(site: Site, groups: list[str]) -> None:
    deadline = time.monotonic() + 20
    while sorted(status(site)["groups"]) != groups:
        assert time.monotonic() < deadline, (status(site), site.log()[-2000:])
        time.sleep(0.1)


def bugs(site: Site) -> list[str]:
    return [line for line in site.log().splitlines()
            if "Traceback" in line or "never retrieved" in line or "internal error" in line]


def test_bad_policy_files_never_stop_the_site_or_the_other_groups(site: Site,
                                                                   tmp_path: Path) -> None:
    """A control character made ``pg apply`` fail with "internal error (ReaderError)", killed
    the SIGHUP reload task, kept every other change from loading and stopped the site from
    starting; a 1 MB file held the site for 21 s; a link to nothing unloaded its group
    without a word."""
    policies = site.root / "policies"
    share = tmp_path / "share"
    share.mkdir()
    (policies / "g1.yaml").write_text(POLICY.format(name="g1", volume="vm1"))
    (share / "g3.yaml").write_text(POLICY.format(name="g3", volume="vm3"))
    (policies / "g3.yaml").symlink_to(share / "g3.yaml")
    assert apply(site)[0] == 0

    bad = policies / "bad.yaml"
    bad.write_text("name: bad\x01\nmembers: [x]\n")
    huge = policies / "huge.yaml"
    huge.write_text("name: huge\nmembers: [" + "v," * 500_000 + "]\n")
    (policies / "g2.yaml").write_text(POLICY.format(name="g2", volume="vm2"))
    (share / "g3.yaml").unlink()
    link = policies / "g3.yaml"
    errors = [
        f"policy {bad} line 1 column 10: not valid YAML: unacceptable character #x0001 "
        "(control character ^A); remove it",
        f"policy {link} is a symbolic link to {share / 'g3.yaml'}, which does not exist; "
        "group g3 keeps running on the version of g3.yaml that last loaded",
        f"policy {huge} is {huge.stat().st_size} bytes; a policy file may hold at most 256 KiB",
    ]
    started = time.monotonic()
    code, said, out = apply(site)
    assert time.monotonic() - started < 10
    assert (code, sorted(said), out) == (2, errors, "loaded 3 protection groups: g1, g2, g3\n")
    assert sorted(status(site)["policy_errors"]) == errors

    (policies / "g2.yaml").unlink()
    site.reload()  # SIGHUP
    wait_for_groups(site, ["g1", "g3"])
    assert sorted(status(site)["policy_errors"]) == errors
    assert bugs(site) == []

    # A restart with the files in place: the site starts, with the groups that load.
    (policies / "g2.yaml").write_text(POLICY.format(name="g2", volume="vm2"))
    site.stop()
    site.start()
    assert sorted(status(site)["groups"]) == ["g1", "g2"]
    assert sorted(status(site)["policy_errors"]) == [
        errors[0], errors[1].split(";")[0], errors[2]]
    assert bugs(site) == []


def test_site_yaml_with_a_control_character(site: Site) -> None:
    """A form feed (^L, as Emacs inserts) in a comment of site.yaml killed the SIGHUP reload
    task with a traceback and stopped the site from starting with another one."""
    (site.root / "policies" / "g1.yaml").write_text(POLICY.format(name="g1", volume="vm1"))
    assert apply(site)[0] == 0
    lines = site.config.read_text().splitlines(keepends=True)
    lines.insert(2, "# peers below\x0c\n")
    site.config.write_text("".join(lines))
    message = (f"{site.config} line 3 column 14: not valid YAML: unacceptable character "
               "#x000c (form feed, ^L); remove it")

    site.reload()  # SIGHUP
    deadline = time.monotonic() + 20
    while "reload failed" not in site.log():
        assert time.monotonic() < deadline, site.log()[-2000:]
        time.sleep(0.1)
    assert f"reload failed, keeping the running configuration: {message}" in site.log()
    assert site.running and sorted(status(site)["groups"]) == ["g1"]
    code, said, _ = apply(site)
    assert (code, said) == (2, [message])
    assert bugs(site) == []

    site.stop()
    with pytest.raises(SiteNotReady) as caught:
        site.start()
    assert f"dvx-dr: error: {message}" in str(caught.value)
    assert "Traceback" not in str(caught.value)
    assert "exited with 2" in str(caught.value)
