"""The tree-page cache: bounded, least recently used out first, and only ever a shortcut for
a verified read."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from dvx_dr.errors import IntegrityError
from dvx_dr.site.blobs import PageCache
from dvx_dr.site.store import Store


def page(n: int) -> bytes:
    return hashlib.sha256(n.to_bytes(4, "little")).digest() * 64  # 2 KiB


def pid(n: int) -> bytes:
    return hashlib.sha256(page(n)).digest()


def test_the_cache_keeps_the_most_recently_used_pages_within_its_limit() -> None:
    cache = PageCache(limit=3 * len(page(0)))
    for n in range(3):
        cache.put(pid(n), page(n))
    assert cache.get(pid(0)) == page(0)  # now the most recently used
    cache.put(pid(3), page(3))  # page 1 is the least recently used: it leaves
    assert cache.get(pid(1)) is None
    assert [cache.get(pid(n)) for n in (0, 2, 3)] == [page(0), page(2), page(3)]
    assert cache.size == 3 * len(page(0))
    cache.put(pid(4), b"x" * (cache.limit + 1))  # larger than the whole cache: not kept
    assert cache.get(pid(4)) is None and cache.size == 3 * len(page(0))
    cache.clear()
    assert cache.get(pid(0)) is None and cache.size == 0


def corrupt_all_segments(store: Store) -> None:
    for seg in Path(store.path, "segments").glob("*.seg"):
        data = bytearray(seg.read_bytes())
        for k in range(0, len(data), 7):
            data[k] ^= 0xFF
        seg.write_bytes(bytes(data))


def test_get_pages_reads_and_verifies_what_the_cache_lacks(
        new_store: Callable[..., Store]) -> None:
    store = new_store()
    with store.transaction():
        ids, rows = store.blobs.put_many([page(0), page(1)])
    store.blobs.writer.close()
    store.blobs.pages.put(ids[0], page(0))
    corrupt_all_segments(store)
    # Page 0 comes from the cache; page 1 is read from the damaged segment and fails.
    assert store.blobs.get_pages([(ids[0], rows[0])]) == [page(0)]
    with pytest.raises(IntegrityError):
        store.blobs.get_pages([(ids[0], rows[0]), (ids[1], rows[1])])
    assert store.blobs.pages.get(ids[1]) is None
