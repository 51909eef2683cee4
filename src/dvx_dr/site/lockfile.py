"""The store's lock file: which process owns the store, and how to reach it.

``STORE/lock`` is held with ``flock`` by the one process that has the store open. Its text is
the owner's pid on the first line and, when the owner is a running site (``site serve``), the
path of that site's admin socket on the second::

    4242
    /run/dvx-dr/site-a.sock

A command that finds the store locked reads the second line and sends its operation to the
running site instead. This module imports nothing heavy, so the command line can find a
running site without loading the store's code (nor pathlib: paths may be given as text).

Whoever owns the store needs to write it, even to read it (SQLite's write-ahead log and its
index, the lock, the reserve, the segment counter): ``check_access`` refuses, in one line
naming the path and the cause, a store this user cannot write, before anything is opened.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import stat

from dvx_dr.errors import StoreBusyError, UserError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not loaded at run time (see cli.replicate)
    from typing import TypeAlias

    StorePath: TypeAlias = str | os.PathLike[str]

NAME = "lock"

#: What the owner of a store needs of its files (those that exist), beyond the directory
#: itself (read, write, search): SQLite writes its log and index next to the database, and
#: replaces ``segments/next`` to take a segment number.
NEEDED = (
    (NAME, os.R_OK | os.W_OK),
    ("store.db", os.R_OK | os.W_OK),
    ("store.db-wal", os.R_OK | os.W_OK),
    ("store.db-shm", os.R_OK | os.W_OK),
    ("keystore.json", os.R_OK),
    ("segments", os.R_OK | os.W_OK | os.X_OK),
)
#: Errors of a file the user may not write: what ``refusal`` explains.
REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)
FIX = "run as the store's owner or fix its permissions"


def holder(path: StorePath) -> tuple[str, str | None]:
    """The owner's pid (as text) and the admin socket of the site serving store ``path``
    (None when the owner is not a running site). :class:`UserError` when this user may not
    read the lock file: whether a site runs is then unknown, and its admin socket (the
    site's user's alone) is out of this user's reach as well."""
    lock = os.path.join(path, NAME)
    try:
        with open(lock, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except PermissionError:
        raise UserError(f"cannot reach a site on store {path}: {denied(lock, os.R_OK)} (the "
                        "lock file names a running site's admin socket, which is for the "
                        "store's owner only): run the command as the store's owner (the user "
                        "its site runs as)") from None
    except OSError:
        lines = []
    return (lines[0] if lines else "unknown"), (lines[1] if len(lines) > 1 else None)


def check_access(path: StorePath) -> None:
    """Refuse store ``path`` in one line (:class:`UserError`) when this user cannot own it:
    a directory on the way it may not enter, a store file it may not write (or read), a
    read-only file system. Nothing to say of a path that does not exist or holds no
    ``store.db``: the caller says it is not a store."""
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return
    except PermissionError:
        raise UserError(f"cannot open store {path}: {denied(path, os.F_OK)}: {FIX}") from None
    if not is_dir:
        return
    if not _access(path, os.R_OK | os.X_OK):
        raise UserError(f"cannot open store {path}: {denied(path, os.R_OK | os.X_OK)}: {FIX}")
    if not os.path.exists(os.path.join(path, "store.db")):
        return
    if on_read_only_fs(path):
        raise UserError(read_only_message(path))
    for name, need in ((".", os.W_OK), *NEEDED):
        target = os.path.normpath(os.path.join(path, name))
        if os.path.lexists(target) and not _access(target, need):
            raise UserError(f"cannot open store {path}: {denied(target, need)}: {FIX}")


def refusal(path: StorePath, exc: OSError) -> str:
    """The one line for ``exc`` (one of ``REFUSED``), met on a file of store ``path`` that
    ``check_access`` let through (a file changed since, an ACL, a server that squashes)."""
    if exc.errno == errno.EROFS:
        return read_only_message(path)
    target = exc.filename if isinstance(exc.filename, str) else os.path.join(path, "store.db")
    return f"cannot open store {path}: {denied(target, os.R_OK | os.W_OK)}: {FIX}"


def on_read_only_fs(path: StorePath) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def read_only_message(path: StorePath) -> str:
    return (f"cannot open store {path}: it is on a read-only file system: dvx-dr needs write "
            "access to its store, even to read it (remount it read-write, or copy the store "
            "to a writable place)")


def denied(path: StorePath, need: int) -> str:
    """Why this user cannot have ``need`` (``os.R_OK``...) of ``path``, as a clause naming
    the file or directory at fault, this user and that file's owner and mode: "S/lock is
    not writable by this user (uid 65534; owner root, mode 0600)"."""
    path = os.path.abspath(path)
    on_the_way = [d for d in _ancestors(path) if not _access(d, os.X_OK)]
    if on_the_way:
        return f"{on_the_way[0]} is not accessible to this user {_whose(on_the_way[0])}"
    is_dir = os.path.isdir(path)
    missing = [word for flag, word in ((os.R_OK, "readable"), (os.W_OK, "writable"))
               if need & flag and not _access(path, flag)]
    if is_dir and (need & os.X_OK and not _access(path, os.X_OK)
                   or "readable" in missing):
        what = "accessible to"
    elif missing:
        what = " or ".join(missing) + " by"
    else:
        what = "usable by"  # refused for another reason (an ACL, a squashing server)
    return f"{path} is not {what} this user {_whose(path)}"


def _ancestors(path: str) -> list[str]:
    """The directories above ``path`` (absolute), outermost first."""
    found = []
    while (parent := os.path.dirname(path)) != path:
        found.append(parent)
        path = parent
    return found[::-1]


def _access(path: StorePath, mode: int) -> bool:
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _whose(path: StorePath) -> str:
    """"(uid 65534; owner root, mode 0700)": this user, then ``path``'s owner and mode."""
    me = f"uid {os.geteuid()}"
    try:
        st = os.stat(path)
    except OSError:
        return f"({me})"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = f"uid {st.st_uid}"
    return f"({me}; owner {owner}, mode {stat.S_IMODE(st.st_mode):04o})"


def acquire(path: StorePath) -> int:
    """Take the lock of store ``path`` and write our pid; the open descriptor holds it.
    :class:`StoreBusyError`, carrying the owner's admin socket, when another process has it."""
    try:
        fd = os.open(os.path.join(path, NAME), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        if exc.errno not in REFUSED:
            raise
        raise UserError(refusal(path, exc)) from None
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
