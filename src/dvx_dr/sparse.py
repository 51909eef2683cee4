"""Writing disk images sparsely: runs of zeros become holes in the output file.

An export of a thin volume writes its data and seeks over its zeros, as ``cp --sparse=auto``
and ``qemu-img convert`` leave raw images: the file has the volume's full size, takes only
the space of its data, and reads back as the same bytes (a hole reads as zeros). Only a file
the writer has just created or truncated is written this way, where every byte not written
reads as zero. A pipe, standard output (perhaps a file opened for appending) or a device gets
every byte: a device may hold old data where a hole would be.

This module imports nothing heavy: the command line uses it without the store's code.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from typing import BinaryIO

#: Holes are made of whole pieces of this size, aligned to the start of the file; zeros in a
#: piece that also holds data are written. 64 KiB is the default block size.
PIECE = 64 * 1024
_ZERO = bytes(PIECE)
_ZEROS = memoryview(bytes(16 * PIECE))  # zero runs written out, a MiB at a time


def write(out: BinaryIO, chunks: Iterable[bytes | int], sparse: bool,
          progress: Callable[[int], None] | None = None) -> int:
    """Write ``chunks`` to ``out`` from its current position; the number of bytes they hold.
    A chunk is bytes, or an int: that many zero bytes (a hole the reader did not fill in).
    With ``sparse`` (``out`` a regular file just created or truncated: see
    ``is_new_regular_file``), zero runs and all-zero pieces are skipped with a seek, and the
    file is cut to its full length at the end (a trailing run of zeros is a hole too)."""
    total = 0
    for chunk in chunks:
        if isinstance(chunk, int):
            if sparse:
                out.seek(chunk, os.SEEK_CUR)
            else:
                for k in range(0, chunk, len(_ZEROS)):
                    out.write(_ZEROS[:min(len(_ZEROS), chunk - k)])
            total += chunk
            if progress:
                progress(chunk)
            continue
        if not sparse:
            out.write(chunk)
        else:
            view = memoryview(chunk)
            pos = start = 0  # ``start``: where the data not yet written begins
            while pos < len(chunk):
                n = min(PIECE - (total + pos) % PIECE, len(chunk) - pos)
                if n == PIECE and chunk[pos:pos + n] == _ZERO:
                    if start < pos:
                        out.write(view[start:pos])
                    out.seek(n, os.SEEK_CUR)
                    start = pos + n
                pos += n
            if start < len(chunk):
                out.write(view[start:])
        total += len(chunk)
        if progress:
            progress(len(chunk))
    if sparse:
        out.truncate(total)
    return total


def is_new_regular_file(out: BinaryIO) -> bool:
    """Whether ``out`` is an empty regular file at offset 0 (one just created or truncated),
    which may be written sparsely."""
    try:
        st = os.fstat(out.fileno())
        return stat.S_ISREG(st.st_mode) and st.st_size == 0 and out.tell() == 0
    except (OSError, ValueError):
        return False
