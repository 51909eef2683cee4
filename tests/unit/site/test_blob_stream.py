"""The blob stream: batches overlap (read ahead while earlier ones are written), and a blob
new in one batch and repeated in later ones, while the first is still being compressed or
after it is indexed, is stored once and every batch gets its row."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from dvx_dr.site import blobs, volumes
from dvx_dr.site.store import Store


def block(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest() * 2048  # 64 KiB, compressible


@pytest.mark.parametrize("ahead", [0, 1, 2, 3])
@pytest.mark.parametrize("encrypted", [True, False])
def test_repeated_blobs_are_stored_once_across_batches(
        new_store: Callable[..., Store], monkeypatch: pytest.MonkeyPatch, encrypted: bool,
        ahead: int) -> None:
    monkeypatch.setattr(blobs, "AHEAD", ahead)
    store = new_store(encrypted=encrypted)
    batches = [
        ["a", "b", "a"],
        ["b", "c"],         # b: new in the batch before (in flight, or written, by depth)
        ["a", "c", "d"],    # a: two batches back; c: one
        ["d", "e"],
        ["f"], ["g"], ["h"],
        ["a", "e", "h"],    # long after: a and e from the index
    ]
    with store.transaction():
        out = list(store.blobs.put_stream((k, [block(n) for n in names])
                                          for k, names in enumerate(batches)))
    assert [tag for tag, _, _ in out] == list(range(len(batches)))
    row_of: dict[str, int] = {}
    for (_, ids, rows), names in zip(out, batches, strict=True):
        assert ids == [hashlib.sha256(block(n)).digest() for n in names]
        for name, row in zip(names, rows, strict=True):
            assert row_of.setdefault(name, row) == row, f"{name} got two rows"
    distinct = sorted({n for names in batches for n in names})
    assert store.db.execute("SELECT COUNT(*) FROM blobs").fetchone()[0] == len(distinct)
    for name in distinct:
        assert store.blobs.get_row(row_of[name]) == block(name)


def test_later_batches_are_read_and_hashed_while_earlier_ones_are_written(
        new_store: Callable[..., Store]) -> None:
    store = new_store()
    pulled: list[int] = []

    def source() -> Iterator[tuple[int, Sequence[bytes]]]:
        for k in range(6):
            pulled.append(k)
            yield k, [block(f"{k}-{i}") for i in range(4)]

    seen_when_yielded = {}
    with store.transaction():
        for tag, _, _ in store.blobs.put_stream(source()):
            seen_when_yielded[tag] = max(pulled)
    # Batch k is written only after batch k + 1 was planned (its compression started) and
    # batch k + 2 was read and its hashing started.
    assert seen_when_yielded == {0: 2, 1: 3, 2: 4, 3: 5, 4: 5, 5: 5}


def test_closing_the_stream_early_leaves_the_index_consistent(
        new_store: Callable[..., Store]) -> None:
    store = new_store()
    with store.transaction():
        stream = store.blobs.put_stream((k, [block(f"x{k}")]) for k in range(10))
        _, _, (row,) = next(stream)
        stream.close()  # the batches read ahead and being compressed are dropped
    assert store.blobs.get_row(row) == block("x0")
    count = store.db.execute("SELECT COUNT(*) FROM blobs").fetchone()[0]
    assert count == 1


def test_import_repeats_blocks_across_batches_and_commits(
        new_store: Callable[..., Store], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """An image whose blocks repeat across batch and commit boundaries reads back exactly,
    and each distinct block is stored once."""
    monkeypatch.setattr(volumes, "IMPORT_BATCH", 3 * 4096)
    monkeypatch.setattr(volumes, "IMPORT_COMMIT", 2 * 3 * 4096)
    store = new_store(block_size=4096)
    names = ["a", "b", "c", "a", "d", "b", "zero", "c", "e", "a", "zero", "f", "e", "g"]
    data = b"".join(bytes(4096) if n == "zero" else block(n)[:4096] for n in names)
    image = tmp_path / "image.raw"
    image.write_bytes(data)
    volumes.import_file(store, "vm1", image)
    assert volumes.read(store, "vm1", 0, len(data)) == data
    count = store.db.execute("SELECT COUNT(*) FROM blobs").fetchone()[0]
    assert count == len(set(names) - {"zero"})
