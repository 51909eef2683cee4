"""What the scheduler reads and writes in the store, in the store thread: the newest replica
each group's target holds (``replication_state``), when a target was first configured, the
group snapshots to send and to keep."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from dvx_dr.errors import StoreLockedError
from dvx_dr.policies.model import Policy
from dvx_dr.replicator.retention import prune_groups
from dvx_dr.site import db as dbmod
from dvx_dr.site import groups, snapshots, volumes
from dvx_dr.site.store import Store, now_iso

#: Store metadata key prefix: when a group's target was first configured (``PG:SITE``).
CONFIGURED = "target_configured:"


def volume_names(store: Store) -> list[str]:
    return [v.name for v in volumes.list_volumes(store)]


def replication_state(store: Store) -> dict[tuple[str, str], tuple[str, str, float | None]]:
    """(pg, target) -> the newest replica there, its snapshot time, and when it was sent."""
    return {(pg, t): (f"{pg}@{s}", taken, timestamp(sent))
            for pg, t, s, taken, sent in store.db.execute(
                "SELECT pg, target, snapshot, snapshot_time, replicated_at "
                "FROM replication_state")}


def timestamp(iso: str | None) -> float | None:
    if not iso:
        return None
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def newest_scheduled(store: Store, pgs: list[str]) -> dict[str, datetime]:
    """When each group's newest scheduler snapshot (a time-stamp name) was taken: the time
    the store recorded, not the name (an operator may give any such name), and never later
    than now (a clock that ran ahead and was set back must not put off the schedule)."""
    now = datetime.now(UTC)
    out = {}
    for pg in pgs:
        taken = [g.created_at for g in groups.list_groups(store, pg)
                 if snapshots.is_default_name(g.name)]
        if taken:
            out[pg] = min(max(taken), now)
    return out


def newest_covering(store: Store, pg: str, members: list[str]
                     ) -> tuple[groups.GroupInfo | None, list[tuple[str, list[str]]]]:
    """The newest group snapshot of ``pg`` holding every volume of ``members``, and the
    newer ones that do not (spec, the members they miss), newest first."""
    skipped: list[tuple[str, list[str]]] = []
    for snap in reversed(groups.list_groups(store, pg)):
        missing = sorted(set(members) - set(groups.member_volumes(store, snap)))
        if not missing:
            return snap, skipped
        skipped.append((snap.spec, missing))
    return None, skipped


def configured_since(store: Store, targets: set[tuple[str, str]], groups_loaded: set[str]
                      ) -> dict[tuple[str, str], float]:
    """When each (group, target) was first configured, recording now for new ones; a target
    its loaded group no longer names is forgotten (if it comes back, it counts afresh)."""
    now = time.time()
    out = {}
    with store.transaction() as db:
        for key, value in dbmod.meta_with_prefix(db, CONFIGURED).items():
            pg, _, site = key.partition(":")
            if (pg, site) in targets:
                out[pg, site] = float(value)
            elif pg in groups_loaded:
                dbmod.delete_meta(db, CONFIGURED + key)
        for pg, site in targets - set(out):
            dbmod.set_meta(db, f"{CONFIGURED}{pg}:{site}", repr(now))
            out[pg, site] = now
    return out


def record_replica(store: Store, pg: str, target: str, snap: groups.GroupInfo) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO replication_state (pg, target, snapshot, snapshot_time, "
                   "replicated_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (pg, target) DO UPDATE "
                   "SET snapshot=excluded.snapshot, snapshot_time=excluded.snapshot_time, "
                   "replicated_at=excluded.replicated_at",
                   (pg, target, snap.name, snap.created, now_iso()))


def prune_local(store: Store, pg: str, policy: Policy, sites: list[str],
                 busy: set[str], members: list[str]) -> list[str]:
    """Apply local retention; the base each configured target holds, snapshots being sent
    right now, and the newest that holds every member (the next to send) are always kept."""
    protect = {s for (s,) in store.db.execute(
        f"SELECT snapshot FROM replication_state WHERE pg=? AND target IN "
        f"({','.join('?' * len(sites))})", (pg, *sites))} if sites else set()
    existing = groups.list_groups(store, pg)
    protect |= busy
    if existing:
        protect.add(existing[-1].name)  # the newest, which targets may still need
    covering, _ = newest_covering(store, pg, members)
    if covering is not None:
        protect.add(covering.name)
    return prune_groups(store, pg, policy.snapshot.retention, protect)[1]


def check_usable(store: Store, until: str) -> None:
    """Raise if the store's keys were crypto-erased, or it is locked (saying ``until``)."""
    refused = store.refusal()
    if isinstance(refused, StoreLockedError):
        raise StoreLockedError(f"store is locked: {until}")
    if refused is not None:
        raise refused
