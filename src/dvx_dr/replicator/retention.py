"""Pruning group snapshots by a retention rule: at the source after each snapshot and
replication, and at a target for the replicas it holds. One place for both ends."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime

from dvx_dr.policies.model import Retention
from dvx_dr.policies.retention import select_keep
from dvx_dr.site import groups
from dvx_dr.site.store import Store

log = logging.getLogger("dvx_dr.retention")


def prune_groups(store: Store, pg: str, rule: Retention, protect: Iterable[str] = ()
                 ) -> tuple[set[str], list[str]]:
    """Delete the group snapshots of ``pg`` that ``rule`` does not keep; ``protect`` names
    are always kept. Returns the names kept and the specs deleted."""
    existing = groups.list_groups(store, pg)
    keep = select_keep([(g.name, g.created_at) for g in existing], rule, datetime.now(UTC),
                       protect)
    deleted = []
    for g in existing:
        if g.name not in keep:
            groups.delete(store, g.pg, g.name)
            deleted.append(g.spec)
    if deleted:
        log.info("retention for %s deleted %s", pg, ", ".join(deleted))
    return keep, deleted
