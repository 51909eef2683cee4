"""The protection-group scheduler inside real ``dvx-dr site serve`` processes (mutual TLS on
127.0.0.1, encrypted stores, policies loaded from each site's policy directory).

Covers:

- a group of two volumes on a 2-second schedule while a writer updates both: group replicas
  keep arriving at the target, each one crash-consistent across its members, and
  ``keep_last: 2`` holds at both ends;
- two targets, one of them down: the other keeps receiving, the down one goes to RPO
  VIOLATED in ``status --json`` and in ``/metrics``; the base it holds is not pruned at the
  source, and once back it catches up with an incremental transfer;
- every policy mistake is reported with file, line and field (``pg validate``, and
  ``pg apply`` into a running site), and a bad file never unloads a good one;
- a hook that fails or overruns its timeout fails that group's snapshot with a clear status
  error, other groups keep snapshotting, and snapshots resume once it is fixed; a hook still
  running when the site stops is killed with it.

The tests watch the sites mostly through the admin socket (``dvx_dr.cli.remote``, the client
the CLI itself uses): each CLI process costs ~0.6 s of startup, too slow for polling. The
observable contract (``pg validate``, ``pg apply``, ``status --json``, ``snapshot read``, the
metrics listener) is checked through the real CLI and HTTP.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from dvx_dr.cli import remote
from dvx_dr.errors import UserError
from tests.integration.sites import HOST, Site, Sites, dvx, free_port

T = TypeVar("T")
KiB = 1024
MiB = 1024 * KiB
GEN_LEN = 16


# -- helpers ----------------------------------------------------------------------------------


def op(site: Site, operation: str, **params: Any) -> Any:
    """A named store operation through the running site's admin socket."""
    return remote.call_op(str(site.admin_socket), operation, params)


def status(site: Site) -> dict[str, Any]:
    """The running site's status (what ``status --json`` prints)."""
    return remote.status(str(site.admin_socket))


def group_names(site: Site, pg: str) -> list[str]:
    """Names of the group snapshots of ``pg`` at ``site`` (op group.list), oldest first."""
    return [g["name"] for g in op(site, "group.list", pg=pg)]


def admin_metrics(site: Site) -> str:
    """The Prometheus text through the admin socket (what ``status --metrics`` prints)."""
    return str(remote.call(str(site.admin_socket), "metrics"))


def http_metrics(port: int) -> str:
    """``GET /metrics`` on the plain-HTTP ``metrics_listen`` address."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers.get_content_type() == "text/plain"
        return str(response.read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    """The value of ``dvx_dr_<name>{labels}`` in Prometheus text; fails when it is absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.compile(rf"^dvx_dr_{re.escape(name)}\{{{re.escape(want)}\}} (\S+)$", re.M)
    found = pattern.findall(text)
    assert len(found) == 1, f"dvx_dr_{name}{{{want}}} not once in metrics:\n{text}"
    return float(found[0])


def wait_for(what: str, check: Callable[[], T | None], timeout: float,
             interval: float = 0.2) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def configure(site: Site, policy_dir: Path, metrics_port: int | None = None) -> None:
    """Rewrite ``site.yaml`` with a policy directory (and a metrics listener)."""
    policy_dir.mkdir(parents=True, exist_ok=True)
    site.write_config()
    extra = [f"policy_dir: {str(policy_dir)!r}"]
    if metrics_port is not None:
        extra.append(f"metrics_listen: {HOST}:{metrics_port}")
    with site.config.open("a") as f:
        f.write("\n".join(extra) + "\n")


def gen_bytes(gen: int) -> bytes:
    return f"gen {gen:010d}\n".encode().ljust(GEN_LEN, b".")


def parse_gen(data: bytes) -> int:
    match = re.fullmatch(rb"gen (\d{10})\n\.*", data)
    assert match, f"not a generation record: {data!r}"
    return int(match.group(1))


def read_gen(site: Site, snapshot: str) -> int:
    """The generation written at offset 0 of a volume snapshot (or replica) at ``site``."""
    data = base64.b64decode(op(site, "snapshot.read", snapshot=snapshot, offset=0,
                               length=GEN_LEN)["data"])
    return parse_gen(data)


def write_gen(site: Site, volume: str, gen: int) -> None:
    op(site, "volume.write", name=volume, offset=0,
       data=base64.b64encode(gen_bytes(gen)).decode())


class Writer(threading.Thread):
    """Writes generation N at offset 0 of each volume in turn, N = 1, 2, 3, ... through the
    running site, until stopped. ``gen`` is the last generation written to every volume."""

    def __init__(self, site: Site, volumes: list[str], pause: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.site, self.volumes, self.pause = site, volumes, pause
        self.gen = 0
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                gen = self.gen + 1
                for volume in self.volumes:
                    write_gen(self.site, volume, gen)
                self.gen = gen
                if self.pause:
                    self._stop_event.wait(self.pause)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self) -> int:
        self._stop_event.set()
        self.join(30)
        assert not self.is_alive(), "writer did not stop"
        if self.error is not None:
            raise AssertionError(f"writer failed: {self.error!r}") from self.error
        return self.gen


def site_bugs(sites: Sites) -> dict[str, list[str]]:
    """Lines of the site logs that show a bug. Handled errors (a failed hook, a peer that is
    down, a bad policy file) are logged at ERROR on purpose here, so only tracebacks and
    internal errors count."""
    bugs = {}
    for name, site in sites.sites.items():
        lines = [line for line in site.log().splitlines()
                 if "Traceback" in line or "internal error" in line or " CRITICAL " in line]
        if lines:
            bugs[name] = lines
    return bugs


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    with Sites(tmp_path / "sites") as s:
        yield s
    bugs = site_bugs(s)
    assert not bugs, f"sites logged internal errors: {bugs}"


def make_sites(sites: Sites, *names: str) -> list[Site]:
    made = [sites.add(name) for name in names]
    sites.mesh()
    for site in made:
        configure(site, site.root / "policies")
    return made


def pg_apply(site: Site) -> Any:
    return site.cli("pg", "apply", "--config", site.config, check=False)


POLICY = """\
name: {name}
members: {members}
snapshot:
  schedule: {schedule}
  retention: {{keep_last: {keep}}}
"""


def policy(name: str, members: str, schedule: str = "2s", keep: int = 2,
           targets: tuple[tuple[str, str, int], ...] = (), hooks: str = "") -> str:
    """A policy file's text; ``targets`` are (site, rpo, keep_last) after each snapshot."""
    text = POLICY.format(name=name, members=members, schedule=schedule, keep=keep)
    if targets:
        text += "replication:\n"
        for site, rpo, keep_target in targets:
            text += (f"  - site: {site}\n"
                     f"    schedule: after-snapshot\n"
                     f"    retention: {{keep_last: {keep_target}}}\n"
                     f"    rpo: {rpo}\n")
    return text + hooks


