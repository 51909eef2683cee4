"""Group snapshots from the command line: one instant for several volumes, deleted as one."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tests.conftest import run_cli
from tests.integration.sites import Sites


def test_group_snapshot_create_list_and_delete(store_dir: Path, password_file: Path,
                                               tmp_path: Path) -> None:
    args = ["--store", store_dir, "--password-file", password_file]
    run_cli("site", "init", "--name", "site-a", *args)
    for name, fill in (("db", b"D"), ("log", b"L")):
        run_cli("volume", "create", name, "--size", "1MiB", *args)
        run_cli("volume", "write", name, "-", *args, input=fill * 4096)
    twice = run_cli("pg", "snapshot-create", "app", "db", "log", "db", "--name", "s1", *args,
                    check=False)
    assert twice.returncode == 2
    assert twice.stderr.decode() == ("dvx-dr: error: volume 'db' is named more than once; name "
                                     "each member once\n")
    run_cli("pg", "snapshot-create", "app", "db", "log", "--name", "s1", *args)
    run_cli("volume", "write", "db", "-", *args, input=b"X" * 4096)

    listed = json.loads(run_cli("pg", "snapshots", "--json", *args).stdout)
    assert [g["snapshot"] for g in listed] == ["app@s1"]
    assert listed[0]["members"] == ["db@s1", "log@s1"]
    assert run_cli("snapshot", "read", "db@s1", "--length", "4", *args).stdout == b"DDDD"

    # A member cannot go alone: the group root would name a missing snapshot.
    refused = run_cli("snapshot", "delete", "db@s1", *args, check=False)
    assert refused.returncode == 2
    assert "pg snapshot-delete app@s1" in refused.stderr.decode()

    run_cli("pg", "snapshot-delete", "app@s1", *args)
    assert json.loads(run_cli("pg", "snapshots", "--json", *args).stdout) == []
    assert json.loads(run_cli("snapshot", "list", "--json", *args).stdout) == []
    run_cli("datastore", "gc", *args)
    assert run_cli("datastore", "scrub", *args).returncode == 0
    assert run_cli("volume", "read", "db", "--length", "4", *args).stdout == b"XXXX"


def test_group_snapshot_replicates_as_one(two_sites: Sites) -> None:
    a, b = two_sites.sites["site-a"], two_sites.sites["site-b"]
    for name, fill in (("db", b"D"), ("log", b"L")):
        a.cli("volume", "create", name, "--size", "2MiB")
        a.cli("volume", "write", name, "-", input=fill * 65536)
    a.cli("pg", "snapshot-create", "app", "db", "log", "--name", "s1")

    stats = a.json("replicate", "app@s1", "--group", "--to", "site-b")
    assert stats["replica"] == "site-a/app@s1"
    assert stats["blocks_sent"] == 2

    groups = b.json("pg", "snapshots")
    assert [(g["snapshot"], g["members"]) for g in groups] == [
        ("site-a/app@s1", ["site-a/db@s1", "site-a/log@s1"])]
    assert b.cli("snapshot", "read", "site-a/log@s1", "--length", "3").stdout == b"LLL"
    again = a.json("replicate", "app@s1", "--group", "--to", "site-b")
    assert again["already_replicated"] and again["blocks_sent"] == 0


def test_group_replicates_after_a_member_was_replicated_alone(two_sites: Sites) -> None:
    """The member's replica is already at the target with the same root: the group commit
    takes it as it is (it used to fail with a database constraint, as a 500, every retry)."""
    a, b = two_sites.sites["site-a"], two_sites.sites["site-b"]
    for name, fill in (("db", b"D"), ("log", b"L")):
        a.cli("volume", "create", name, "--size", "2MiB")
        a.cli("volume", "write", name, "-", input=fill * 65536)
    a.cli("pg", "snapshot-create", "app", "db", "log", "--name", "s1")
    assert a.json("replicate", "db@s1", "--to", "site-b")["replica"] == "site-a/db@s1"

    stats = a.json("replicate", "app@s1", "--group", "--to", "site-b")
    assert stats["replica"] == "site-a/app@s1"
    groups = b.json("pg", "snapshots")
    assert [(g["snapshot"], g["members"]) for g in groups] == [
        ("site-a/app@s1", ["site-a/db@s1", "site-a/log@s1"])]
    assert b.cli("snapshot", "read", "site-a/db@s1", "--length", "3").stdout == b"DDD"
    # Deleting the group replica (by hand, or by the target's retention) leaves the member
    # replicated on its own: it had been deleted with the group, though the operator had
    # asked for it and been told it was committed.
    b.cli("pg", "snapshot-delete", "site-a/app@s1")
    assert [s["snapshot"] for s in b.json("snapshot", "list")] == ["site-a/db@s1"]
    assert b.cli("snapshot", "read", "site-a/db@s1", "--length", "3").stdout == b"DDD"
    b.cli("snapshot", "delete", "site-a/db@s1")
    assert b.json("snapshot", "list") == []


def test_a_member_replicated_on_its_own_after_its_group_outlives_the_group(
        two_sites: Sites) -> None:
    """The other order: the group first, then one member on its own, which the target
    answered "already replicated" without noting that it was now asked for on its own."""
    a, b = two_sites.sites["site-a"], two_sites.sites["site-b"]
    for name, fill in (("db", b"D"), ("log", b"L")):
        a.cli("volume", "create", name, "--size", "2MiB")
        a.cli("volume", "write", name, "-", input=fill * 65536)
    a.cli("pg", "snapshot-create", "app", "db", "log", "--name", "s1")
    a.json("replicate", "app@s1", "--group", "--to", "site-b")
    assert a.json("replicate", "log@s1", "--to", "site-b")["already_replicated"]
    # A group replica is not sent on (the target answered with a protocol error).
    sent_on = b.cli("replicate", "site-a/app@s1", "--group", "--to", "site-a", check=False)
    assert sent_on.returncode == 2, sent_on.stderr
    assert b"group replica received from another site" in sent_on.stderr
    b.cli("pg", "snapshot-delete", "site-a/app@s1")
    assert [s["snapshot"] for s in b.json("snapshot", "list")] == ["site-a/log@s1"]


def test_members_holding_the_same_data_send_it_once(two_sites: Sites) -> None:
    """Two members with the same blocks: the second member's walk asks the target about
    blocks the first one's records carry but the target may not have stored yet, so they are
    left out of its questions instead (they were sent twice)."""
    a = two_sites.sites["site-a"]
    data = random.Random(7).randbytes(5 * 65536)
    for name, size in (("db", "1MiB"), ("copy", "2MiB")):
        a.cli("volume", "create", name, "--size", size)
        a.cli("volume", "write", name, "-", input=data)
    a.cli("pg", "snapshot-create", "app", "db", "copy", "--name", "s1")

    stats = a.json("replicate", "app@s1", "--group", "--to", "site-b")
    assert stats["blocks_sent"] == 5
    b = two_sites.sites["site-b"]
    for name in ("db", "copy"):
        assert b.cli("snapshot", "read", f"site-a/{name}@s1", "--length",
                     str(len(data))).stdout == data
    assert b.cli("datastore", "scrub").returncode == 0


def test_a_replicate_that_would_be_refused_takes_no_snapshot(two_sites: Sites) -> None:
    """``--volume`` snapshots first; a transfer refused anyway (a site that is not a peer,
    the site itself, --group with --volume) must not leave a snapshot that no group's
    retention removes."""
    a = two_sites.sites["site-a"]
    a.cli("volume", "create", "vm1", "--size", "1MiB")
    for args, message in (
            (["--to", "site-z"], b"unknown site 'site-z'"),
            (["--to", "site-a"], b"unknown site 'site-a'"),
            (["--to", "site-b", "--group"], b"give one of them")):
        refused = a.cli("replicate", "--volume", "vm1", *args, check=False)
        assert refused.returncode == 2, refused.stderr
        assert message in refused.stderr
        assert b"created snapshot" not in refused.stderr
    assert a.json("snapshot", "list") == []
