"""gc's order, its transactions and the store's space reserve."""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from dvx_dr.errors import StoreFullError
from dvx_dr.site import gc, stats, volumes
from dvx_dr.site.store import RESERVE_BYTES, RESERVE_NAME, Store
from tests.conftest import PASSWORD

BS = 4096


def _blocks(tag: bytes, first: int, count: int) -> bytes:
    """``count`` distinct blocks (each compresses to a few bytes)."""
    return b"".join((tag + n.to_bytes(8, "big")).ljust(BS, b"\0")
                    for n in range(first, first + count))


def _trace(store: Store) -> list[str]:
    """Every SQL statement the store runs from now on, in order."""
    seen: list[str] = []
    store.db.set_trace_callback(seen.append)
    return seen


def test_the_reserve_is_made_at_init_holds_zeros_and_counts_as_no_data(
    new_store: Callable[..., Store], store_dir: Path
) -> None:
    store = new_store()
    reserve = store_dir / RESERVE_NAME
    assert reserve.read_bytes() == bytes(RESERVE_BYTES)
    assert reserve.stat().st_blocks * 512 >= RESERVE_BYTES  # allocated, not sparse
    volumes.create(store, "v", 8 * BS)
    volumes.write(store, "v", 0, io.BytesIO(_blocks(b"v", 0, 8)))
    segments = sum(p.stat().st_size for p in (store_dir / "segments").glob("*.seg"))
    assert stats.collect(store).stored_bytes == segments


def test_an_opening_store_makes_a_missing_reserve_but_never_fails_for_lack_of_space(
    new_store: Callable[..., Store], store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    new_store().close()
    reserve = store_dir / RESERVE_NAME
    reserve.unlink()
    Store.open(store_dir, lambda: PASSWORD).close()
    assert reserve.stat().st_size == RESERVE_BYTES

    reserve.unlink()

    def full(fd: int, offset: int, length: int) -> None:
        os.write(fd, bytes(1000))  # what a file system may leave of a failed allocation
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    Store.open(store_dir, lambda: PASSWORD).close()
    assert not reserve.exists()


def test_gc_sweeps_in_small_transactions(
    new_store: Callable[..., Store], store_dir: Path
) -> None:
    """Dead rows spread through the index (two volumes written in turns, one deleted): each
    sweep transaction deletes at most ``SWEEP_BATCH`` of them, and the write-ahead log stays
    well within the reserve, where one transaction for all needed more than it."""
    store = new_store(block_size=BS)
    n = 3 * gc.SWEEP_BATCH
    for name in ("a", "b"):
        volumes.create(store, name, n * BS)
    for first in range(0, n, 100):
        for name in ("a", "b"):
            volumes.write(store, name, first * BS, io.BytesIO(_blocks(name.encode(), first, 100)))
    volumes.delete(store, "a")
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = store_dir / "store.db-wal"
    peak = [0]
    per_transaction: list[int] = []

    def watch(sql: str) -> None:
        peak[0] = max(peak[0], wal.stat().st_size if wal.exists() else 0)
        if sql.startswith("BEGIN"):
            per_transaction.append(0)
        elif sql.startswith("DELETE FROM blobs"):
            per_transaction[-1] += 1

    store.db.set_trace_callback(watch)
    report = gc.gc(store)
    assert report.blobs_deleted == n
    assert max(per_transaction) == gc.SWEEP_BATCH and sum(per_transaction) == n
    assert peak[0] < RESERVE_BYTES // 2, peak[0]
    assert volumes.read(store, "b", 0, n * BS) == _blocks(b"b", 0, n)


def test_compaction_deletes_each_old_segment_right_after_its_commit(
    new_store: Callable[..., Store], store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store(block_size=BS)
    volumes.create(store, "v", 64 * BS)
    for seg in range(2):  # two segments, each 1/4 live once overwritten
        store.writer.close()
        volumes.write(store, "v", seg * 32 * BS, io.BytesIO(_blocks(b"old", seg * 32, 32)))
    store.writer.close()
    for seg in range(2):
        volumes.write(store, "v", seg * 32 * BS, io.BytesIO(_blocks(b"new", seg * 32, 24)))
    store.writer.close()
    events = _trace(store)
    real = os.unlink

    def unlink(path: str | os.PathLike[str], *args: object, **kwargs: object) -> None:
        events.append(f"unlink {Path(path).name}")
        real(path)

    monkeypatch.setattr(os, "unlink", unlink)
    report = gc.gc(store)
    assert report.segments_compacted == 2
    steps = [e for e in events if e.startswith(("BEGIN", "COMMIT", "unlink 0"))]
    # BEGIN, COMMIT, unlink: one compacted segment; then the other.
    assert steps[-6:] == ["BEGIN IMMEDIATE", "COMMIT", "unlink 00000001.seg",
                          "BEGIN IMMEDIATE", "COMMIT", "unlink 00000002.seg"], steps
    expected = _blocks(b"new", 0, 24) + _blocks(b"old", 24, 8) + _blocks(b"new", 32, 24) \
        + _blocks(b"old", 56, 8)
    assert volumes.read(store, "v", 0, 64 * BS) == expected


def test_gc_stopped_by_a_full_disk_says_what_it_reclaimed(
    new_store: Callable[..., Store], store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It had said "nothing of this operation was committed", though its sweep was."""
    store = new_store(block_size=BS)
    volumes.create(store, "dead", 16 * BS)
    volumes.write(store, "dead", 0, io.BytesIO(_blocks(b"d", 0, 16)))
    store.writer.close()
    volumes.create(store, "v", 16 * BS)
    volumes.write(store, "v", 0, io.BytesIO(_blocks(b"old", 0, 16)))
    store.writer.close()
    volumes.write(store, "v", 0, io.BytesIO(_blocks(b"new", 0, 12)))
    volumes.delete(store, "dead")

    def full(rows: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.blobs, "rewrite", full)
    with pytest.raises(StoreFullError) as caught:
        gc.gc(store)
    message = str(caught.value)
    assert "gc reclaimed" in message and "removed 28 unused blobs" in message, message
    assert "deleted 1 segment file" in message and "run 'dvx-dr datastore gc' again" in message
    assert "nothing of this operation was committed" not in message
    assert not (store_dir / "segments" / "00000001.seg").exists()
    assert (store_dir / RESERVE_NAME).stat().st_size == RESERVE_BYTES
    monkeypatch.undo()
    assert volumes.read(store, "v", 0, 16 * BS) == _blocks(b"new", 0, 12) + _blocks(b"old", 12, 4)