def slow_group(site: Site, tmp_path: Path, seed: int, size: int, schedule: str) -> Path:
    """Volume vm1 of ``size`` random bytes in group g, sent to site-b at 256 KiB/s on
    ``schedule``; the policy file's path."""
    image = tmp_path / "img"
    image.write_bytes(random.Random(seed).randbytes(size))
    site.cli("volume", "import", "vm1", image)
    text = policy("g", '["vm1"]', schedule=schedule, keep=5, targets=(("site-b", "2h", 5),))
    path = site.root / "policies" / "g.yaml"
    path.write_text(text.replace("    rpo: 2h\n", "    rpo: 2h\n    bandwidth_limit: 256KiB/s\n"))
    return path


# -- a group of two volumes: crash-consistent replicas and retention --------------------------


def test_group_replicas_are_crash_consistent_and_retention_holds(sites: Sites) -> None:
    a, b = make_sites(sites, "site-a", "site-b")
    sites.start()
    for volume in ("db-data", "db-log"):
        op(a, "volume.create", name=volume, size=1 * MiB)
    # The writer writes N into db-data, then into db-log, then N+1 ...: at any one instant
    # db-data holds N and db-log N or N-1. A group snapshot taken at one instant shows exactly
    # such a pair; members snapshotted at different instants would show other pairs. It runs
    # before the group loads, whose first snapshot is taken at once.
    writer = Writer(a, ["db-data", "db-log"])
    writer.start()
    wait_for("the writer's first generation", lambda: writer.gen > 0, timeout=10)
    (a.root / "policies" / "db.yaml").write_text(
        policy("db", '["db-*"]', targets=(("site-b", "1m", 2),)))
    applied = pg_apply(a)
    assert applied.returncode == 0, applied.stderr
    assert b"loaded 1 protection group: db" in applied.stdout
    checked: dict[str, tuple[int, int]] = {}   # replica name -> (db-data gen, db-log gen)
    seen: set[str] = set()
    deadline = time.monotonic() + 45
    try:
        while len(checked) < 4:
            assert time.monotonic() < deadline, f"only {len(checked)} group replicas arrived"
            assert writer.is_alive(), writer.error
            replicas = op(b, "group.list", pg="site-a/db")
            for replica in replicas:
                name = replica["name"]
                seen.add(name)
                if name in checked:
                    continue
                assert sorted(replica["members"]) == [f"site-a/db-data@{name}",
                                                      f"site-a/db-log@{name}"]
                try:
                    pair = (read_gen(b, f"site-a/db-data@{name}"),
                            read_gen(b, f"site-a/db-log@{name}"))
                except UserError as exc:  # pruned by retention between list and read
                    assert "unknown" in str(exc), exc
                    continue
                checked[name] = pair
            time.sleep(0.2)
    finally:
        last_gen = writer.stop()

    assert len(checked) >= 3
    for name, (data, log) in checked.items():
        assert data - log in (0, 1), f"replica {name} is not crash-consistent: db-data holds " \
            f"generation {data}, db-log {log}"
    pairs = [checked[name] for name in sorted(checked)]
    assert pairs == sorted(pairs), f"replicas went back in time: {pairs}"
    assert pairs[-1][0] > pairs[0][0], f"the replicas do not follow the writer: {pairs}"

    # One more cycle after the writer stopped: the newest replica holds its last generation in
    # both volumes (read through the real CLI), and retention has pruned at both ends.
    def final_replica() -> str | None:
        names = group_names(b, "site-a/db")
        if names and read_gen(b, f"site-a/db-log@{names[-1]}") == last_gen:
            return names[-1]
        return None

    final = wait_for("the writer's last generation at site-b", final_replica, 20)
    for volume in ("db-data", "db-log"):
        out = b.cli("snapshot", "read", f"site-a/{volume}@{final}", "--offset", "0",
                    "--length", str(GEN_LEN)).stdout
        assert parse_gen(out) == last_gen

    def retention_held() -> bool:
        at_b = group_names(b, "site-a/db")
        at_a = group_names(a, "db")
        seen.update(at_b)
        base = status(a)["groups"]["db"]["targets"]["site-b"]["last_replica"]
        # Beyond the 2 newest, site-a may keep only the base site-b holds.
        return len(at_b) <= 2 and {f"db@{n}" for n in at_a[:-2]} <= {base}

    wait_for("keep_last: 2 at both sites", retention_held, 15)
    report = a.json("status")
    group = report["groups"]["db"]
    assert group["members"] == ["db-data", "db-log"]
    assert group["last_snapshot_error"] is None
    target = group["targets"]["site-b"]
    assert target["rpo_status"] == "OK" and target["last_error"] is None, target
    assert report["policy_errors"] == []

    # Unload the group (its file removed): no more snapshots, so what retention left at both
    # ends stays put, and the CLI's snapshot lists show it.
    (a.root / "policies" / "db.yaml").unlink()
    applied = pg_apply(a)
    assert applied.returncode == 0 and b"loaded 0 protection groups" in applied.stdout
    assert "db" not in status(a)["groups"]
    time.sleep(1.5)  # a transfer already under way finishes

    def snapshot_names(site: Site, volume: str) -> list[str]:
        return sorted(s["name"] for s in site.json("snapshot", "list")
                      if s["volume"] == volume)

    at_a, at_b = group_names(a, "db"), group_names(b, "site-a/db")
    seen.update(at_b)
    assert len(seen) >= 5, f"too few replicas arrived to see retention work: {sorted(seen)}"
    assert 1 <= len(at_b) <= 2, at_b
    # Beyond the 2 newest, site-a may keep only the base site-b holds (its newest replica).
    assert set(at_a[:-2]) <= {at_b[-1]} and 1 <= len(at_a) <= 3, (at_a, at_b)
    assert at_b[-1] in at_a
    for volume in ("db-data", "db-log"):
        assert snapshot_names(b, f"site-a/{volume}") == at_b
        assert snapshot_names(a, volume) == at_a
    time.sleep(2.5)
    assert (group_names(a, "db"), group_names(b, "site-a/db")) == (at_a, at_b), \
        "an unloaded group still snapshots"


# -- two targets, one down --------------------------------------------------------------------


