"""The one exception hierarchy of dvx-dr.

Every message says what happened and what the user can do about it. The CLI prints
``str(error)`` as one line on stderr and exits with ``error.exit_code``.
"""

from __future__ import annotations


class DvxError(Exception):
    """Root of every error dvx-dr raises on purpose."""

    exit_code = 1


class UserError(DvxError):
    """Bad input: a wrong password, an unknown volume, a malformed file. Exit 2."""

    exit_code = 2


class NotFoundError(UserError):
    """A named thing (volume, snapshot, site) does not exist."""


class AlreadyExistsError(UserError):
    """A name is taken."""


class WrongPasswordError(UserError):
    """The password does not unwrap the keystore."""


class StoreLockedError(UserError):
    """The store's keys are not unlocked yet."""


class StoreBusyError(UserError):
    """Another process owns the store; ``admin_socket`` is where a running site listens."""

    admin_socket: str | None = None


class StoreFullError(UserError):
    """The device holding the store is full; the operation was rolled back."""


class KeysDestroyedError(UserError):
    """The keys were crypto-erased; encrypted data can no longer be read."""


class FormatError(UserError):
    """A file or message is in a format or version this build does not understand."""


class IntegrityError(DvxError):
    """Stored or received data does not match its content address. Always loud. Exit 3."""

    exit_code = 3


class TransientError(DvxError):
    """A network or peer problem that may go away; retried with backoff. Exit 4."""

    exit_code = 4


class ProtocolError(DvxError):
    """A peer sent something that breaks the replication protocol. Exit 5."""

    exit_code = 5
