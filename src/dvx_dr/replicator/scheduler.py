"""The protection-group scheduler inside ``site serve``: snapshots, replication, retention, RPO.

For every policy in the site's policy directory (see ``policies``) it keeps, on APScheduler's
asyncio scheduler:

- a *snapshot job* on the policy's schedule: membership is re-evaluated (volume globs against
  the volumes that exist now), the pre-snapshot hook runs, all member volumes are snapshotted
  at one instant (``groups.create``), the post-snapshot hook runs, local retention is applied,
  and every ``after-snapshot`` target is replicated;
- a *replication job* per target with a schedule of its own, replicating the newest group
  snapshot.

Jobs coalesce missed runs into one and never overlap themselves (``max_instances=1`` plus one
lock per group and per group+target). A failing target is retried with backoff inside its own
task and never holds up another target or group. The newest group snapshot each target holds
(``replication_state``) is the base of its next incremental and is never pruned here while
that target is configured.

Status per group and target: the last good replica and its age against the RPO (OK, WARNING
from 80%, VIOLATED past it), the next run, bytes sent and saved by the last run, its rate, and
the last error with its time. ``metrics()`` renders the same as Prometheus text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from dvx_dr.errors import DvxError
from dvx_dr.policies.loader import PolicyError, load_policy_dir, members_of
from dvx_dr.policies.model import Policy, ReplicationTarget, Schedule
from dvx_dr.replicator import groupstate, hooks
from dvx_dr.replicator.peer import with_retries
from dvx_dr.replicator.sender import TransferStats, send_group
from dvx_dr.site import groups
from dvx_dr.site.store import Store

if TYPE_CHECKING:
    from dvx_dr.replicator.server import SiteService

log = logging.getLogger("dvx_dr.scheduler")
T = TypeVar("T")
WARNING_AT = 0.8
TARGET_ATTEMPTS = 3


@dataclass
class TargetStatus:
    site: str
    rpo: float
    last_snapshot: str | None = None
    last_snapshot_time: str | None = None
    last_success: float | None = None
    last_error: str | None = None
    last_error_time: float | None = None
    bytes_sent: int = 0
    bytes_skipped: int = 0
    duration: float = 0.0
    rate: float = 0.0
    bytes_sent_total: int = 0
    bytes_skipped_total: int = 0
    errors_total: int = 0
    running: bool = False
    progress: dict[str, Any] = field(default_factory=dict)
    #: Why the newest group snapshot is not the one replicated (it misses a member).
    skipped: str | None = None
    #: When this target was first configured for the group (kept in the store, so a restart
    #: does not reset the age of a target that was never replicated).
    configured: float | None = None

    def age(self, now: float, since: float) -> float:
        """The age of the newest replica's data; for a target never replicated, the time
        since it was configured (``since`` when that is not known)."""
        if self.last_snapshot_time:
            taken = datetime.fromisoformat(self.last_snapshot_time.replace("Z", "+00:00"))
            return max(0.0, now - taken.timestamp())
        return max(0.0, now - (self.configured or since))

    def rpo_state(self, now: float, since: float) -> str:
        age = self.age(now, since)
        if age > self.rpo:
            return "VIOLATED"
        if age >= WARNING_AT * self.rpo:
            return "WARNING"
        return "OK"


@dataclass
class GroupStatus:
    name: str
    file: str
    members: list[str] = field(default_factory=list)
    last_snapshot: str | None = None
    last_snapshot_error: str | None = None
    last_snapshot_error_time: float | None = None
    snapshots_total: int = 0
    targets: dict[str, TargetStatus] = field(default_factory=dict)
    loaded: float = field(default_factory=time.time)


class Scheduler:
    def __init__(self, service: SiteService) -> None:
        self.service = service
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.policies: dict[str, Policy] = {}
        self.files: dict[str, Path] = {}  # PG name -> the file it was loaded from
        self.errors: list[str] = []
        self.status: dict[str, GroupStatus] = {}
        self._group_locks: dict[str, asyncio.Lock] = {}
        self._target_locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._pending: set[tuple[str, str]] = set()  # (pg, site) triggered while busy
        self._loading = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        # (pg, snapshot name) -> transfers of it in flight (to any target, scheduled or not)
        self._sending: Counter[tuple[str, str]] = Counter()
        # (pg, site) -> the task running its transfers; those a reload cancelled
        self._transfers: dict[tuple[str, str], asyncio.Task[Any]] = {}
        self._cancelled: dict[tuple[str, str], str] = {}  # -> why
        # PG name -> (mtime, size) of its file when that version loaded
        self._signatures: dict[str, tuple[int, int] | None] = {}

    @property
    def store(self) -> Store:
        return self.service.store.store

    # -- loading ---------------------------------------------------------------------------

    async def start(self) -> None:
        self.scheduler.start()
        await self.load()

    async def stop(self) -> None:
        if self.scheduler.running:  # not yet, when the site failed to start
            self.scheduler.shutdown(wait=False)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def load(self) -> dict[str, Any]:
        """(Re)load the policy directory. Bad files are reported; good ones are applied.
        Loads run one at a time (SIGHUP and ``pg apply`` may come together)."""
        async with self._loading:
            return await self._load()

    async def _load(self) -> dict[str, Any]:
        directory = self.service.config.policy_dir
        if directory is None:
            # As after a restart: with no policy directory, no group runs.
            for name in list(self.policies):
                self._unload(name)
            self.policies, self.files, self.errors = {}, {}, []
            log.info("policies loaded: none (the site's configuration names no policy_dir)")
            return {"loaded": [], "errors": []}
        names = await self.service.store.run(groupstate.volume_names, self.store)
        peers = set(self.service.config.peers)
        files: dict[str, Path] = {}
        try:
            # Parsing runs in a thread of its own: a slow file never holds up the event loop
            # (admin socket, peer API, other groups' jobs, SIGTERM). The groups running now
            # keep their names and volumes against a file added beside theirs, and against
            # an edit of another running group's file.
            first = self._precedence()
            policies, errors = await _off_loop(
                lambda: load_policy_dir(directory, peers, names, files=files, first=first))
        except DvxError as exc:
            self.errors = [str(exc)]
            log.error("%s", exc)
            return {"loaded": sorted(self.policies), "errors": self.errors}
        loaded = set(policies)
        self.errors = self._keep_last_good(errors, policies, files, names)
        for message in self.errors:
            log.error("policy not loaded: %s", message)
        # Precedence (who keeps a volume two groups match): the groups running already, in
        # their order, then new ones in the loader's.
        order = [n for n in self.policies if n in policies]
        order += [n for n in policies if n not in self.policies]
        for name in set(self.policies) - set(policies):
            self._unload(name)
        lasts = await self.service.store.run(groupstate.newest_scheduled, self.store, order)
        before, self.policies = self.policies, {}
        for name in order:
            policy = policies[name]
            old = before.get(name)
            try:
                self._apply(name, policy, Path(directory), old, lasts.get(name))
            except Exception as exc:  # one policy APScheduler refuses never stops the others
                self._unload(name)
                self.errors.append(f"group {name}: cannot be scheduled: {exc}")
                log.error("policy not loaded: %s", self.errors[-1])
                continue
            if old is not None:  # a target the reload removed: its transfer stops now
                self._cancel_transfers(name, {t.site for t in old.replication}
                                       - {t.site for t in policy.replication},
                                       "a reload removed the target")
            self.policies[name] = policy
        for name in self.policies:
            # What the globs match now, so that 'pg list' and 'pg show' answer "did my glob
            # match?" right after a reload; each group snapshot evaluates them again.
            self.status[name].members = self._members(name, names)[0]
        self.files = {name: files[name] for name in self.policies}
        fresh = [n for n in self.policies if n in loaded]
        signatures = {n: _signature(self.files[n]) for n in fresh}
        self._signatures = {n: signatures.get(n, self._signatures.get(n))
                            for n in self.policies}
        configured = await self.service.store.run(
            groupstate.configured_since, self.store,
            {(pg, t.site) for pg, p in self.policies.items() for t in p.replication},
            set(self.policies))
        for (pg, site), when in configured.items():
            self.status[pg].targets[site].configured = when
        state = await self.service.store.run(groupstate.replication_state, self.store)
        for (pg, site), (snap, taken, replicated) in state.items():
            target = self.status.get(pg, None)
            if target is not None and site in target.targets:
                t = target.targets[site]
                if t.last_snapshot is None:
                    t.last_snapshot, t.last_snapshot_time = snap, taken
                if t.last_success is None:
                    t.last_success = replicated
        await self._catch_up(before, names, state)
        log.info("policies loaded: %s", ", ".join(sorted(self.policies)) or "none")
        return {"loaded": sorted(self.policies), "errors": self.errors}

    def _precedence(self) -> list[Path]:
        """The files of the running groups, in the order the loader reads them first: those
        unchanged since their group last loaded, then the changed ones (so an edit cannot take
        another running group's volumes), each in the groups' order of precedence."""
        files = [(self.files[n], self._signatures.get(n)) for n in self.policies
                 if n in self.files]
        return ([f for f, sig in files if _signature(f) == sig]
                + [f for f, sig in files if _signature(f) != sig])

    def _keep_last_good(self, errors: list[PolicyError], policies: dict[str, Policy],
                        files: dict[str, Path], volumes: list[str]) -> list[str]:
        """A running group whose file no longer loads (an edit with a mistake, or a volume
        another group has) keeps running on the version that last loaded, unless a group that
        did load now has its name; it is added to ``policies`` and ``files``. A new group
        that claims a volume of a group kept so is not loaded: a running group keeps its
        volumes. Each error's message, saying so where it applies."""
        by_file = {path: name for name, path in self.files.items()}
        messages = []
        kept: dict[str, set[str]] = {}
        for error in errors:
            name = by_file.get(error.path)
            old = self.policies.get(name) if name else None
            if name is None or old is None or name in policies:
                messages.append(str(error))
                continue
            policies[name] = old
            files[name] = error.path
            kept[name] = set(members_of(old, volumes))
            messages.append(f"{error}; group {name} keeps running on the version of "
                            f"{error.path.name} that last loaded")
        for name in [n for n in policies if n not in self.policies]:
            for owner, theirs in kept.items():
                claimed = sorted(theirs & set(members_of(policies[name], volumes)))
                if claimed:
                    messages.append(
                        f"policy {files[name]}: members: expected volumes no other group has, "
                        f"got {', '.join(map(repr, claimed))} (already in {owner!r}, which "
                        f"keeps running on the version of {files[owner].name} that last "
                        f"loaded)")
                    del policies[name], files[name]
                    break
        return messages

    def _members(self, name: str, volumes: list[str]) -> tuple[list[str], dict[str, str]]:
        """The members of group ``name`` among ``volumes``, and the volumes its globs match
        that a group before it (in precedence) has: volume -> that group. A volume created
        after the policies loaded can match two groups; it stays with the first."""
        taken: dict[str, str] = {}
        for other, policy in self.policies.items():
            if other == name:
                break
            for volume in members_of(policy, volumes):
                taken.setdefault(volume, other)
        if name not in self.policies:  # unloaded meanwhile
            return [], {}
        mine = members_of(self.policies[name], volumes)
        return ([v for v in mine if v not in taken], {v: taken[v] for v in mine if v in taken})

    async def _catch_up(self, before: dict[str, Policy], volumes: list[str],
                        state: dict[tuple[str, str], tuple[str, str, float | None]]) -> None:
        """Replicate now to each target added by this load (every target, at start) whose
        newest replica is older than the group's newest snapshot: a transfer a stop
        interrupted resumes at once, not a whole interval later."""
        for name, policy in self.policies.items():
            old = before.get(name)
            sites = {t.site for t in policy.replication} - (
                {t.site for t in old.replication} if old is not None else set())
            if not sites:
                continue
            newest, _ = await self.service.store.run(
                groupstate.newest_covering, self.store, name, self._members(name, volumes)[0])
            if newest is None:
                continue
            for site in sorted(sites):
                held = state.get((name, site))
                if held is not None and held[0] == newest.spec:
                    continue
                log.info("group %s -> %s: %s is not replicated there yet; replicating it now",
                         name, site, newest.spec)
                self._spawn(self.replicate_job(name, site))

    def _unload(self, name: str) -> None:
        """Stop group ``name``: its jobs, its transfers, its status."""
        self._remove_jobs(name)
        self._cancel_transfers(name, None, "the group was unloaded")
        self.status.pop(name, None)

    def _cancel_transfers(self, name: str, sites: set[str] | None, why: str) -> None:
        """Cancel the transfers of group ``name`` running to ``sites`` (None: to any). The
        target never shows a half-made replica; the transfer resumes if the target comes
        back."""
        for (pg, site), task in list(self._transfers.items()):
            if pg == name and (sites is None or site in sites) and not task.done():
                self._cancelled[pg, site] = why
                task.cancel()

    def _apply(self, name: str, policy: Policy, directory: Path, before: Policy | None,
               last: datetime | None = None) -> None:
        """Schedule the jobs of ``policy``. A job whose schedule is the same as in the policy
        loaded ``before`` is left as it is: a reload (SIGHUP, ``pg apply``) must not restart
        the interval of an unchanged job, or reloads more frequent than it would stop it.
        A snapshot job added (every one, at start) is due an interval after ``last``, the
        group's newest scheduler snapshot, at once if that is past (a cron run missed
        meanwhile is made up once): a restart does not restart the interval."""
        status = self.status.get(name)
        if status is None:
            status = self.status[name] = GroupStatus(name, str(directory))
        status.targets = {
            t.site: status.targets.get(t.site) or TargetStatus(t.site, t.rpo)
            for t in policy.replication
        }
        for t in policy.replication:
            status.targets[t.site].rpo = t.rpo
        wanted = _schedules(policy)
        running = _schedules(before) if before is not None else {}
        for job in self.scheduler.get_jobs():
            if _job_pg(job.id) == name and job.id not in wanted:
                job.remove()
        for job_id, schedule in wanted.items():
            if running.get(job_id) == schedule and self.scheduler.get_job(job_id):
                continue
            kind, _, *site = job_id.split(":")
            func = self.snapshot_job if kind == "snapshot" else self.replicate_job
            extra: dict[str, Any] = {}
            if kind == "snapshot" and (due := _first_run(schedule, last)) is not None:
                extra["next_run_time"] = due
            # A replication job's second instance only marks the running one to go again.
            self.scheduler.add_job(func, schedule.to_trigger(), args=[name, *site],
                                   id=job_id, coalesce=True,
                                   max_instances=1 if kind == "snapshot" else 2,
                                   misfire_grace_time=None, replace_existing=True, **extra)

    def _remove_jobs(self, name: str) -> None:
        for job in self.scheduler.get_jobs():
            if _job_pg(job.id) == name:
                job.remove()

    # -- jobs ------------------------------------------------------------------------------

    async def snapshot_job(self, name: str) -> None:
        policy = self.policies.get(name)
        if policy is None:
            return
        lock = self._group_locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            return
        status = self.status[name]
        async with lock:
            try:
                groupstate.check_usable(self.store, "no snapshot until it is unlocked")
                snap, conflict = await self._take_snapshot(name, policy)
            except asyncio.CancelledError:  # the site stops; APScheduler would log a traceback
                log.info("group %s: snapshot interrupted: the site is stopping", name)
                return
            except DvxError as exc:
                status.last_snapshot_error = str(exc)
                status.last_snapshot_error_time = time.time()
                log.error("group %s: snapshot failed: %s", name, exc)
                return
            except Exception as exc:  # never let a bug stop the scheduler
                status.last_snapshot_error = f"internal error: {exc!r}"
                status.last_snapshot_error_time = time.time()
                log.exception("group %s: snapshot failed", name)
                return
            status.last_snapshot = snap.spec
            status.snapshots_total += 1
            try:
                hook_error = await self._post_snapshot(name, policy, snap)
                status.last_snapshot_error = "; ".join(
                    e for e in (conflict, hook_error) if e) or None
                if status.last_snapshot_error:
                    status.last_snapshot_error_time = time.time()
                await self._apply_local_retention(name, policy)
            except asyncio.CancelledError:  # as above: the snapshot is taken, the rest waits
                log.info("group %s: post-snapshot steps interrupted: the site is stopping",
                         name)
                return
        for target in policy.replication:
            if target.after_snapshot:
                self._spawn(self.replicate_job(name, target.site))

    async def _take_snapshot(self, name: str, policy: Policy
                             ) -> tuple[groups.GroupInfo, str | None]:
        """The group snapshot, and the error to record for volumes left out of it because
        a group before this one has them."""
        store = self.service.store
        names = await store.run(groupstate.volume_names, self.store)
        members, others = self._members(name, names)
        self.status[name].members = members
        conflict = None
        if others:
            conflict = "; ".join(
                f"volume {v!r} is also matched by group {g!r}, which has it (loaded first): "
                f"left out of group {name!r}" for v, g in others.items())
            log.error("group %s: %s", name, conflict)
        if not members:
            raise DvxError(f"group {name}: no volume matches members {policy.members}"
                           + (f" ({conflict})" if conflict else ""))
        if policy.hooks.pre_snapshot:
            await hooks.run_hook(name, "pre_snapshot", policy.hooks.pre_snapshot)
        snap = await store.run(groups.create, self.store, name, members)
        log.info("group %s: snapshot %s of %s", name, snap.spec, ", ".join(members))
        return snap, conflict

    async def _post_snapshot(self, name: str, policy: Policy, snap: groups.GroupInfo
                             ) -> str | None:
        """Run the post-snapshot hook. Its failure is reported, but the snapshot is good
        data: it is still kept, pruned and replicated like any other."""
        if not policy.hooks.post_snapshot:
            return None
        try:
            await hooks.run_hook(name, "post_snapshot", policy.hooks.post_snapshot,
                           outcome=f"snapshot {snap.spec} was taken and is replicated")
        except DvxError as exc:
            log.error("group %s: %s", name, exc)
            return str(exc)
        return None

    async def replicate_job(self, name: str, site: str) -> None:
        """Replicate the group's newest snapshot to ``site``. A trigger that comes while that
        target's transfer runs is not dropped: once the transfer succeeds, one more runs at
        once, of the snapshot that is newest then (missed runs coalesce into one)."""
        key = (name, site)
        lock = self._target_locks.setdefault(key, asyncio.Lock())
        if lock.locked():
            self._pending.add(key)
            return
        async with lock:
            task = asyncio.current_task()
            assert task is not None
            self._transfers[key] = task
            try:
                while await self._replicate_to(name, site) and key in self._pending:
                    self._pending.discard(key)
            finally:
                if self._transfers.get(key) is task:
                    del self._transfers[key]
                self._cancelled.pop(key, None)
            self._pending.discard(key)  # after a failure, the next trigger tries again

    async def _replicate_to(self, name: str, site: str) -> bool:
        """One transfer to ``site``, its outcome in the target's status; whether it sent a
        snapshot."""
        policy = self.policies.get(name)
        target = next((t for t in policy.replication if t.site == site), None) if policy else None
        if policy is None or target is None:
            return False
        status = self.status[name].targets[site]
        status.running = True
        try:
            groupstate.check_usable(self.store, "nothing replicates until unlocked")
            stats = await self._replicate(name, target)
        except asyncio.CancelledError:  # the site stops; the transfer resumes next start
            if (name, site) in self._cancelled:
                log.info("group %s -> %s: transfer cancelled: %s", name, site,
                         self._cancelled[name, site])
            else:
                log.info("group %s -> %s: transfer interrupted: the site is stopping", name,
                         site)
            return False
        except Exception as exc:
            status.last_error = str(exc) if isinstance(exc, DvxError) else repr(exc)
            status.last_error_time = time.time()
            status.errors_total += 1
            log.error("group %s -> %s: replication failed: %s", name, site, exc)
            return False
        finally:
            status.running = False
        if stats is None:
            return False
        status.last_success = time.time()
        status.last_error = None
        status.bytes_sent = stats.bytes_on_wire
        status.bytes_skipped = stats.bytes_skipped
        status.duration = stats.seconds
        status.rate = stats.rate
        status.bytes_sent_total += stats.bytes_on_wire
        status.bytes_skipped_total += stats.bytes_skipped
        return True

    async def _replicate(self, name: str, target: ReplicationTarget) -> TransferStats | None:
        """Send the newest group snapshot that covers every current member (one taken by
        hand of fewer volumes is not the group's: sent as the newest, target retention
        would delete the only replica of the others)."""
        store = self.service.store
        status = self.status[name].targets[target.site]
        names = await store.run(groupstate.volume_names, self.store)
        if name not in self.policies:
            return None
        snap, skipped = await store.run(groupstate.newest_covering, self.store, name,
                                        self._members(name, names)[0])
        if skipped:
            spec, missing = skipped[0]
            note = (f"{spec} does not hold member {', '.join(missing)}: not replicated by the "
                    f"scheduler" + (f"; {snap.spec} is, the newest that holds every member"
                                    if snap else "; no group snapshot holds every member"))
            if note != status.skipped:
                log.warning("group %s -> %s: %s", name, target.site, note)
            status.skipped = note
        else:
            status.skipped = None
        if snap is None:
            return None
        peer = self.service.peer(target.site)

        def progress(s: TransferStats) -> None:
            status.progress = {"snapshot": snap.spec, "payload_bytes": s.payload_bytes,
                               "bytes_on_wire": s.bytes_on_wire, "seconds": round(s.seconds, 2),
                               "rate_bytes_per_second": round(s.bytes_on_wire / s.seconds, 1)
                               if s.seconds else 0.0}

        def retrying(n: int, delay: float, exc: DvxError) -> None:
            # Shown at once: an operator watching status sees why a target is late while
            # the retries run, not only after the last one.
            status.last_error = f"{exc} (attempt {n} of {TARGET_ATTEMPTS}; retrying)"
            status.last_error_time = time.time()
            status.errors_total += 1
            log.warning("group %s -> %s: attempt %d failed (%s); retrying in %.1fs", name,
                        target.site, n, exc, delay)

        def limit() -> float | None:
            """The target's limit in the policy loaded now: a reload applies at once."""
            policy = self.policies.get(name)
            now = [t for t in policy.replication if t.site == target.site] if policy else []
            return now[0].bandwidth_limit if now else target.bandwidth_limit

        try:
            with self.sending(name, snap.name):
                stats = await with_retries(
                    lambda: send_group(store, peer, name, snap.name, progress=progress,
                                       bandwidth_limit=limit),
                    attempts=TARGET_ATTEMPTS, base=1.0, cap=30.0, on_retry=retrying)
        finally:
            status.progress = {}
        await store.run(groupstate.record_replica, self.store, name, target.site, snap)
        status.last_snapshot, status.last_snapshot_time = snap.spec, snap.created
        log.info("group %s -> %s: %s replicated (%d bytes sent, %d skipped, %.2fs)", name,
                 target.site, snap.spec, stats.bytes_on_wire, stats.bytes_skipped, stats.seconds)
        try:
            await peer.post_json("/retention", {
                "group": name, "retention": target.retention.model_dump(),
                "protect": [snap.name]})
        except DvxError as exc:
            log.warning("group %s -> %s: target retention failed: %s", name, target.site, exc)
        await self._apply_local_retention(name, self.policies.get(name))
        return stats

    @contextlib.contextmanager
    def sending(self, pg: str, snapshot: str) -> Iterator[None]:
        """Keep group snapshot ``pg@snapshot`` out of local retention while it is being sent.
        Transfers of one snapshot to several targets (or by hand) overlap, so each one
        counts: the snapshot is free again only when the last of them ends."""
        self._sending[pg, snapshot] += 1
        try:
            yield
        finally:
            self._sending[pg, snapshot] -= 1
            if not self._sending[pg, snapshot]:
                del self._sending[pg, snapshot]

    async def _apply_local_retention(self, name: str, policy: Policy | None) -> None:
        if policy is None:
            return
        store = self.service.store
        sites = [t.site for t in policy.replication]
        busy = {n for pg, n in self._sending if pg == name}
        names = await store.run(groupstate.volume_names, self.store)
        if name in self.policies:
            members = self._members(name, names)[0]
        else:
            members = members_of(policy, names)
        await store.run(groupstate.prune_local, self.store, name, policy, sites, busy, members)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- status ----------------------------------------------------------------------------

    def next_run(self, job_id: str) -> str | None:
        job = self.scheduler.get_job(job_id)
        when = getattr(job, "next_run_time", None) if job else None
        return _iso(when.timestamp()) if when else None

    def report(self) -> dict[str, Any]:
        now = time.time()
        out: dict[str, Any] = {"policy_errors": self.errors, "groups": {}}
        for name, g in sorted(self.status.items()):
            policy = self.policies.get(name)
            targets = {}
            for site, t in g.targets.items():
                own = policy and any(x.site == site and not x.after_snapshot
                                     for x in policy.replication)
                job = f"replicate:{name}:{site}" if own else f"snapshot:{name}"
                targets[site] = {
                    "last_replica": t.last_snapshot,
                    "last_replica_time": t.last_snapshot_time,
                    "last_success": _iso(t.last_success),
                    "age_seconds": round(t.age(now, g.loaded), 1),
                    "rpo_seconds": t.rpo,
                    "rpo_status": t.rpo_state(now, g.loaded),
                    "next_run": self.next_run(job),
                    "running": t.running,
                    "progress": t.progress or None,
                    "bytes_sent": t.bytes_sent,
                    "bytes_saved": t.bytes_skipped,
                    "duration_seconds": round(t.duration, 3),
                    "rate_bytes_per_second": round(t.rate, 1),
                    "last_error": t.last_error,
                    "last_error_time": _iso(t.last_error_time),
                    "skipped": t.skipped,
                }
            out["groups"][name] = {
                "members": g.members,
                "last_snapshot": g.last_snapshot,
                "last_snapshot_error": g.last_snapshot_error,
                "last_snapshot_error_time": _iso(g.last_snapshot_error_time),
                "next_snapshot": self.next_run(f"snapshot:{name}"),
                "targets": targets,
            }
        return out

    def metrics(self) -> str:
        now = time.time()
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str,
                   values: list[tuple[dict[str, str], float]]) -> None:
            lines.append(f"# HELP dvx_dr_{name} {help_text}")
            lines.append(f"# TYPE dvx_dr_{name} {kind}")
            for labels, value in values:
                text = ",".join(f'{k}="{v}"' for k, v in labels.items())
                lines.append(f"dvx_dr_{name}{{{text}}} {value}")

        rows = [({"pg": g, "target": s}, t, st.loaded)
                for g, st in sorted(self.status.items()) for s, t in st.targets.items()]
        states = {"OK": 0, "WARNING": 1, "VIOLATED": 2}
        metric("replication_last_success_timestamp_seconds", "gauge",
               "Unix time of the last successful replication.",
               [(lab, t.last_success or 0) for lab, t, _ in rows])
        metric("replication_age_seconds", "gauge",
               "Age of the newest replica's data at the target.",
               [(lab, round(t.age(now, since), 1)) for lab, t, since in rows])
        metric("replication_rpo_seconds", "gauge", "The configured recovery point objective.",
               [(lab, t.rpo) for lab, t, _ in rows])
        metric("replication_rpo_status", "gauge", "0 = OK, 1 = WARNING (80% of RPO), "
               "2 = VIOLATED.", [(lab, states[t.rpo_state(now, since)]) for lab, t, since in rows])
        metric("replication_bytes_sent_total", "counter", "Bytes sent on the wire.",
               [(lab, t.bytes_sent_total) for lab, t, _ in rows])
        metric("replication_bytes_skipped_total", "counter",
               "Bytes of volume data not sent because the target had them.",
               [(lab, t.bytes_skipped_total) for lab, t, _ in rows])
        metric("replication_duration_seconds", "gauge", "Duration of the last transfer.",
               [(lab, round(t.duration, 3)) for lab, t, _ in rows])
        metric("replication_errors_total", "counter", "Failed replication attempts.",
               [(lab, t.errors_total) for lab, t, _ in rows])
        metric("snapshot_errors", "gauge", "1 when the group's last snapshot failed.",
               [({"pg": g}, 1 if st.last_snapshot_error else 0)
                for g, st in sorted(self.status.items())])
        return "\n".join(lines) + "\n"


