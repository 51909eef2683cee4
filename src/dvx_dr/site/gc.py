"""Garbage collection: mark, sweep, compact.

1. *Mark* every blob row that a live volume, a volume's cached tree or a retained snapshot
   names (``refs``). An unreadable snapshot tree stops gc before anything is deleted.
2. *Sweep* the index rows nobody names, and keep "complete tree node" marks (``treeblobs``)
   only on rows under a snapshot; skipped while a replication session is open at this site
   (``Store.pin``).
3. *Compact*: segments whose live bytes fall under ``COMPACT_BELOW`` of their size have their
   live extents copied into the open segment (new addresses, so new XTS tweaks, under the
   current key and encryption setting); the old segment file is deleted only after the index
   points at the copies. Segment files no index row names any more are deleted.

Runs under the store mutex: nothing else writes while it runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dvx_dr.site import refs, snapshots, treeblobs
from dvx_dr.site.segments import fsync_dir, segment_path
from dvx_dr.site.store import Store

COMPACT_BELOW = 0.5


@dataclass
class GcReport:
    blobs_deleted: int = 0
    segments_deleted: int = 0
    segments_compacted: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    #: Replication sessions open at the time; with any, nothing is deleted (``Store.pin``).
    sessions_open: int = 0

    @property
    def reclaimed(self) -> int:
        return self.bytes_before - self.bytes_after


def _segment_bytes(store: Store) -> dict[int, int]:
    out = {}
    for path in (store.path / "segments").glob("*.seg"):
        if path.stem.isdigit():
            out[int(path.stem)] = path.stat().st_size
    return out


def mark(store: Store) -> tuple[set[int], set[tuple[int, int]]]:
    """The live rows, and the (row, level) of every tree page and root under a snapshot or
    group snapshot: the complete tree nodes whose marks stay."""
    live: set[int] = set()
    nodes: set[tuple[int, int]] = set()

    def take(found: Iterable[refs.Ref]) -> None:
        for r in found:
            live.add(r.row)
            if r.level is not None:
                nodes.add((r.row, r.level))

    take(refs.group_refs(store))
    seen: set[tuple[bytes, int]] = set()
    for snap in snapshots.list_snapshots(store):
        take(refs.snapshot_refs(store, snap, seen))
    live.update(r.row for r in refs.live_refs(store))
    return live, nodes


def gc(store: Store, compact_below: float = COMPACT_BELOW,
       progress: Callable[[str], None] | None = None,
       select: Callable[[int, int, int], bool] | None = None,
       progress_bytes: Callable[[int], None] | None = None) -> GcReport:
    """Collect garbage. ``select(seg, live, size)`` may force segments into compaction."""
    report = GcReport()
    with store.mutex:
        report.bytes_before = sum(_segment_bytes(store).values())
        if progress:
            progress("marking")
        report.sessions_open = store.live_pins()
        if not report.sessions_open:
            live, nodes = mark(store)
            if progress:
                progress("sweeping")
            with store.transaction() as db:
                dead = [(r,) for (r,) in db.execute("SELECT row FROM blobs") if r not in live]
                db.executemany("DELETE FROM blobs WHERE row=?", dead)
                # A volume's cached tree can outlive blocks it named, and a blob kept as a
                # block may once have been a page: only the tree nodes under a snapshot, at
                # the level they have there, stay marked complete.
                treeblobs.unmark_except(db, nodes)
            report.blobs_deleted = len(dead)
        if progress:
            progress("compacting")
        report.segments_compacted = compact(store, compact_below, select, progress_bytes)
        report.segments_deleted = delete_unused_segments(store)
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        report.bytes_after = sum(_segment_bytes(store).values())
    return report


def compact(store: Store, compact_below: float,
            select: Callable[[int, int, int], bool] | None = None,
            progress: Callable[[int], None] | None = None) -> int:
    sizes = _segment_bytes(store)
    live_bytes = dict(store.db.execute("SELECT seg, SUM(length) FROM blobs GROUP BY seg"))
    done = 0
    for seg, size in sorted(sizes.items()):
        if seg == store.writer.number:
            continue
        live = live_bytes.get(seg, 0)
        if live == 0:
            continue
        wanted = select(seg, live, size) if select else live < compact_below * size
        if not wanted:
            continue
        with store.transaction() as db:
            rows = [r for (r,) in db.execute("SELECT row FROM blobs WHERE seg=? ORDER BY off",
                                             (seg,))]
            written = store.blobs.rewrite(rows)
        if progress:
            progress(written)
        done += 1
    return done


def delete_unused_segments(store: Store) -> int:
    used = {s for (s,) in store.db.execute("SELECT DISTINCT seg FROM blobs")}
    deleted = 0
    directory = store.path / "segments"
    for seg in _segment_bytes(store):
        if seg in used or seg == store.writer.number:
            continue
        store.reader.forget(seg)
        os.unlink(segment_path(directory, seg))
        deleted += 1
    if deleted:
        fsync_dir(directory)
    return deleted
