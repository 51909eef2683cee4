"""Volumes: fixed-block virtual disks kept as a live map (block number -> blob).

A write at any byte offset is a read-modify-write of the blocks it touches. An all-zero block
is stored as a hole (its map row is removed). Every write marks its blocks dirty, so the next
snapshot patches just their ids into the cached tree pages; a resize or an import marks whole
leaf pages dirty instead, to be rebuilt in full.

Writes are atomic: ``write`` runs in one transaction, so a failure (a write past the end, a
full disk) changes nothing. ``import_file`` builds the volume in the 'importing' state and
commits it batch by batch in bounded memory; it becomes visible, under its name, only when the
whole image is in; an interrupted import is dropped when the store next opens. It takes a raw
image only, unless told otherwise: a qcow2, VMDK, VHD(X) or VDI container is refused by its
magic numbers (``image_format``). A resize that would shrink a volume is refused unless told
to shrink it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import sqlite3
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal, overload

from dvx_dr.errors import AlreadyExistsError, IntegrityError, NotFoundError, UserError
from dvx_dr.site import db as dbmod
from dvx_dr.site.store import Store, drop_import, drop_volume, now_iso, using_reserve
from dvx_dr.site.tree import FANOUT, level_counts
from dvx_dr.units import format_size

#: Blocks handed to the pipeline at once (4 MiB at the default block size).
BATCH_BLOCKS = 64
#: An import's batches are 4 MiB whatever the block size, since about three are in memory at
#: once (see ``BlobStore.put_stream``); and it commits every 64 MiB.
IMPORT_BATCH = 4 * 1024 * 1024
IMPORT_COMMIT = 64 * 1024 * 1024
VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_VOLUME = 1 << 50

Progress = Callable[[int], None]


@dataclass(frozen=True)
class VolumeInfo:
    id: int
    name: str
    size: int
    created: str
    mapped_blocks: int


def valid_name(name: str) -> bool:
    return VOLUME_NAME.fullmatch(name) is not None


def check_name(name: str) -> None:
    if not valid_name(name):
        raise UserError(f"volume name {name!r}: use ASCII letters (a-z, A-Z), digits, '.', "
                        "'_' and '-' (up to 128), starting with a letter or digit")


def _check_size(size: int) -> None:
    if size < 0 or size > MAX_VOLUME:
        raise UserError(f"volume size {size}: expected 0 to 1 PiB")


def get(store: Store, name: str) -> VolumeInfo:
    row = store.db.execute(
        "SELECT vol, name, size, created FROM volumes WHERE name=? AND state='ready'", (name,)
    ).fetchone()
    if row is None:
        raise NotFoundError(f"unknown volume {name!r}; 'dvx-dr volume list' shows the volumes")
    mapped = store.db.execute("SELECT COUNT(*) FROM blocks WHERE vol=?", (row[0],)).fetchone()[0]
    return VolumeInfo(row[0], row[1], row[2], row[3], mapped)


def list_volumes(store: Store) -> list[VolumeInfo]:
    names = [r[0] for r in store.db.execute(
        "SELECT name FROM volumes WHERE state='ready' ORDER BY name")]
    return [get(store, n) for n in names]


def insert(db: sqlite3.Connection, name: str, size: int, state: str = "ready") -> int:
    if db.execute("SELECT 1 FROM volumes WHERE name=?", (name,)).fetchone():
        raise AlreadyExistsError(f"volume {name!r} already exists")
    cur = db.execute("INSERT INTO volumes (name, size, created, state) VALUES (?, ?, ?, ?)",
                     (name, size, now_iso(), state))
    assert cur.lastrowid is not None
    return cur.lastrowid


def create(store: Store, name: str, size: int) -> VolumeInfo:
    check_name(name)
    _check_size(size)
    with store.transaction() as db:
        insert(db, name, size)
    return get(store, name)


def delete(store: Store, name: str) -> None:
    """Delete a volume: marked 'deleting' under a hidden name in one small transaction (the
    name is free at once), then removed in bounded transactions (``store.drop_volume``). On
    a disk too full even to mark it, the gc reserve is given up for it: deleting is how an
    operator frees space."""
    vol = get(store, name).id

    def mark() -> None:
        with store.transaction() as db:
            db.execute("UPDATE volumes SET state='deleting', name=? WHERE vol=?",
                       (f"(deleting {vol})", vol))

    using_reserve(store.path, mark)
    drop_volume(store, vol)


def resize(store: Store, name: str, size: int, shrink: bool = False) -> None:
    """Grow or shrink a volume. Shrinking discards the bytes past the new end, so it is done
    only with ``shrink`` (``--shrink``): without it a smaller size is refused, changing
    nothing (a typo in a size must not cut a disk)."""
    _check_size(size)
    info = get(store, name)
    if size < info.size and not shrink:
        raise UserError(f"volume {name!r} is {info.size} bytes ({format_size(info.size)}); "
                        f"resizing it to {size} bytes ({format_size(size)}) would drop its "
                        f"last {info.size - size} bytes; nothing was changed (pass --shrink "
                        "to shrink it)")
    bs = store.block_size
    with store.transaction() as db:
        old_blocks = -(-info.size // bs)
        new_blocks = -(-size // bs)
        keep = min(old_blocks, new_blocks)
        if size < info.size:
            db.execute("DELETE FROM blocks WHERE vol=? AND blk>=?", (info.id, new_blocks))
            if size % bs:
                # The new last block is partial: zero its tail so a later grow reads zeros.
                _write_in_txn(store, info.id, size, size, b"\0" * (bs - size % bs), clamp=True)
        # The leaf at the old end and the leaf at the new end change shape, and the pages
        # above them follow at snapshot time; the leaves between hold no blocks (holes, or
        # pages past the new end, which the next snapshot drops), so a resize costs the same
        # whatever the sizes (marking every leaf between took 50 s growing to 1 PiB).
        leaves = {max(0, keep - 1) // FANOUT, max(0, new_blocks - 1) // FANOUT}
        db.executemany("INSERT OR IGNORE INTO dirty_leaves (vol, leaf) VALUES (?, ?)",
                       [(info.id, leaf) for leaf in sorted(leaves)])
        if new_blocks < old_blocks:
            # The cached pages past the new end describe blocks just discarded, and the
            # pages at the new end still name them: drop them all now, so that growing again
            # before the next snapshot finds holes there and rebuilds those pages in full.
            pages = level_counts(new_blocks)  # per level, up to the new top
            for level in range(len(level_counts(old_blocks))):
                at_end = pages[level] - 1 if level < len(pages) else 0
                db.execute("DELETE FROM tree_pages WHERE vol=? AND level=? AND idx>=?",
                           (info.id, level, at_end))
        db.execute("UPDATE volumes SET size=? WHERE vol=?", (size, info.id))


# -- writing ------------------------------------------------------------------------------


def _put_blocks(store: Store, vol: int, blocks: dict[int, bytes], whole_leaves: bool = False
                ) -> None:
    """Store whole blocks (inside a transaction): holes for zeros, blobs for the rest."""
    data = _nonzero(store, blocks)
    _, rows = store.blobs.put_many(list(data.values()))
    _record_blocks(store, vol, list(blocks), dict(zip(data, rows, strict=True)), whole_leaves)


def _nonzero(store: Store, blocks: dict[int, bytes]) -> dict[int, bytes]:
    zero = bytes(store.block_size)
    return {b: d for b, d in blocks.items() if d != zero}


def _record_blocks(store: Store, vol: int, numbers: list[int], rows: dict[int, int],
                   whole_leaves: bool) -> None:
    """Map blocks ``numbers`` to their blob ``rows`` (a block absent from ``rows`` is a hole).

    The blocks whose content changed are marked dirty for the next snapshot (rewriting a
    block with what it already holds changes nothing, so writing back a whole image with a
    few changes costs the next snapshot only those); with ``whole_leaves`` (a volume that has
    no tree yet) their leaf pages are, to be built in full.
    """
    db = store.db
    new = {b: rows.get(b) for b in numbers}  # block -> blob row; None = hole
    old = {} if whole_leaves else _block_rows(db, vol, numbers)
    changed = [b for b, r in new.items() if whole_leaves or old.get(b) != r]
    db.executemany("INSERT OR REPLACE INTO blocks (vol, blk, blob) VALUES (?, ?, ?)",
                   [(vol, b, new[b]) for b in changed if new[b] is not None])
    db.executemany("DELETE FROM blocks WHERE vol=? AND blk=?",
                   [(vol, b) for b in changed if new[b] is None])
    if whole_leaves:
        db.executemany("INSERT OR IGNORE INTO dirty_leaves (vol, leaf) VALUES (?, ?)",
                       [(vol, leaf) for leaf in {b // FANOUT for b in numbers}])
    else:
        db.executemany("INSERT OR IGNORE INTO dirty_blocks (vol, blk) VALUES (?, ?)",
                       [(vol, b) for b in changed])


def _block_rows(db: sqlite3.Connection, vol: int, numbers: list[int]) -> dict[int, int]:
    """The blob row of each of ``numbers`` that is mapped (holes are absent)."""
    return dict(dbmod.select_in(db, "SELECT blk, blob FROM blocks WHERE vol=? AND blk IN (?*)",
                                numbers, (vol,)))


def _write_in_txn(store: Store, vol: int, size: int, offset: int, data: bytes,
                  clamp: bool = False) -> None:
    bs = store.block_size
    end = offset + len(data)
    if clamp:
        end = min(end, -(-size // bs) * bs)
    first, last = offset // bs, (end - 1) // bs
    if end <= offset:
        return
    blocks: dict[int, bytes] = {}
    partial = [b for b in (first, last) if b * bs < offset or (b + 1) * bs > end]
    current = dict(zip(partial, _read_blocks(store, vol, partial), strict=True))
    for b in range(first, last + 1):
        lo, hi = b * bs, (b + 1) * bs
        if lo >= offset and hi <= end:
            blocks[b] = data[lo - offset:hi - offset]
        else:
            buf = bytearray(current[b])
            s, e = max(lo, offset), min(hi, end)
            buf[s - lo:e - lo] = data[s - offset:e - offset]
            blocks[b] = bytes(buf)
    _put_blocks(store, vol, blocks)


def write(store: Store, name: str, offset: int, source: BinaryIO,
          progress: Progress | None = None) -> int:
    """Write a stream at a byte offset, atomically. Returns the bytes written."""
    info = get(store, name)
    if offset < 0:
        raise UserError("offset must not be negative")
    if offset > info.size:  # even for an empty write: the offset itself is out of range
        raise UserError(f"offset {offset} is past the end of volume {name!r} "
                        f"({info.size} bytes); nothing was written")
    bs = store.block_size
    written = 0
    with store.transaction():
        pos = offset
        while True:
            window = (pos // bs + BATCH_BLOCKS) * bs - pos
            chunk = _read_full(source, window)
            if not chunk:
                break
            if pos + len(chunk) > info.size:
                raise UserError(
                    f"write past the end of volume {name!r}: it is {info.size} bytes, the write "
                    f"reaches byte {pos + len(chunk)} at least; nothing was written (resize it "
                    "first)"
                )
            _write_in_txn(store, info.id, info.size, pos, chunk)
            pos += len(chunk)
            written += len(chunk)
            if progress:
                progress(len(chunk))
    return written


def _read_full(source: BinaryIO, n: int) -> bytes:
    parts = []
    while n > 0:
        chunk = source.read(n)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _image_batches(store: Store, source: BinaryIO, size: int
                   ) -> Iterator[tuple[tuple[list[int], list[int], int], list[memoryview]]]:
    """The image's batches of ``IMPORT_BATCH`` bytes, as the blob stream takes them: only
    the non-zero blocks are stored, and the tag carries every block number of the batch,
    the numbers of the stored ones (the others become holes) and its bytes of the image.

    The blocks are views into the batch as read: copying each out (as a slice of bytes) cost
    this critical thread about 0.5 s per GiB on this project's machine, a sixth of an
    import; all-zero blocks are found with ``startswith`` (a memcmp), since comparing a view
    with bytes goes element by element."""
    bs = store.block_size
    zero = bytes(bs)
    blk = 0
    # At most ``size`` bytes: a file that grows while it is imported does not put blocks
    # past the volume's end.
    while chunk := _read_full(source, min(max(1, IMPORT_BATCH // bs) * bs, size - blk * bs)):
        if len(chunk) % bs:
            chunk += bytes(bs - len(chunk) % bs)
        n = len(chunk) // bs
        view = memoryview(chunk)
        data = {blk + i: view[i * bs:(i + 1) * bs] for i in range(n)
                if not chunk.startswith(zero, i * bs)}
        yield ((list(range(blk, blk + n)), list(data), min(n * bs, size - blk * bs)),
               list(data.values()))
        blk += n


def image_format(source: BinaryIO, size: int) -> str | None:
    """The disk image container ``source`` (``size`` bytes) is, by its magic numbers, or
    None for what may be a raw disk: qcow2 (``QFI\\xfb`` at 0; version 1 is qcow), VMDK
    (``KDMV`` at 0, or a text descriptor starting ``# Disk DescriptorFile``), VHDX
    (``vhdxfile`` at 0), VDI (``<<< `` at 0 and 0xbeda107f, little-endian, at 64) and VHD
    (``conectix`` starting its footer, the last 512 bytes, or 511 in the oldest; a dynamic
    VHD copies it at 0). Leaves ``source`` at its start."""
    source.seek(0)
    head = _read_full(source, 512)
    tail = b""
    if size >= 512:
        source.seek(size - 512)
        tail = _read_full(source, 512)
    source.seek(0)
    if head.startswith(b"QFI\xfb"):
        return "qcow" if head[4:8] == b"\0\0\0\x01" else "qcow2"
    if head.startswith((b"KDMV", b"# Disk DescriptorFile")):
        return "VMDK"
    if head.startswith(b"vhdxfile"):
        return "VHDX"
    if head.startswith(b"<<< ") and head[64:68] == b"\x7f\x10\xda\xbe":
        return "VDI"
    if head.startswith(b"conectix") or tail.startswith(b"conectix") \
            or tail[1:].startswith(b"conectix"):
        return "VHD"
    return None


def import_file(store: Store, name: str, path: Path, progress: Progress | None = None,
                any_format: bool = False) -> int:
    """Create volume ``name`` from a raw disk image, streaming in bounded memory. An image
    in a container format (``image_format``: qcow2, VMDK, ...) is refused unless
    ``any_format`` says to import its bytes as they are."""
    check_name(name)
    try:
        # Checked before opening: opening a pipe waits for a writer.
        if not (stat.S_ISREG(mode := os.stat(path).st_mode) or stat.S_ISBLK(mode)):
            raise UserError(f"cannot import {path}: not a regular file or block device (a "
                            "pipe, terminal, character device or directory has no size to "
                            "make the volume with); write it into a volume with 'dvx-dr "
                            "volume write' instead")
        source = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise UserError(f"cannot read image {path}: {exc.strerror}") from None
    with source:
        size = source.seek(0, os.SEEK_END)  # a file's length, a block device's size
        try:
            kind = None if any_format else image_format(source, size)
        except OSError as exc:
            raise UserError(f"cannot read image {path}: {exc.strerror}") from None
        if kind is not None:
            raise UserError(f"{path} is a {kind} image, not a raw disk; convert it first: "
                            f"qemu-img convert -O raw {shlex.quote(str(path))} "
                            f"{shlex.quote(f'{path}.raw')} (or pass --any-format to import "
                            "its bytes as they are)")
        source.seek(0)
        _check_size(size)
        with store.transaction() as db:
            if db.execute("SELECT 1 FROM volumes WHERE name=?", (name,)).fetchone():
                raise AlreadyExistsError(f"volume {name!r} already exists; delete it first or "
                                         "import under another name")
            vol = insert(db, name, size, state="importing")
        # One transaction (one fsync of segment and log) per IMPORT_COMMIT bytes: an
        # interrupted import is dropped whole anyway, so smaller steps buy nothing.
        per_commit = max(1, IMPORT_COMMIT // IMPORT_BATCH)
        stream = store.blobs.put_stream(_image_batches(store, source, size))
        try:
            more = True
            while more:
                with store.transaction():
                    count = 0
                    for (numbers, stored, nbytes), _, rows in itertools.islice(stream,
                                                                              per_commit):
                        _record_blocks(store, vol, numbers, dict(zip(stored, rows, strict=True)),
                                       whole_leaves=True)
                        if progress:
                            progress(nbytes)
                        count += 1
                    more = count == per_commit
            with store.transaction() as db:
                db.execute("UPDATE volumes SET state='ready' WHERE vol=?", (vol,))
        except BaseException:
            # The volume goes with the import, here and now: a running site would otherwise
            # keep its name taken (and its blocks held from gc) until it restarts, when an
            # opening store drops unfinished imports. If even that fails (a disk still
            # full), the next opening does it.
            stream.close()
            with contextlib.suppress(Exception), store.transaction() as db:
                drop_import(db, vol)
            raise
        finally:
            stream.close()
    return size


# -- reading ------------------------------------------------------------------------------


def _read_blocks(store: Store, vol: int, numbers: list[int]) -> list[bytes]:
    if not numbers:
        return []
    rows = _block_rows(store.db, vol, numbers)
    wanted = [rows[b] for b in numbers if b in rows]
    plains = iter(whole_blocks(store, store.blobs.get_rows(wanted)))
    zero = bytes(store.block_size)
    return [next(plains) if b in rows else zero for b in numbers]


def whole_blocks(store: Store, plains: list[bytes]) -> list[bytes]:
    """``plains``, checked to be blocks: a tree or map that names a blob of another length as
    a block (a replica from a peer that lied) must fail the read, not shift the data after it."""
    bs = store.block_size
    for plain in plains:
        if len(plain) != bs:
            raise IntegrityError(f"a volume or snapshot names a blob of {len(plain)} bytes as "
                                 f"a block of {bs} bytes: its tree is damaged or forged; run "
                                 "'dvx-dr datastore scrub'")
    return plains


@overload
def iter_range(store: Store, vol: int, size: int, offset: int, length: int,
               zero_runs: Literal[False] = False) -> Iterator[bytes]: ...


@overload
def iter_range(store: Store, vol: int, size: int, offset: int, length: int,
               zero_runs: bool) -> Iterator[bytes | int]: ...


def iter_range(store: Store, vol: int, size: int, offset: int, length: int,
               zero_runs: bool = False) -> Iterator[bytes | int]:
    """Yield the bytes of ``[offset, offset + length)`` of a live volume, batch by batch.
    With ``zero_runs``, a run of unmapped blocks comes as its length (an int) instead, found
    through the block index, so a thin volume costs what its data costs (``sparse.write``
    takes both)."""
    bs = store.block_size
    end = min(offset + length, size)
    pos = offset
    while pos < end:
        first = pos // bs
        if zero_runs:
            mapped = store.db.execute("SELECT MIN(blk) FROM blocks WHERE vol=? AND blk>=? "
                                      "AND blk<=?", (vol, first, (end - 1) // bs)).fetchone()[0]
            if mapped is None:
                yield end - pos
                return
            if mapped > first:
                yield mapped * bs - pos
                pos, first = mapped * bs, mapped
        last = min((end - 1) // bs, first + BATCH_BLOCKS - 1)
        data = b"".join(_read_blocks(store, vol, list(range(first, last + 1))))
        lo = pos - first * bs
        hi = min(end - first * bs, len(data))
        yield data[lo:hi]
        pos = first * bs + hi


def read(store: Store, name: str, offset: int, length: int) -> bytes:
    info = get(store, name)
    _check_range(name, info.size, offset, length)
    return b"".join(iter_range(store, info.id, info.size, offset, length))


def _check_range(name: str, size: int, offset: int, length: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise UserError(f"range {offset}+{length} is outside volume {name!r} of {size} bytes")