def test_a_target_that_is_down_violates_its_rpo_and_catches_up_incrementally(
        sites: Sites, tmp_path: Path) -> None:
    a, b, c = make_sites(sites, "site-a", "site-b", "site-c")
    metrics_port = free_port()
    configure(a, a.root / "policies", metrics_port=metrics_port)
    sites.start()
    for volume in ("app-1", "app-2"):
        image = tmp_path / f"{volume}.img"
        image.write_bytes(os.urandom(4 * MiB))
        op(a, "volume.import", name=volume, path=str(image))
        write_gen(a, volume, 0)
    (a.root / "policies" / "app.yaml").write_text(policy(
        "app", '["app-*"]', targets=(("site-b", "1m", 2), ("site-c", "4s", 2))))
    assert pg_apply(a).returncode == 0

    def targets() -> dict[str, Any]:
        return dict(status(a)["groups"]["app"]["targets"])

    def both_replicated() -> dict[str, Any] | None:
        t = targets()
        ok = all(t[s]["last_replica"] and t[s]["last_error"] is None for s in ("site-b",
                                                                               "site-c"))
        return t if ok else None

    first = wait_for("the first replicas at site-b and site-c", both_replicated, 30)
    # The first transfer to site-c is a full one: 8 MiB of random data.
    full = metric(admin_metrics(a), "replication_bytes_sent_total", pg="app", target="site-c")
    assert full >= 8 * MiB, first

    writer = Writer(a, ["app-1"], pause=0.3)
    writer.start()
    try:
        c.stop()
        b_replicas: set[str] = set()

        def violated() -> dict[str, Any] | None:
            t = targets()
            b_replicas.add(t["site-b"]["last_replica"])
            # site-b keeps receiving while site-c is down: three replicas newer than site-c's
            # (keep_last: 2 alone would have pruned site-c's base by then).
            newer = [r for r in b_replicas if r > t["site-c"]["last_replica"]]
            if t["site-c"]["rpo_status"] == "VIOLATED" and len(newer) >= 3:
                return t
            return None

        t = wait_for("site-c to violate its RPO while site-b keeps receiving", violated, 30)
        base = t["site-c"]["last_replica"]
        base_name = base.split("@", 1)[1]
        # site-a still holds the base site-c has (its next incremental starts there); the
        # other group snapshots follow keep_last: 2, plus the one site-c's failing transfer
        # may still be retrying (a snapshot being sent is kept until its transfers end).
        at_a = group_names(a, "app")
        assert base_name in at_a, f"site-c's base {base} was pruned at site-a: {at_a}"
        assert len([n for n in at_a if n != base_name]) <= 3, at_a
        base_gen = read_gen(a, f"app-1@{base_name}")
        sent_before = metric(admin_metrics(a), "replication_bytes_sent_total", pg="app",
                             target="site-c")
        assert t["site-b"]["rpo_status"] == "OK" and t["site-b"]["last_error"] is None, t
        assert t["site-c"]["last_error"], t["site-c"]

        # The same through the CLI and the metrics listener.
        report = a.json("status")["groups"]["app"]["targets"]
        assert report["site-c"]["rpo_status"] == "VIOLATED"
        assert report["site-c"]["rpo_seconds"] == 4
        assert report["site-c"]["age_seconds"] > 4
        assert report["site-c"]["last_replica"] == base
        assert report["site-b"]["rpo_status"] == "OK"
        text = http_metrics(metrics_port)
        assert metric(text, "replication_rpo_status", pg="app", target="site-c") == 2
        assert metric(text, "replication_rpo_status", pg="app", target="site-b") == 0
        assert metric(text, "replication_errors_total", pg="app", target="site-c") >= 1
        assert metric(text, "replication_rpo_seconds", pg="app", target="site-c") == 4
        cli_text = a.cli("status", "--metrics").stdout.decode()
        assert metric(cli_text, "replication_rpo_status", pg="app", target="site-c") == 2
        assert metric(cli_text, "replication_rpo_seconds", pg="app", target="site-c") == 4

        # site-c (its store read by the CLI while it is down) holds that base too.
        held = c.cli("snapshot", "read", f"site-a/app-1@{base_name}", "--offset", "0",
                     "--length", str(GEN_LEN)).stdout
        assert parse_gen(held) == base_gen

        # site-c comes back: it catches up with what changed, not with a full transfer.
        c.start()

        def caught_up() -> dict[str, Any] | None:
            tc = targets()["site-c"]
            if tc["last_replica"] != base and tc["last_error"] is None \
                    and tc["rpo_status"] == "OK":
                return tc
            return None

        tc = wait_for("site-c to catch up", caught_up, 30)
        sent_after = metric(admin_metrics(a), "replication_bytes_sent_total", pg="app",
                            target="site-c")
    finally:
        writer.stop()
    catch_up = sent_after - sent_before
    assert 0 < catch_up < full / 10, f"catch-up sent {catch_up} bytes, a full transfer {full}"
    assert tc["bytes_sent"] < full / 10, tc
    # site-c now holds a newer replica, with what site-a's snapshot holds.
    newest = group_names(c, "site-a/app")[-1]
    assert newest > base_name
    gen = read_gen(c, f"site-a/app-1@{newest}")
    assert gen > base_gen
    if newest in group_names(a, "app"):
        assert gen == read_gen(a, f"app-1@{newest}")


# -- policy errors ----------------------------------------------------------------------------


BAD_POLICIES = {
    # file name: (text, line, field or None, what the message says)
    "unknown-site.yaml": (policy("unknown", '["x-*"]', targets=(("site-x", "1m", 2),)), 7,
                          "replication[0].site",
                          "expected one of the peer sites (site-b), got 'site-x'"),
    "short-rpo.yaml": (policy("shortrpo", '["y-*"]', schedule="1m",
                              targets=(("site-b", "30s", 2),)), 10, "replication[0].rpo",
                       "expected at least 1m, as snapshot.schedule '1m' leaves up to 1m "
                       "between runs, got 30s"),
    "keeps-nothing.yaml": (policy("nothing", '["z-*"]', keep=0), 5, "snapshot.retention",
                           "this retention would keep nothing"),
    "malformed.yaml": ('name: broken\nmembers: ["db-*"\nsnapshot:\n  schedule: 2s\n', 3, None,
                       "not valid YAML"),
}


def error_lines(stderr: bytes) -> list[str]:
    return [line.removeprefix("dvx-dr: error: ")
            for line in stderr.decode().splitlines() if line.startswith("dvx-dr: error: ")]


def expect_error(lines: list[str], path: Path, line: int, field: str | None,
                 message: str) -> str:
    """The one error line about ``path``; it names the file, the line and the field."""
    mine = [text for text in lines if text.startswith(f"policy {path} ")]
    assert len(mine) == 1, f"expected one error about {path}, got {lines}"
    prefix = f"policy {path} line {line}: " + (f"{field}: " if field else "")
    assert mine[0].startswith(prefix), f"{mine[0]!r} does not start with {prefix!r}"
    assert message in mine[0], mine[0]
    return mine[0]


