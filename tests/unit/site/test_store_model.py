"""Property test: the store against an in-memory model of its volumes and snapshots."""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dvx_dr.site import gc, scrub, snapshots, volumes
from dvx_dr.site.store import Store

BS = 4096
SIZE = 1100 * BS + 123  # three leaf pages and a level above; not whole blocks

LEAF = 512 * BS  # bytes under one leaf page of the snapshot tree
#: Offsets spread over all three leaf pages, with page and block boundaries made likely.
offsets = st.builds(
    lambda leaf, block, byte: min(SIZE - 1, leaf * LEAF + block * BS + byte),
    st.integers(0, 2),
    st.one_of(st.just(0), st.just(511), st.integers(0, 511)),
    st.one_of(st.just(0), st.just(BS - 1), st.integers(0, BS - 1)),
)
write_op = st.tuples(
    st.just("write"),
    offsets,
    st.integers(1, 3 * BS),
    st.sampled_from([b"\0", b"a", b"xyz", b"random"]),
)
#: A whole leaf's range written at once: with zeros the leaf becomes a hole; with the same
#: repeated bytes as before it goes back to content an earlier snapshot had. Either way a new
#: upper page can stand above no new leaf at all, a case small writes never reach.
fill_leaf = st.tuples(st.just("fill_leaf"), st.integers(0, 2), st.sampled_from([b"\0", b"a"]))
ops = st.lists(
    st.one_of(
        write_op,
        fill_leaf,
        st.tuples(st.just("snapshot")),
        st.tuples(st.just("delete_snapshot"), st.integers(0, 10)),
        st.tuples(st.just("gc")),
        st.tuples(st.just("reopen")),
        st.tuples(st.just("resize"), st.integers(1, 2 * SIZE)),
    ),
    min_size=1,
    max_size=25,
)


def _fill(kind: bytes, length: int, seed: int) -> bytes:
    if kind == b"random":
        import random

        return random.Random(seed).randbytes(length)
    return (kind * (length // len(kind) + 1))[:length]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops, encrypted=st.booleans())
@example(ops=[("write", 0, 10, b"a"), ("write", 2 * LEAF, 10, b"xyz"), ("snapshot",),
              ("write", 2 * LEAF + 5, 2, b"a"), ("gc",), ("snapshot",)], encrypted=True)
@example(ops=[("write", 0, 3 * BS, b"random"), ("write", LEAF, 3 * BS, b"random"),
              ("write", 2 * LEAF, 3 * BS, b"random"), ("snapshot",), ("fill_leaf", 2, b"\0"),
              ("snapshot",), ("write", 0, BS, b"xyz"), ("snapshot",), ("gc",)], encrypted=False)
@example(ops=[("fill_leaf", 1, b"a"), ("snapshot",), ("write", LEAF, 10, b"xyz"), ("snapshot",),
              ("fill_leaf", 1, b"a"), ("snapshot",), ("write", 0, 10, b"xyz"),
              ("delete_snapshot", 0), ("gc",)], encrypted=True)
def test_store_matches_model_and_snapshots_never_change(ops: list[tuple], encrypted: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="dvx-model-"))
    password = "model password"
    store = Store.init(root / "s", "model", BS, password if encrypted else None)
    try:
        volumes.create(store, "v", SIZE)
        model = bytearray(SIZE)
        snaps: dict[str, bytes] = {}
        counter = 0
        for op in ops:
            counter += 1
            if op[0] == "write":
                _, offset, length, kind = op
                length = min(length, len(model) - offset)
                if length <= 0:
                    continue
                data = _fill(kind, length, counter)
                volumes.write(store, "v", offset, io.BytesIO(data))
                model[offset:offset + length] = data
            elif op[0] == "fill_leaf":
                _, leaf, kind = op
                start, end = leaf * LEAF, min((leaf + 1) * LEAF, len(model))
                if start >= end:
                    continue
                data = _fill(kind, end - start, counter)
                volumes.write(store, "v", start, io.BytesIO(data))
                model[start:end] = data
            elif op[0] == "snapshot":
                name = f"s{counter}"
                snapshots.create(store, "v", name)
                snaps[f"v@{name}"] = bytes(model)
            elif op[0] == "delete_snapshot" and snaps:
                spec = sorted(snaps)[op[1] % len(snaps)]
                snapshots.delete(store, spec)
                del snaps[spec]
            elif op[0] == "gc":
                gc.gc(store, compact_below=0.9)
            elif op[0] == "reopen":
                store.close()
                store = Store.open(root / "s", lambda: password)
            elif op[0] == "resize":
                new = op[1]
                volumes.resize(store, "v", new, shrink=True)
                model = model[:new] + bytearray(max(0, new - len(model)))
            assert volumes.read(store, "v", 0, len(model)) == bytes(model)
        for spec, content in snaps.items():
            assert snapshots.read(store, spec, 0, len(content)) == content, spec
        gc.gc(store, compact_below=1.01)  # compact everything: every extent moves
        for spec, content in snaps.items():
            assert snapshots.read(store, spec, 0, len(content)) == content, spec
        assert volumes.read(store, "v", 0, len(model)) == bytes(model)
        assert scrub.scrub(store).clean
        # Diff agrees with the model at block granularity.
        specs = sorted(snaps)
        for a, b in zip(specs, specs[1:], strict=False):
            ranges = snapshots.diff(store, a, b)
            ca, cb = snaps[a], snaps[b]
            n, small = max(len(ca), len(cb)), min(len(ca), len(cb))
            ca, cb = ca.ljust(n, b"\0"), cb.ljust(n, b"\0")
            changed = {k for o, ln in ranges for k in range(o // BS, (o + ln - 1) // BS + 1)}
            # A block reaching past the smaller snapshot's end differs whatever it holds.
            expect = {i // BS for i in range(0, n, BS)
                      if ca[i:i + BS] != cb[i:i + BS] or (n > small and i + BS > small)}
            assert changed == expect
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)


def test_scrub_names_a_block_whose_index_row_is_missing(tmp_path: Path) -> None:
    """A volume block naming a blob row the index lost: scrub reported nothing and stopped
    with an IntegrityError; it names the volume and offset now, like any damage."""
    store = Store.init(tmp_path / "s", "model", BS, None)
    try:
        volumes.create(store, "v", 1 << 20)
        volumes.write(store, "v", BS, io.BytesIO(bytes(range(256)) * 16))  # one block
        (row,) = store.db.execute("SELECT blob FROM blocks").fetchone()
        with store.transaction() as db:
            db.execute("DELETE FROM blobs WHERE row=?", (row,))
        report = scrub.scrub(store)
        assert report.damaged == [f"volume v offset {BS}: names blob row {row}, which is "
                                  "missing from the index"]
    finally:
        store.close()
