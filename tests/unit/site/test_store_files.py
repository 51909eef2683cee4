"""The modes of a store's files: the store is its owner's alone, store.db included (it names
volumes, snapshots, groups and sites), whatever the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dvx_dr.site.store import Store


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(store: Path) -> dict[str, int]:
    """Every file and directory of ``store`` (itself as '.') -> its mode."""
    found = {".": mode(store)}
    found.update((str(p.relative_to(store)), mode(p)) for p in store.rglob("*"))
    return found


@pytest.fixture
def umask() -> Iterator[Callable[[int], int]]:
    """``os.umask``, the process's umask put back after the test."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o000])
@pytest.mark.parametrize("existing", [False, True])
def test_a_new_store_is_its_owners_alone(tmp_path: Path, umask: Callable[[int], int],
                                         mask: int, existing: bool) -> None:
    """store.db and its log and index (SQLite gives them the database's mode) are 0600 like
    every other file, the directories 0700, whatever the umask and the mode of an empty
    directory given; store.db was 0644 less the umask, the store directory 0777 less it."""
    path = tmp_path / "store"
    if existing:
        path.mkdir(mode=0o777)
        path.chmod(0o775)
    umask(mask)
    store = Store.init(path, "site-a", password=None)
    try:
        found = modes(path)  # while it is open: the log and its index are there
    finally:
        store.close()
    assert {"store.db", "store.db-wal", "store.db-shm", "lock", "reserve"} <= set(found)
    expected = {name: 0o700 if (path / name).is_dir() else 0o600 for name in found}
    assert found == expected


def test_opening_a_store_takes_back_what_its_database_gave_others(tmp_path: Path) -> None:
    """A store made before (store.db 0644, a log left 0644 by a crash) is tightened, without a
    word, when it is opened to be written; the log and index SQLite makes then are 0600."""
    path = tmp_path / "store"
    Store.init(path, "site-a", password=None).close()
    (path / "store.db").chmod(0o644)
    (path / "store.db-wal").touch(0o644)
    (path / "store.db-wal").chmod(0o644)
    store = Store.open(path)
    try:
        assert {name: mode(path / name) for name in ("store.db", "store.db-wal",
                                                     "store.db-shm")} == dict.fromkeys(
            ("store.db", "store.db-wal", "store.db-shm"), 0o600)
    finally:
        store.close()