def test_policy_errors_name_file_line_and_field(sites: Sites, tmp_path: Path) -> None:
    # pg validate: no site needed.
    files = tmp_path / "validate"
    files.mkdir()
    for name, (text, *_) in BAD_POLICIES.items():
        (files / name).write_text(text)
    good = files / "good.yaml"
    good.write_text(policy("good", '["db-*"]', targets=(("site-b", "1m", 2),)))
    paths = [files / name for name in BAD_POLICIES]
    out = dvx("pg", "validate", good, *paths, "--site", "site-b", check=False)
    assert out.returncode == 2, out
    assert out.stdout.decode() == f"{good}: ok (group good, 1 target)\n"
    lines = error_lines(out.stderr)
    assert len(lines) == len(BAD_POLICIES), lines
    for name, (_, line, field, message) in BAD_POLICIES.items():
        expect_error(lines, files / name, line, field, message)

    # The same files in a running site's policy directory, next to a good one that runs.
    (a,) = make_sites(sites, "site-a")
    a.peers["site-b"] = f"https://{HOST}:{free_port()}"  # a peer that never runs
    configure(a, a.root / "policies")
    policies = a.root / "policies"
    sites.start("site-a")
    for volume in ("db-data", "db-log"):
        op(a, "volume.create", name=volume, size=256 * KiB)
    (policies / "10-good.yaml").write_text(policy("good", '["db-*"]', keep=3))
    assert pg_apply(a).returncode == 0
    first = wait_for("a snapshot of the good group",
                     lambda: status(a)["groups"]["good"]["last_snapshot"], 10)

    # A second group claiming db-log (the good group has it), the bad files, then apply.
    (policies / "20-claims.yaml").write_text(
        policy("claims", '["other", "db-l*"]', keep=3))
    for name, (text, *_) in BAD_POLICIES.items():
        (policies / f"30-{name}").write_text(text)
    applied = pg_apply(a)
    assert applied.returncode == 2
    assert applied.stdout.decode() == "loaded 1 protection group: good\n"
    lines = error_lines(applied.stderr)
    assert len(lines) == len(BAD_POLICIES) + 1, lines
    claim = expect_error(lines, policies / "20-claims.yaml", 2, "members[1]",
                         "expected volumes no other group has, got 'db-log' (already in "
                         "'good' from 10-good.yaml)")
    for name, (_, line, field, message) in BAD_POLICIES.items():
        expect_error(lines, policies / f"30-{name}", line, field, message)

    # The good group keeps snapshotting; status shows every policy error.
    def snapshots_after(after: str) -> str | None:
        last = status(a)["groups"]["good"]["last_snapshot"]
        return last if last > after else None

    second = wait_for("the good group to keep snapshotting", lambda: snapshots_after(first),
                      10)
    wait_for("another snapshot of the good group", lambda: snapshots_after(second), 10)
    report = a.json("status")
    assert sorted(report["groups"]) == ["good"]
    assert report["groups"]["good"]["last_snapshot_error"] is None
    assert set(report["policy_errors"]) == set(lines)
    assert claim in report["policy_errors"]
    assert len(group_names(a, "good")) >= 3


# -- hooks ------------------------------------------------------------------------------------


def test_validate_checks_targets_against_the_site_config(sites: Sites) -> None:
    (a,) = make_sites(sites, "site-a")
    a.peers["site-b"] = f"https://{HOST}:{free_port()}"
    configure(a, a.root / "policies")
    policies = a.root / "policies"
    (policies / "good.yaml").write_text(policy("good", '["db-*"]', targets=(("site-b", "1m", 2),)))
    (policies / "elsewhere.yaml").write_text(
        policy("elsewhere", '["web-*"]', targets=(("site-z", "1m", 2),)))

    # Without --config or --site the target names cannot be checked, and it says so.
    out = dvx("pg", "validate", policies / "elsewhere.yaml")
    assert out.stdout.decode() == (f"{policies / 'elsewhere.yaml'}: ok (group elsewhere, "
                                   "1 target; target site names not checked: pass --config)\n")

    # With --config, the policy directory's files against the configured peers: the unknown
    # target is the error 'pg apply' would give.
    out = dvx("pg", "validate", "--config", a.config, check=False)
    assert out.returncode == 2, out
    assert out.stdout.decode() == f"{policies / 'good.yaml'}: ok (group good, 1 target)\n"
    (line,) = error_lines(out.stderr)
    assert line.startswith(f"policy {policies / 'elsewhere.yaml'} line "), line
    assert "replication[0].site: expected one of the peer sites (site-b), got 'site-z'" in line


def test_a_group_lists_its_members_before_its_first_snapshot(sites: Sites) -> None:
    """Its members, as soon as it loads (it had none until its first snapshot)."""
    (a,) = make_sites(sites, "site-a")
    configure(a, a.root / "policies")
    sites.start("site-a")
    for volume in ("db-data", "db-log", "web"):
        op(a, "volume.create", name=volume, size=256 * KiB)
    # A cron schedule: an interval's first snapshot is taken at once.
    (a.root / "policies" / "db.yaml").write_text(
        policy("db", '["db-*"]', schedule="'0 3 * * *'"))
    assert pg_apply(a).returncode == 0
    group = status(a)["groups"]["db"]
    assert group["last_snapshot"] is None
    assert group["members"] == ["db-data", "db-log"]
    listed = dvx("pg", "list", "--config", a.config).stdout.decode().splitlines()
    assert listed[1].split()[:2] == ["db", "2"], listed


def test_a_new_group_is_snapshotted_at_once_not_an_interval_later(sites: Sites) -> None:
    """A group applied with 'schedule: 1h' took its first snapshot an hour later: its volumes
    had no protection for a whole interval."""
    (a,) = make_sites(sites, "site-a")
    sites.start("site-a")
    op(a, "volume.create", name="vm1", size=256 * KiB)
    (a.root / "policies" / "g.yaml").write_text(policy("g", '["vm1"]', schedule="1h"))
    assert pg_apply(a).returncode == 0
    wait_for("the group's first snapshot", lambda: group_names(a, "g"), timeout=10)
    assert status(a)["groups"]["g"]["last_snapshot"] is not None


def test_a_site_stopped_during_a_post_snapshot_step_logs_no_traceback(sites: Sites) -> None:
    """The snapshot job caught the stop (a cancellation) while it took the snapshot, but not
    in the steps after it (the post-snapshot hook, local retention): APScheduler logged a
    traceback ("Job ... raised an exception ... CancelledError")."""
    (a,) = make_sites(sites, "site-a")
    sites.start("site-a")
    op(a, "volume.create", name="vm1", size=256 * KiB)
    (a.root / "policies" / "g.yaml").write_text(policy(
        "g", '["vm1"]', schedule="1h", hooks=hook("sleep 20", "30s", "post_snapshot")))
    assert pg_apply(a).returncode == 0
    wait_for("the snapshot", lambda: group_names(a, "g"), timeout=10)
    assert a.stop(timeout=15) == 0
    assert "post-snapshot steps interrupted: the site is stopping" in a.log(), a.log()[-3000:]
    assert site_bugs(sites) == {}


def hook(command: str, timeout: str, which: str = "pre_snapshot") -> str:
    return f"hooks:\n  {which}:\n    command: {command!r}\n    timeout: {timeout}\n"


