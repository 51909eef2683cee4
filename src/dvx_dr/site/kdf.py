"""The password's key-encryption key (KEK): the KDF, its parameters, and deriving it early.

The parameters are recorded in the keystore (see ``keystore``): scrypt (n = 2^15, r = 8,
p = 1) by default, PBKDF2-HMAC-SHA256 (600 000 iterations) in FIPS mode. This module loads
only the KDFs, not the store's code, so a command can start the derivation before it loads
the rest (:class:`KekDerivation`).
"""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from dvx_dr.errors import DvxError, FormatError, UserError

#: The keystore's file name in the store directory.
NAME = "keystore.json"
KEK_BYTES = 32
#: Test suites set DVX_DR_KDF_COST=test to make keystores cheap to create; the cost chosen is
#: recorded in the keystore itself, so this never weakens an existing store.
KDF_COST_ENV = "DVX_DR_KDF_COST"


def kdf_params(fips: bool = False) -> dict[str, Any]:
    """Fresh KDF parameters (new salt) at the configured cost."""
    weak = os.environ.get(KDF_COST_ENV) == "test"
    salt = base64.b64encode(os.urandom(16)).decode()
    if fips:
        return {"name": "pbkdf2-sha256", "salt": salt, "iterations": 1000 if weak else 600_000}
    return {"name": "scrypt", "salt": salt, "n": 2**10 if weak else 2**15, "r": 8, "p": 1}


#: Bounds on recorded KDF parameters: an altered keystore must not make a command allocate
#: without limit or run for days (scrypt takes 128 * n * r bytes).
MAX_SCRYPT_MEMORY = 1 << 30
MAX_PBKDF2_ITERATIONS = 10_000_000


def _check_params(params: dict[str, Any]) -> None:
    if params["name"] == "scrypt":
        n, r, p = params["n"], params["r"], params["p"]
        if not all(type(v) is int for v in (n, r, p)) or not (
                n >= 2 and n & (n - 1) == 0 and 1 <= r <= 64 and 1 <= p <= 16
                and 128 * n * r <= MAX_SCRYPT_MEMORY):
            raise FormatError(f"scrypt parameters n={n!r}, r={r!r}, p={p!r} are out of range")
    elif params["name"] == "pbkdf2-sha256":
        it = params["iterations"]
        if type(it) is not int or not 1 <= it <= MAX_PBKDF2_ITERATIONS:
            raise FormatError(f"PBKDF2 iterations {it!r} are out of range")


def password_bytes(password: str) -> bytes:
    """The password as the KDF takes it (UTF-8). A password with bytes that the terminal's
    character set did not decode (Python keeps them as lone surrogates) is refused here in
    one line: an encoding error would carry the whole password in its text."""
    try:
        return password.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("the password is not valid text: it holds bytes the terminal's "
                        "character set (LC_ALL, LANG) could not decode; type it in a UTF-8 "
                        "terminal, or give it with --password-file") from None


def derive_kek(password: str, params: dict[str, Any]) -> bytes:
    secret = password_bytes(password)
    salt = base64.b64decode(params["salt"], validate=True)
    _check_params(params)
    if params["name"] == "scrypt":
        return Scrypt(salt=salt, length=KEK_BYTES, n=params["n"], r=params["r"],
                      p=params["p"]).derive(secret)
    if params["name"] == "pbkdf2-sha256":
        return PBKDF2HMAC(algorithm=hashes.SHA256(), length=KEK_BYTES, salt=salt,
                          iterations=params["iterations"]).derive(secret)
    raise FormatError(f"unknown key derivation function {params['name']!r}")


class KekDerivation:
    """The password's KEK, derived in a background thread.

    The KDF costs about 80 ms by design (scrypt, n = 2^15), a fixed cost of every command that
    opens an encrypted store. A command that already has the password (from a file) starts the
    derivation with the keystore's parameters before it loads the store's code, so the two
    run side by side (the KDF runs in OpenSSL, without the GIL). ``Keystore.unlock`` uses
    the result only for the same password and the same parameters as the keystore it opens,
    and derives again otherwise, so a stale or swapped file costs time, never correctness.
    """

    def __init__(self, password: str, params: dict[str, Any]) -> None:
        self._password: str | None = password
        self._params = params
        self._kek: bytes | None = None
        self._done = threading.Event()
        threading.Thread(target=self._derive, args=(password,), name="kek-derivation",
                         daemon=True).start()

    @classmethod
    def start(cls, store_dir: Path, password: str) -> KekDerivation | None:
        """Start deriving for the keystore of ``store_dir``; None when it has none (a plain
        store) or it cannot be read here (:meth:`Keystore.load` reports why, later)."""
        try:
            params = json.loads((store_dir / NAME).read_bytes())["kdf"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return cls(password, params) if isinstance(params, dict) else None

    def _derive(self, password: str) -> None:
        try:
            self._kek = derive_kek(password, self._params)
        except (DvxError, KeyError, TypeError, ValueError, MemoryError, OverflowError):
            self._kek = None  # unlock derives again and reports the error
        finally:
            self._done.set()

    def kek(self, password: str, params: dict[str, Any]) -> bytes | None:
        """The KEK for ``password`` and ``params``, when that is what was derived."""
        if self._password is None or password != self._password or params != self._params:
            return None
        self._done.wait()
        kek, self._kek, self._password = self._kek, None, None  # used once, then forgotten
        return kek
