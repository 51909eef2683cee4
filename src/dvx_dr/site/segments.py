"""Segment files: append-only logs of extents, ``segments/NNNNNNNN.seg``.

A segment is written by appending extents, fsync'ed before any index row names them, and
sealed (never modified again) once it passes the target size. A segment has no header of its
own: each extent carries its own (see ``extent``). A new segment number is taken from the
high-water file ``segments/next`` (replaced atomically and fsync'ed) *before* the segment file
is created, and every process start opens a fresh segment, so a number is never reused, not
after a crash that left a torn tail nor after gc deleted the newest segment, and no XTS tweak
(segment, offset) ever encrypts two different payloads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

from dvx_dr.errors import IntegrityError

TARGET_SEGMENT_SIZE = 64 * 1024 * 1024


def segment_path(directory: Path, number: int) -> Path:
    return directory / f"{number:08d}.seg"


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until all of ``data`` is written (a write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentNumbers:
    """The never-decreasing counter of segment numbers, kept in ``segments/next``."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "next"
        self.directory = directory

    def peek(self) -> int:
        try:
            text = self.path.read_text().strip()
            recorded = int(text)
        except FileNotFoundError:
            recorded = 1
        except ValueError:
            raise IntegrityError(f"{self.path} is corrupt: expected a number; "
                                 "it must be larger than every segment number") from None
        # Never hand out a number at or below an existing file, whatever the counter says.
        highest = max((int(p.stem) for p in self.directory.glob("*.seg") if p.stem.isdigit()),
                      default=0)
        return max(recorded, highest + 1)

    def take(self) -> int:
        number = self.peek()
        tmp = self.path.with_name("next.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, f"{number + 1}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.directory)
        return number


class SegmentWriter:
    """Appends to the open segment, rolling over to a new number past the target size.

    ``allocate`` is called for a new segment number; it must make that number durable
    before returning (``SegmentNumbers.take``).
    """

    def __init__(
        self,
        directory: Path,
        allocate: Callable[[], int],
        target_size: int = TARGET_SEGMENT_SIZE,
    ) -> None:
        self.directory = directory
        self._allocate = allocate
        self._target = target_size
        self._fd: int | None = None
        self.number = 0
        self.size = 0
        self._unsynced = False
        #: Every segment number this writer opened, in order (see ``discard_since``).
        self.opened: list[int] = []

    def _open_new(self) -> None:
        self.close()
        self.number = self._allocate()
        path = segment_path(self.directory, self.number)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        fsync_dir(self.directory)
        self.size = 0
        self.opened.append(self.number)

    def reserve(self, length: int) -> tuple[int, int]:
        """The (segment, offset) the next extent of ``length`` bytes will be written at."""
        if self._fd is None or (self.size > 0 and self.size + length > self._target):
            if self._fd is not None:
                self.sync()
            self._open_new()
        return self.number, self.size

    def room(self) -> int:
        """Bytes the open segment takes before it is sealed (at least one extent)."""
        return max(0, self._target - self.size)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None
        try:
            write_all(self._fd, data)
        except OSError:
            # A partial write (a full disk) leaves bytes the planned offsets do not account
            # for: seal this segment, so the next extent starts in a new one.
            self.abandon()
            raise
        self.size += len(data)
        self._unsynced = True

    def mark(self) -> tuple[int, int, int]:
        """Where writing stands now, for ``discard_since`` if what follows is rolled back."""
        return self.number, self.size, len(self.opened)

    def discard_since(self, mark: tuple[int, int, int]) -> list[int]:
        """Give back the space of extents written since ``mark`` (none of them committed).

        Segments opened since are deleted; the segment open at ``mark`` is cut back to its
        size then. Either way the writer moves on to a new segment number afterwards, so no
        (segment, offset) address, and so no XTS tweak, is ever written twice. Returns the
        deleted segment numbers.
        """
        number, size, opened = mark
        self.abandon()
        deleted = []
        for n in self.opened[opened:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(segment_path(self.directory, n))
                deleted.append(n)
        if number and number not in self.opened[opened:]:
            with contextlib.suppress(FileNotFoundError):
                os.truncate(segment_path(self.directory, number), size)
        if deleted:
            fsync_dir(self.directory)
        return deleted

    def abandon(self) -> None:
        """Stop writing to the open segment without syncing (after a failed write)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.number = 0
        self._unsynced = False

    def sync(self) -> None:
        if self._fd is not None and self._unsynced:
            try:
                os.fsync(self._fd)
            except OSError:
                self.abandon()
                raise
            self._unsynced = False

    def close(self) -> None:
        """Seal the open segment; the next write opens a new one."""
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None
        self.number = 0


class SegmentReader:
    """Reads byte ranges of segment files, keeping a few file descriptors open."""

    def __init__(self, directory: Path, max_open: int = 32) -> None:
        self.directory = directory
        self._fds: dict[int, int] = {}
        self._max_open = max_open

    def _fd(self, number: int) -> int:
        fd = self._fds.get(number)
        if fd is None:
            if len(self._fds) >= self._max_open:
                _, old = self._fds.popitem()
                os.close(old)
            try:
                fd = os.open(segment_path(self.directory, number), os.O_RDONLY)
            except FileNotFoundError:
                raise IntegrityError(
                    f"segment file {segment_path(self.directory, number)} is missing; "
                    "restore it from a replica or backup"
                ) from None
            self._fds[number] = fd
        return fd

    def read(self, number: int, offset: int, length: int) -> bytes:
        data = os.pread(self._fd(number), length, offset)
        if len(data) != length:
            raise IntegrityError(
                f"segment {number:08d} is truncated: wanted {length} bytes at offset {offset}"
            )
        return data

    def forget(self, number: int) -> None:
        fd = self._fds.pop(number, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