def test_a_failing_or_hanging_hook_fails_its_snapshot_and_nothing_else(sites: Sites) -> None:
    (a,) = make_sites(sites, "site-a")
    policies = a.root / "policies"
    sites.start("site-a")
    for volume in ("h-1", "h-2", "p-1"):
        op(a, "volume.create", name=volume, size=256 * KiB)
    hooked = policies / "hooked.yaml"
    hooked.write_text(policy("hooked", '["h-*"]', keep=3,
                             hooks=hook("echo cannot quiesce the database; exit 1", "5s")))
    (policies / "plain.yaml").write_text(policy("plain", '["p-*"]', keep=3))
    assert pg_apply(a).returncode == 0

    def groups() -> dict[str, Any]:
        return dict(status(a)["groups"])

    def plain_snapshots_after(after: str | None) -> str | None:
        last = groups()["plain"]["last_snapshot"]
        return last if last and (after is None or last > after) else None

    def hooked_error(text: str) -> dict[str, Any] | None:
        g = groups()["hooked"]
        return g if g["last_snapshot_error"] and text in g["last_snapshot_error"] else None

    # The hook exits 1: the snapshot is not taken, and status says why.
    g = wait_for("the failing hook's error", lambda: hooked_error("exited 1"), 10)
    assert g["last_snapshot_error"] == ("group hooked: pre_snapshot hook exited 1 (cannot "
                                        "quiesce the database); snapshot not taken")
    assert g["last_snapshot"] is None and g["last_snapshot_error_time"]
    assert g["members"] == ["h-1", "h-2"]
    assert group_names(a, "hooked") == []
    assert metric(admin_metrics(a), "snapshot_errors", pg="hooked") == 1
    assert metric(admin_metrics(a), "snapshot_errors", pg="plain") == 0
    # ... and the other group keeps snapshotting.
    mark = wait_for("plain snapshots", lambda: plain_snapshots_after(None), 10)
    mark = wait_for("plain snapshots", lambda: plain_snapshots_after(mark), 10)
    report = a.json("status")["groups"]
    assert report["hooked"]["last_snapshot_error"] == g["last_snapshot_error"]
    assert report["plain"]["last_snapshot_error"] is None

    # The hook runs past its timeout (sleep 10, timeout 1s): killed after 1s, the snapshot is
    # not taken, and the next runs come on schedule (not after the 10 s the hook wanted).
    hooked.write_text(policy("hooked", '["h-*"]', keep=3, hooks=hook("sleep 10", "1s")))
    applied_at = time.monotonic()
    assert pg_apply(a).returncode == 0
    wait_for("the hook's timeout error", lambda: hooked_error("timed out"), 8)
    took = time.monotonic() - applied_at
    g = groups()["hooked"]
    assert g["last_snapshot_error"] == ("group hooked: pre_snapshot hook timed out after 1s; "
                                        "snapshot not taken")
    first_error = g["last_snapshot_error_time"]
    assert took < 7, f"the 1s hook timeout was reported only after {took:.1f}s"
    wait_for("the next timed-out run",
             lambda: groups()["hooked"]["last_snapshot_error_time"] != first_error, 8)
    assert group_names(a, "hooked") == []
    mark = wait_for("plain snapshots", lambda: plain_snapshots_after(mark), 10)
    wait_for("plain snapshots", lambda: plain_snapshots_after(mark), 10)

    # A post-snapshot hook that fails: the snapshot was taken (the status must not say
    # otherwise), and the failure is reported.
    hooked.write_text(policy("hooked", '["h-*"]', keep=3,
                             hooks=hook("echo cannot resume; exit 3", "5s", "post_snapshot")))
    assert pg_apply(a).returncode == 0
    g = wait_for("the post-snapshot hook's error", lambda: hooked_error("post_snapshot"), 8)
    taken = group_names(a, "hooked")
    assert taken, "the snapshot before the failed post-snapshot hook is gone"
    assert re.fullmatch(r"group hooked: post_snapshot hook exited 3 \(cannot resume\); "
                        r"snapshot hooked@(\S+) was taken and is replicated",
                        g["last_snapshot_error"]), g
    assert g["last_snapshot_error"].rsplit("@", 1)[1].split()[0] in taken

    # Fixed and applied: the group snapshots again and the error is gone.
    hooked.write_text(policy("hooked", '["h-*"]', keep=3, hooks=hook("true", "5s")))
    assert pg_apply(a).returncode == 0

    def hooked_snapshots() -> dict[str, Any] | None:
        g = groups()["hooked"]
        return g if g["last_snapshot"] and g["last_snapshot_error"] is None else None

    g = wait_for("the fixed hook's snapshots", hooked_snapshots, 15)
    assert g["last_snapshot"] in {f"hooked@{n}" for n in group_names(a, "hooked")}
    assert metric(admin_metrics(a), "snapshot_errors", pg="hooked") == 0
    report = a.json("status")["groups"]
    assert report["hooked"]["last_snapshot_error"] is None
    assert report["plain"]["last_snapshot_error"] is None

    # A hook still running when the site stops is killed with it, not left behind.
    pid_file = a.root / "hook.pid"
    hooked.write_text(policy("hooked", '["h-*"]', keep=3,
                             hooks=hook(f"echo $$ > {pid_file}; sleep 30; true", "1m")))
    assert pg_apply(a).returncode == 0

    def hook_pid() -> int | None:
        text = pid_file.read_text().strip() if pid_file.exists() else ""
        return int(text) if text.isdigit() else None

    pgid = wait_for("the long hook to start", hook_pid, 8)
    assert process_group_alive(pgid)
    assert a.stop() == 0
    wait_for("the hook's processes to end with the site",
             lambda: not process_group_alive(pgid), 5, interval=0.1)
    assert "group hooked: snapshot interrupted: the site is stopping" in a.log()


def process_group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


# -- retention and reloads never cost a snapshot that is needed -------------------------------


def test_a_snapshot_being_sent_is_kept_when_another_target_of_its_group_fails(
        sites: Sites, tmp_path: Path) -> None:
    """Two targets after each snapshot, one down, the other slowed by a bandwidth limit;
    ``keep_last: 1`` on a 3-second schedule. The failing target's transfer gave up while the
    slow one was still sending the same snapshot, and the next snapshot's retention deleted it
    under that transfer. Now every snapshot a transfer is sending stays until the last one
    ends: each replica that reaches the slow target was still held at the source when its
    transfer finished."""
    a, _, c = make_sites(sites, "site-a", "site-b", "site-c")
    sites.start("site-a", "site-c")  # site-b stays down
    image = tmp_path / "img"
    image.write_bytes(os.urandom(4 * MiB))
    a.cli("volume", "import", "vm1", image)
    text = policy("g", '["vm1"]', schedule="3s", keep=1,
                  targets=(("site-b", "1h", 1), ("site-c", "1h", 1)))
    text = text.replace("    rpo: 1h\n", "    rpo: 1h\n    bandwidth_limit: 512KiB/s\n")
    (a.root / "policies" / "g.yaml").write_text(text)
    pg_apply(a)

    def replicated() -> list[str] | None:
        lines = [line for line in a.log().splitlines() if "-> site-c:" in line
                 and " replicated (" in line]
        return lines if len(lines) >= 2 else None

    wait_for("two replicas at site-c", replicated, timeout=60)
    log = a.log().splitlines()  # in the order things happened
    for n, line in enumerate(log):
        if "-> site-c:" in line and " replicated (" in line:
            spec = re.search(r"(g@\S+) replicated", line)
            assert spec, line
            early = [d for d in log[:n] if "retention for g deleted" in d and spec[1] in d]
            assert not early, f"{spec[1]} was deleted while it was being sent: {early}"
    assert any("-> site-b" in line and "replication failed" in line for line in log), \
        "site-b's failure never happened"


