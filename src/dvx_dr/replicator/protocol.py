"""The replication wire format between sites, version 3.

A transfer runs over HTTPS (mutual TLS) as a short series of requests from the source site to
the target site, all under ``/v1/replication``:

``POST /sessions``  JSON ``{"version": 3, "volume": "vm1", "snapshot": "daily-1",
    "root": "<hex id>", "created": "<ISO time>", "ask": ["<hex id>", ...]}`` for one volume's
    snapshot, or with ``"group": "pg1"`` instead of ``"volume"`` for a protection-group
    snapshot (root = the group root); answers ``{"session": "<id>", "complete": bool,
    "lacking": ["<hex id>", ...]}`` (complete: the target already holds this replica). ``ask``
    (optional, at most ``MAX_ASK`` ids) is a first ``have`` question folded into the opening:
    the source asks about the root and the roots of earlier snapshots it could use as bases,
    and ``lacking`` lists those the target does not hold as complete roots.

``POST /sessions/<id>/have[?level=N]``  body: concatenated 32-byte ids (at most
    ``MAX_HAVE_IDS``); answers one byte per id: 1 when the target lacks it, 0 when it holds
    it. Without ``level`` the ids are data blocks, held when stored at all; with it they are
    tree pages of level N (0 = leaf pages, -1 = volume roots), held only when the target
    holds them as *complete* tree nodes of that level (``site.treeblobs``). The source walks
    the snapshot's Merkle tree top-down and descends only into pages the target lacks.

``POST /sessions/<id>/blobs``  body: a *blob stream*, batches one after another, each
    prefixed by its length (u32 LE), ended by a zero length; a batch is a framed series of
    records (below). The target verifies each batch's records, re-encrypts the payloads with
    its own key and makes the batch durable, or rejects it whole; it reads and checks the
    next batch while it stores the last. Answers ``{"stored": n, "bytes": n}`` once the
    end mark is read and every batch is durable. A bad batch ends the stream with an error;
    the batches before it stay durable. The source bounds one stream (``STREAM_BYTES``,
    ``STREAM_SECONDS``) and opens the next, so that the target confirms a long transfer piece
    by piece.

``POST /sessions/<id>/commit``  the target checks that the root and everything it names
    directly are present and makes the replica visible as ``<source site>/<volume>@<snapshot>``
    (a group: every member ``<source site>/<volume>@<snapshot>`` and the group
    ``<source site>/<pg>@<snapshot>``, in one transaction).

``POST /retention``  JSON ``{"group": "pg1", "retention": {...}, "protect": ["name"]}``: the
    target prunes its replicas of that group by the target retention rule.

Batch layout, all integers little-endian::

    batch header (8 bytes)
      0   4   magic b"DXRB"
      4   1   protocol version (1)
      5   3   reserved (0)
    record header (44 bytes), repeated
      0   1   kind: 1 = data block, 2 = tree page, 3 = snapshot root, 4 = group root,
              0 = end of batch
      1   1   flags: bit 0 = payload is zstd-compressed;
                     bit 1 = a base page id follows (tree pages only); other bits zero
      2   2   tree level of a tree page (0 = a leaf page, listing blocks); 0 for others
      4   4   plaintext length
      8   4   payload length
      12  32  blob id = SHA-256(plaintext)
    base page id (32 bytes, only with flag bit 1)
    payload (payload length bytes)
    ...
    end record: kind 0 with every other field zero; nothing may follow it.

A tree page carries its level, and the target checks each entry against it: a leaf page's
entries must be stored blobs, a level-k page's entries complete pages of level k - 1, a root's
top a complete page of the root's depth - 1 (each, or earlier in the same batch). A tree page
may also name a *base page*: a page the target holds complete at the same level (the page at
the same place in an earlier snapshot whose root the target holds). Holding it means holding
everything under it, so the target checks only the entries that differ from the base page's,
and the cost of checking a page is in proportion to what changed, not to its 512 entries.

Version 2 added page levels, the base page, ``have?level`` and ``ask``. Version 3 made
``blobs`` a stream of batches (version 2 sent one batch per request, and the target idled
while each response went back and the next request came in). A peer of another version is
refused with a message naming both versions.

Hard limits: a payload and a plaintext at most ``MAX_PLAIN`` bytes; at most
``MAX_RECORDS`` records and ``MAX_BATCH`` bytes per batch (a larger length prefix ends the
stream before the batch is read). Records come bottom-up: a tree page
only after every child it names that the target lacked, the root last, so whatever part of an
interrupted transfer is durable at the target is complete below each stored page, and a rerun
sends only what is still missing.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from dvx_dr.errors import ProtocolError, TransientError
from dvx_dr.site import treeblobs

VERSION = 3
BATCH_MAGIC = b"DXRB"
_BATCH_HEADER = struct.Struct("<4sB3x")
_RECORD = struct.Struct("<BBHII32s")
KIND_END = 0
KIND_BLOCK = 1
KIND_PAGE = 2
KIND_ROOT = 3
KIND_GROUP = 4
FLAG_COMPRESSED = 0x01
FLAG_BASE = 0x02
MAX_PLAIN = 4 * 1024 * 1024
MAX_RECORDS = 4096
MAX_BATCH = 64 * 1024 * 1024
STREAM_LENGTH = struct.Struct("<I")
STREAM_END = STREAM_LENGTH.pack(0)
STREAM_BYTES = 256 * 1024 * 1024
STREAM_SECONDS = 30.0
#: A target drops a blob stream whose peer sends nothing for this long (a stalled or vanished
#: source would otherwise hold the request, its buffers and its session). It is longer than
#: any pause a sender makes on purpose (a bandwidth limit waits between batches).
STREAM_IDLE = 300.0
MAX_HAVE_IDS = 16384
MAX_ASK = 256
MAX_LEVEL = treeblobs.MAX_LEVEL
ID = 32


@dataclass(frozen=True, slots=True)
class Record:
    kind: int
    compressed: bool
    plain_len: int
    id: bytes
    payload: bytes
    base: bytes | None = None  # tree pages: a page the target holds that this one revises
    level: int = 0  # tree pages: 0 for a leaf page


def encode_batch(records: Iterable[Record]) -> bytes:
    parts = [_BATCH_HEADER.pack(BATCH_MAGIC, VERSION)]
    for r in records:
        flags = (FLAG_COMPRESSED if r.compressed else 0) | (FLAG_BASE if r.base else 0)
        parts.append(_RECORD.pack(r.kind, flags, r.level, r.plain_len, len(r.payload), r.id))
        if r.base:
            parts.append(r.base)
        parts.append(r.payload)
    parts.append(_RECORD.pack(KIND_END, 0, 0, 0, 0, bytes(ID)))
    return b"".join(parts)


def decode_batch(data: bytes) -> list[Record]:
    """Parse a whole batch, enforcing every limit; raises ``ProtocolError`` on any defect."""
    if len(data) > MAX_BATCH:
        raise ProtocolError(f"batch of {len(data)} bytes exceeds the limit of {MAX_BATCH}")
    if len(data) < _BATCH_HEADER.size:
        raise ProtocolError("batch is truncated before its header ends")
    magic, version = _BATCH_HEADER.unpack_from(data)
    if magic != BATCH_MAGIC:
        raise ProtocolError("batch does not start with the replication magic; the peer is not "
                            "speaking dvx-dr replication")
    if version != VERSION:
        raise ProtocolError(f"batch uses protocol version {version}; this site speaks version "
                            f"{VERSION}: upgrade the older site")
    return list(_records(data, _BATCH_HEADER.size))


class ByteStream(Protocol):
    """What ``read_stream`` reads from: an asyncio-style stream (aiohttp's request body)."""

    async def readexactly(self, n: int) -> bytes: ...

    async def read(self, n: int = -1) -> bytes: ...


async def read_stream(stream: ByteStream, idle: float = STREAM_IDLE
                      ) -> AsyncIterator[bytes]:
    """The batches of a blob stream, each still to be parsed with ``decode_batch``; raises
    ``ProtocolError`` on a length above the limit, a stream that ends early (without its end
    mark) or bytes after the end mark, and ``TransientError`` when the peer sends nothing for
    ``idle`` seconds. A connection that breaks raises what the stream raises."""
    count = 0

    async def read(n: int) -> bytes:
        try:
            return await asyncio.wait_for(stream.readexactly(n), idle)
        except TimeoutError:
            raise TransientError(f"the peer sent nothing for {idle:.0f} s inside a blob "
                                 f"stream (after {count} batches); the stream was dropped"
                                 ) from None

    while True:
        try:
            (length,) = STREAM_LENGTH.unpack(await read(STREAM_LENGTH.size))
        except asyncio.IncompleteReadError:
            raise ProtocolError(f"blob stream ended after {count} batches without its end "
                                "mark") from None
        if length == 0:
            if await stream.read(1):
                raise ProtocolError("bytes follow the end mark of the blob stream")
            return
        if length > MAX_BATCH:
            raise ProtocolError(f"batch {count} of the blob stream claims {length} bytes, above "
                                f"the limit of {MAX_BATCH}")
        try:
            batch = await read(length)
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError(f"blob stream is truncated inside batch {count} "
                                f"({len(exc.partial)} of {length} bytes)") from None
        count += 1
        yield batch


def _records(data: bytes, pos: int) -> Iterator[Record]:
    count = 0
    view = memoryview(data)
    while True:
        if pos + _RECORD.size > len(data):
            raise ProtocolError(f"batch is truncated: record header at byte {pos} is incomplete "
                                "(the connection was probably cut)")
        kind, flags, level, plain_len, length, blob_id = _RECORD.unpack_from(data, pos)
        pos += _RECORD.size
        if kind == KIND_END:
            if flags or level or plain_len or length or blob_id != bytes(ID):
                raise ProtocolError("malformed end-of-batch record")
            if pos != len(data):
                raise ProtocolError(f"{len(data) - pos} bytes follow the end-of-batch record")
            return
        if kind not in (KIND_BLOCK, KIND_PAGE, KIND_ROOT, KIND_GROUP):
            raise ProtocolError(f"record {count} has unknown kind {kind}")
        if flags & ~(FLAG_COMPRESSED | FLAG_BASE):
            raise ProtocolError(f"record {count} has unknown flags {flags:#x}")
        if level > (MAX_LEVEL if kind == KIND_PAGE else 0):
            raise ProtocolError(f"record {count} has tree level {level}, which a "
                                f"{'tree page' if kind == KIND_PAGE else 'non-page'} record "
                                "cannot have")
        base = None
        if flags & FLAG_BASE:
            if kind != KIND_PAGE:
                raise ProtocolError(f"record {count} names a base page but is not a tree page")
            if pos + ID > len(data):
                raise ProtocolError(f"batch is truncated inside record {count}'s base id")
            base = bytes(view[pos:pos + ID])
            pos += ID
        if length > MAX_PLAIN or plain_len > MAX_PLAIN:
            raise ProtocolError(f"record {count} claims {max(length, plain_len)} bytes, above "
                                f"the limit of {MAX_PLAIN}")
        if not flags & FLAG_COMPRESSED and length != plain_len:
            raise ProtocolError(f"record {count}: uncompressed payload length differs from its "
                                "plaintext length")
        if pos + length > len(data):
            raise ProtocolError(f"batch is truncated inside record {count}'s payload")
        count += 1
        if count > MAX_RECORDS:
            raise ProtocolError(f"batch has more than {MAX_RECORDS} records")
        yield Record(kind, bool(flags & FLAG_COMPRESSED), plain_len, blob_id,
                     bytes(view[pos:pos + length]), base, level)
        pos += length


def encode_ids(ids: Iterable[bytes]) -> bytes:
    return b"".join(ids)


def decode_ask(value: object) -> list[bytes]:
    """The ``ask`` list of a session request: at most ``MAX_ASK`` hex ids."""
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_ASK:
        raise ProtocolError(f"session request: 'ask' must be a list of at most {MAX_ASK} ids")
    try:
        ids = [bytes.fromhex(v) for v in value]
    except (TypeError, ValueError):
        raise ProtocolError("session request: 'ask' holds something that is not a hex id"
                            ) from None
    if any(len(i) != ID for i in ids):
        raise ProtocolError("session request: an id in 'ask' is not 32 bytes")
    return ids


def decode_level(value: str | None) -> int | None:
    """The ``level`` of a have request: None for blocks, -1 (roots, ``treeblobs.ROOT``) to
    ``MAX_LEVEL``."""
    if value is None:
        return None
    try:
        level = int(value)
    except ValueError:
        level = treeblobs.ROOT - 1
    if not treeblobs.ROOT <= level <= MAX_LEVEL:
        raise ProtocolError(f"have: level must be {treeblobs.ROOT} (roots) to {MAX_LEVEL}, "
                            f"got {value!r}")
    return level


def decode_ids(data: bytes) -> list[bytes]:
    if len(data) % ID:
        raise ProtocolError("id list length is not a multiple of 32 bytes")
    n = len(data) // ID
    if n > MAX_HAVE_IDS:
        raise ProtocolError(f"id list of {n} ids exceeds the limit of {MAX_HAVE_IDS}")
    return [data[i:i + ID] for i in range(0, len(data), ID)]
