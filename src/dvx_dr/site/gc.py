"""Garbage collection: mark, sweep, delete dead segment files, compact.

Runs under the store mutex (nothing else writes meanwhile), in this order:

1. *Mark* every blob row that a live volume, a volume's cached tree or a retained snapshot
   names (``refs``). An unreadable snapshot tree stops gc before anything is deleted.
2. *Sweep*: keep "complete tree node" marks (``treeblobs``) only on rows under a snapshot,
   then delete the index rows nobody names, ``SWEEP_BATCH`` rows per transaction in segment
   order, with a checkpoint after each so that SQLite's write-ahead log stays small. A segment
   file that a committed batch left unnamed is deleted at once. Skipped while a replication
   session is open at this site (``Store.pin``).
3. Delete every other segment file no index row names (the leftovers of failed writes, or of
   a crash between a commit and a deletion).
4. *Compact*, segment by segment: a segment whose live bytes fall under ``COMPACT_BELOW`` of
   its size (or that ``select`` picks, for convert) has its live extents copied into the open
   segment (new addresses, so new XTS tweaks, under the current key and encryption setting)
   and fsync'ed, the index moves to the copies in one transaction, and the old file is deleted
   right after that commits. Segments go fewest live bytes first, each only if the disk has
   room for its copies; the rest are left as they are (``GcReport.segments_skipped``).

Crash safety: a segment file is deleted only after the commit that stopped every row naming
it, so no row ever names a deleted file; a crash in between leaves a file no row names, which
step 3 of the next gc deletes.

Space: gc gives up the store's reserve (``store.RESERVE_NAME``) when it starts, so that its
first sweep batch can be logged on a disk the store has filled, and takes it back after step 3
and at its end when the space is there. A full disk that still stops it raises
``StoreFullError`` saying what it had reclaimed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dvx_dr.errors import StoreFullError
from dvx_dr.site import refs, snapshots, treeblobs
from dvx_dr.site.segments import fsync_dir, segment_path
from dvx_dr.site.store import Store, make_reserve, release_reserve
from dvx_dr.units import count, format_size

COMPACT_BELOW = 0.5
#: Index rows deleted per sweep transaction. Each costs about one 4 KiB log page (its keyed
#: name sits at a random place in the name index): 500 measured 2.0-2.1 MiB of log on stores
#: of 100 000 and 300 000 rows, half of ``store.RESERVE_BYTES``. (One transaction for 100 000
#: rows took 24.6 MiB; batches of 500 made that gc 2.6 s instead of 1.5 s.)
SWEEP_BATCH = 500
#: Free space a compaction needs besides its copies: its transaction's log (a 64 MiB segment
#: of 4 KiB blocks has 16 384 rows to move).
COMPACT_SLACK = 4 * 1024 * 1024


@dataclass
class GcReport:
    blobs_deleted: int = 0
    segments_deleted: int = 0
    segments_compacted: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    #: Replication sessions open at the time; with any, nothing is deleted (``Store.pin``).
    sessions_open: int = 0
    #: Bytes of live extents compaction copied.
    bytes_compacted: int = 0
    #: Segments compaction wanted but left as they are: the disk lacked room for their copies.
    segments_skipped: int = 0
    #: The free space the smallest of those needs.
    space_needed: int = 0

    @property
    def reclaimed(self) -> int:
        return self.bytes_before - self.bytes_after

    def done(self) -> str | None:
        """What this gc did, for a message; None when it did nothing."""
        if not (self.blobs_deleted or self.segments_deleted or self.segments_compacted):
            return None
        return (f"gc reclaimed {format_size(max(0, self.reclaimed))} (removed "
                f"{count(self.blobs_deleted, 'unused blob')}, deleted "
                f"{count(self.segments_deleted, 'segment file')}, compacted "
                f"{count(self.segments_compacted, 'segment')})")


def _segment_bytes(store: Store) -> dict[int, int]:
    out = {}
    for path in (store.path / "segments").glob("*.seg"):
        if path.stem.isdigit():
            out[int(path.stem)] = path.stat().st_size
    return out


def free_space(store: Store) -> int:
    st = os.statvfs(store.path)
    return st.f_bavail * st.f_frsize


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
       progress_bytes: Callable[[int], None] | None = None,
       report: GcReport | None = None) -> GcReport:
    """Collect garbage. ``select(seg, live, size)`` may force segments into compaction.

    A full disk that stops it raises ``StoreFullError`` saying what was done; ``report``, when
    given, is filled in as it goes (for a caller's own message)."""
    report = report if report is not None else GcReport()
    with store.mutex:
        report.bytes_before = sum(_segment_bytes(store).values())
        release_reserve(store.path)
        try:
            _collect(store, report, compact_below, progress, select, progress_bytes)
        except StoreFullError:
            report.bytes_after = sum(_segment_bytes(store).values())
            raise StoreFullError(store.full_message(
                report.done(), "free space (delete snapshots or volumes, or make the file "
                "system larger) and run 'dvx-dr datastore gc' again")) from None
        finally:
            make_reserve(store.path)
        report.bytes_after = sum(_segment_bytes(store).values())
    return report


def _collect(store: Store, report: GcReport, compact_below: float,
             progress: Callable[[str], None] | None,
             select: Callable[[int, int, int], bool] | None,
             progress_bytes: Callable[[int], None] | None) -> None:
    if progress:
        progress("marking")
    report.sessions_open = store.live_pins()
    if not report.sessions_open:
        live, nodes = mark(store)
        if progress:
            progress("sweeping")
        sweep(store, live, nodes, report)
    report.segments_deleted += delete_unused_segments(store)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    make_reserve(store.path)  # before compaction takes the space
    if progress:
        progress("compacting")
    compact(store, compact_below, select, progress_bytes, report)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def sweep(store: Store, live: set[int], nodes: set[tuple[int, int]], report: GcReport) -> None:
    """Delete the rows not in ``live`` in small transactions, and each segment file they
    leave unnamed once its transaction commits."""
    # The marks first, in a transaction of their own: a row number can be taken again once
    # its row is gone, and no mark may outlive its row. (A volume's cached tree can outlive
    # blocks it named, and a blob kept as a block may once have been a page: only the tree
    # nodes under a snapshot, at the level they have there, stay marked complete.)
    with store.transaction() as db:
        treeblobs.unmark_except(db, nodes)
    dead = sorted((seg, row) for row, seg in store.db.execute("SELECT row, seg FROM blobs")
                  if row not in live)
    for start in range(0, len(dead), SWEEP_BATCH):
        batch = dead[start:start + SWEEP_BATCH]
        with store.transaction() as db:
            db.executemany("DELETE FROM blobs WHERE row=?", [(row,) for _, row in batch])
        report.blobs_deleted += len(batch)
        # The next transaction starts the log over instead of growing it.
        store.db.execute("PRAGMA wal_checkpoint(RESTART)")
        report.segments_deleted += delete_unused_segments(store, {seg for seg, _ in batch})


def compact(store: Store, compact_below: float,
            select: Callable[[int, int, int], bool] | None = None,
            progress: Callable[[int], None] | None = None,
            report: GcReport | None = None) -> int:
    """Compact the segments that want it, fewest live bytes first, while the disk has room;
    returns how many were compacted."""
    report = report if report is not None else GcReport()
    sizes = _segment_bytes(store)
    live_bytes = dict(store.db.execute("SELECT seg, SUM(length) FROM blobs GROUP BY seg"))
    wanted = []
    for seg, size in sizes.items():
        live = live_bytes.get(seg, 0)
        if seg == store.writer.number or live == 0:
            continue
        if select(seg, live, size) if select else live < compact_below * size:
            wanted.append((live, seg))
    wanted.sort()
    directory = store.path / "segments"
    for i, (live, seg) in enumerate(wanted):
        if free_space(store) < live + COMPACT_SLACK:
            # The rest have at least as many live bytes: none of them fits either.
            report.segments_skipped = len(wanted) - i
            report.space_needed = live + COMPACT_SLACK
            break
        with store.transaction() as db:
            rows = [r for (r,) in db.execute("SELECT row FROM blobs WHERE seg=? ORDER BY off",
                                             (seg,))]
            written = store.blobs.rewrite(rows)
        # Committed: no row names the old file any more.
        store.reader.forget(seg)
        os.unlink(segment_path(directory, seg))
        fsync_dir(directory)
        report.segments_compacted += 1
        report.segments_deleted += 1
        report.bytes_compacted += written
        if progress:
            progress(written)
    return report.segments_compacted


def delete_unused_segments(store: Store, candidates: Iterable[int] | None = None) -> int:
    """Delete the segment files (of ``candidates``, or all) that no index row names."""
    directory = store.path / "segments"
    if candidates is None:
        used = {s for (s,) in store.db.execute("SELECT DISTINCT seg FROM blobs")}
        unused = [seg for seg in _segment_bytes(store) if seg not in used]
    else:
        unused = [seg for seg in candidates if store.db.execute(
            "SELECT 1 FROM blobs WHERE seg=? LIMIT 1", (seg,)).fetchone() is None]
    deleted = 0
    for seg in unused:
        if seg == store.writer.number:
            continue
        store.reader.forget(seg)
        try:
            os.unlink(segment_path(directory, seg))
        except FileNotFoundError:
            continue
        deleted += 1
    if deleted:
        fsync_dir(directory)
    return deleted
