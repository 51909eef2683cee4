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
import math
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from dvx_dr.errors import DvxError, StoreLockedError
from dvx_dr.policies.loader import PolicyError, load_policy_dir, members_of
from dvx_dr.policies.model import Hook, Policy, ReplicationTarget, Schedule
from dvx_dr.replicator.peer import with_retries
from dvx_dr.replicator.retention import prune_groups
from dvx_dr.replicator.sender import TransferStats, send_group
from dvx_dr.site import db as dbmod
from dvx_dr.site import groups, keys, volumes
from dvx_dr.site.store import Store, now_iso

if TYPE_CHECKING:
    from dvx_dr.replicator.server import SiteService

log = logging.getLogger("dvx_dr.scheduler")
WARNING_AT = 0.8
TARGET_ATTEMPTS = 3
#: Store metadata key prefix: when a group's target was first configured (``PG:SITE``).
_CONFIGURED = "target_configured:"


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
            return {"loaded": [], "errors": []}
        names = [v["name"] for v in await self.service.store.run(_volume_names, self.store)]
        peers = set(self.service.config.peers)
        files: dict[str, Path] = {}
        try:
            # The groups running now keep their names and volumes against a file added
            # beside theirs.
            policies, errors = load_policy_dir(
                directory, peers, names, files=files,
                first=sorted((self.files[n] for n in self.policies), key=_modified))
        except DvxError as exc:
            self.errors = [str(exc)]
            log.error("%s", exc)
            return {"loaded": sorted(self.policies), "errors": self.errors}
        self.errors = self._keep_last_good(errors, policies, files, names)
        for message in self.errors:
            log.error("policy not loaded: %s", message)
        for name in set(self.policies) - set(policies):
            self._remove_jobs(name)
            self.status.pop(name, None)
        before, self.policies = self.policies, {}
        for name, policy in policies.items():
            try:
                self._apply(name, policy, Path(directory), before.get(name))
            except Exception as exc:  # one policy APScheduler refuses never stops the others
                self._remove_jobs(name)
                self.status.pop(name, None)
                self.errors.append(f"group {name}: cannot be scheduled: {exc}")
                log.error("policy not loaded: %s", self.errors[-1])
                continue
            self.policies[name] = policy
            # What the globs match now, so that 'pg list' and 'pg show' answer "did my glob
            # match?" right after a reload; each group snapshot evaluates them again.
            self.status[name].members = members_of(policy, names)
        self.files = {name: files[name] for name in self.policies}
        configured = await self.service.store.run(
            _configured_since, self.store,
            {(pg, t.site) for pg, p in self.policies.items() for t in p.replication},
            set(self.policies))
        for (pg, site), when in configured.items():
            self.status[pg].targets[site].configured = when
        state = await self.service.store.run(_replication_state, self.store)
        for (pg, site), (snap, taken) in state.items():
            target = self.status.get(pg, None)
            if target is not None and site in target.targets:
                t = target.targets[site]
                if t.last_snapshot is None:
                    t.last_snapshot, t.last_snapshot_time = snap, taken
        log.info("policies loaded: %s", ", ".join(sorted(self.policies)) or "none")
        return {"loaded": sorted(self.policies), "errors": self.errors}

    def _keep_last_good(self, errors: list[PolicyError], policies: dict[str, Policy],
                        files: dict[str, Path], volumes: list[str]) -> list[str]:
        """A running group whose file no longer loads (an edit with a mistake) keeps running
        on the version that last loaded, unless a group that did load now has its name or
        one of its volumes; it is added to ``policies`` and ``files``. Each error's message,
        saying so where it applies."""
        owned = {v for p in policies.values() for v in members_of(p, volumes)}
        by_file = {path: name for name, path in self.files.items()}
        messages = []
        for error in errors:
            name = by_file.get(error.path)
            old = self.policies.get(name) if name else None
            if (name is None or old is None or name in policies
                    or owned & set(members_of(old, volumes))):
                messages.append(str(error))
                continue
            policies[name] = old
            files[name] = error.path
            owned |= set(members_of(old, volumes))
            messages.append(f"{error}; group {name} keeps running on the version of "
                            f"{error.path.name} that last loaded")
        return messages

    def _apply(self, name: str, policy: Policy, directory: Path, before: Policy | None
               ) -> None:
        """Schedule the jobs of ``policy``. A job whose schedule is the same as in the policy
        loaded ``before`` is left as it is: a reload (SIGHUP, ``pg apply``) must not restart
        the interval of an unchanged job, or reloads more frequent than it would stop it."""
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
            # A replication job's second instance only marks the running one to go again.
            self.scheduler.add_job(func, schedule.to_trigger(), args=[name, *site],
                                   id=job_id, coalesce=True,
                                   max_instances=1 if kind == "snapshot" else 2,
                                   misfire_grace_time=None, replace_existing=True)

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
                _check_usable(self.store, "no snapshot until it is unlocked")
                snap = await self._take_snapshot(name, policy)
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
            hook_error = await self._post_snapshot(name, policy, snap)
            status.last_snapshot_error = hook_error
            if hook_error:
                status.last_snapshot_error_time = time.time()
            await self._apply_local_retention(name, policy)
        for target in policy.replication:
            if target.after_snapshot:
                self._spawn(self.replicate_job(name, target.site))

    async def _take_snapshot(self, name: str, policy: Policy) -> groups.GroupInfo:
        store = self.service.store
        names = [v["name"] for v in await store.run(_volume_names, self.store)]
        members = members_of(policy, names)
        self.status[name].members = members
        if not members:
            raise DvxError(f"group {name}: no volume matches members {policy.members}")
        if policy.hooks.pre_snapshot:
            await run_hook(name, "pre_snapshot", policy.hooks.pre_snapshot)
        snap = await store.run(groups.create, self.store, name, members)
        log.info("group %s: snapshot %s of %s", name, snap.spec, ", ".join(members))
        return snap

    async def _post_snapshot(self, name: str, policy: Policy, snap: groups.GroupInfo
                             ) -> str | None:
        """Run the post-snapshot hook. Its failure is reported, but the snapshot is good
        data: it is still kept, pruned and replicated like any other."""
        if not policy.hooks.post_snapshot:
            return None
        try:
            await run_hook(name, "post_snapshot", policy.hooks.post_snapshot,
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
            while await self._replicate_to(name, site) and key in self._pending:
                self._pending.discard(key)
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
            _check_usable(self.store, "nothing replicates until unlocked")
            stats = await self._replicate(name, target)
        except asyncio.CancelledError:  # the site stops; the transfer resumes next start
            log.info("group %s -> %s: transfer interrupted: the site is stopping", name, site)
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
        store = self.service.store
        newest = await store.run(groups.list_groups, self.store, name)
        if not newest:
            return None
        snap = newest[-1]
        peer = self.service.peer(target.site)
        status = self.status[name].targets[target.site]

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

        try:
            with self.sending(name, snap.name):
                stats = await with_retries(
                    lambda: send_group(store, peer, name, snap.name, progress=progress,
                                       bandwidth_limit=target.bandwidth_limit),
                    attempts=TARGET_ATTEMPTS, base=1.0, cap=30.0, on_retry=retrying)
        finally:
            status.progress = {}
        await store.run(_record_replica, self.store, name, target.site, snap)
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
        await store.run(_prune_local, self.store, name, policy, sites, busy)

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


def _modified(path: Path) -> float:
    """When ``path`` last changed (a file edited just now sorts after those left alone)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return math.inf


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


async def run_hook(pg: str, which: str, hook: Hook,
                   outcome: str = "snapshot not taken") -> None:
    argv = hook.argv()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True)  # its own process group, so a timeout kills all of it
    except OSError as exc:
        raise DvxError(f"group {pg}: {which} hook {argv[0]!r} cannot run: {exc.strerror}"
                       ) from None
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), hook.timeout)
    except (TimeoutError, asyncio.CancelledError) as exc:
        # Kill the whole group: a shell's children (`sh -c "sleep 10"`) hold the output pipe,
        # and waiting for them would hold the snapshot job (and the group's lock) past the
        # timeout, forever if the hook hangs. Cancelled (the site stops): leave nothing behind.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise DvxError(f"group {pg}: {which} hook timed out after {hook.timeout:g}s; "
                       f"{outcome}") from None
    if proc.returncode != 0:
        tail = out.decode(errors="replace").strip().splitlines()[-1:] if out else []
        raise DvxError(f"group {pg}: {which} hook exited {proc.returncode}"
                       + (f" ({tail[0]})" if tail else "") + f"; {outcome}")


# -- store-thread functions ------------------------------------------------------------------


def _volume_names(store: Store) -> list[dict[str, Any]]:
    return [{"name": v.name} for v in volumes.list_volumes(store)]


def _replication_state(store: Store) -> dict[tuple[str, str], tuple[str, str]]:
    return {(pg, t): (f"{pg}@{s}", taken) for pg, t, s, taken in store.db.execute(
        "SELECT pg, target, snapshot, snapshot_time FROM replication_state")}


def _configured_since(store: Store, targets: set[tuple[str, str]], groups_loaded: set[str]
                      ) -> dict[tuple[str, str], float]:
    """When each (group, target) was first configured, recording now for new ones; a target
    its loaded group no longer names is forgotten (if it comes back, it counts afresh)."""
    now = time.time()
    out = {}
    with store.transaction() as db:
        for key, value in dbmod.meta_with_prefix(db, _CONFIGURED).items():
            pg, _, site = key.partition(":")
            if (pg, site) in targets:
                out[pg, site] = float(value)
            elif pg in groups_loaded:
                dbmod.delete_meta(db, _CONFIGURED + key)
        for pg, site in targets - set(out):
            dbmod.set_meta(db, f"{_CONFIGURED}{pg}:{site}", repr(now))
            out[pg, site] = now
    return out


def _record_replica(store: Store, pg: str, target: str, snap: groups.GroupInfo) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO replication_state (pg, target, snapshot, snapshot_time, "
                   "replicated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (pg, target) DO UPDATE "
                   "SET snapshot=excluded.snapshot, snapshot_time=excluded.snapshot_time, "
                   "replicated_at=excluded.replicated_at",
                   (pg, target, snap.name, snap.created, now_iso()))


def _prune_local(store: Store, pg: str, policy: Policy, sites: list[str],
                 busy: set[str]) -> list[str]:
    """Apply local retention; the base each configured target holds, and snapshots being
    sent right now, are always kept."""
    protect = {s for (s,) in store.db.execute(
        f"SELECT snapshot FROM replication_state WHERE pg=? AND target IN "
        f"({','.join('?' * len(sites))})", (pg, *sites))} if sites else set()
    existing = groups.list_groups(store, pg)
    protect |= busy
    if existing:
        protect.add(existing[-1].name)  # the newest, which targets may still need
    return prune_groups(store, pg, policy.snapshot.retention, protect)[1]


def _check_usable(store: Store, until: str) -> None:
    """Raise if the store's keys were crypto-erased, or it is locked (saying ``until``)."""
    refused = keys.refusal(store)
    if isinstance(refused, StoreLockedError):
        raise StoreLockedError(f"store is locked: {until}")
    if refused is not None:
        raise refused
