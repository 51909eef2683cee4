"""Building snapshot trees: patched pages are byte-identical to a from-scratch build, the
cost follows the changed blocks, and a store of schema version 1 migrates and still builds."""

from __future__ import annotations

import hashlib
import io
import random
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvx_dr.site import db as dbmod
from dvx_dr.site import gc, snapshots, treeblobs, volumes
from dvx_dr.site.store import Store
from dvx_dr.site.tree import FANOUT, HOLE, Root
from tests.conftest import PASSWORD

BS = 4096
LEAF = FANOUT * BS


def reference_tree(store: Store, vol: int, size: int) -> tuple[Root, dict[tuple[int, int], bytes]]:
    """The root and every page id ((level, idx) -> id) of the volume's tree, computed from its
    block map alone, the way the format defines it."""
    rows = dict(store.db.execute("SELECT blk, blob FROM blocks WHERE vol=?", (vol,)))
    ids = store.blobs.ids_of(rows.values())
    children = [ids[rows[b]] if b in rows else HOLE for b in range(-(-size // BS))]
    pages: dict[tuple[int, int], bytes] = {}
    level = 0
    while True:
        up = []
        for idx in range(max(1, -(-len(children) // FANOUT))):
            part = children[idx * FANOUT:(idx + 1) * FANOUT]
            if all(c == HOLE for c in part):
                up.append(HOLE)
            else:
                pages[(level, idx)] = hashlib.sha256(b"".join(part)).digest()
                up.append(pages[(level, idx)])
        if len(up) == 1:
            return Root(level + 1, BS, size, len(rows), up[0]), pages
        children, level = up, level + 1


def check_snapshot(store: Store, volume: str, name: str) -> None:
    """The snapshot just taken, and the tree cached for the next one, match a full build."""
    info = volumes.get(store, volume)
    root, pages = reference_tree(store, info.id, info.size)
    assert snapshots.root_of(store, snapshots.get(store, f"{volume}@{name}")) == root
    cached = {(level, idx): store.blobs.id_of(row) for level, idx, row in store.db.execute(
        "SELECT level, idx, blob FROM tree_pages WHERE vol=?", (info.id,))}
    assert cached == pages
    for table in ("dirty_leaves", "dirty_blocks"):
        assert store.db.execute(f"SELECT COUNT(*) FROM {table} WHERE vol=?",
                                (info.id,)).fetchone()[0] == 0


def write_blocks(store: Store, volume: str, blks: Iterable[int], fill: Callable[[int], bytes]
                 ) -> None:
    """Write whole blocks (the volume's last block up to its end)."""
    size = volumes.get(store, volume).size
    for blk in blks:
        volumes.write(store, volume, blk * BS, io.BytesIO(fill(blk)[:size - blk * BS]))


def _content(kind: str, seed: int) -> bytes:
    if kind == "zero":
        return bytes(BS)
    if kind == "same":
        return b"s" * BS  # one blob shared by every block written with it
    return random.Random(seed).randbytes(BS)


def _filler(kind: str, seed: int) -> Callable[[int], bytes]:
    return lambda blk: _content(kind, seed + blk)


# -- random histories against the reference ------------------------------------------------

SIZE = 3 * LEAF + 5 * BS + 100  # four leaf pages, the last short and ending mid-block
block_numbers = st.builds(lambda leaf, k: leaf * FANOUT + k, st.integers(0, 4),
                          st.one_of(st.just(0), st.just(FANOUT - 1), st.integers(0, FANOUT - 1)))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("blocks"), st.lists(block_numbers, min_size=1, max_size=6),
                  st.sampled_from(["zero", "same", "random"])),
        st.tuples(st.just("bytes"), st.integers(0, 2 * SIZE), st.integers(1, 3 * BS)),
        st.tuples(st.just("snapshot")),
        st.tuples(st.just("reopen")),
        st.tuples(st.just("resize"),
                  st.one_of(st.integers(0, 2 * SIZE), st.sampled_from([LEAF, LEAF + 1, SIZE]))),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, encrypted=st.booleans())
def test_random_history_builds_the_same_tree_as_a_full_build(ops: list[tuple],
                                                             encrypted: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="dvx-build-"))
    store = Store.init(root / "s", "build", BS, PASSWORD if encrypted else None)
    try:
        volumes.create(store, "v", SIZE)
        image = bytearray(SIZE)  # every 7th block mapped, the rest holes
        for b in range(0, SIZE // BS, 7):
            image[b * BS:(b + 1) * BS] = _content("random", b)
        volumes.write(store, "v", 0, io.BytesIO(image))
        snapshots.create(store, "v", "base")
        check_snapshot(store, "v", "base")
        for n, op in enumerate(ops):
            size = volumes.get(store, "v").size
            if op[0] == "blocks":
                write_blocks(store, "v", [b for b in op[1] if b * BS < size],
                             _filler(op[2], n))
            elif op[0] == "bytes":
                offset, length = min(op[1], size), min(op[2], size - min(op[1], size))
                if length:
                    data = random.Random(n).randbytes(length)
                    volumes.write(store, "v", offset, io.BytesIO(data))
            elif op[0] == "snapshot":
                snapshots.create(store, "v", f"s{n}")
                check_snapshot(store, "v", f"s{n}")
                assert snapshots.read(store, f"v@s{n}", 0, size) == volumes.read(
                    store, "v", 0, size)
            elif op[0] == "reopen":
                store.close()
                store = Store.open(root / "s", lambda: PASSWORD)
            elif op[0] == "resize":
                volumes.resize(store, "v", op[1], shrink=True)
        snapshots.create(store, "v", "last")
        check_snapshot(store, "v", "last")
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)


def test_three_level_tree_through_resizes_across_depths(new_store: Callable[..., Store]) -> None:
    """A sparse volume over more than 512 leaves (three levels), shrunk and grown back."""
    store = new_store(block_size=BS)
    rng = random.Random(3)
    volumes.create(store, "v", 600 * LEAF)
    sizes = [600 * LEAF, 600 * LEAF - 3 * BS - 7, 513 * LEAF, 512 * LEAF, 2 * LEAF + BS,
             LEAF, 100, 0, 700 * LEAF + 1]
    for step, size in enumerate(sizes):
        if size != volumes.get(store, "v").size:
            volumes.resize(store, "v", size, shrink=True)
        nblocks = -(-size // BS)
        for _ in range(2):  # two snapshots per size: the second one patches
            if nblocks:
                blks = rng.sample(range(nblocks), min(nblocks, 12))
                blks += [nblocks - 1, min(nblocks - 1, 512 * FANOUT)]
                write_blocks(store, "v", blks, lambda b: _content(
                    rng.choice(["zero", "same", "random", "random"]), rng.getrandbits(32)))
            name = f"s{step}-{_}"
            snapshots.create(store, "v", name)
            check_snapshot(store, "v", name)


# -- the cost follows the changed blocks ---------------------------------------------------


class Spy:
    """Counts what the blob store is asked for while a snapshot is built."""

    def __init__(self, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ids_rows = 0
        self.pages_read = 0
        self.puts: list[int] = []
        blobs = store.blobs
        ids_of, get_rows, put_many = blobs.ids_of, blobs.get_rows, blobs.put_many

        def spy_ids_of(rows: Iterable[int]) -> dict[int, bytes]:
            out = ids_of(rows)
            self.ids_rows += len(out)
            return out

        def spy_get_rows(rows: Sequence[int]) -> list[bytes]:
            self.pages_read += len(rows)
            return get_rows(rows)

        def spy_put_many(plains: Sequence[bytes]) -> tuple[list[bytes], list[int]]:
            self.puts.append(len(plains))
            return put_many(plains)

        monkeypatch.setattr(blobs, "ids_of", spy_ids_of)
        monkeypatch.setattr(blobs, "get_rows", spy_get_rows)
        monkeypatch.setattr(blobs, "put_many", spy_put_many)


def test_small_change_patches_cached_pages(new_store: Callable[..., Store],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    store = new_store(block_size=BS)
    volumes.create(store, "v", 3 * LEAF)
    volumes.write(store, "v", 0, io.BytesIO(random.Random(1).randbytes(3 * LEAF)))
    snapshots.create(store, "v", "full")
    check_snapshot(store, "v", "full")

    changed = [5, 700, 1100, 1535]  # in all three leaves; 1100 becomes a hole
    write_blocks(store, "v", changed, lambda b: bytes(BS) if b == 1100 else _content("rnd", b))
    spy = Spy(store, monkeypatch)
    snapshots.create(store, "v", "small")
    # The three changed blocks that are not holes (not 3 x 512), and the cached pages to
    # patch: the three leaves and their parent.
    assert spy.ids_rows == 3 + 3 + 1
    assert spy.pages_read == 0  # those pages were made by the last snapshot: in the page cache
    assert spy.puts == [3, 1, 1]  # one put per level (three leaves, the top), then the root
    check_snapshot(store, "v", "small")

    write_blocks(store, "v", changed, lambda b: _content("rnd", b + 10_000))
    store.blobs.pages.clear()  # e.g. the site restarted
    spy = Spy(store, monkeypatch)
    snapshots.create(store, "v", "after-restart")
    assert spy.pages_read == 3 + 1  # the cached leaves and their parent, read from disk
    assert spy.puts == [3, 1, 1]
    check_snapshot(store, "v", "after-restart")


def test_full_build_of_dirty_leaves_still_reads_whole_leaves(
        new_store: Callable[..., Store], monkeypatch: pytest.MonkeyPatch) -> None:
    """The counter-case: a resize marks whole leaves, which are rebuilt from the map."""
    store = new_store(block_size=BS)
    volumes.create(store, "v", 2 * LEAF)
    volumes.write(store, "v", 0, io.BytesIO(random.Random(2).randbytes(2 * LEAF)))
    snapshots.create(store, "v", "a")
    volumes.resize(store, "v", 2 * LEAF - BS, shrink=True)
    spy = Spy(store, monkeypatch)
    snapshots.create(store, "v", "b")
    # The leaf at the new end, rebuilt from the map, and the top page, which the shrink
    # dropped from the cache (it named the discarded block), rebuilt from its children.
    assert spy.ids_rows == FANOUT - 1 + 2
    check_snapshot(store, "v", "b")


def test_rewriting_a_whole_image_marks_only_the_blocks_that_changed(
        new_store: Callable[..., Store], monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing an image back with a few blocks changed (a VM disk synced whole) costs the
    next snapshot only those blocks."""
    store = new_store(block_size=BS)
    image = bytearray(random.Random(3).randbytes(2 * LEAF))
    image[7 * BS:8 * BS] = bytes(BS)  # a hole from the start
    volumes.create(store, "v", len(image))
    volumes.write(store, "v", 0, io.BytesIO(bytes(image)))
    snapshots.create(store, "v", "a")
    image[3 * BS:4 * BS] = _content("rnd", 99)  # changed
    image[7 * BS:8 * BS] = _content("rnd", 98)  # a hole filled
    image[600 * BS:601 * BS] = bytes(BS)  # punched out
    volumes.write(store, "v", 0, io.BytesIO(bytes(image)))
    dirty = [r[0] for r in store.db.execute("SELECT blk FROM dirty_blocks ORDER BY blk")]
    assert dirty == [3, 7, 600]
    spy = Spy(store, monkeypatch)
    snapshots.create(store, "v", "b")
    assert spy.ids_rows == 2 + 2 + 1  # two blocks with data, the two leaves and the top
    check_snapshot(store, "v", "b")


def test_dirty_blocks_are_cleared_with_the_volume(new_store: Callable[..., Store]) -> None:
    store = new_store(block_size=BS)
    volumes.create(store, "v", LEAF)
    write_blocks(store, "v", [1, 2], lambda b: _content("rnd", b))
    assert store.db.execute("SELECT COUNT(*) FROM dirty_blocks").fetchone()[0] == 2
    volumes.delete(store, "v")
    assert store.db.execute("SELECT COUNT(*) FROM dirty_blocks").fetchone()[0] == 0


# -- a store of schema version 1 -------------------------------------------------------------


def _table_sql(db: sqlite3.Connection) -> dict[str, str]:
    return {name: " ".join(sql.split()) for name, sql in db.execute(
        "SELECT name, sql FROM sqlite_master WHERE type='table'")}


def test_version_1_store_migrates_and_honours_pending_dirty_leaves(
        new_store: Callable[..., Store], store_dir: Path, tmp_path: Path) -> None:
    store = new_store(block_size=BS)
    volumes.create(store, "v", 2 * LEAF + 3 * BS)
    volumes.write(store, "v", 0, io.BytesIO(random.Random(4).randbytes(2 * LEAF + 3 * BS)))
    snapshots.create(store, "v", "a")
    write_blocks(store, "v", [3, 600, 1025], lambda b: _content("rnd", b))
    write_blocks(store, "v", [7], lambda b: bytes(BS))
    # What version 1 wrote for these writes: dirty leaves, and neither dirty_blocks nor
    # tree_blobs (version 3).
    with store.transaction() as db:
        db.execute("INSERT OR IGNORE INTO dirty_leaves SELECT vol, blk / ? FROM dirty_blocks",
                   (FANOUT,))
        db.execute("DROP TABLE dirty_blocks")
        db.execute("DROP TABLE tree_blobs")
        db.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    store.close()

    store = Store.open(store_dir, lambda: PASSWORD)
    assert dbmod.get_meta(store.db, "schema_version") == str(dbmod.SCHEMA_VERSION) == "3"
    fresh = new_store(path=tmp_path / "fresh")
    assert _table_sql(store.db) == _table_sql(fresh.db)
    snapshots.create(store, "v", "b")
    check_snapshot(store, "v", "b")
    assert snapshots.diff(store, "v@a", "v@b") == [(o * BS, BS) for o in (3, 7, 600, 1025)]
    # And writes after the migration are patched in.
    write_blocks(store, "v", [8, 1026], lambda b: _content("rnd", b))
    snapshots.create(store, "v", "c")
    check_snapshot(store, "v", "c")
    store.close()


def test_complete_marks_cover_snapshot_trees_and_gc_keeps_them_only_under_snapshots(
        new_store: Callable[..., Store]) -> None:
    """Every page and root of a snapshot's tree is marked complete (``treeblobs``); once no
    snapshot names them, gc drops the marks: a volume's cached tree can outlive the blocks
    it named."""
    store = new_store(block_size=BS)
    volumes.create(store, "v", 2 * LEAF)
    write_blocks(store, "v", range(0, 2 * FANOUT, 7), lambda b: _content("rnd", b))
    snapshots.create(store, "v", "a")

    def marks() -> set[tuple[int, int]]:
        return set(store.db.execute("SELECT row, level FROM tree_blobs"))

    pages = set(store.db.execute("SELECT blob, level FROM tree_pages"))
    root = snapshots.get(store, "v@a").root_row
    assert marks() == pages | {(root, treeblobs.ROOT)} and len(pages) == 3
    snapshots.delete(store, "v@a")
    gc.gc(store)
    assert marks() == set()
    snapshots.create(store, "v", "b")
    assert marks() == set(store.db.execute("SELECT blob, level FROM tree_pages")) | {
        (snapshots.get(store, "v@b").root_row, treeblobs.ROOT)}


def test_resize_marks_only_the_leaves_at_its_two_ends(new_store: Callable[..., Store]) -> None:
    """Growing a volume to 1 PiB marked every leaf in between (33 million rows, 50 s, and a
    snapshot that did not finish); now the leaves at the old and the new end are marked, and
    the pages between are holes."""
    store = new_store(block_size=BS)
    volumes.create(store, "v", 2 * LEAF)
    data = random.Random(4).randbytes(2 * LEAF)
    volumes.write(store, "v", 0, io.BytesIO(data))
    snapshots.create(store, "v", "small")
    volumes.resize(store, "v", 1 << 50)
    marked = store.db.execute("SELECT COUNT(*) FROM dirty_leaves").fetchone()[0]
    assert marked == 2
    snapshots.create(store, "v", "huge")
    assert snapshots.read(store, "v@huge", 0, 2 * LEAF) == data
    assert snapshots.read(store, "v@huge", (1 << 50) - BS, BS) == bytes(BS)
    volumes.resize(store, "v", 2 * LEAF, shrink=True)
    snapshots.create(store, "v", "small-again")
    check_snapshot(store, "v", "small-again")
    assert snapshots.root_of(store, snapshots.get(store, "v@small-again")) == \
        snapshots.root_of(store, snapshots.get(store, "v@small"))