def test_retention_keeps_group_snapshots_an_operator_named(sites: Sites) -> None:
    """``keep_last: 1`` on a 1-second schedule prunes the scheduler's snapshots, not one taken
    by hand with a name (as zrepl and sanoid prune only their own)."""
    (a,) = make_sites(sites, "site-a")
    sites.start()
    a.cli("volume", "create", "vm1", "--size", "1MiB")
    (a.root / "policies" / "g.yaml").write_text(policy("g", '["vm1"]', schedule="1s", keep=1))
    pg_apply(a)
    a.cli("pg", "snapshot-create", "g", "vm1", "--name", "before-upgrade")
    first = wait_for("a scheduled snapshot", lambda: [n for n in group_names(a, "g")
                                                      if n != "before-upgrade"], timeout=20)
    wait_for("retention of the scheduled snapshots",
             lambda: first[0] not in group_names(a, "g"), timeout=20)
    assert "before-upgrade" in group_names(a, "g")
    assert any(s["snapshot"] == "vm1@before-upgrade" for s in a.json("snapshot", "list"))


def test_reloads_do_not_postpone_an_unchanged_schedule(sites: Sites) -> None:
    """A reload every second of an unchanged policy on a 3-second interval: each reload had
    restarted the interval, so no snapshot was ever taken. Now the job keeps its next run."""
    (a,) = make_sites(sites, "site-a")
    sites.start()
    a.cli("volume", "create", "vm1", "--size", "1MiB")
    (a.root / "policies" / "g.yaml").write_text(policy("g", '["vm1"]', schedule="3s", keep=5))
    pg_apply(a)
    before = status(a)["groups"]["g"]["next_snapshot"]
    for _ in range(10):
        time.sleep(1)
        assert "error" not in remote.call(str(a.admin_socket), "reload")
    assert len(group_names(a, "g")) >= 2  # at 3 s and 6 s, and 9 s
    assert status(a)["groups"]["g"]["next_snapshot"] != before


def test_a_trigger_during_a_transfer_runs_once_it_ends(sites: Sites, tmp_path: Path) -> None:
    """Snapshots every 4 s; the first transfer takes about 12 s (6 MiB at 512 KiB/s), so the
    snapshots taken meanwhile trigger replication while it runs. Those triggers were dropped,
    and the next transfer waited for the next snapshot; now one more transfer starts as soon
    as the first ends, of the snapshot newest at that moment."""
    a, b = make_sites(sites, "site-a", "site-b")
    sites.start()
    image = tmp_path / "img"
    image.write_bytes(os.urandom(6 * MiB))
    a.cli("volume", "import", "vm1", image)
    text = policy("g", '["vm1"]', schedule="4s", keep=10, targets=(("site-b", "1h", 10),))
    (a.root / "policies" / "g.yaml").write_text(
        text.replace("    rpo: 1h\n", "    rpo: 1h\n    bandwidth_limit: 512KiB/s\n"))
    pg_apply(a)

    def two_replicas() -> list[int] | None:
        log = a.log().splitlines()
        done = [n for n, line in enumerate(log) if "-> site-b:" in line and " replicated (" in line]
        return done if len(done) >= 2 else None

    first, second = wait_for("two replicas at site-b", two_replicas, timeout=60)[:2]
    log = a.log().splitlines()
    taken = [m[1] for line in log[:first] if (m := re.search(r"snapshot (g@\S+) of", line))]
    assert len(taken) >= 2, "no snapshot was taken during the first transfer"
    # The one newest when the first transfer ended (or, should the 4-second schedule fire
    # in the instant between, the one it took then).
    instant = [m[1] for line in log[first:second] if (m := re.search(r"snapshot (g@\S+) of", line))
               and _log_time(line) - _log_time(log[first]) < 0.5]
    sent = re.search(r"(g@\S+) replicated", log[second])
    assert sent and sent[1] in (taken[-1], *instant), (taken[-1], log[second])


def _log_time(line: str) -> float:
    """Seconds since midnight of a site log line's time stamp (``YYYY-MM-DD HH:MM:SS,mmm``)."""
    hours, minutes, seconds = line.split()[1].replace(",", ".").split(":")
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def test_a_target_never_replicated_stays_violated_across_a_restart(sites: Sites) -> None:
    """The age of a target that never got a replica counts from when it was configured, kept
    in the store: a restart had reset it to zero, so a site restarted more often than the RPO
    never reported the target unprotected."""
    a, _ = make_sites(sites, "site-a", "site-b")
    sites.start("site-a")  # site-b never runs
    a.cli("volume", "create", "vm1", "--size", "1MiB")
    (a.root / "policies" / "g.yaml").write_text(
        policy("g", '["vm1"]', schedule="2s", targets=(("site-b", "3s", 2),)))
    pg_apply(a)

    def target() -> dict[str, Any]:
        return dict(status(a)["groups"]["g"]["targets"]["site-b"])

    wait_for("the RPO to be violated", lambda: target()["rpo_status"] == "VIOLATED", 20)
    a.stop()
    a.start()
    t = target()
    assert t["last_replica"] is None
    assert t["rpo_status"] == "VIOLATED", t
    assert t["age_seconds"] > 3, t


