"""Opening, creating and owning a site's store directory.

Layout of a store directory::

    store.db, store.db-wal   metadata (see ``db``)
    keystore.json            wrapped keys (see ``keystore``); absent on a store never encrypted
    segments/NNNNNNNN.seg    extents (see ``segments`` and ``extent``)
    segments/next            the segment number high-water mark
    lock                     held (flock) by the one process that owns the store (see ``lockfile``)
    reserve                  RESERVE_BYTES of zeros, preallocated: room for gc on a full disk

The *reserve* is a file of zeros that holds disk space for the one operation that frees space:
gc gives it up when it starts, so that its sweep can record its deletions in SQLite's
write-ahead log even on a disk the store has filled, and takes it back when it ends if the
space is there (see ``gc``). An opening store makes a missing reserve, best effort: never at
the cost of failing the open. Nothing in it is data; scrub, stats and the index ignore it.

One process owns a store at a time. Everything that changes the store goes through one
``Store`` object, and through ``Store.transaction()``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from dvx_dr.errors import (
    KeysDestroyedError,
    StoreFullError,
    StoreLockedError,
    UserError,
)
from dvx_dr.site import db as dbmod
from dvx_dr.site import lockfile
from dvx_dr.site.blobs import BlobStore
from dvx_dr.site.crypto import (
    ExtentCipher,
    IndexKeys,
    NoIndexKeys,
    PlainIndex,
    new_index_key,
    new_tek,
)
from dvx_dr.site.kdf import NAME as KEYSTORE_NAME
from dvx_dr.site.keystore import (
    KekDerivation,
    KeyMaterial,
    Keystore,
    check_password_strength,
    destroy_key_file,
    scrub_file,
    scrub_leftovers,
)
from dvx_dr.site.segments import SegmentNumbers, SegmentReader, SegmentWriter

log = logging.getLogger("dvx_dr.site")
T = TypeVar("T")

DB_NAME = "store.db"
RESERVE_NAME = "reserve"
#: 4 MiB: gc's sweep commits ``gc.SWEEP_BATCH`` (500) deletions per transaction, which measured
#: at most 2.1 MiB of write-ahead log (plus its 32 KiB index file), twice over.
RESERVE_BYTES = 4 * 1024 * 1024
STARTUP_KEY_BYTES = 32
MIN_BLOCK = 4096
MAX_BLOCK = 1024 * 1024
DEFAULT_BLOCK = 64 * 1024
#: A replication session's pin lapses after this long unused (see ``Store.pin``).
PIN_IDLE = 600.0
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")

PasswordSource = Callable[[], str]
LOCKED = "store is locked: unlock it with 'dvx-dr datastore unlock'"


#: Store metadata key: the startup key files (a JSON list) a crypto erase has still to
#: destroy, besides the keystore, from its commit until it has destroyed them.
ERASE_PENDING = "erase_pending"


def finish_erase(path: Path, db: sqlite3.Connection, startup_keys: Iterable[Path] = ()
                 ) -> list[str]:
    """Destroy the keystore and the startup key files of a crypto erase (``startup_keys``,
    or those it recorded before a crash interrupted it), then record that it is done.
    Returns what could not be destroyed (a path that is no longer a regular file: a link is
    not followed); that is logged and reported, and does not keep the store from opening."""
    pending = dbmod.get_meta(db, ERASE_PENDING)
    doomed = {*map(Path, json.loads(pending) if pending else []), *startup_keys}
    left = []
    for key, size in [(path / KEYSTORE_NAME, None),
                      *((k, STARTUP_KEY_BYTES) for k in sorted(doomed))]:
        try:
            destroy_key_file(key, size)
        except UserError as exc:
            log.warning("crypto erase: %s", exc)
            left.append(str(exc))
    dbmod.delete_meta(db, ERASE_PENDING)  # one statement: committed on its own
    return left


def now_iso() -> str:
    return utc_iso(datetime.now(UTC))


def utc_iso(when: datetime) -> str:
    """``when`` (aware) as the store writes its times: UTC, to the second, ``Z``."""
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _check_block_size(block_size: int) -> None:
    if not MIN_BLOCK <= block_size <= MAX_BLOCK or block_size & (block_size - 1):
        raise UserError(f"block size {block_size}: expected a power of two from 4KiB to 1MiB")


class Store:
    """An open store: metadata, blob pipeline and keys, owned by this process."""

    def __init__(self, path: Path, db: sqlite3.Connection, lock_fd: int,
                 keys: KeyMaterial | None, keystore: Keystore | None) -> None:
        self.path = path
        self.db = db
        self._lock_fd = lock_fd
        self.keystore = keystore
        self.keys = keys
        self.mutex = threading.RLock()
        self.served = False  # owned by a running site (``site serve``)
        #: Open replication sessions, and when each was last used (see ``pin``); guarded by
        #: ``_pin_lock`` (requests mark a session busy from the event loop's thread).
        self.pins: dict[str, float] = {}
        self._pins_busy: dict[str, int] = {}
        self._pin_lock = threading.Lock()
        self.store_id = dbmod.get_meta(db, "store_id") or ""
        self.site = dbmod.get_meta(db, "site") or ""
        self.block_size = int(dbmod.get_meta(db, "block_size") or DEFAULT_BLOCK)
        self.pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2),
                                       thread_name_prefix="dvx-pipeline")
        segdir = path / "segments"
        self.segment_numbers = SegmentNumbers(segdir)
        self.writer = SegmentWriter(segdir, self.segment_numbers.take)
        self.reader = SegmentReader(segdir)
        self.blobs = BlobStore(db, self.writer, self.reader, PlainIndex(), None, self.pool)
        if keys is not None:
            self.install_keys(keys)
        elif self.keyed:  # locked, or crypto-erased: nothing is named or written keyless
            self.blobs.index = NoIndexKeys(self._keyless)
        self.apply_write_setting()

    @property
    def keyed(self) -> bool:
        """Whether the store has keys (an index keyed by HMAC, possibly encrypted extents)."""
        return self.meta("keyed") == "1"

    @property
    def locked(self) -> bool:
        """An encrypted store whose keys are not unwrapped yet: only status and unlock work."""
        return self.keyed and self.keys is None

    def refusal(self) -> KeysDestroyedError | StoreLockedError | None:
        """Why the store cannot be used now: its keys were crypto-erased, or it is locked."""
        if self.meta("keys_destroyed") == "1":
            return KeysDestroyedError("keys destroyed: this store's keys were crypto-erased; "
                                      "its encrypted data cannot be read and it takes no new "
                                      "data")
        if self.locked:
            return StoreLockedError(LOCKED)
        return None

    def _keyless(self) -> KeysDestroyedError | StoreLockedError:
        """What refuses a use of the keys while none are in memory (see ``NoIndexKeys``)."""
        return self.refusal() or StoreLockedError(LOCKED)

    def drop_keys(self) -> None:
        """Forget every key (a crypto erase): from here on the store names, writes and reads
        nothing, and what was decrypted is not kept in memory either."""
        self.keys = None
        self.keystore = None
        self.blobs.cipher = None
        self.blobs.index = NoIndexKeys(self._keyless)
        self.blobs.pages.clear()

    def install_keys(self, keys: KeyMaterial) -> None:
        self.keys = keys
        self.blobs.index = IndexKeys(keys.index_key)
        self.blobs.cipher = ExtentCipher(keys.teks)
        self.apply_write_setting()

    def unlock(self, password: str) -> None:
        """Unwrap the keys of a locked store with its password."""
        if self.meta("keys_destroyed") == "1":
            raise KeysDestroyedError("keys destroyed: this store's keys were crypto-erased; "
                                     "no password can unlock it")
        if not self.locked:
            return
        if self.keystore is None:
            self.keystore = Keystore.load(self.path / KEYSTORE_NAME, self.store_id)
        self.install_keys(self.keystore.unlock(password))

    # -- creation --------------------------------------------------------------------------

    @classmethod
    def init(cls, path: Path, name: str, block_size: int = DEFAULT_BLOCK,
             password: str | None = None) -> Store:
        """Create a new store; encrypted when a password is given."""
        if not SITE_NAME.fullmatch(name):
            raise UserError(f"site name {name!r}: use 1-63 lowercase letters, digits and '-', "
                            "starting with a letter or digit")
        _check_block_size(block_size)
        if password is not None:
            check_password_strength(password)
        if (path / DB_NAME).exists():
            raise UserError(f"{path} already holds a dvx-dr store; choose an empty directory")
        try:
            if path.exists() and any(path.iterdir()):
                raise UserError(f"{path} is not empty; choose an empty or new directory")
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            (path / "segments").mkdir(mode=0o700, exist_ok=True)
            # Whatever the umask (or the mode of an empty directory given), the store is its
            # owner's alone, as its files are (0600, store.db included: see ``db.init_db``);
            # an empty directory given that another user owns keeps its mode.
            (path / "segments").chmod(0o700)
            with contextlib.suppress(PermissionError):
                path.chmod(0o700)
        except OSError as exc:
            raise UserError(f"cannot make a store at {path}: {exc.strerror or exc}; choose "
                            "an empty or new directory") from None
        store_id = str(uuid.uuid4())
        keys = None
        if password is not None:
            keys = KeyMaterial(new_index_key(), {1: new_tek()})
            Keystore.create(path / KEYSTORE_NAME, store_id, name, password, keys)
        db = dbmod.init_db(path / DB_NAME, {
            "store_id": store_id,
            "site": name,
            "block_size": str(block_size),
            "encryption": "on" if keys else "off",
            "keyed": "1" if keys else "0",
            "key_version": "1" if keys else "0",
            "created": now_iso(),
        })
        db.close()
        return cls.open(path, (lambda: password) if password is not None else None)

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, password: PasswordSource | None = None, *,
             startup_key: Path | None = None, allow_locked: bool = False,
             derivation: KekDerivation | None = None) -> Store:
        """Open a store this process will own.

        The keys of an encrypted store are unwrapped with the startup key file when it is
        given and valid (unlocked startup mode), else with ``password``, asked only then. With
        ``allow_locked`` and neither, the store opens locked (see ``locked``). ``derivation``
        may hold the password's KEK, derived while the caller loaded this code.

        A store this user cannot write (another user's, a read-only file system) is refused
        in one line (:class:`UserError`, see ``lockfile.check_access``): it needs write
        access even to be read.
        """
        path = Path(path)
        lockfile.check_access(path)
        if not (path / DB_NAME).exists():
            raise UserError(f"{path} is not a dvx-dr store (no {DB_NAME}); create one with "
                            "'dvx-dr site init'")
        with _refused_as_user_error(path):
            return cls._open(path, password, startup_key, allow_locked, derivation)

    @classmethod
    def _open(cls, path: Path, password: PasswordSource | None, startup_key: Path | None,
              allow_locked: bool, derivation: KekDerivation | None) -> Store:
        lock_fd = lockfile.acquire(path)
        try:
            _scrub_keystore_leftovers(path / KEYSTORE_NAME)
            # Too full for SQLite's log and its index: the reserve is there for this.
            db = using_reserve(path, lambda: dbmod.open_db(path / DB_NAME))
            keys = keystore = None
            destroyed = dbmod.get_meta(db, "keys_destroyed") == "1"
            if destroyed and dbmod.get_meta(db, ERASE_PENDING) is not None:
                finish_erase(path, db)  # a crypto erase a crash interrupted
            if destroyed and not allow_locked:
                raise KeysDestroyedError(
                    f"keys destroyed: store {path} was crypto-erased and its encrypted "
                    "data cannot be read by anyone")
            # A crypto-erased store opens keyless (like a locked one) for what ``ops.LOCKED_OK``
            # allows: its status, and a crypto erase rerun with --delete-plain.
            if dbmod.get_meta(db, "keyed") == "1" and not destroyed:
                keystore = Keystore.load(path / KEYSTORE_NAME, dbmod.get_meta(db, "store_id"))
                recorded = dbmod.get_meta(db, "startup_key")
                if startup_key is None and recorded:
                    startup_key = Path(recorded)
                keys = _unwrap(keystore, password, startup_key, allow_locked, path,
                               derivation)
            elif dbmod.get_meta(db, "keyed") != "1" and (path / KEYSTORE_NAME).exists():
                # Only an 'encryption enable' stopped before its commit leaves a keystore on
                # a store never keyed: keys that nothing was written with, to be scrubbed.
                log.warning("scrubbing %s, left by an 'encryption enable' that did not "
                            "finish (the store stayed unencrypted)", path / KEYSTORE_NAME)
                _scrub_keystore_leftovers(path / KEYSTORE_NAME, live=True)
            store = cls(path, db, lock_fd, keys, keystore)
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            store._drop_unfinished_imports()
        except BaseException:
            store.close()
            raise
        make_reserve(path)
        return store

    def pin(self, key: str) -> None:
        """Hold off gc's sweep until ``unpin(key)``, or until the pin has not been renewed
        (by calling this again) for ``PIN_IDLE`` seconds: while a replication session is
        open, the blobs it made durable are named by no snapshot yet, and the pages it stored
        rely on older blobs (a base page's subtree, blocks shared with other volumes) that
        deleting a snapshot could leave unnamed meanwhile. gc deletes nothing while any pin
        is held; a session whose pin lapsed is over (the source starts again)."""
        with self._pin_lock:
            self.pins[key] = time.monotonic()

    def unpin(self, key: str) -> None:
        with self._pin_lock:
            self.pins.pop(key, None)

    @contextmanager
    def pin_busy(self, key: str) -> Iterator[None]:
        """A request of session ``key`` is waiting for, or running in, the store thread: its
        pin cannot lapse meanwhile (a long scrub or gc ahead of it in the queue is not the
        source's idleness), and it counts as used when the request ends."""
        with self._pin_lock:
            self._pins_busy[key] = self._pins_busy.get(key, 0) + 1
        try:
            yield
        finally:
            with self._pin_lock:
                self._pins_busy[key] -= 1
                if not self._pins_busy[key]:
                    del self._pins_busy[key]
                if key in self.pins:
                    self.pins[key] = time.monotonic()

    def live_pins(self) -> int:
        """Drop the pins idle for ``PIN_IDLE`` seconds with no request in progress; how many
        remain."""
        now = time.monotonic()
        with self._pin_lock:
            for key in [k for k, used in self.pins.items()
                        if now - used > PIN_IDLE and k not in self._pins_busy]:
                del self.pins[key]
            return len(self.pins)

    def announce(self, admin_socket: str) -> None:
        """Record in the lock file where the owning site's admin socket is, for the CLI."""
        self.served = True
        lockfile.announce(self._lock_fd, admin_socket)

    def close(self) -> None:
        self.writer.close()
        self.reader.close()
        self.pool.shutdown(wait=True)
        self.db.close()
        os.close(self._lock_fd)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- settings --------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        return dbmod.get_meta(self.db, key)

    @property
    def encrypted(self) -> bool:
        """Whether new extents are written encrypted."""
        return self.meta("encryption") == "on"

    def apply_write_setting(self) -> None:
        self.blobs.write_key_version = int(self.meta("key_version") or 0) if self.encrypted \
            else 0

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One SQLite write transaction; rolled back if the block raises.

        Extents appended inside it are fsync'ed before the commit, so an index row never
        becomes durable before the extent it names.
        """
        with self.mutex:
            self.db.execute("BEGIN IMMEDIATE")
            mark = self.writer.mark()
            try:
                yield self.db
                self.writer.sync()
                self.db.execute("COMMIT")
            except BaseException as exc:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                for n in self.writer.discard_since(mark):
                    self.reader.forget(n)
                if _is_disk_full(exc):
                    raise StoreFullError(self.full_message()) from None
                raise

    def full_message(self, done: str | None = None, advice: str | None = None) -> str:
        """What a full disk stopped. ``done``: what an operation of several transactions
        committed before the one that failed (by default, a single-transaction operation:
        nothing)."""
        what = (f"{done} before it stopped, and that is committed; the step it was on was "
                "rolled back" if done else "nothing of this operation was committed")
        advice = advice or ("free space (delete snapshots or volumes, then 'dvx-dr datastore "
                            "gc') and retry")
        return f"no space left on the device holding store {self.path}: {what}; {advice}"

    def _drop_unfinished_imports(self) -> None:
        with self.transaction() as db:
            for (vol,) in db.execute("SELECT vol FROM volumes WHERE state='importing'").fetchall():
                drop_import(db, vol)
        for (vol,) in self.db.execute("SELECT vol FROM volumes WHERE state='deleting'").fetchall():
            drop_volume(self, vol)  # a deletion a crash interrupted


#: Block map rows a volume's deletion removes per transaction, so that its write-ahead log
#: stays small whatever the volume's size (a disk filled to its last megabytes can still
#: delete a large volume: one transaction for a 1 TiB volume of 64 KiB blocks would log
#: about 256 MiB).
DROP_BATCH = 20_000


def drop_volume(store: Store, vol: int) -> None:
    """Remove volume ``vol``, which ``volumes.delete`` marked 'deleting' (its name is free
    already), ``DROP_BATCH`` rows of its block map per transaction, then the volume itself. A
    crash in between leaves it marked; the next opening of the store finishes the job."""
    for table in ("blocks", "dirty_blocks"):
        while True:
            with store.transaction() as db:
                gone = db.execute(
                    f"DELETE FROM {table} WHERE vol=? AND blk IN "
                    f"(SELECT blk FROM {table} WHERE vol=? LIMIT ?)",
                    (vol, vol, DROP_BATCH)).rowcount
            store.db.execute("PRAGMA wal_checkpoint(RESTART)")  # the next one starts it over
            if gone < DROP_BATCH:
                break
    with store.transaction() as db:
        for table in ("dirty_leaves", "tree_pages"):
            db.execute(f"DELETE FROM {table} WHERE vol=?", (vol,))
        db.execute("DELETE FROM volumes WHERE vol=? AND state='deleting'", (vol,))


def drop_import(db: sqlite3.Connection, vol: int) -> None:
    """Remove volume ``vol`` of an import that did not finish, with its block map and caches
    (its blobs are then gc's to reclaim)."""
    for table in ("blocks", "dirty_leaves", "dirty_blocks", "tree_pages"):
        db.execute(f"DELETE FROM {table} WHERE vol=?", (vol,))
    db.execute("DELETE FROM volumes WHERE vol=? AND state='importing'", (vol,))


def make_reserve(path: Path) -> bool:
    """Put the reserve in place in store directory ``path`` if it is not, when the disk has
    the room; never raises. Whether it is in place."""
    target = path / RESERVE_NAME
    try:
        st: os.stat_result | None = target.stat()
    except FileNotFoundError:
        st = None
    except OSError:
        return False
    if st is not None and st.st_size == RESERVE_BYTES and st.st_blocks * 512 >= RESERVE_BYTES:
        return True
    try:
        fs = os.statvfs(path)
        if fs.f_bavail * fs.f_frsize < RESERVE_BYTES:
            return False
        # Truncated first: whatever a crash left, the reserve holds nothing but zeros.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        finally:
            os.close(fd)
    except OSError:
        with contextlib.suppress(OSError):
            target.unlink()
        return False
    return True


def using_reserve(path: Path, step: Callable[[], T]) -> T:
    """``step()``; when the disk is full (``StoreFullError``), once more after giving up the
    reserve of store directory ``path``, if it has one. For the steps that free space or let
    gc run: opening the store, marking a volume deleted."""
    try:
        return step()
    except StoreFullError:
        if not release_reserve(path):
            raise
    return step()


def release_reserve(path: Path) -> bool:
    """Give the reserve's space back to the file system; whether there was one."""
    try:
        (path / RESERVE_NAME).unlink()
    except OSError:
        return False
    return True


@contextmanager
def _refused_as_user_error(path: Path) -> Iterator[None]:
    """A store file this user may not write, met although ``lockfile.check_access`` let the
    store through (a file changed since, an ACL, a server that squashes root), is refused in
    the same one line, not with a traceback."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        if "readonly" not in str(exc):
            raise
        raise UserError(lockfile.read_only_message(path) if lockfile.on_read_only_fs(path)
                        else lockfile.refusal(path, PermissionError(
                            errno.EACCES, str(exc), str(path / DB_NAME)))) from None
    except OSError as exc:
        if exc.errno not in lockfile.REFUSED:
            raise
        raise UserError(lockfile.refusal(path, exc)) from None


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc)


def read_startup_key(path: Path, strict: bool = False) -> bytes | None:
    """The startup key in ``path``, or None when it is missing or not a startup key file,
    or when others than its owner may read it or its owner is another user: it opens the
    store without a password, and a key others could have copied is not used (as ssh does
    not use such a private key). The site then starts locked, and its log says why; with
    ``strict`` (a key named on the command line) that is an error instead."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO there must not hang it
    except OSError as exc:
        if not strict:
            log.warning("startup key %s cannot be read (%s): the store opens locked; unlock "
                        "it with its password", path, exc.strerror or exc)
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            if not strict:
                log.warning("startup key %s is not a regular file: the store opens locked",
                            path)
            return None
        if st.st_mode & 0o077 or st.st_uid != os.geteuid():
            why = (f"its mode is {st.st_mode & 0o7777:04o}, which lets others read it"
                   if st.st_mode & 0o077 else f"it belongs to user id {st.st_uid}")
            message = (f"startup key {path} is not used: {why}; 'chmod 600' it (and make "
                       "the site's user its owner)")
            if strict:
                raise UserError(message + "; nothing was changed")
            log.warning("%s, or unlock the site with its password", message)
            return None
        data = os.read(fd, STARTUP_KEY_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == STARTUP_KEY_BYTES else None


def _unwrap(keystore: Keystore, password: PasswordSource | None, startup_key: Path | None,
            allow_locked: bool, path: Path, derivation: KekDerivation | None = None
            ) -> KeyMaterial | None:
    if startup_key is not None and keystore.has_startup_slot:
        key = read_startup_key(startup_key)
        if key is not None:
            try:
                return keystore.unlock_with_startup_key(key)
            except UserError:
                pass  # a stale startup key file: fall back to the password
    if password is None:
        if allow_locked:
            return None
        raise StoreLockedError(f"store {path} is encrypted: give its password "
                               "(--password-file FILE, or type it at the prompt)")
    return keystore.unlock(password(), derivation)


def _scrub_keystore_leftovers(path: Path, live: bool = False) -> None:
    """A keystore write killed midway leaves copies (``keystore.scrub_leftovers``); they go
    when the store is next opened (with ``live``, the keystore itself too). Failing that (a
    full disk, say) does not stop the opening: the next keystore write tries again."""
    try:
        scrub_leftovers(path)
        if live:
            scrub_file(path)
    except OSError as exc:
        log.warning("could not scrub what an interrupted keystore write left next to %s: %s",
                    path, exc.strerror or exc)
