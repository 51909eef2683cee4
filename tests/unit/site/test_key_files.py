"""Key files and the password's KDF around crashes and mistakes: a FIPS-mode change leaves
the mode and the keystore's KDF the safe way round, later key operations follow the recorded
mode, and destroying a startup key touches only what can be one of its copies."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dvx_dr.errors import KeysDestroyedError, StoreLockedError, UserError
from dvx_dr.site import db as dbmod
from dvx_dr.site import keys
from dvx_dr.site import store as store_module
from dvx_dr.site.keystore import Keystore, write_atomic
from dvx_dr.site.store import KEYSTORE_NAME, STARTUP_KEY_BYTES, Store
from tests.conftest import PASSWORD


def keystore_fips(store: Store) -> bool:
    return Keystore.load(store.path / KEYSTORE_NAME).fips


class Crash(Exception):
    """A process killed at this point (raised where the kill would land)."""


def test_leaving_fips_mode_never_leaves_the_mode_on_with_a_scrypt_keystore(
        new_store: Callable[..., Store], monkeypatch: pytest.MonkeyPatch) -> None:
    store = new_store()
    keys.set_modes(store, "approved", PASSWORD, None, None)
    assert keystore_fips(store)

    real = dbmod.set_meta

    def crash_at_the_mode(db: Any, key: str, value: str) -> None:
        if key == "fips_mode":
            raise Crash
        real(db, key, value)

    monkeypatch.setattr(dbmod, "set_meta", crash_at_the_mode)
    with pytest.raises(Crash):
        keys.set_modes(store, "off", PASSWORD, None, None)
    monkeypatch.undo()
    # The mode still says approved, so the keystore must still have the approved KDF.
    assert store.meta("fips_mode") == "approved"
    assert keystore_fips(store)


@pytest.mark.parametrize("operation", ["change-password", "rotate-key"])
def test_key_operations_follow_the_recorded_fips_mode(
        new_store: Callable[..., Store], operation: str) -> None:
    store = new_store()
    assert not keystore_fips(store)
    # What an interrupted change could leave on an older version: the mode approved, the
    # keystore still under scrypt. The next key operation puts the approved KDF in place.
    with store.transaction() as db:
        dbmod.set_meta(db, "fips_mode", "approved")
    if operation == "change-password":
        keys.change_password(store, PASSWORD, "another password, long enough")
    else:
        keys.rotate_key(store, PASSWORD)
    assert keystore_fips(store)


def test_locking_destroys_only_leftovers_that_can_be_startup_keys(
        new_store: Callable[..., Store], tmp_path: Path) -> None:
    store = new_store()
    key = tmp_path / "etc" / "startup.key"
    keys.set_modes(store, None, PASSWORD, "unlocked", key)
    image = tmp_path / "disk.img"
    image.write_bytes(os.urandom(1 << 20))
    before = image.read_bytes()
    (key.parent / "startup.key.old").symlink_to(image)
    notes = key.parent / "startup.key.tmp"
    notes.write_text("an operator's notes, not a key\n")
    leftover = key.parent / "other.key"
    leftover.write_bytes(os.urandom(STARTUP_KEY_BYTES))
    real_leftover = key.parent / "startup.key.old.real"
    real_leftover.write_bytes(os.urandom(STARTUP_KEY_BYTES))

    keys.set_modes(store, None, PASSWORD, "locked", None)
    assert not key.exists()
    assert image.read_bytes() == before
    assert (key.parent / "startup.key.old").is_symlink()
    assert notes.read_text() == "an operator's notes, not a key\n"

    # Unlocked again: the key is written beside the link without following it. Then a real
    # leftover of an interrupted key write (a 32-byte regular file) does go at the next lock.
    keys.set_modes(store, None, PASSWORD, "unlocked", key)
    assert image.read_bytes() == before
    (key.parent / "startup.key.old").unlink()
    real_leftover.rename(key.parent / "startup.key.old")
    keys.set_modes(store, None, PASSWORD, "locked", None)
    assert not (key.parent / "startup.key.old").exists()
    assert leftover.exists()


def test_a_key_write_does_not_follow_a_link_in_the_way(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"a disk image " * 1000)
    before = image.read_bytes()
    key = tmp_path / "startup.key"
    key.write_bytes(os.urandom(STARTUP_KEY_BYTES))
    old_key = key.read_bytes()
    (tmp_path / "startup.key.tmp").symlink_to(image)
    with pytest.raises(UserError, match=r"startup\.key\.tmp is in the way"):
        write_atomic(key, os.urandom(STARTUP_KEY_BYTES))
    assert image.read_bytes() == before and key.read_bytes() == old_key

    (tmp_path / "startup.key.tmp").unlink()
    (tmp_path / "startup.key.old").symlink_to(image)
    with pytest.raises(UserError, match=r"startup\.key\.old is in the way"):
        write_atomic(key, os.urandom(STARTUP_KEY_BYTES))
    assert image.read_bytes() == before and key.read_bytes() == old_key
    assert not (tmp_path / "startup.key.tmp").exists()


def test_a_crypto_erase_a_crash_interrupted_is_finished_when_the_store_opens(
        new_store: Callable[..., Store], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = new_store()
    key = tmp_path / "startup.key"
    keys.set_modes(store, None, PASSWORD, "unlocked", key)
    keystore = store.path / KEYSTORE_NAME

    def crash(path: Path, size: int | None) -> None:
        raise Crash

    monkeypatch.setattr(store_module, "destroy_key_file", crash)
    with pytest.raises(Crash):
        keys.crypto_erase(store, "site-a")
    monkeypatch.undo()
    store.close()
    assert keystore.exists() and key.exists()  # what the crash left: keys still unwrappable

    with pytest.raises(KeysDestroyedError):
        Store.open(store.path, lambda: PASSWORD)
    assert not keystore.exists() and not key.exists()
    erased = Store.open(store.path, allow_locked=True)
    try:
        assert erased.meta(store_module.ERASE_PENDING) is None
        assert keys.status(erased)["keys_destroyed"]
    finally:
        erased.close()


def test_a_locked_store_names_and_writes_nothing(new_store: Callable[..., Store]) -> None:
    """Without its keys a keyed store had an index of raw ids: a write that got through
    would have put plaintext-derived names on disk, unencrypted."""
    store = new_store()
    path = store.path
    store.close()
    locked = Store.open(path, allow_locked=True)
    try:
        assert locked.locked
        with pytest.raises(StoreLockedError), locked.transaction():
            locked.blobs.put_many([b"written while locked"])
        assert locked.db.execute("SELECT COUNT(*) FROM blobs").fetchone()[0] == 0
    finally:
        locked.close()


def test_an_erase_that_meets_a_link_finishes_and_says_so(new_store: Callable[..., Store],
                                                         tmp_path: Path) -> None:
    """A startup key path that became a link: the erase had destroyed the keystore, then
    raised, and left its 'pending' mark, so every later opening raised the same."""
    store = new_store()
    key = tmp_path / "startup.key"
    keys.set_modes(store, None, PASSWORD, "unlocked", key)
    other = tmp_path / "other-file"
    other.write_bytes(b"not ours")
    key.unlink()
    key.symlink_to(other)

    result = keys.crypto_erase(store, "site-a")
    assert [m for m in result["not_destroyed"] if f"{key} is not a regular file" in m]
    assert not (store.path / KEYSTORE_NAME).exists()
    assert other.read_bytes() == b"not ours"
    store.close()
    erased = Store.open(store.path, allow_locked=True)
    try:
        assert erased.meta(store_module.ERASE_PENDING) is None
    finally:
        erased.close()
