"""Which blobs are complete tree nodes (table ``tree_blobs``).

A blob is *complete* at a level when it is a tree page of that level (0 = a leaf page, whose
entries are blocks; k = a page whose entries are pages of level k - 1) or a root (``ROOT``, a
volume snapshot's root; ``GROUP``, a group snapshot's root), everything under it is durable,
and every page under it is marked complete too. Replication rests on this: a target answers
"held" for a page or root only when it is marked, accepts a *base page* only when it is marked
at the page's level, and checks every child of a received page against the level it must have.
So a blob that merely has the bytes of a page (a data block, say) is never taken for one.

Marked by ``snapshots.build_tree`` (every page of the tree it builds), ``snapshots.record`` and
``groups.record`` (roots), and the replication receiver (pages and roots it checked). gc keeps
marks only on blobs under a snapshot (a volume's cached tree can outlive the blocks it named).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from dvx_dr.site.db import select_in

ROOT = -1
GROUP = -2
#: Tree levels a page can have (2^50-byte volumes of 4 KiB blocks need 5).
MAX_LEVEL = 15


def mark(db: sqlite3.Connection, rows: Iterable[int], level: int) -> None:
    """Record blob ``rows`` as complete at ``level`` (inside the transaction storing them)."""
    db.executemany("INSERT OR IGNORE INTO tree_blobs (row, level) VALUES (?, ?)",
                   [(row, level) for row in rows])


def mark_cached_tree(db: sqlite3.Connection, vol: int) -> None:
    """Mark every page of volume ``vol``'s cached tree, just brought up to date for a
    snapshot (so complete under every page), at its level."""
    db.execute("INSERT OR IGNORE INTO tree_blobs (row, level) "
               "SELECT blob, level FROM tree_pages WHERE vol=?", (vol,))


def marked(db: sqlite3.Connection, rows: Iterable[int], level: int) -> set[int]:
    """Those of ``rows`` that are complete at ``level``."""
    return {r for (r,) in select_in(db, "SELECT row FROM tree_blobs WHERE level=? AND row IN (?*)",
                                    dict.fromkeys(rows), (level,))}


def unmark_except(db: sqlite3.Connection, keep: set[tuple[int, int]]) -> int:
    """Drop every mark but the (row, level) pairs in ``keep``; returns how many went."""
    stale = [m for m in db.execute("SELECT row, level FROM tree_blobs") if m not in keep]
    db.executemany("DELETE FROM tree_blobs WHERE row=? AND level=?", stale)
    return len(stale)
