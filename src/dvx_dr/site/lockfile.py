"""The store's lock file: which process owns the store, and how to reach it.

``STORE/lock`` is held with ``flock`` by the one process that has the store open. Its text is
the owner's pid on the first line and, when the owner is a running site (``site serve``), the
path of that site's admin socket on the second::

    4242
    /run/dvx-dr/site-a.sock

A command that finds the store locked reads the second line and sends its operation to the
running site instead. This module imports nothing heavy, so the command line can find a
running site without loading the store's code (nor pathlib: paths may be given as text).
"""

from __future__ import annotations

import fcntl
import os

from dvx_dr.errors import StoreBusyError, UserError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not loaded at run time (see cli.replicate)
    from typing import TypeAlias

    StorePath: TypeAlias = str | os.PathLike[str]

NAME = "lock"


def holder(path: StorePath) -> tuple[str, str | None]:
    """The owner's pid (as text) and the admin socket of the site serving store ``path``
    (None when the owner is not a running site)."""
    try:
        with open(os.path.join(path, NAME), encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    return (lines[0] if lines else "unknown"), (lines[1] if len(lines) > 1 else None)


def acquire(path: StorePath) -> int:
    """Take the lock of store ``path`` and write our pid; the open descriptor holds it.
    :class:`StoreBusyError`, carrying the owner's admin socket, when another process has it."""
    fd = os.open(os.path.join(path, NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid, socket = holder(path)
        error = StoreBusyError(
            f"store {path} is in use by another dvx-dr process (pid {pid}); stop it, or "
            "run the command against the running site"
        )
        error.admin_socket = socket
        raise error from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def announce(fd: int, admin_socket: str) -> None:
    """Record, in the lock file held through ``fd``, the admin socket of the owning site."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n{admin_socket}\n".encode(), 0)


def check_output_path(path: StorePath) -> None:
    """Refuse an export or read target inside a dvx-dr store directory (one holding this
    lock file and its segments): writing there would overwrite the store's own files. The
    path is resolved first (``realpath``): a symlink, or a path through a symlinked
    directory, that leads into a store is refused like the store's own path."""
    parent = os.path.realpath(path)
    while (up := os.path.dirname(parent)) != parent:
        parent = up
        if (os.path.isfile(os.path.join(parent, NAME))
                and os.path.isdir(os.path.join(parent, "segments"))):
            raise UserError(f"{path} is inside the dvx-dr store {parent}; write it outside the "
                            "store directory")
