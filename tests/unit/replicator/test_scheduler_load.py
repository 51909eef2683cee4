"""Policy reloads of the scheduler that overlap (SIGHUP and ``pg apply`` at once)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dvx_dr.replicator import scheduler as schedmod
from dvx_dr.replicator.storethread import StoreThread
from dvx_dr.site import volumes
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
        if fn is schedmod._configured_since and not held.is_set():
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
