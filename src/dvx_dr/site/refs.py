"""Everything that keeps a blob alive, walked in one place for gc and scrub.

A blob is live when a live volume's block map, a volume's cached tree, or a snapshot (its
root, its tree pages, the blocks its leaves list) names it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from dvx_dr.errors import IntegrityError
from dvx_dr.site import tree, treeblobs
from dvx_dr.site.snapshots import SnapshotInfo
from dvx_dr.site.store import Store
from dvx_dr.site.tree import HOLE, Root

_BATCH = 4096


@dataclass(frozen=True, slots=True)
class Ref:
    """A blob row and where it is used: ``what`` names a volume or snapshot."""

    row: int
    what: str
    offset: int  # byte offset in the volume, or -1 for metadata (tree pages, roots)
    level: int | None = None  # metadata: the page's tree level, or treeblobs.ROOT / GROUP


def live_refs(store: Store) -> Iterator[Ref]:
    names = dict(store.db.execute("SELECT vol, name FROM volumes"))
    bs = store.block_size
    last: tuple[int, int] = (-1, -1)
    while True:
        rows = store.db.execute(
            "SELECT vol, blk, blob FROM blocks WHERE (vol, blk) > (?, ?) ORDER BY vol, blk "
            "LIMIT ?", (*last, _BATCH)).fetchall()
        if not rows:
            break
        for vol, blk, blob in rows:
            yield Ref(blob, f"volume {names.get(vol, vol)}", blk * bs)
        last = rows[-1][0], rows[-1][1]
    for vol, blob in store.db.execute("SELECT vol, blob FROM tree_pages").fetchall():
        yield Ref(blob, f"volume {names.get(vol, vol)} (tree)", -1)


def snapshot_refs(store: Store, snap: SnapshotInfo, seen_pages: set[tuple[bytes, int]]
                  ) -> Iterator[Ref]:
    """Refs of one snapshot, skipping subtrees under pages in ``seen_pages`` (id, level;
    then adding). Raises IntegrityError when the root or a tree page cannot be read.
    """
    what = f"snapshot {snap.spec}"
    yield Ref(snap.root_row, what, -1, treeblobs.ROOT)
    root = Root.unpack(store.blobs.get_row(snap.root_row))
    new_pages: list[tuple[bytes, int]] = []

    def prune(page_id: bytes, level: int) -> bool:
        if (page_id, level) in seen_pages:
            return True
        seen_pages.add((page_id, level))
        new_pages.append((page_id, level))
        return False

    def page_refs() -> Iterator[Ref]:
        """Refs of the pages visited since the last call."""
        rows = store.blobs.lookup(i for i, _ in new_pages)
        for page_id, level in new_pages:
            if page_id not in rows:
                raise IntegrityError(f"{what}: tree page {page_id.hex()[:16]}… at level {level} "
                                     "is not in the store")
            yield Ref(rows[page_id], what, -1, level)
        new_pages.clear()

    bs = root.block_size
    for first, ids in tree.iter_leaves(root, store.blobs.get, prune, holes=False):
        known = [i for i in ids if i != HOLE]
        rows = store.blobs.lookup(known)
        for k, blob_id in enumerate(ids):
            if blob_id == HOLE:
                continue
            row = rows.get(blob_id)
            if row is None:
                raise IntegrityError(f"{what}: block at offset {(first + k) * bs} names a blob "
                                     "the store lacks")
            yield Ref(row, what, (first + k) * bs)
        yield from page_refs()
    # Pages visited after the last new leaf, or above none at all: every child under them is
    # a hole or a page seen under an earlier snapshot. They are live all the same (gc had
    # deleted them, losing the snapshot).
    yield from page_refs()


def group_refs(store: Store) -> Iterator[Ref]:
    """Group roots; the member roots they name are snapshots of their own (deleted only with
    their group), so marking those snapshots marks everything under a group."""
    for pg, name, root in store.db.execute(
            "SELECT pg, name, root FROM group_snapshots").fetchall():
        yield Ref(root, f"group snapshot {pg}@{name}", -1, treeblobs.GROUP)
