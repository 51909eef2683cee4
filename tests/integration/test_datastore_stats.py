"""``datastore stats``: the ratios speak of volume data, not of the trees that index it."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tests.conftest import run_cli

KiB = 1024


def stats(store: Path) -> dict[str, Any]:
    return dict(json.loads(run_cli("datastore", "stats", "--json", "--store", store).stdout))


def test_snapshot_trees_are_not_counted_as_unique_data(tmp_path: Path) -> None:
    """One incompressible 4 KiB block in a 1 TiB volume, then a snapshot: its tree pages had
    been counted as unique data, giving a dedup ratio of 0.15x and a compression ratio of
    12x for random bytes. The tree is reported on its own now."""
    store = tmp_path / "store"
    run_cli("site", "init", "--store", store, "--name", "site-a", "--block-size", "4KiB",
            "--no-encryption")
    run_cli("volume", "create", "v", "--size", "1TiB", "--store", store)
    block = random.Random(5).randbytes(4 * KiB)
    run_cli("volume", "write", "v", "--offset", "1GiB", "-", "--store", store, input=block)
    run_cli("snapshot", "create", "v", "--name", "a", "--store", store)
    got = stats(store)
    assert got["logical_bytes"] == 2 * 4 * KiB  # the volume and its snapshot
    assert got["unique_bytes"] == 4 * KiB
    assert got["dedup_ratio"] == 2.0
    assert got["compression_ratio"] <= 1.0  # random bytes are stored as they are
    assert got["tree_unique_bytes"] > 0  # the snapshot's pages and root
    assert got["extent_bytes"] > got["tree_extent_bytes"] > 0
    text = run_cli("datastore", "stats", "--store", store).stdout.decode()
    assert "tree unique bytes" in text

    # A second block with the same bytes in another volume is deduplicated.
    run_cli("volume", "create", "w", "--size", "1MiB", "--store", store)
    run_cli("volume", "write", "w", "-", "--store", store, input=block)
    again = stats(store)
    assert again["unique_bytes"] == 4 * KiB
    assert again["dedup_ratio"] == 3.0


def test_snapshot_diff_shows_a_size_change(tmp_path: Path) -> None:
    """Snapshots of 8 KiB and 16 KiB (a grow between them) had been reported identical ("0
    bytes differ"): the space only the larger one has differs too, and the sizes are said."""
    store = tmp_path / "store"
    args = ["--store", store]
    run_cli("site", "init", *args, "--name", "site-a", "--block-size", "4KiB",
            "--no-encryption")
    run_cli("volume", "create", "d", "--size", "8KiB", *args)
    run_cli("snapshot", "create", "d", "--name", "a", *args)
    run_cli("volume", "resize", "d", "--size", "16KiB", *args)
    run_cli("snapshot", "create", "d", "--name", "b", *args)
    run_cli("volume", "write", "d", "--offset", "5000", "-", *args, input=b"x")
    run_cli("snapshot", "create", "d", "--name", "c", *args)

    def diff(a: str, b: str) -> list[dict[str, int]]:
        return list(json.loads(run_cli("snapshot", "diff", a, b, "--json", *args).stdout))

    assert diff("d@a", "d@b") == [{"offset": 8 * KiB, "length": 8 * KiB}]
    assert diff("d@b", "d@a") == [{"offset": 8 * KiB, "length": 8 * KiB}]
    assert diff("d@b", "d@c") == [{"offset": 4 * KiB, "length": 4 * KiB}]  # a whole block
    # Both at once: a block changed next to the grown space, merged into one range.
    assert diff("d@a", "d@c") == [{"offset": 4 * KiB, "length": 12 * KiB}]
    text = run_cli("snapshot", "diff", "d@a", "d@b", *args).stdout.decode()
    assert "d@a is 8192 bytes (8.0 KiB), d@b 16384 bytes (16.0 KiB)" in text
    assert "# 1 range, 8192 bytes (8.0 KiB) differ, in whole blocks" in text