def test_a_running_group_keeps_its_place_against_new_and_broken_files(sites: Sites) -> None:
    """A file added beside a running group's, claiming its volumes (here all of them), used to
    win when its name sorted first, unloading the running group (gone from status and
    metrics). And an edit that broke a running group's file unloaded it too. Now the running
    group keeps its volumes, and keeps running on its last good version, with the errors
    reported."""
    (a,) = make_sites(sites, "site-a")
    sites.start()
    a.cli("volume", "create", "fin-1", "--size", "1MiB")
    policies = a.root / "policies"
    (policies / "finance.yaml").write_text(policy("finance", '["fin-*"]', schedule="1h"))
    assert pg_apply(a).returncode == 0
    (policies / "all.yaml").write_text(policy("everything", '["*"]', schedule="1h"))
    applied = pg_apply(a)
    assert applied.returncode == 2
    assert "already in 'finance'" in applied.stderr.decode()
    assert set(status(a)["groups"]) == {"finance"}
    (policies / "all.yaml").unlink()
    (policies / "finance.yaml").write_text(
        policy("finance", '["fin-*"]', schedule="1h").replace("1h", "soon"))
    applied = pg_apply(a)
    err = applied.stderr.decode()
    assert applied.returncode == 2 and "schedule" in err, err
    assert "keeps running on the version of finance.yaml that last loaded" in err, err
    assert status(a)["groups"]["finance"]["next_snapshot"] is not None
    assert 'pg="finance"' in admin_metrics(a)
    # A running group's file edited to claim another running group's volume: the edited
    # file is the one refused, and both groups go on.
    (policies / "finance.yaml").write_text(policy("finance", '["fin-*"]', schedule="1h"))
    a.cli("volume", "create", "web-1", "--size", "1MiB")
    (policies / "web.yaml").write_text(policy("web", '["web-*"]', schedule="1h"))
    assert pg_apply(a).returncode == 0
    (policies / "finance.yaml").write_text(policy("finance", '["fin-*", "web-*"]',
                                                  schedule="1h"))
    applied = pg_apply(a)
    assert "finance.yaml" in applied.stderr.decode() and "already in 'web'" in \
        applied.stderr.decode(), applied.stderr.decode()
    assert set(status(a)["groups"]) == {"finance", "web"}


def test_gc_deletes_nothing_a_running_transfer_still_reads(sites: Sites, tmp_path: Path) -> None:
    """A group snapshot deleted by hand while a (slow) transfer sends it, then gc at the
    source: gc deleted the snapshot's blocks under the transfer, which failed. Now gc deletes
    nothing while a transfer runs at the site (and says so), and the replica arrives whole."""
    a, b = make_sites(sites, "site-a", "site-b")
    sites.start()
    data = random.Random(9).randbytes(4 * MiB)
    image = tmp_path / "img"
    image.write_bytes(data)
    a.cli("volume", "import", "vm1", image)
    text = policy("g", '["vm1"]', schedule="3s", keep=5, targets=(("site-b", "2h", 5),))
    (a.root / "policies" / "g.yaml").write_text(
        text.replace("    rpo: 2h\n", "    rpo: 2h\n    bandwidth_limit: 512KiB/s\n"))
    pg_apply(a)

    def sending() -> str | None:
        progress = status(a)["groups"]["g"]["targets"]["site-b"]["progress"]
        return progress["snapshot"] if progress and progress["payload_bytes"] else None

    spec = wait_for("the transfer to be under way", sending, timeout=20)
    a.cli("pg", "snapshot-delete", spec)
    a.cli("volume", "delete", "vm1")
    out = a.cli("datastore", "gc").stdout.decode()
    assert "were open, so no blob was deleted" in out, out
    replica = f"site-a/{spec}"
    wait_for("the replica at site-b", lambda: any(
        g["snapshot"] == replica for g in op(b, "group.list", pg=None)), timeout=40)
    got = b.cli("snapshot", "read", f"site-a/vm1@{spec.split('@')[1]}", "--length",
                str(len(data))).stdout
    assert got == data


def test_a_peer_removed_by_a_reload_gets_no_more_of_a_running_transfer(
        sites: Sites, tmp_path: Path) -> None:
    """site-a and site-b each take the other out of their peers (site.yaml, SIGHUP) while a
    slow scheduled transfer runs between them: the transfer had gone on to its end, and site-b
    kept site-a's session (and its hold on gc) until it lapsed. Now site-a stops sending
    within a batch and says why, and site-b drops site-a's session at once."""
    a, b = make_sites(sites, "site-a", "site-b")
    sites.start()
    slow_group(a, tmp_path, 10, 4 * MiB, "3s")
    pg_apply(a)

    def target() -> dict[str, Any]:
        return dict(status(a)["groups"]["g"]["targets"]["site-b"])

    wait_for("the transfer to be under way",
             lambda: (target()["progress"] or {}).get("payload_bytes"), timeout=20)
    wait_for("site-b to hold site-a's session", lambda: status(b)["sessions"], timeout=10)
    for site, other in ((a, "site-b"), (b, "site-a")):
        del site.peers[other]
        configure(site, site.root / "policies")  # site.yaml without the peer
        site.reload()
    removed = time.monotonic()
    wait_for("site-b to drop site-a's session", lambda: status(b)["sessions"] == 0,
             timeout=10)
    wait_for("the transfer to stop", lambda: "site-b at https" in a.log()
             and "is no longer a peer in the site's configuration" in a.log(), timeout=15)
    # At 256 KiB/s the 4 MiB transfer had more than 10 s to go.
    assert time.monotonic() - removed < 8
    assert not target()["progress"]
    assert not any(g["snapshot"].startswith("site-a/g@") for g in op(b, "group.list", pg=None))
    assert "is no longer a peer: 1 of its replication sessions here dropped" in b.log()


def test_two_commands_sending_one_snapshot_each_keep_their_own_transfer(
        sites: Sites, tmp_path: Path) -> None:
    """Two ``replicate`` commands for the same snapshot and target, the target down: the site
    kept one status entry for both, so the first command to end (here: given up by its user)
    took it away and the other's next retry failed with an internal KeyError. Each has its
    own entry now, and the one left goes on retrying until the target is back."""
    a, b = make_sites(sites, "site-a", "site-b")
    a.start()
    image = tmp_path / "img"
    image.write_bytes(random.Random(11).randbytes(MiB))
    a.cli("volume", "import", "vm1", image)
    a.cli("snapshot", "create", "vm1", "--name", "s1")
    first = a.popen("replicate", "vm1@s1", "--to", "site-b", "--json")
    second = a.popen("replicate", "vm1@s1", "--to", "site-b", "--json")
    try:
        transfers = wait_for("both transfers in the site's status",
                             lambda: len(status(a)["transfers"]) == 2 and status(a)["transfers"],
                             timeout=20)
        assert {t["snapshot"] for t in transfers} == {"vm1@s1"}
        first.kill()  # its user gives up: the site cancels that transfer alone
        first.wait(timeout=10)
        wait_for("the first transfer to end", lambda: len(status(a)["transfers"]) == 1,
                 timeout=20)
        b.start()
        out, err = second.communicate(timeout=120)
    finally:
        for proc in (first, second):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert second.returncode == 0, err
    assert json.loads(out)["replica"] == "site-a/vm1@s1"
    assert status(a)["transfers"] == []
    assert b.cli("snapshot", "read", "site-a/vm1@s1", "--length", str(MiB)).stdout == \
        image.read_bytes()


def own_schedule(name: str, members: str, target: str, every: str, keep_target: int,
                 schedule: str = "1h") -> str:
    """A policy whose one target replicates on a schedule of its own."""
    return policy(name, members, schedule=schedule, keep=5) + (
        f"replication:\n  - site: {target}\n    schedule: {every}\n"
        f"    retention: {{keep_last: {keep_target}}}\n    rpo: 2h\n")


