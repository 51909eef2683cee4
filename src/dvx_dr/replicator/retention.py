"""Pruning group snapshots by a retention rule: at the source after each snapshot and
replication, and at a target for the replicas it holds. One place for both ends."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime

from dvx_dr.policies.model import Retention
from dvx_dr.policies.retention import select_keep
from dvx_dr.site import groups, snapshots
from dvx_dr.site.store import Store

log = logging.getLogger("dvx_dr.retention")


def prune_groups(store: Store, pg: str, rule: Retention, protect: Iterable[str] = ()
                 ) -> tuple[set[str], list[str]]:
    """Delete the group snapshots of ``pg`` that ``rule`` does not keep; ``protect`` names
    are always kept, and so is every snapshot an operator named (only snapshots with the
    scheduler's time-stamp names are the rule's to delete, as zrepl and sanoid prune only
    their own snapshots). Returns the names kept and the specs deleted."""
    existing = [g for g in groups.list_groups(store, pg) if snapshots.is_default_name(g.name)]
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
