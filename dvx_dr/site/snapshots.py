"""Snapshots: immutable Merkle trees over a volume's blocks (format in ``tree``).

A snapshot is named ``VOLUME@NAME``; a replica received from another site lives under that
site's namespace, ``SITE/VOLUME@NAME``. Taking a snapshot rebuilds only the tree pages over
blocks written since the last one (O(changed)), stores the new pages and the root as blobs,
and commits the snapshot row in the same transaction, after every blob under it is durable.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from dvx_dr.errors import AlreadyExistsError, NotFoundError, UserError
from dvx_dr.site import tree, volumes
from dvx_dr.site.blobs import blob_id
from dvx_dr.site.store import Store, now_iso
from dvx_dr.site.tree import FANOUT, HOLE, Root

SNAP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


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
    if volume is None:
        rows = store.db.execute(f"SELECT {_COLUMNS} FROM snapshots ORDER BY volume, snap")
    else:
        rows = store.db.execute(
            f"SELECT {_COLUMNS} FROM snapshots WHERE volume=? ORDER BY snap", (volume,))
    return [SnapshotInfo(*r) for r in rows]


def default_name() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def build_tree(store: Store, vol: int, size: int) -> Root:
    """Bring the volume's cached tree up to date with its live map; inside a transaction."""
    db = store.db
    blobs = store.blobs
    nblocks = -(-size // store.block_size)
    counts = tree.level_counts(nblocks)
    dirty = {r[0] for r in db.execute("SELECT leaf FROM dirty_leaves WHERE vol=?", (vol,))}
    db.execute("DELETE FROM tree_pages WHERE vol=? AND level>=?", (vol, len(counts)))
    for level, count in enumerate(counts):
        db.execute("DELETE FROM tree_pages WHERE vol=? AND level=? AND idx>=?",
                   (vol, level, count))
        todo = sorted(i for i in dirty if i < count)
        below = nblocks if level == 0 else counts[level - 1]
        for idx in todo:
            lo, hi = idx * FANOUT, min((idx + 1) * FANOUT, below)
            if level == 0:
                refs = db.execute("SELECT blk, blob FROM blocks WHERE vol=? AND blk>=? AND blk<?",
                                  (vol, lo, hi)).fetchall()
            else:
                refs = db.execute("SELECT idx, blob FROM tree_pages WHERE vol=? AND level=? "
                                  "AND idx>=? AND idx<?", (vol, level - 1, lo, hi)).fetchall()
            if not refs:
                db.execute("DELETE FROM tree_pages WHERE vol=? AND level=? AND idx=?",
                           (vol, level, idx))
                continue
            ids = blobs.ids_of(r for _, r in refs)
            page = [HOLE] * (hi - lo)
            for n, r in refs:
                page[n - lo] = ids[r]
            _, (row,) = blobs.put_many([b"".join(page)])
            db.execute("INSERT OR REPLACE INTO tree_pages (vol, level, idx, blob) "
                       "VALUES (?, ?, ?, ?)", (vol, level, idx, row))
        dirty = {i // FANOUT for i in todo}
    db.execute("DELETE FROM dirty_leaves WHERE vol=?", (vol,))
    top = db.execute("SELECT blob FROM tree_pages WHERE vol=? AND level=? AND idx=0",
                     (vol, len(counts) - 1)).fetchone()
    mapped = db.execute("SELECT COUNT(*) FROM blocks WHERE vol=?", (vol,)).fetchone()[0]
    top_id = blobs.id_of(top[0]) if top else HOLE
    return Root(len(counts), store.block_size, size, mapped, top_id)


def create(store: Store, volume: str, name: str | None = None) -> SnapshotInfo:
    name = name or default_name()
    if not SNAP_NAME.match(name):
        raise UserError(f"snapshot name {name!r}: use letters, digits and . _ : + - "
                        "(up to 128)")
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


def root_of(store: Store, snap: SnapshotInfo) -> Root:
    return Root.unpack(store.blobs.get_row(snap.root_row))


def iter_range(store: Store, spec: str, offset: int, length: int) -> Iterator[bytes]:
    """The bytes of a snapshot as of its time, batch by batch."""
    snap = get(store, spec)
    root = root_of(store, snap)
    bs = store.block_size
    if offset < 0 or length < 0 or offset + length > root.size:
        raise UserError(f"range {offset}+{length} is outside snapshot {spec!r} of "
                        f"{root.size} bytes")
    end = offset + length
    zero = bytes(bs)
    for first, ids in tree.iter_leaves(root, store.blobs.get):
        lo, hi = first * bs, (first + len(ids)) * bs
        if hi <= offset or lo >= end:
            continue
        for start in range(0, len(ids), volumes.BATCH_BLOCKS):
            part = ids[start:start + volumes.BATCH_BLOCKS]
            plo = lo + start * bs
            phi = plo + len(part) * bs
            if phi <= offset or plo >= end:
                continue
            known = [i for i in part if i != HOLE]
            rows = store.blobs.lookup(known)
            missing = [i for i in known if i not in rows]
            if missing:
                raise NotFoundError(f"snapshot {spec!r} names a block the store lacks "
                                    f"({missing[0].hex()[:16]}…): run 'dvx-dr datastore scrub'")
            plains = iter(store.blobs.get_rows([rows[i] for i in known]))
            data = b"".join(zero if i == HOLE else next(plains) for i in part)
            yield data[max(0, offset - plo):min(len(data), end - plo)]


def read(store: Store, spec: str, offset: int, length: int) -> bytes:
    return b"".join(iter_range(store, spec, offset, length))


def export(store: Store, spec: str, out: BinaryIO, progress: volumes.Progress | None = None
           ) -> int:
    size = get(store, spec).size
    for chunk in iter_range(store, spec, 0, size):
        out.write(chunk)
        if progress:
            progress(len(chunk))
    return size


def diff(store: Store, spec_a: str, spec_b: str) -> list[tuple[int, int]]:
    """Byte ranges ``(offset, length)`` that differ between two snapshots, merged."""
    ra = root_of(store, get(store, spec_a))
    rb = root_of(store, get(store, spec_b))
    bs = store.block_size
    ranges: list[tuple[int, int]] = []
    for blk in tree.diff_blocks(ra, rb, store.blobs.get):
        start = blk * bs
        if ranges and ranges[-1][0] + ranges[-1][1] == start:
            ranges[-1] = (ranges[-1][0], ranges[-1][1] + bs)
        else:
            ranges.append((start, bs))
    size = max(ra.size, rb.size)
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