def replicas_of(site: Site, volume: str) -> list[str]:
    return [s["snapshot"] for s in op(site, "snapshot.list")
            if s["snapshot"].startswith(f"site-a/{volume}@")]


def test_a_group_snapshot_of_some_members_is_not_replicated_as_the_group(sites: Sites) -> None:
    """``pg snapshot-create g vm1`` in a group of vm1 and vm2 (a time-stamp name, like the
    scheduler's): the target's job sent it as the group's newest snapshot, status said OK,
    and target retention (keep_last: 1) deleted the only replica that held vm2. Now only a
    group snapshot holding every member is sent, and status says why the newer one was not."""
    a, b = make_sites(sites, "site-a", "site-b")
    sites.start()
    for v in ("vm1", "vm2"):
        a.cli("volume", "create", v, "--size", "1MiB")
    (a.root / "policies" / "g.yaml").write_text(
        own_schedule("g", '["vm1", "vm2"]', "site-b", "1s", keep_target=1))
    assert pg_apply(a).returncode == 0
    a.cli("pg", "snapshot-create", "g", "vm1", "vm2")
    full = group_names(a, "g")[-1]
    wait_for("the whole group at site-b", lambda: f"site-a/vm2@{full}" in replicas_of(b, "vm2"),
             timeout=20)
    a.cli("pg", "snapshot-create", "g", "vm1")
    part = group_names(a, "g")[-1]
    time.sleep(3)  # three more runs of the target's job
    assert replicas_of(b, "vm2") == [f"site-a/vm2@{full}"]
    assert f"site-a/vm1@{part}" not in replicas_of(b, "vm1")
    target = status(a)["groups"]["g"]["targets"]["site-b"]
    assert target["last_replica"] == f"g@{full}", target
    assert f"g@{part}" in target["skipped"] and "vm2" in target["skipped"], target


def test_a_restart_keeps_the_schedule_and_the_last_success(sites: Sites) -> None:
    """A restart restarted every interval (a site restarted more often than its interval never
    snapshotted), and forgot when the last transfer succeeded (null in status, 0 in the
    metrics). Now the next snapshot is due an interval after the newest one, at once if that
    is past, and the last success is read back from the store."""
    a, b = make_sites(sites, "site-a", "site-b")
    sites.start()
    a.cli("volume", "create", "vm1", "--size", "1MiB")
    (a.root / "policies" / "g.yaml").write_text(
        policy("g", '["vm1"]', schedule="6s", keep=5, targets=(("site-b", "1h", 5),)))
    assert pg_apply(a).returncode == 0

    def target() -> dict[str, Any]:
        return dict(status(a)["groups"]["g"]["targets"]["site-b"])

    success = wait_for("a replica", lambda: target()["last_success"], timeout=20)
    newest = group_names(a, "g")[-1]
    a.stop()
    time.sleep(6.5)  # the next snapshot falls due while the site is down
    a.start()
    started = time.monotonic()
    # Read back from the store (or already newer: the overdue snapshot may have gone out).
    after = target()["last_success"]
    assert after is not None and after >= success, (after, success)
    assert metric(admin_metrics(a), "replication_last_success_timestamp_seconds", pg="g",
                  target="site-b") > 0
    wait_for("a snapshot soon after the start", lambda: group_names(a, "g")[-1] != newest,
             timeout=4, interval=0.1)
    assert time.monotonic() - started < 4


def test_a_target_behind_the_newest_snapshot_is_replicated_at_start(sites: Sites) -> None:
    """A snapshot not yet replicated when the site stopped (a transfer interrupted, or the
    target down) waited for the next scheduled run, a whole interval after the restart. Now a
    target whose newest replica is older than the group's newest snapshot gets it at start."""
    a, b = make_sites(sites, "site-a", "site-b")
    sites.start("site-a")
    a.cli("volume", "create", "vm1", "--size", "1MiB")
    # A cron schedule, so that the one snapshot is the one taken here (an interval schedule
    # takes a new group's first one at once).
    (a.root / "policies" / "g.yaml").write_text(policy(
        "g", '["vm1"]', schedule="'0 3 * * *'", keep=5, targets=(("site-b", "2d", 5),)))
    assert pg_apply(a).returncode == 0
    a.cli("pg", "snapshot-create", "g", "vm1")
    (name,) = group_names(a, "g")
    a.stop()
    b.start()
    a.start()
    wait_for("the snapshot at site-b", lambda: f"site-a/vm1@{name}" in replicas_of(b, "vm1"),
             timeout=15)


def test_a_reload_that_raises_the_bandwidth_limit_speeds_up_the_transfer_in_flight(
        sites: Sites, tmp_path: Path) -> None:
    """An operator raising the limit to let a slow first sync finish saw no change: the
    transfer in flight kept the limit it started with, to its end."""
    a, b = make_sites(sites, "site-a", "site-b")
    sites.start()
    path = slow_group(a, tmp_path, 14, 8 * MiB, "1h")  # 32 s at 256 KiB/s
    assert pg_apply(a).returncode == 0
    wait_for("the transfer to be under way", lambda: (status(a)["groups"]["g"]["targets"][
        "site-b"]["progress"] or {}).get("payload_bytes"), timeout=20)
    path.write_text(path.read_text().replace("256KiB/s", "256MiB/s"))
    raised = time.monotonic()
    assert pg_apply(a).returncode == 0
    wait_for("the replica at site-b", lambda: any(
        g["snapshot"].startswith("site-a/g@") for g in op(b, "group.list", pg=None)),
        timeout=15)
    assert time.monotonic() - raised < 10


def test_a_transfer_stops_when_a_reload_removes_its_target(sites: Sites,
                                                           tmp_path: Path) -> None:
    """The replication entry removed from the policy while a slow transfer ran: status showed
    no target, and the transfer went on to its end unseen, then applied the old target
    retention. Now the reload cancels it, and no replica appears at the target."""
    a, b = make_sites(sites, "site-a", "site-b")
    sites.start()
    path = slow_group(a, tmp_path, 12, 3 * MiB, "2s")
    assert pg_apply(a).returncode == 0
    wait_for("the transfer to be under way", lambda: (status(a)["groups"]["g"]["targets"][
        "site-b"]["progress"] or {}).get("payload_bytes"), timeout=20)
    path.write_text(policy("g", '["vm1"]', schedule="2s", keep=5))
    assert pg_apply(a).returncode == 0
    wait_for("the transfer to be cancelled", lambda: "transfer cancelled: a reload removed "
             "the target" in a.log(), timeout=5)
    time.sleep(3)  # more than the 3 MiB at 256 KiB/s had left, had it gone on
    assert not any(g["snapshot"].startswith("site-a/g@") for g in op(b, "group.list", pg=None))
    assert " replicated (" not in a.log()
