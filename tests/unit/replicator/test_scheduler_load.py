"""Policy reloads of the scheduler that overlap (SIGHUP and ``pg apply`` at once)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dvx_dr.replicator import groupstate
from dvx_dr.replicator import scheduler as schedmod
from dvx_dr.replicator.storethread import StoreThread
from dvx_dr.site import groups, volumes
from dvx_dr.site.store import Store

POLICY = """\
name: g
members: ["v1"]
snapshot: {schedule: 1h, retention: {keep_last: 2}}
replication:
  - {site: site-b, schedule: after-snapshot, rpo: 2h, retention: {keep_last: 2}}
"""


def test_a_reload_that_overlaps_another_waits_for_it(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The first reload is held up in the store thread (here by a delay put in its way);
    meanwhile the group's file is deleted and a second reload starts. The second removed the
    group under the first, which then failed with a KeyError and left its load half done.
    Reloads now run one at a time, and both succeed."""
    store = Store.init(tmp_path / "s", "site-a", 4096, None)
    volumes.create(store, "v1", 1 << 20)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "g.yaml").write_text(POLICY)
    thread = StoreThread(store)
    service = SimpleNamespace(store=thread, config=SimpleNamespace(
        policy_dir=policies, peers={"site-b": "https://127.0.0.1:1"}))
    scheduler = schedmod.Scheduler(service)  # type: ignore[arg-type]
    held = asyncio.Event()
    real_run = thread.run

    async def run(fn: Any, *args: Any) -> Any:
        if fn is groupstate.configured_since and not held.is_set():
            held.set()
            await asyncio.sleep(0.2)  # the second reload happens meanwhile
        return await real_run(fn, *args)

    async def main() -> list[Any]:
        scheduler.scheduler.start()
        try:
            monkeypatch.setattr(thread, "run", run)
            first = asyncio.create_task(scheduler.load())
            await held.wait()
            (policies / "g.yaml").unlink()
            second = asyncio.create_task(scheduler.load())
            return await asyncio.gather(first, second, return_exceptions=True)
        finally:
            scheduler.scheduler.shutdown(wait=False)

    try:
        results = asyncio.run(main())
    finally:
        thread.close()
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert results[0]["loaded"] == ["g"] and results[1]["loaded"] == []


# -- a scheduler over a real store, without a site process ------------------------------------


def group_policy(name: str, members: str, schedule: str = "1h") -> str:
    return (f"name: {name}\nmembers: {members}\n"
            f"snapshot: {{schedule: {schedule}, retention: {{keep_last: 2}}}}\n")


class Rig:
    """A scheduler on a real store and policy directory, its loop driven by ``run``."""

    def __init__(self, tmp_path: Path, *vols: str) -> None:
        self.store = Store.init(tmp_path / "s", "site-a", 4096, None)
        for v in vols:
            volumes.create(self.store, v, 1 << 20)
        self.policies = tmp_path / "policies"
        self.policies.mkdir()
        self.thread = StoreThread(self.store)
        self.config = SimpleNamespace(policy_dir=self.policies, peers={})
        service = SimpleNamespace(store=self.thread, config=self.config)
        self.scheduler = schedmod.Scheduler(service)  # type: ignore[arg-type]

    def write(self, file: str, text: str, mtime: float | None = None) -> None:
        path = self.policies / file
        path.write_text(text)
        if mtime is not None:
            os.utime(path, (mtime, mtime))

    def run(self, steps: Any) -> Any:
        async def main() -> Any:
            self.scheduler.scheduler.start()
            try:
                return await steps()
            finally:
                self.scheduler.scheduler.shutdown(wait=False)

        try:
            return asyncio.run(main())
        finally:
            self.thread.close()


