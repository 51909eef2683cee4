"""The key manager: the encryption lifecycle of a live store.

Every operation works on a store holding live data, offline or inside a running site (through
the same ``ops`` names). What each one writes, and why a crash at any point is safe:

- **enable** on a never-encrypted store: new random index key and key version 1, wrapped under
  the new password in a new keystore (written atomically), then one transaction re-keys the
  index (raw ids become HMAC names, ids are sealed) and switches new writes to encryption. A
  crash before that commit leaves a plain store and an unused keystore, which the next enable
  replaces. Existing extents stay plain until ``convert``.
- **disable**: new extents are written plain; encrypted ones stay readable.
- **change-password**: rewraps the keys (new salt); no extent is touched. Atomic file replace:
  after a crash exactly one of the old and new password opens the store.
- **rotate-key**: adds key version N+1 to the keystore, then makes it current in the database.
  A crash in between leaves an unused version in the keystore.
- **convert**: rewrites every extent that is not in the current form (plain, or an older key
  version) into new segments, segment by segment, each committed before its old segment file
  is deleted right after (``gc``), so it needs free space for about one segment; rerunning
  after a crash, or after a full disk stopped it, continues where it stopped.
- **startup mode**: *unlocked* writes a random 256-bit startup key to a 0600 file outside the
  store and wraps the keys under it as well, so the site starts without a password; *locked*
  removes that wrapping and overwrites the file.
- **FIPS mode**: *approved* rewraps the keys under PBKDF2-HMAC-SHA256 (600 000 iterations)
  instead of scrypt; every other algorithm in use is already FIPS-approved (AES-256-XTS,
  AES key wrap, AES-GCM, HMAC-SHA256, HKDF-SHA256, SHA-256). *validated* also requires
  OpenSSL's FIPS provider to be active.
- **crypto-erase**: overwrites (random bytes, fsync) and deletes every wrapped copy of the
  keys, keystore and startup key file; encrypted data is unrecoverable at once.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.bindings._rust import openssl as rust_openssl

from dvx_dr.errors import KeysDestroyedError, StoreFullError, UserError
from dvx_dr.site import db as dbmod
from dvx_dr.site import gc
from dvx_dr.site.crypto import IndexKeys, new_index_key, new_tek
from dvx_dr.site.keystore import (
    KeyMaterial,
    Keystore,
    destroy_key_file,
    scrub_file,
    write_atomic,
)
from dvx_dr.site.segments import fsync_dir
from dvx_dr.site.store import (
    ERASE_PENDING,
    KEYSTORE_NAME,
    STARTUP_KEY_BYTES,
    Store,
    finish_erase,
    read_startup_key,
)
from dvx_dr.units import count, format_size

FIPS_MODES = ("off", "approved", "validated")


def fips_provider_active() -> bool:
    return bool(rust_openssl.is_fips_enabled())


def _require_keys(store: Store) -> KeyMaterial:
    if (refused := store.refusal()) is not None:
        raise refused
    if store.keys is None or store.keystore is None:
        raise UserError("encryption has never been enabled on this store; "
                        "'dvx-dr datastore encryption enable' does that")
    return store.keys


def _check_password(store: Store, password: str | None) -> str:
    if password is None:
        raise UserError("give the current password (--password-file FILE or the prompt)")
    assert store.keystore is not None
    store.keystore.verify_password(password)
    return password


def status(store: Store) -> dict[str, Any]:
    kv_bytes = {kv: (n, b) for kv, n, b in store.db.execute(
        "SELECT key_version, COUNT(*), SUM(length) FROM blobs GROUP BY key_version")}
    keystore = store.keystore
    if keystore is None and store.keyed and (store.path / KEYSTORE_NAME).exists():
        keystore = Keystore.load(store.path / KEYSTORE_NAME, store.store_id)
    versions = []
    for entry in keystore.key_versions() if keystore else []:
        n, b = kv_bytes.get(entry["version"], (0, 0))
        versions.append(entry | {"extents": n, "bytes": b})
    plain_n, plain_b = kv_bytes.get(0, (0, 0))
    return {
        "encryption": "on" if store.encrypted else "off",
        "keys_destroyed": store.meta("keys_destroyed") == "1",
        "locked": store.locked if store.served else None,
        "startup_mode": ("unlocked" if keystore and keystore.has_startup_slot else "locked")
        if keystore else None,
        "fips_mode": store.meta("fips_mode") or "off",
        "fips_provider_active": fips_provider_active(),
        "kdf": keystore.doc["kdf"]["name"] if keystore else None,
        "current_key_version": int(store.meta("key_version") or 0),
        "key_versions": versions,
        "plain": {"extents": plain_n, "bytes": plain_b},
    }


def enable(store: Store, new_password: str | None) -> dict[str, Any]:
    """Switch encryption on. A store that had keys before uses them again, with their
    password (``new_password`` must then be None); otherwise new keys are made, under
    ``new_password``."""
    if store.meta("keys_destroyed") == "1":
        raise KeysDestroyedError("keys destroyed: this store cannot be encrypted again")
    if store.keyed and new_password is not None:
        raise UserError("this store has encryption keys from before, and enabling encryption "
                        "again uses them and their password; give no new password "
                        "('change-password' changes it)")
    if store.keyed:
        _require_keys(store)
        if store.encrypted:
            return {"encryption": "on", "changed": False, "new_keys": False}
        with store.transaction() as db:
            dbmod.set_meta(db, "encryption", "on")
        store.apply_write_setting()
        return {"encryption": "on", "changed": True, "new_keys": False}
    if new_password is None:
        raise UserError("enabling encryption needs a new password (--new-password-file or the "
                        "prompt)")
    keys = KeyMaterial(new_index_key(), {1: new_tek()})
    fips = _fips(store)
    keystore = Keystore.create(store.path / KEYSTORE_NAME, store.store_id, store.site,
                               new_password, keys, fips=fips)
    index = IndexKeys(keys.index_key)
    try:
        with store.transaction() as db:
            rows = db.execute("SELECT row, sealed_id FROM blobs").fetchall()
            for row, raw_id in rows:
                name = index.name(raw_id)
                db.execute("UPDATE blobs SET name=?, sealed_id=? WHERE row=?",
                           (name, index.seal(name, raw_id), row))
            for key, value in (("keyed", "1"), ("encryption", "on"), ("key_version", "1")):
                dbmod.set_meta(db, key, value)
    except BaseException:
        # The store stays unencrypted: the new keys protect nothing, and a keystore file
        # would only mislead (the warning said to back it up). A kill here leaves it to the
        # next opening, which scrubs it. Unless the commit did happen (an interrupt just
        # after it): then the keystore is the store's, and stays.
        with contextlib.suppress(Exception):
            if dbmod.get_meta(store.db, "keyed") != "1":
                scrub_file(store.path / KEYSTORE_NAME)
        raise
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.keystore = keystore
    store.install_keys(keys)
    return {"encryption": "on", "changed": True, "new_keys": True, "reindexed": len(rows)}


def disable(store: Store) -> dict[str, Any]:
    _require_keys(store)
    if not store.encrypted:
        return {"encryption": "off", "changed": False}
    with store.transaction() as db:
        dbmod.set_meta(db, "encryption", "off")
    store.apply_write_setting()
    return {"encryption": "off", "changed": True}


def change_password(store: Store, password: str | None, new_password: str) -> dict[str, Any]:
    keys = _require_keys(store)
    _check_password(store, password)
    assert store.keystore is not None
    store.keystore.rewrap(keys, new_password, fips=_fips(store))
    return {"changed": True}


def _fips(store: Store) -> bool:
    """Whether the store's FIPS mode asks for approved algorithms (the password's KDF)."""
    return store.meta("fips_mode") in ("approved", "validated")


def rotate_key(store: Store, password: str | None,
               startup_key: Path | None = None) -> dict[str, Any]:
    keys = _require_keys(store)
    pw = _check_password(store, password)
    assert store.keystore is not None
    startup = read_startup_key(startup_key, strict=True) if startup_key else None
    if store.keystore.has_startup_slot:
        if startup is None:
            raise UserError("the store is in unlocked startup mode but its startup key file "
                            f"({store.meta('startup_key') or 'not recorded'}) is not readable; "
                            "set a new one with 'encryption set --startup-mode unlocked "
                            "--startup-key PATH', or lock the store with --startup-mode locked")
        try:  # the new key version is wrapped under it: it must be this store's key
            store.keystore.unlock_with_startup_key(startup)
        except UserError:
            raise UserError(f"{startup_key} is not this store's startup key; nothing was "
                            "changed") from None
    version = max([*keys.teks, int(store.meta("key_version") or 0)]) + 1
    store.keystore.add_tek(keys, version, new_tek(), pw, startup, fips=_fips(store))
    store.install_keys(keys)
    with store.transaction() as db:
        dbmod.set_meta(db, "key_version", str(version))
    store.apply_write_setting()
    return {"key_version": version}


def convert(store: Store, to: str, progress: Callable[[int], None] | None = None
            ) -> dict[str, Any]:
    if to not in ("encrypted", "plain"):
        raise UserError(f"convert --to: expected encrypted or plain, got {to!r}")
    if to == "encrypted":
        _require_keys(store)
        if not store.encrypted:
            raise UserError("encryption is off: 'dvx-dr datastore encryption enable' first")
        wanted = int(store.meta("key_version") or 0)
    else:
        if store.keyed:
            _require_keys(store)
        if store.encrypted:
            raise UserError("encryption is on: 'dvx-dr datastore encryption disable' first")
        wanted = 0
    with store.mutex:
        store.writer.close()  # seal the open segment: it may hold extents of the old form
        odd = {seg for (seg,) in store.db.execute(
            "SELECT DISTINCT seg FROM blobs WHERE key_version != ?", (wanted,))}
        moved = store.db.execute("SELECT COALESCE(SUM(length), 0) FROM blobs "
                                 "WHERE key_version != ?", (wanted,)).fetchone()[0]
        # gc first deletes what is dead, then rewrites the segments holding the old form one
        # at a time, deleting each old file once its copies are committed: the disk needs room
        # for about one segment's live extents.
        report = gc.GcReport()
        try:
            gc.gc(store, select=lambda seg, live, size: seg in odd, progress_bytes=progress,
                  report=report)
        except StoreFullError:
            raise StoreFullError(store.full_message(
                _converted(store, report, wanted), _CONVERT_AGAIN)) from None
        if report.segments_skipped:
            raise StoreFullError(store.full_message(
                _converted(store, report, wanted),
                f"the next segment needs {format_size(report.space_needed)} free: "
                + _CONVERT_AGAIN))
        left = store.db.execute("SELECT COUNT(*) FROM blobs WHERE key_version != ?",
                                (wanted,)).fetchone()[0]
    return {"to": to, "key_version": wanted, "bytes_converted": moved,
            "segments_rewritten": report.segments_compacted, "extents_left": left}


_CONVERT_AGAIN = ("free space (delete snapshots or volumes, then 'dvx-dr datastore gc') and run "
                  "convert again; it continues where it stopped")


def _converted(store: Store, report: gc.GcReport, wanted: int) -> str:
    """What a convert stopped by a full disk had done."""
    left_n, left_b = store.db.execute(
        "SELECT COUNT(*), COALESCE(SUM(length), 0) FROM blobs WHERE key_version != ?",
        (wanted,)).fetchone()
    return (f"convert rewrote {count(report.segments_compacted, 'segment')} "
            f"({format_size(report.bytes_compacted)}; {left_n} extents, "
            f"{format_size(left_b)} of the old form are left, and no old copy of what it "
            f"rewrote stays on disk) and gc reclaimed {format_size(max(0, report.reclaimed))}")


def set_modes(store: Store, fips_mode: str | None, password: str | None,
              startup_mode: str | None, startup_key: Path | None) -> dict[str, Any]:
    """``encryption set``: the FIPS mode and/or the startup mode. Every request is checked
    (the password once) before either is applied, so a refused one leaves the other
    unchanged too."""
    if fips_mode is None and startup_mode is None:
        raise UserError("nothing to set: give --startup-mode and/or --fips-mode")
    password_ok = _check_fips_mode(store, fips_mode, password) if fips_mode is not None else None
    doomed = (_check_startup_mode(store, startup_mode, startup_key)
              if startup_mode is not None else set())
    out: dict[str, Any] = {}
    if startup_mode is not None:
        out |= _apply_startup_mode(store, startup_mode, startup_key, doomed)
    if fips_mode is not None:
        out |= _apply_fips_mode(store, fips_mode, password_ok)
    return out


def _check_startup_mode(store: Store, mode: str, startup_key: Path | None) -> set[Path]:
    """What a startup-mode change refuses, checked before anything changes; the key files
    that locking would destroy."""
    _require_keys(store)
    if mode == "unlocked":
        if startup_key is None:
            raise UserError("unlocked startup mode needs a startup key path: set startup_key in "
                            "site.yaml (outside the store directory) or pass --startup-key")
        if Path(os.path.realpath(startup_key)).is_relative_to(os.path.realpath(store.path)):
            raise UserError("keep the startup key outside the store directory, so that a copy "
                            "of the store alone cannot be unlocked")
        # The key is written over whatever is at that path: it must be a key already.
        _refuse_unless_startup_key(store, startup_key, "overwritten")
        return set()
    if mode == "locked":
        return _startup_keys_to_destroy(store, startup_key)
    raise UserError(f"--startup-mode: expected locked or unlocked, got {mode!r}")


def _apply_startup_mode(store: Store, mode: str, startup_key: Path | None, doomed: set[Path]
                        ) -> dict[str, Any]:
    keys = _require_keys(store)
    assert store.keystore is not None
    if mode == "unlocked":
        assert startup_key is not None
        key = os.urandom(STARTUP_KEY_BYTES)
        try:
            startup_key.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot write the startup key at {startup_key}: "
                            f"{exc.strerror or exc}; name a file in a writable directory "
                            "outside the store") from None
        # The keystore first: if it cannot be written, nothing has changed (the old key file
        # still opens the store). If then the key file cannot be, the password still does.
        store.keystore.set_startup_key(keys, key)
        try:
            write_atomic(startup_key, key, 0o600)
        except OSError as exc:
            raise UserError(f"the keys are now wrapped under a new startup key, which could not "
                            f"be written to {startup_key} ({exc.strerror or exc}): the store "
                            "opens with its password; run 'encryption set --startup-mode "
                            "unlocked' again once the path is writable") from None
        with store.transaction() as db:
            dbmod.set_meta(db, "startup_key", str(startup_key))
    else:
        store.keystore.set_startup_key(keys, None)
        for path in doomed:
            destroy_key_file(path, STARTUP_KEY_BYTES)
        with store.transaction() as db:
            dbmod.delete_meta(db, "startup_key")
    return {"startup_mode": mode, "startup_key": str(startup_key) if mode == "unlocked" else None}


def _check_fips_mode(store: Store, mode: str, password: str | None) -> str | None:
    """What a FIPS-mode change refuses, checked before anything changes; the checked password
    of a store with keys."""
    if mode not in FIPS_MODES:
        raise UserError(f"--fips-mode: expected one of {', '.join(FIPS_MODES)}, got {mode!r}")
    if mode == "validated" and not fips_provider_active():
        raise UserError(
            "FIPS validated mode needs OpenSSL's FIPS provider, which is not active in this "
            "process: install a FIPS-validated OpenSSL 3 with its fips provider, enable it in "
            "openssl.cnf (or OPENSSL_CONF), and build cryptography against it; then retry. "
            "'approved' mode works without it.")
    if store.keyed:
        _require_keys(store)
        return _check_password(store, password)
    return None


def _apply_fips_mode(store: Store, mode: str, password: str | None) -> dict[str, Any]:
    """``password`` is the one ``_check_fips_mode`` checked (None for a store without keys)."""
    # In the order a crash can only leave the safe way round: an approved password KDF under
    # a mode that does not ask for one, never the other way. Key operations after it follow
    # the recorded mode (``_fips``), whatever KDF the keystore was last written with.
    def rewrap() -> None:
        if password is not None:
            assert store.keystore is not None and store.keys is not None
            store.keystore.rewrap(store.keys, password, fips=mode != "off")

    if mode != "off":
        rewrap()
    with store.transaction() as db:
        dbmod.set_meta(db, "fips_mode", mode)
    if mode == "off":
        rewrap()
    return {"fips_mode": mode, "fips_provider_active": fips_provider_active()}


def crypto_erase(store: Store, confirm_name: str, delete_plain: bool = False,
                 startup_key: Path | None = None) -> dict[str, Any]:
    if confirm_name != store.site:
        raise UserError(f"crypto erase not confirmed: type the site name {store.site!r} exactly")
    if not store.keyed:
        raise UserError("this store has no keys to erase (it was never encrypted)")
    plain_n, plain_b = store.db.execute(
        "SELECT COUNT(*), COALESCE(SUM(length), 0) FROM blobs WHERE key_version=0").fetchone()
    doomed = _startup_keys_to_destroy(store, startup_key)
    with store.mutex:
        with store.transaction() as db:
            dbmod.set_meta(db, "keys_destroyed", "1")
            dbmod.set_meta(db, "encryption", "off")
            # What is left to destroy: a crash before the end has the store finish it when
            # it next opens (``store.finish_erase``).
            dbmod.set_meta(db, ERASE_PENDING, json.dumps(sorted(str(p) for p in doomed)))
        # An inbound transfer or an import still under way fails at its next batch instead
        # of going on in the clear.
        store.drop_keys()
        left = finish_erase(store.path, store.db, doomed)
        deleted = 0
        if delete_plain:
            deleted = _delete_all_data(store)
    return {"erased": True, "plain_extents_left": 0 if delete_plain else plain_n,
            "plain_bytes_left": 0 if delete_plain else plain_b, "deleted_bytes": deleted,
            "not_destroyed": left}


def _startup_keys_to_destroy(store: Store, given: Path | None) -> set[Path]:
    """The startup key files to destroy: the one this store recorded, and ``given`` (from
    --startup-key or site.yaml) when it is one. A ``given`` file that cannot be a startup key
    (not a regular file of ``STARTUP_KEY_BYTES`` bytes) is refused before anything changes:
    destroying overwrites and deletes it, so a mistyped path must not name a disk image or the
    store's own keystore."""
    recorded = store.meta("startup_key")
    doomed = {Path(recorded)} if recorded else set()
    if given is not None and os.path.lexists(given) and Path(given) not in doomed:
        _refuse_unless_startup_key(store, given, "destroyed")
        doomed.add(Path(given))
    return doomed


