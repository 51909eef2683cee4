"""The keystore file: the store's keys, wrapped, never in the clear.

``keystore.json`` in the store directory, format ``dvx-dr-keystore`` version 1::

    {
      "format": "dvx-dr-keystore",
      "version": 1,
      "store_id": "<uuid of the store this keystore belongs to>",
      "site": "<site name>",
      "kdf": {"name": "scrypt", "salt": "<b64>", "n": 32768, "r": 8, "p": 1}
           | {"name": "pbkdf2-sha256", "salt": "<b64>", "iterations": 600000},
      "index_key": {"password": "<b64>", "startup": "<b64>" | null},
      "teks": [{"version": 1, "created": "<ISO 8601>",
                "password": "<b64>", "startup": "<b64>" | null}, ...],
      "mac": "<hex>"
    }

Each key is wrapped with AES key wrap (RFC 3394) under a key-encryption key (KEK): the
*password* KEK is derived from the password with the named KDF and salt; the *startup* KEK is a
random 256-bit key kept in a startup key file outside the store (unlocked startup mode only).
``mac`` is HMAC-SHA256, under a key derived from the index key, over the canonical JSON of
every other field, so any edit to the file is detected once the keys are unwrapped. A wrong
password fails the key unwrap's integrity check. The file is replaced atomically (write a
temporary file, fsync, rename, fsync the directory), so a crash leaves the old or the new file.
The KDF and its parameters live in ``kdf``, which reads only the ``kdf`` field of this file
to start deriving before the rest of the store's code is loaded.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import errno
import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from dvx_dr.errors import FormatError, StoreFullError, UserError, WrongPasswordError
from dvx_dr.site.crypto import IndexKeys
from dvx_dr.site.kdf import KekDerivation, derive_kek, kdf_params, password_bytes
from dvx_dr.site.segments import fsync_dir, write_all

log = logging.getLogger("dvx_dr.keystore")

FORMAT = "dvx-dr-keystore"
VERSION = 1
MIN_PASSWORD = 8


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def check_password_strength(password: str) -> None:
    password_bytes(password)  # text the KDF can take, or one line saying why not
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password must have at least {MIN_PASSWORD} characters")


@dataclass
class KeyMaterial:
    """Unwrapped keys, held only in memory."""

    index_key: bytes
    teks: dict[int, bytes] = field(default_factory=dict)


@dataclass
class Keystore:
    path: Path
    doc: dict[str, Any]

    # -- creation and loading -------------------------------------------------------------

    @classmethod
    def create(cls, path: Path, store_id: str, site: str, password: str,
               keys: KeyMaterial, fips: bool = False) -> Keystore:
        check_password_strength(password)
        params = kdf_params(fips)
        kek = derive_kek(password, params)
        now = datetime.now(UTC).isoformat(timespec="seconds")
        doc: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "store_id": store_id,
            "site": site,
            "kdf": params,
            "index_key": {"password": _b64(aes_key_wrap(kek, keys.index_key)), "startup": None},
            "teks": [
                {"version": v, "created": now, "password": _b64(aes_key_wrap(kek, k)),
                 "startup": None}
                for v, k in sorted(keys.teks.items())
            ],
        }
        store = cls(path, doc)
        store.save(keys)
        return store

    @classmethod
    def load(cls, path: Path, store_id: str | None = None) -> Keystore:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"keystore {path} is missing: the store is encrypted and cannot "
                            "be opened without it; restore it from your keystore backup") from None
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FormatError(f"keystore {path} is corrupt ({exc}); restore it from your "
                              "keystore backup") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise FormatError(f"{path} is not a dvx-dr keystore")
        if doc.get("version") != VERSION:
            raise FormatError(f"keystore {path} has format version {doc.get('version')!r}; "
                              f"this dvx-dr reads version {VERSION}")
        try:
            _ = doc["kdf"]["name"], doc["index_key"]["password"], doc["mac"]
            for entry in doc["teks"]:
                _ = int(entry["version"]), entry["password"]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"keystore {path} is corrupt (fields missing or malformed); "
                              "restore it from your keystore backup") from None
        if store_id is not None and doc.get("store_id") != store_id:
            raise UserError(f"keystore {path} belongs to another store "
                            f"(store id {doc.get('store_id')!r}, this store is {store_id!r}); "
                            "put this store's own keystore back")
        return cls(path, doc)

    # -- unwrapping -----------------------------------------------------------------------

    def _unwrap_all(self, kek: bytes, slot: str) -> KeyMaterial:
        wrapped = [("index", self.doc["index_key"][slot])]
        wrapped += [(e["version"], e[slot]) for e in self.doc["teks"]]
        unwrapped: dict[Any, bytes] = {}
        try:
            for version, text in wrapped:
                with contextlib.suppress(InvalidUnwrap):
                    unwrapped[version] = aes_key_unwrap(kek, _unb64(text))
        except (ValueError, TypeError):
            raise FormatError(f"keystore {self.path} is corrupt (a wrapped key is not valid "
                              "base64); restore it from your keystore backup") from None
        if not unwrapped:
            if slot == "password":
                raise WrongPasswordError(f"wrong password for the keystore {self.path}") from None
            raise UserError(f"the startup key does not open keystore {self.path}") from None
        if len(unwrapped) != len(wrapped):
            # The key opens some wrapped keys but not others: the file was altered.
            raise FormatError(f"keystore {self.path} was altered (a wrapped key does not "
                              "unwrap); restore it from your keystore backup")
        index_key = unwrapped.pop("index")
        keys = KeyMaterial(index_key, {int(v): k for v, k in unwrapped.items()})
        self._check_mac(keys)
        return keys

    def unlock(self, password: str, derivation: KekDerivation | None = None) -> KeyMaterial:
        """Unwrap the keys with ``password`` (and its KEK from ``derivation``, when that
        derived it for this keystore)."""
        try:
            kek = derivation.kek(password, self.doc["kdf"]) if derivation else None
            kek = kek or derive_kek(password, self.doc["kdf"])
        except (FormatError, KeyError, TypeError, ValueError) as exc:
            detail = str(exc) if isinstance(exc, FormatError) else "malformed parameters"
            raise FormatError(f"keystore {self.path} is corrupt (key derivation: {detail}); "
                              "restore it from your keystore backup") from None
        return self._unwrap_all(kek, "password")

    def unlock_with_startup_key(self, startup_key: bytes) -> KeyMaterial:
        if self.doc["index_key"].get("startup") is None:
            raise UserError(f"keystore {self.path} has no startup key (locked startup mode)")
        return self._unwrap_all(startup_key, "startup")

    # -- changing the wrapping -----------------------------------------------------------
    # Each change rewrites the whole file atomically: a crash leaves the old or the new file.

    def verify_password(self, password: str) -> KeyMaterial:
        """Unwrap with ``password``; raises WrongPasswordError when it is not the password."""
        return self.unlock(password)

    def rewrap(self, keys: KeyMaterial, password: str, fips: bool | None = None,
               startup_key: bytes | None | bool = True) -> None:
        """Wrap every key anew: under ``password`` (fresh salt; PBKDF2 when ``fips``) and, if
        ``startup_key`` is bytes, also under it; ``True`` keeps the startup slots as they are
        (rewrapped under the same startup key is impossible without it, so they are kept
        only when unchanged), ``None`` removes them (locked startup mode)."""
        check_password_strength(password)
        params = kdf_params(self.fips if fips is None else fips)
        kek = derive_kek(password, params)
        with self._unchanged_on_error():
            self._rewrap(keys, kek, params, startup_key)

    def _rewrap(self, keys: KeyMaterial, kek: bytes, params: dict[str, Any],
                startup_key: bytes | None | bool) -> None:
        self.doc["kdf"] = params
        self.doc["index_key"]["password"] = _b64(aes_key_wrap(kek, keys.index_key))
        entries = {int(e["version"]): e for e in self.doc["teks"]}
        for version, key in sorted(keys.teks.items()):
            entry = entries.setdefault(version, {
                "version": version, "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "startup": None})
            entry["password"] = _b64(aes_key_wrap(kek, key))
        self.doc["teks"] = [entries[v] for v in sorted(entries)]
        if startup_key is None:
            self._set_startup(keys, None)
        elif isinstance(startup_key, bytes):
            self._set_startup(keys, startup_key)
        self.save(keys)

    def _set_startup(self, keys: KeyMaterial, startup_key: bytes | None) -> None:
        wrap = (lambda k: _b64(aes_key_wrap(startup_key, k))) if startup_key else (lambda k: None)
        self.doc["index_key"]["startup"] = wrap(keys.index_key)
        for entry in self.doc["teks"]:
            entry["startup"] = wrap(keys.teks[int(entry["version"])])

    def set_startup_key(self, keys: KeyMaterial, startup_key: bytes | None) -> None:
        """Add (unlocked mode) or remove (locked mode) the startup-key wrapping."""
        with self._unchanged_on_error():
            self._set_startup(keys, startup_key)
            self.save(keys)

    def add_tek(self, keys: KeyMaterial, version: int, key: bytes, password: str,
                startup_key: bytes | None, fips: bool | None = None) -> None:
        """Add a new key version, wrapped under the password (and startup key if in use)."""
        keys.teks[version] = key
        try:
            self.rewrap(keys, password, fips=fips,
                        startup_key=startup_key if self.has_startup_slot else None)
        except BaseException:
            del keys.teks[version]
            raise

    @contextlib.contextmanager
    def _unchanged_on_error(self) -> Iterator[None]:
        """A change of the document that takes effect only if it is written: when writing
        fails (a full disk), the keystore in memory stays the one on disk. Otherwise a
        running site would go on with, say, a new password its keystore file does not have."""
        before = copy.deepcopy(self.doc)
        try:
            yield
        except BaseException:
            self.doc = before
            raise

    def key_versions(self) -> list[dict[str, Any]]:
        return [{"version": int(e["version"]), "created": e.get("created")}
                for e in self.doc["teks"]]

    # -- integrity and persistence --------------------------------------------------------

    def _body(self) -> bytes:
        body = {k: v for k, v in self.doc.items() if k != "mac"}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def _check_mac(self, keys: KeyMaterial) -> None:
        want = IndexKeys(keys.index_key).mac(self._body()).hex()
        if self.doc.get("mac") != want:
            raise FormatError(f"keystore {self.path} was altered (its MAC does not verify); "
                              "restore it from your keystore backup")

    def save(self, keys: KeyMaterial) -> None:
        self.doc["mac"] = IndexKeys(keys.index_key).mac(self._body()).hex()
        data = json.dumps(self.doc, indent=2, sort_keys=True).encode() + b"\n"
        try:
            write_atomic(self.path, data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StoreFullError(f"cannot write keystore {self.path}: no space left on "
                                     "the device; nothing was changed") from None
            raise UserError(f"cannot write keystore {self.path}: {exc.strerror or exc}; "
                            "nothing was changed") from None

    @property
    def has_startup_slot(self) -> bool:
        return self.doc["index_key"].get("startup") is not None

    @property
    def store_id(self) -> str:
        return str(self.doc["store_id"])

    @property
    def fips(self) -> bool:
        return bool(self.doc["kdf"]["name"] == "pbkdf2-sha256")


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new content.

    The old content is then overwritten in place (through a hard link kept across the
    rename) before it is unlinked, so a superseded keystore does not linger in freed blocks;
    a crash in between leaves ``<name>.old``, which the next write scrubs (or only unlinks,
    when the crash came before the rename and it is still the live file). (On SSDs and
    copy-on-write file systems an overwrite is not a guaranteed erase; see the README.)
    """
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    scrub_leftovers(path)
    linked = False
    try:
        # Never through a link or over something else that took the name (scrub_leftovers
        # removed only regular files): such a name is refused, not followed.
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        except FileExistsError:
            raise UserError(f"{tmp} is in the way (not a file dvx-dr left): move it away and "
                            "retry; nothing was changed") from None
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        if path.exists():
            try:
                os.link(path, old)
            except FileExistsError:
                raise UserError(f"{old} is in the way (not a file dvx-dr left): move it away "
                                "and retry; nothing was changed") from None
            linked = True
        os.replace(tmp, path)
    except BaseException:
        # Not put in place: the new content (under a new password, maybe) goes now, not at
        # the next opening; ``.old`` is still the live file's second name, only unlinked.
        with contextlib.suppress(OSError):
            scrub_leftovers(path)
        raise
    # The new content is in place: a failure from here on is reported, not raised, since a
    # caller told "failed" would go on with the old content the file no longer has.
    steps = [(lambda: fsync_dir(path.parent), "its directory could not be synced")]
    if linked:
        steps.append((lambda: scrub_file(old), f"the old content in {old} was not scrubbed"))
    for step, what in steps:
        try:
            step()
        except OSError as exc:
            log.warning("%s was replaced, but %s: %s", path, what, exc.strerror or exc)


