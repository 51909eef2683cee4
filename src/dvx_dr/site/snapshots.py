"""Snapshots: immutable Merkle trees over a volume's blocks (format in ``tree``).

A snapshot is named ``VOLUME@NAME``; a replica received from another site lives under that
site's namespace, ``SITE/VOLUME@NAME``. Taking a snapshot patches only the cached tree pages
over blocks written since the last one (O(changed), see ``build_tree``), stores the new pages
and the root as blobs, and commits the snapshot row in the same transaction, after every blob
under it is durable.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, overload

from dvx_dr.errors import AlreadyExistsError, NotFoundError, UserError
from dvx_dr.site import db as dbmod
from dvx_dr.site import tree, treeblobs, volumes
from dvx_dr.site.blobs import blob_id
from dvx_dr.site.db import select_in
from dvx_dr.site.store import Store, now_iso
from dvx_dr.site.tree import FANOUT, HOLE, ID, Root

SNAP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")
#: Tree pages built and stored (one ``put_many``) at once: a whole level of a usual snapshot,
#: 4 MiB of pages at most when a large volume's tree is built from scratch.
PAGE_BATCH = 256


@dataclass(frozen=True)
class SnapshotInfo:
    id: int
    volume: str
    name: str
    root_row: int
    size: int
    mapped_blocks: int
    created: str
    origin: str

    @property
    def spec(self) -> str:
        return f"{self.volume}@{self.name}"


_COLUMNS = "snap, volume, name, root, size, mapped_blocks, created, origin"


def parse_spec(spec: str) -> tuple[str, str]:
    volume, sep, name = spec.rpartition("@")
    if not sep or not volume or not name:
        raise UserError(f"snapshot {spec!r}: expected VOLUME@NAME, e.g. vm1@before-upgrade")
    return volume, name


def get(store: Store, spec: str) -> SnapshotInfo:
    volume, name = parse_spec(spec)
    row = store.db.execute(f"SELECT {_COLUMNS} FROM snapshots WHERE volume=? AND name=?",
                           (volume, name)).fetchone()
    if row is None:
        raise NotFoundError(f"unknown snapshot {spec!r}; 'dvx-dr snapshot list' shows them")
    return SnapshotInfo(*row)


def list_snapshots(store: Store, volume: str | None = None) -> list[SnapshotInfo]:
    """All snapshots, or those of ``volume``: a volume there is (maybe with none yet), or
    one that has snapshots still (deleted since, or a replica's ``SITE/VOLUME``); any other
    name is refused as unknown, as every command refuses it."""
    if volume is None:
        rows = store.db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY volume, snap")
        return [SnapshotInfo(*r) for r in rows]
    found = [SnapshotInfo(*r) for r in store.db.execute(
        f"SELECT {_COLUMNS} FROM snapshots WHERE volume=? ORDER BY snap", (volume,))]
    if not found:
        volumes.get(store, volume)  # raises for a name that is no volume
    return found


def default_name() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_DEFAULT_NAME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def is_default_name(name: str) -> bool:
    """Whether ``name`` has the form ``default_name`` gives (the scheduler's snapshots, and
    those taken without a name): the only ones automatic retention may delete."""
    return _DEFAULT_NAME.fullmatch(name) is not None


def build_tree(store: Store, vol: int, size: int) -> Root:
    """Bring the volume's cached tree up to date with its live map; inside a transaction.

    Level by level, only pages over changed children are touched. A page with a cached copy of
    the right length is patched: the ids of its changed children (at level 0 the blocks in
    ``dirty_blocks``, read again from the map; above, the pages just built below) replace
    theirs. A page in ``dirty_leaves``, or with no usable cached copy, is rebuilt in full from
    the level below. Either way a page is byte-identical to a full rebuild's.
    """
    db = store.db
    nblocks = -(-size // store.block_size)
    counts = tree.level_counts(nblocks)
    db.execute("DELETE FROM tree_pages WHERE vol=? AND level>=?", (vol, len(counts)))
    whole = {r[0] for r in db.execute("SELECT leaf FROM dirty_leaves WHERE vol=? AND leaf<?",
                                      (vol, counts[0]))}
    touched = {r[0] for r in db.execute(
        "SELECT DISTINCT blk / ? FROM dirty_blocks WHERE vol=? AND blk<?",
        (FANOUT, vol, nblocks))}
    changed: dict[int, bytes] = {}  # child index -> its new id, for the level being built
    below = nblocks
    for level, count in enumerate(counts):
        db.execute("DELETE FROM tree_pages WHERE vol=? AND level=? AND idx>=?",
                   (vol, level, count))
        if level:
            whole, touched = set(), {i // FANOUT for i in changed}
        todo = sorted(touched | whole)
        built: dict[int, bytes] = {}
        for start in range(0, len(todo), PAGE_BATCH):
            built.update(_build_pages(store, vol, level, below, todo[start:start + PAGE_BATCH],
                                      whole, changed))
        changed, below = built, count
    db.execute("DELETE FROM dirty_leaves WHERE vol=?", (vol,))
    db.execute("DELETE FROM dirty_blocks WHERE vol=?", (vol,))
    treeblobs.mark_cached_tree(db, vol)
    top = db.execute("SELECT blob FROM tree_pages WHERE vol=? AND level=? AND idx=0",
                     (vol, len(counts) - 1)).fetchone()
    mapped = db.execute("SELECT COUNT(*) FROM blocks WHERE vol=?", (vol,)).fetchone()[0]
    top_id = store.blobs.id_of(top[0]) if top else HOLE
    return Root(len(counts), store.block_size, size, mapped, top_id)


def _build_pages(store: Store, vol: int, level: int, below: int, idxs: list[int],
                 whole: set[int], changed: dict[int, bytes]) -> dict[int, bytes]:
    """Patch or rebuild pages ``idxs`` (ascending) of one level over ``below`` children, store
    them with one ``put_many`` and record them; returns idx -> new page id (HOLE: no page)."""
    db = store.db
    blobs = store.blobs
    pages = _cached_pages(store, vol, level, below, [i for i in idxs if i not in whole])
    if level == 0 and pages:
        changed = _dirty_block_ids(store, vol, below, pages)
    for child, child_id in changed.items():
        page = pages.get(child // FANOUT)
        if page is not None:
            k = child % FANOUT * ID
            page[k:k + ID] = child_id
    full = [i for i in idxs if i not in pages]
    refs: list[tuple[int, int]] = []
    for idx in full:
        lo, hi = idx * FANOUT, min((idx + 1) * FANOUT, below)
        pages[idx] = bytearray(ID * (hi - lo))
        if level == 0:
            refs += db.execute("SELECT blk, blob FROM blocks WHERE vol=? AND blk>=? AND blk<?",
                               (vol, lo, hi)).fetchall()
        else:
            refs += db.execute("SELECT idx, blob FROM tree_pages WHERE vol=? AND level=? "
                               "AND idx>=? AND idx<?", (vol, level - 1, lo, hi)).fetchall()
    ids = blobs.ids_of(r for _, r in refs)
    for child, r in refs:
        k = child % FANOUT * ID
        pages[child // FANOUT][k:k + ID] = ids[r]
    built = {idx: HOLE for idx in idxs}
    keep = [idx for idx in idxs if pages[idx].count(0) != len(pages[idx])]  # holes: no page
    plains = [bytes(pages[idx]) for idx in keep]
    new_ids, rows = blobs.put_many(plains)
    built.update(zip(keep, new_ids, strict=True))
    for page_id, plain in zip(new_ids, plains, strict=True):
        blobs.pages.put(page_id, plain)
    db.executemany("INSERT OR REPLACE INTO tree_pages (vol, level, idx, blob) VALUES (?, ?, ?, ?)",
                   [(vol, level, idx, row) for idx, row in zip(keep, rows, strict=True)])
    db.executemany("DELETE FROM tree_pages WHERE vol=? AND level=? AND idx=?",
                   [(vol, level, idx) for idx in idxs if built[idx] == HOLE])
    return built


def _cached_pages(store: Store, vol: int, level: int, below: int, idxs: list[int]
                  ) -> dict[int, bytearray]:
    """The cached pages among ``idxs`` whose length fits ``below`` children (else rebuilt)."""
    rows = list(select_in(store.db, "SELECT idx, blob FROM tree_pages WHERE vol=? AND level=? "
                          "AND idx IN (?*)", idxs, (vol, level)))
    ids = store.blobs.ids_of(r for _, r in rows)
    plains = store.blobs.get_pages([(ids[r], r) for _, r in rows])
    return {idx: bytearray(p) for (idx, _), p in zip(rows, plains, strict=True)
            if len(p) == ID * min(FANOUT, below - idx * FANOUT)}


def _dirty_block_ids(store: Store, vol: int, nblocks: int, leaves: dict[int, bytearray]
                     ) -> dict[int, bytes]:
    """Block number -> current id (HOLE for a hole) of the dirty blocks under ``leaves``."""
    first, last = min(leaves), max(leaves)
    refs = [(blk, r) for blk, r in store.db.execute(
        "SELECT d.blk, b.blob FROM dirty_blocks d LEFT JOIN blocks b "
        "ON b.vol=d.vol AND b.blk=d.blk WHERE d.vol=? AND d.blk>=? AND d.blk<?",
        (vol, first * FANOUT, min((last + 1) * FANOUT, nblocks))) if blk // FANOUT in leaves]
    ids = store.blobs.ids_of(r for _, r in refs if r is not None)
    return {blk: HOLE if r is None else ids[r] for blk, r in refs}


def create(store: Store, volume: str, name: str | None = None) -> SnapshotInfo:
    name = default_name() if name is None else name
    if not SNAP_NAME.fullmatch(name):
        raise UserError(f"snapshot name {name!r}: use ASCII letters (a-z, A-Z), digits and "
                        ". _ : + - (up to 128)")
    info = volumes.get(store, volume)
    with store.transaction() as db:
        if db.execute("SELECT 1 FROM snapshots WHERE volume=? AND name=?",
                      (volume, name)).fetchone():
            raise AlreadyExistsError(f"snapshot {volume}@{name} already exists")
        root = build_tree(store, info.id, info.size)
        record(store, volume, name, root)
    return get(store, f"{volume}@{name}")


def blob_id_of(root: Root) -> bytes:
    """The id of a root blob (the snapshot's id)."""
    return blob_id(root.pack())


def record(store: Store, volume: str, name: str, root: Root, origin: str = "local",
           created: str | None = None) -> int:
    """Store a root blob and its snapshot row (inside a transaction, blobs already durable)."""
    _, (root_row,) = store.blobs.put_many([root.pack()])
    treeblobs.mark(store.db, [root_row], treeblobs.ROOT)
    cur = store.db.execute(
        "INSERT INTO snapshots (volume, name, root, size, mapped_blocks, created, origin) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (volume, name, root_row, root.size, root.mapped_blocks, created or now_iso(), origin),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def delete(store: Store, spec: str) -> None:
    snap = get(store, spec)
    with store.transaction() as db:
        db.execute("DELETE FROM snapshots WHERE snap=?", (snap.id,))
        dbmod.delete_meta(db, _STANDALONE + spec)


#: Store metadata key prefix: a replica that a peer also sent on its own (``VOLUME@NAME``),
#: besides as a member of a group replica that shares its row.
_STANDALONE = "standalone_replica:"


def mark_standalone(db: sqlite3.Connection, spec: str) -> None:
    """Record that replica ``spec`` was asked for on its own: deleting a group replica that
    shares it (by hand, or by the target's retention) leaves it."""
    dbmod.set_meta(db, _STANDALONE + spec, "1")


def is_standalone(db: sqlite3.Connection, spec: str) -> bool:
    return dbmod.get_meta(db, _STANDALONE + spec) is not None


def root_of(store: Store, snap: SnapshotInfo) -> Root:
    return Root.unpack(store.blobs.get_row(snap.root_row))


@overload
def iter_range(store: Store, spec: str, offset: int, length: int,
               zero_runs: Literal[False] = False) -> Iterator[bytes]: ...


@overload
def iter_range(store: Store, spec: str, offset: int, length: int,
               zero_runs: bool) -> Iterator[bytes | int]: ...


def iter_range(store: Store, spec: str, offset: int, length: int, zero_runs: bool = False
               ) -> Iterator[bytes | int]:
    """The bytes of a snapshot as of its time, batch by batch. With ``zero_runs``, holes come
    as their length (an int) instead, and hole subtrees are not walked, so a thin volume
    costs what its data costs (``sparse.write`` takes both)."""
    snap = get(store, spec)
    root = root_of(store, snap)
    bs = store.block_size
    if offset < 0 or length < 0 or offset + length > root.size:
        raise UserError(f"range {offset}+{length} is outside snapshot {spec!r} of "
                        f"{root.size} bytes")
    end = offset + length
    zero = bytes(bs)
    pos = offset  # where the next chunk starts
    for first, ids in tree.iter_leaves(root, store.blobs.get, holes=not zero_runs,
                                       first=offset // bs):
        lo, hi = first * bs, (first + len(ids)) * bs
        if lo >= end:
            break  # leaves come in order: the rest is past the range
        if hi <= offset:
            continue
        for start in range(0, len(ids), volumes.BATCH_BLOCKS):
            part = ids[start:start + volumes.BATCH_BLOCKS]
            plo = lo + start * bs
            a, b = max(plo, offset), min(plo + len(part) * bs, end)
            if a >= b:
                continue
            if a > pos:  # hole leaves skipped (only with zero_runs)
                yield a - pos
            known = [i for i in part if i != HOLE]
            if zero_runs and not known:
                yield b - a
            else:
                rows = store.blobs.lookup(known)
                missing = [i for i in known if i not in rows]
                if missing:
                    raise NotFoundError(f"snapshot {spec!r} names a block the store lacks "
                                        f"({missing[0].hex()[:16]}…): run 'dvx-dr datastore "
                                        "scrub'")
                plains = iter(volumes.whole_blocks(
                    store, store.blobs.get_rows([rows[i] for i in known])))
                data = b"".join(zero if i == HOLE else next(plains) for i in part)
                yield data[a - plo:b - plo]
            pos = b
    if pos < end:  # trailing hole leaves (only with zero_runs)
        yield end - pos


def read(store: Store, spec: str, offset: int, length: int) -> bytes:
    return b"".join(iter_range(store, spec, offset, length))


def diff(store: Store, spec_a: str, spec_b: str) -> list[tuple[int, int]]:
    """Byte ranges ``(offset, length)`` that differ between two snapshots, merged, in whole
    blocks (as changed-block tracking reports them: a block with any byte changed counts
    whole). When the sizes differ, the bytes only the larger one has differ too (a grown
    volume's new space reads as zeros, which the smaller one does not have)."""
    ra = root_of(store, get(store, spec_a))
    rb = root_of(store, get(store, spec_b))
    bs = store.block_size
    small, size = sorted((ra.size, rb.size))
    ranges: list[tuple[int, int]] = []

    def add(start: int, length: int) -> None:
        if ranges and ranges[-1][0] + ranges[-1][1] >= start:
            end = max(ranges[-1][0] + ranges[-1][1], start + length)
            ranges[-1] = (ranges[-1][0], end - ranges[-1][0])
        else:
            ranges.append((start, length))

    for blk in tree.diff_blocks(ra, rb, store.blobs.get):
        if blk * bs >= small:
            break  # from here on, the larger one's tail
        add(blk * bs, bs)
    if size > small:
        add(small, size - small)
    return [(o, min(n, size - o)) for o, n in ranges if o < size]


def clone(store: Store, new: str, spec: str) -> volumes.VolumeInfo:
    """A writable volume whose content is the snapshot's; shares every block with it."""
    volumes.check_name(new)
    snap = get(store, spec)
    root = root_of(store, snap)
    with store.transaction() as db:
        vol = volumes.insert(db, new, root.size)
        for first, ids in tree.iter_leaves(root, store.blobs.get):
            known = [i for i in ids if i != HOLE]
            rows = store.blobs.lookup(known)
            db.executemany("INSERT INTO blocks (vol, blk, blob) VALUES (?, ?, ?)",
                           [(vol, first + k, rows[i]) for k, i in enumerate(ids) if i != HOLE])
            db.execute("INSERT OR IGNORE INTO dirty_leaves (vol, leaf) VALUES (?, ?)",
                       (vol, first // FANOUT))
    return volumes.get(store, new)