def test_policies_are_parsed_off_the_event_loop(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow parse (here a loader that takes 1 s) froze the event loop, and with it the
    admin socket, the peer API and SIGTERM. Now the loop goes on while the files load."""
    rig = Rig(tmp_path, "v1")
    rig.write("g.yaml", group_policy("g", '["v1"]'))
    real = schedmod.load_policy_dir

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(schedmod, "load_policy_dir", slow)

    async def steps() -> tuple[Any, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticker = asyncio.create_task(tick())
        result = await rig.scheduler.load()
        ticker.cancel()
        return result, ticks

    result, ticks = rig.run(steps)
    assert result["loaded"] == ["g"]
    assert ticks >= 10, f"the event loop ran {ticks} times in the 1 s the load took"


def test_removing_the_policy_dir_unloads_the_groups(tmp_path: Path) -> None:
    """policy_dir taken out of site.yaml, then a reload: it said "loaded 0 protection groups"
    and the groups went on running (a restart would not run them). Now they are unloaded."""
    rig = Rig(tmp_path, "v1")
    rig.write("g.yaml", group_policy("g", '["v1"]'))

    async def steps() -> tuple[Any, Any, list[str]]:
        first = await rig.scheduler.load()
        rig.config.policy_dir = None
        second = await rig.scheduler.load()
        return first, second, [j.id for j in rig.scheduler.scheduler.get_jobs()]

    first, second, jobs = rig.run(steps)
    assert first["loaded"] == ["g"] and second["loaded"] == []
    assert jobs == []
    assert rig.scheduler.report()["groups"] == {}


def test_a_volume_created_in_two_groups_stays_with_the_first(tmp_path: Path) -> None:
    """Groups fin (fin-*) and xvols (*-x) did not overlap when they loaded; then fin-x was
    created. Both groups snapshotted (and replicated) it, and the next reload unloaded xvols
    whole. Now fin-x stays with fin, xvols snapshots the rest and says why, and a reload keeps
    xvols running."""
    rig = Rig(tmp_path, "fin-db", "web-x")
    # Cron: an interval group would take its first snapshot as it loads, and the one this
    # test takes, in the same second, would be refused as a name already taken.
    rig.write("fin.yaml", group_policy("fin", '["fin-*"]', "'0 3 * * *'"))
    rig.write("xvols.yaml", group_policy("xvols", '["*-x"]', "'0 3 * * *'"))

    async def steps() -> tuple[Any, Any, Any]:
        assert (await rig.scheduler.load())["loaded"] == ["fin", "xvols"]
        await rig.thread.run(volumes.create, rig.store, "fin-x", 1 << 20)
        await rig.scheduler.snapshot_job("fin")
        await rig.scheduler.snapshot_job("xvols")
        report = rig.scheduler.report()
        return report, await rig.scheduler.load(), await rig.thread.run(members, rig.store)

    def members(store: Store) -> dict[str, list[list[str]]]:
        return {pg: [[n for n, _ in groups.root_of(store, g).members]
                     for g in groups.list_groups(store, pg)]
                for pg in ("fin", "xvols")}

    report, reloaded, taken = rig.run(steps)
    assert taken == {"fin": [["fin-db", "fin-x"]], "xvols": [["web-x"]]}
    error = report["groups"]["xvols"]["last_snapshot_error"]
    assert error and "'fin-x'" in error and "'fin'" in error, error
    assert report["groups"]["fin"]["last_snapshot_error"] is None
    assert reloaded["loaded"] == ["fin", "xvols"], reloaded


def test_a_touched_file_does_not_hand_a_running_group_to_a_rejected_edit(
        tmp_path: Path) -> None:
    """ga (a.yaml: vma) and gb (b.yaml: vmb) run; b.yaml is edited to claim vma too and is
    refused (gb keeps its last good version). Then a.yaml got a comment: it became the file
    changed last, so the refused claim won: ga was unloaded and gb took vma. Now ga keeps vma."""
    rig = Rig(tmp_path, "vma", "vmb")
    rig.write("a.yaml", group_policy("ga", '["vma"]'), mtime=1000)
    rig.write("b.yaml", group_policy("gb", '["vmb"]'), mtime=1000)

    async def steps() -> list[Any]:
        out = [await rig.scheduler.load()]
        rig.write("b.yaml", group_policy("gb", '["vma", "vmb"]'), mtime=2000)
        out.append(await rig.scheduler.load())
        rig.write("a.yaml", "# a comment\n" + group_policy("ga", '["vma"]'), mtime=3000)
        out.append(await rig.scheduler.load())
        out.append(rig.scheduler.report())
        return out

    first, second, third, report = rig.run(steps)
    assert first["loaded"] == second["loaded"] == ["ga", "gb"]
    assert third["loaded"] == ["ga", "gb"], third
    assert [e for e in third["errors"] if "b.yaml" in e and "keeps running" in e], third
    assert report["groups"]["ga"]["members"] == ["vma"]
    assert report["groups"]["gb"]["members"] == ["vmb"]


def test_a_new_file_does_not_take_the_volumes_of_a_group_kept_on_its_last_version(
        tmp_path: Path) -> None:
    """g runs from g.yaml; an edit leaves a typo in it (g keeps running on its last version);
    meanwhile h.yaml claims db*. h loaded, took db1, and g was unloaded. Now h is refused."""
    rig = Rig(tmp_path, "db1")
    rig.write("g.yaml", group_policy("g", '["db*"]', schedule="2s"))

    async def steps() -> list[Any]:
        out = [await rig.scheduler.load()]
        rig.write("g.yaml", group_policy("g", '["db*"]', schedule="soon"))
        rig.write("h.yaml", group_policy("h", '["db*"]'))
        out.append(await rig.scheduler.load())
        out.append(rig.scheduler.report())
        return out

    first, second, report = rig.run(steps)
    assert first["loaded"] == ["g"]
    assert second["loaded"] == ["g"], second
    assert [e for e in second["errors"] if "h.yaml" in e and "'g'" in e], second
    assert report["groups"]["g"]["members"] == ["db1"]