def _signature(path: Path) -> tuple[int, int] | None:
    """(mtime, size) of ``path``, to tell whether it changed since its group loaded."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


async def _off_loop(fn: Callable[[], T]) -> T:
    """``fn()`` in a daemon thread of its own (as ``asyncio.to_thread``, but a stop does
    not wait for it: asyncio.run would wait for the default executor's threads)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: Any, exc: BaseException | None) -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)

    def run() -> None:
        try:
            value, exc = fn(), None
        except BaseException as e:  # handed to the awaiting task
            value, exc = None, e
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, value, exc)

    threading.Thread(target=run, name="dvx-dr-policy-load", daemon=True).start()
    return await future


def _first_run(schedule: Schedule, last: datetime | None,
               now: datetime | None = None) -> datetime | None:
    """When a snapshot job added now is first due, given the group's newest scheduler
    snapshot at ``last``: an interval after it (now, if that is past, or if the group has no
    such snapshot yet: a new group is protected at once, not an interval later); for a cron
    schedule, now if a run fell due since ``last`` (made up once), else None (its next run:
    the operator chose its times)."""
    now = now or datetime.now(UTC)
    interval = schedule.interval_seconds
    if interval is not None:
        return now if last is None else max(now, last + timedelta(seconds=interval))
    if last is None:
        return None
    missed = schedule.to_trigger().get_next_fire_time(None, last + timedelta(seconds=1))
    return now if missed is not None and missed <= now else None


def _job_pg(job_id: str) -> str:
    """The group of a job id (``snapshot:PG`` or ``replicate:PG:SITE``)."""
    return job_id.split(":")[1]


def _schedules(policy: Policy) -> dict[str, Schedule]:
    """Job id -> schedule of each job ``policy`` runs."""
    out = {f"snapshot:{policy.name}": policy.snapshot.schedule}
    for t in policy.replication:
        if not t.after_snapshot:
            assert not isinstance(t.schedule, str)
            out[f"replicate:{policy.name}:{t.site}"] = t.schedule
    return out


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds") if ts else None