def scrub_leftovers(path: Path, size: int | None = None) -> None:
    """Scrub what a ``write_atomic`` of ``path`` killed midway left: ``<name>.tmp`` (new
    content never put in place) and ``<name>.old`` (the superseded content, which the old
    password still opens), unless ``.old`` is the live file itself (a crash between the link
    and the rename), which is only unlinked. Store opening calls this too, so a keystore
    replaced because its password leaked does not outlive the crash until the next write.
    Only regular files are scrubbed, and only of ``size`` bytes when it is given (a startup
    key's leftovers are keys too: an operator's file of another size is not one)."""
    old = path.with_name(path.name + ".old")
    if path.exists() and old.exists() and os.path.samefile(path, old):
        os.unlink(old)
    for leftover in (old, path.with_name(path.name + ".tmp")):
        with contextlib.suppress(FileNotFoundError):
            # Not whatever else took the name (a directory; a link, whose target is not ours).
            st = os.lstat(leftover)
            if stat.S_ISREG(st.st_mode) and size in (None, st.st_size):
                scrub_file(leftover)


def destroy_key_file(path: Path, size: int | None) -> None:
    """Overwrite a key file with random bytes, fsync, delete; also the leftovers of an
    interrupted write of it that are regular files (of ``size`` bytes, when given)."""
    scrub_file(path)
    scrub_leftovers(path, size)


def scrub_file(path: Path) -> None:
    """Overwrite a file with random bytes, fsync, delete it and fsync its directory. Only a
    regular file: a link is not followed (its target is not a key of ours), nor is anything
    else overwritten."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path} is not a regular file (a link or something else took its "
                        "name), so it was not overwritten; remove it by hand if it is a key")
    size = st.st_size
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.pwrite(fd, os.urandom(max(size, 1)), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
    fsync_dir(path.parent)