def _refuse_unless_startup_key(store: Store, path: Path, fate: str) -> None:
    """Refuse, before anything changes, an existing ``path`` that cannot be a startup key
    (the recorded one, or a regular file of ``STARTUP_KEY_BYTES`` bytes): it is about to be
    ``fate`` (overwritten or destroyed), and a mistyped path must not name a disk image, a
    password file or the store's own keystore."""
    recorded = store.meta("startup_key")
    if not os.path.lexists(path) or (recorded and Path(recorded) == Path(path)):
        return
    if not (os.path.isfile(path) and os.path.getsize(path) == STARTUP_KEY_BYTES):
        raise UserError(f"{path} is not a startup key (not a file of {STARTUP_KEY_BYTES} "
                        f"bytes), so it is not {fate} and nothing was changed; the recorded "
                        f"startup key is {recorded or 'none'}")


def _delete_all_data(store: Store) -> int:
    """After a crypto erase with --delete-plain: drop every volume, snapshot and extent."""
    with store.transaction() as db:
        for table in ("blocks", "dirty_leaves", "dirty_blocks", "tree_pages", "volumes",
                      "snapshots", "group_snapshots", "replication_state", "tree_blobs",
                      "blobs"):
            db.execute(f"DELETE FROM {table}")
    store.writer.close()
    total = 0
    directory = store.path / "segments"
    for path in directory.glob("*.seg"):
        total += path.stat().st_size
        store.reader.forget(int(path.stem))
        path.unlink()
    fsync_dir(directory)
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.db.execute("VACUUM")
    return total
