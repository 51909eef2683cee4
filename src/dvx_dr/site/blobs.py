"""The blob pipeline: block -> id = SHA-256 -> zstd -> AES-256-XTS -> segment, and back.

Writing a batch of plaintexts:

1. hash every plaintext (in the worker pool) and drop the ones already in the index (looked
   up by keyed name) or repeated in the batch: dedup;
2. compress the new ones with zstd (in the worker pool), keeping the plaintext when that is
   not smaller;
3. give each extent its address in the open segment, encrypt it with XTS under the current
   key version using that address as the tweak, and append it;
4. fsync the segment, then insert the index rows in the caller's transaction. The caller
   commits, so an index row never names an extent that is not durable.

A stream of batches (``put_stream``, used by imports) overlaps the steps across batches: this
thread seals and writes one batch while the pool compresses the next and hashes the one after.

Reading decrypts, decompresses and checks ``SHA-256(plaintext) == id``; a mismatch raises
``IntegrityError`` and never returns data.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections import OrderedDict, deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Generic, TypeVar

import zstandard

from dvx_dr.errors import IntegrityError
from dvx_dr.site import db as dbmod
from dvx_dr.site import extent
from dvx_dr.site.crypto import ExtentCipher, IndexKeys, NoIndexKeys, PlainIndex
from dvx_dr.site.segments import SegmentReader, SegmentWriter

ZSTD_LEVEL = 3
#: The largest plaintext a blob may have (a 1 MiB block; pages and roots are smaller).
MAX_PLAIN = 4 * 1024 * 1024
PAGE_CACHE_BYTES = 32 * 1024 * 1024
_CHUNK = 16
#: Batches planned (being compressed) ahead of the one being written. Deeper pipelines
#: measured no faster on two cores, within this VM's run-to-run noise.
AHEAD = 1
T = TypeVar("T")
C = TypeVar("C")

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    c = getattr(_local, "cctx", None)
    if c is None:
        c = _local.cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


def blob_id(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


#: A block's plaintext as a stream of batches hands it over: bytes, or a view into the
#: batch it was read in (an import does not copy its blocks out of what it read).
Plain = bytes | memoryview


def _hash_chunk(chunk: Sequence[Plain]) -> list[bytes]:
    return [hashlib.sha256(b).digest() for b in chunk]


def compress(plain: Plain) -> tuple[bool, bytes]:
    """``(True, zstd(plain))`` when that is smaller, else ``(False, plain)`` (as bytes)."""
    packed = _compressor().compress(plain)
    return (True, packed) if len(packed) < len(plain) else (False, bytes(plain))


def _compress_chunk(chunk: Sequence[Plain]) -> list[tuple[bool, bytes]]:
    return [compress(b) for b in chunk]


def decompress(payload: bytes, plain_len: int) -> bytes:
    """The plaintext of a compressed payload: exactly one zstd frame that declares
    ``plain_len`` bytes of content. A frame declaring more is refused before anything is
    allocated for it (the output limit of one-shot decompression does not apply to a frame
    that declares its size), and bytes after the frame are refused, not stored."""
    if plain_len > MAX_PLAIN:
        raise IntegrityError(f"blob claims {plain_len} bytes of plaintext, above the limit")
    try:
        declared = zstandard.frame_content_size(payload)
        if declared != plain_len:
            raise IntegrityError(f"compressed payload declares {declared} bytes of content, "
                                 f"not the {plain_len} its blob claims")
        return _decompressor().decompress(payload, max_output_size=max(plain_len, 1),
                                          allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"compressed payload does not decompress ({exc})") from None


def _chunks(items: Sequence[C]) -> list[Sequence[C]]:
    """``items`` in pieces of ``_CHUNK``, the unit of work handed to the pool."""
    return [items[i:i + _CHUNK] for i in range(0, len(items), _CHUNK)]


@dataclass(frozen=True, slots=True)
class Payload:
    """A blob as it travels between sites: compressed or not, never encrypted."""

    id: bytes
    compressed: bool
    data: bytes
    plain_len: int


@dataclass(frozen=True, slots=True)
class BlobRow:
    row: int
    seg: int
    off: int
    length: int
    plain_len: int
    key_version: int


@dataclass(slots=True)
class _Planned(Generic[T]):
    """A batch looked up, its new blobs being compressed in the pool."""

    tag: T
    ids: list[bytes]
    known: dict[bytes, int]  # id -> row of the blobs the index already held
    names: dict[bytes, bytes]  # id -> index name
    parts: list[Sequence[tuple[bytes, Plain]]]  # the new (id, plaintext), chunk by chunk
    futures: list[Future[list[tuple[bool, bytes]]]]  # each chunk's compression

    def payload_groups(self) -> Iterator[list[Payload]]:
        """Each chunk's payloads, in order, as soon as the pool has compressed it."""
        for part, future in zip(self.parts, self.futures, strict=True):
            yield [Payload(i, c, data, len(plain))
                   for (i, plain), (c, data) in zip(part, future.result(), strict=True)]


class PageCache:
    """Plaintexts of recently written or read snapshot tree pages, by blob id, up to ``limit``
    bytes (the least recently used leave first).

    Each snapshot and each replica rewrites only the pages over changed blocks, and the next
    one starts from exactly those pages: a snapshot patches the volume's current pages, a
    transfer compares each page it sends with its base page, which is the page at the same
    place in the last replica, at the source and at the target. Kept here, they are not read,
    decrypted and verified again. A page is content-addressed, so an entry can never be
    stale; it is verified plaintext (read and checked, or made here, or received and
    checked against its id). The default holds 2,048 pages of 512 entries: the leaves over
    64 GiB of 64 KiB blocks.
    """

    def __init__(self, limit: int = PAGE_CACHE_BYTES) -> None:
        self.limit = limit
        self.size = 0
        self._pages: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, blob: bytes) -> bytes | None:
        plain = self._pages.get(blob)
        if plain is not None:
            self._pages.move_to_end(blob)
        return plain

    def clear(self) -> None:
        self._pages.clear()
        self.size = 0

    def put(self, blob: bytes, plain: bytes) -> None:
        if blob in self._pages or len(plain) > self.limit:
            return
        self._pages[blob] = plain
        self.size += len(plain)
        while self.size > self.limit:
            self.size -= len(self._pages.popitem(last=False)[1])


class BlobStore:
    """The blob index plus the segment files, with the cipher and compression in between."""

    def __init__(
        self,
        db: sqlite3.Connection,
        writer: SegmentWriter,
        reader: SegmentReader,
        index: IndexKeys | PlainIndex | NoIndexKeys,
        cipher: ExtentCipher | None,
        pool: Executor,
    ) -> None:
        self.db = db
        self.writer = writer
        self.reader = reader
        self.index = index
        self.cipher = cipher
        self.pool = pool
        #: TEK version new extents are encrypted with; 0 writes them plain.
        self.write_key_version = 0
        self.pages = PageCache()

    # -- lookups ---------------------------------------------------------------------------

    def lookup(self, ids: Iterable[bytes], names_out: dict[bytes, bytes] | None = None
               ) -> dict[bytes, int]:
        """Map each id the index holds to its row; ids it lacks are absent. ``names_out``
        receives id -> index name of every id, for a caller about to store the new ones."""
        names = {self.index.name(i): i for i in ids}
        if names_out is not None:
            names_out.update((i, n) for n, i in names.items())
        return {names[name]: row for row, name in dbmod.select_in(
            self.db, "SELECT row, name FROM blobs WHERE name IN (?*)", names)}

    def plain_lengths(self, rows: Iterable[int]) -> dict[int, int]:
        """The plaintext length of each of ``rows`` that the index holds."""
        return dict(dbmod.select_in(self.db, "SELECT row, plain_len FROM blobs WHERE row IN (?*)",
                                    dict.fromkeys(rows)))

    def id_of(self, row: int) -> bytes:
        r = self.db.execute("SELECT name, sealed_id FROM blobs WHERE row=?", (row,)).fetchone()
        if r is None:
            raise IntegrityError(f"blob row {row} is referenced but missing from the index")
        return self.index.unseal(r[0], r[1])

    def ids_of(self, rows: Iterable[int]) -> dict[int, bytes]:
        wanted = set(rows)
        out = {row: self.index.unseal(name, sealed) for row, name, sealed in dbmod.select_in(
            self.db, "SELECT row, name, sealed_id FROM blobs WHERE row IN (?*)", wanted)}
        missing = wanted - set(out)
        if missing:
            raise IntegrityError(f"blob rows {sorted(missing)[:5]} are referenced but missing "
                                 "from the index")
        return out

    # -- writing ---------------------------------------------------------------------------

    def put_many(self, plaintexts: Sequence[bytes]) -> tuple[list[bytes], list[int]]:
        """Store a batch of plaintexts; returns their ids and rows, in order.

        Must be called inside a transaction the caller commits.
        """
        if not plaintexts:
            return [], []
        [(_, ids, rows)] = self.put_stream([(None, plaintexts)])
        return ids, rows

    def put_stream(self, batches: Iterable[tuple[T, Sequence[Plain]]]
                   ) -> Generator[tuple[T, list[bytes], list[int]], None, None]:
        """Store a stream of ``(tag, plaintexts)`` batches, yielding ``(tag, ids, rows)`` for
        each, in order, once its blobs are appended and indexed.

        The stages overlap across batches: while this thread seals and writes batch k, the
        pool compresses batch k + 1 and hashes batch k + 2, so neither waits for the other
        at batch boundaries. A batch's rows are inserted in the transaction the caller has
        open when it asks for that batch, and the caller commits (as for ``put_many``). A
        blob new in one batch and repeated in the next is written once: the ids of a batch
        planned but not yet written are kept in flight, and the next batch takes their rows
        from there.

        The stream carries rows from one of the caller's transactions into the next, so: drop
        the stream when a transaction fails (its rows were rolled back); let no other writer
        (``put_many``, gc) touch the blob index between its batches; and hold about three
        batches of memory (one being hashed, one compressed, one written).
        """
        source = iter(batches)
        hashing: deque[tuple[T, Sequence[Plain], list[Future[list[bytes]]]]] = deque()
        planned: deque[_Planned[T]] = deque()
        in_flight: dict[bytes, int] = {}  # id -> row (-1 until written) of planned new blobs
        recent: deque[list[bytes]] = deque()  # new ids of the last batches written

        def read_next() -> bool:
            item = next(source, None)
            if item is None:
                return False
            tag, plains = item
            hashing.append((tag, plains, [self.pool.submit(_hash_chunk, c)
                                          for c in _chunks(plains)]))
            return True

        more = read_next()
        try:
            while hashing or planned:
                if hashing:
                    tag, plains, futures = hashing[0]
                    more = more and read_next()
                    ids = [i for f in futures for i in f.result()]
                    hashing.popleft()
                    planned.append(self._plan(tag, plains, ids, in_flight))
                if len(planned) > AHEAD or (planned and not hashing):
                    batch = planned[0]
                    written = self._write_new(batch.payload_groups(), batch.names)
                    planned.popleft()
                    in_flight.update(written)
                    known = batch.known
                    rows = [known[i] if i in known else in_flight[i] for i in batch.ids]
                    # A batch's new blobs are named in flight by the batches planned before
                    # it was written, the last of which is written AHEAD batches later;
                    # every batch planned after that takes their rows from the index.
                    recent.append(list(written))
                    if len(recent) > AHEAD:
                        for i in recent.popleft():
                            del in_flight[i]
                    yield batch.tag, batch.ids, rows
        finally:
            for _, _, hashes in hashing:
                for h in hashes:
                    h.cancel()
            for batch in planned:
                for c in batch.futures:
                    c.cancel()

    def _plan(self, tag: T, plains: Sequence[Plain], ids: list[bytes],
              in_flight: dict[bytes, int]) -> _Planned[T]:
        """Look up a hashed batch and start compressing its new blobs in the pool."""
        names: dict[bytes, bytes] = {}
        known = self.lookup((i for i in ids if i not in in_flight), names)
        # Blobs of earlier batches: written (their rows are known now), or still being
        # compressed (-1: the previous batch's, resolved when this one is written).
        known.update((i, in_flight[i]) for i in ids if in_flight.get(i, -1) != -1)
        new: dict[bytes, Plain] = {}
        for i, plain in zip(ids, plains, strict=True):
            if i not in known and i not in in_flight and i not in new:
                new[i] = plain
        in_flight.update(dict.fromkeys(new, -1))
        parts = _chunks(list(new.items()))
        futures = [self.pool.submit(_compress_chunk, [plain for _, plain in part])
                   for part in parts]
        return _Planned(tag, ids, known, names, parts, futures)

    def put_payloads(self, payloads: Sequence[Payload], verified: bool = False,
                     fresh: bool = False) -> dict[bytes, int]:
        """Store payloads that are already compressed (or not), e.g. received from a peer.

        Unless ``verified``, each payload is decompressed and checked against its id first.
        Ids the index already holds are not written again (``fresh``: the caller just looked
        them all up). Returns id -> row for all. Must run inside ``Store.transaction()``,
        which fsyncs the segment before committing the rows.
        """
        if not verified:
            checks = list(self.pool.map(_verify_payload, payloads))
            bad = [p.id.hex() for p, ok in zip(payloads, checks, strict=True) if not ok]
            if bad:
                raise IntegrityError(f"payload does not match its id {bad[0]}")
        known = {} if fresh else self.lookup(p.id for p in payloads)
        todo: list[Payload] = []
        seen: set[bytes] = set()
        for p in payloads:
            if p.id in known or p.id in seen:
                continue
            seen.add(p.id)
            todo.append(p)
        if todo:
            known.update(self._write_new([todo]))
        return known

    def _write_new(self, groups: Iterable[Sequence[Payload]],
                   names: dict[bytes, bytes] | None = None) -> dict[bytes, int]:
        """Append new blobs and index them; returns id -> row. ``names`` may hold their index
        names already computed. The caller's transaction fsyncs the segment before it
        commits these rows."""
        known = {}
        for pid, values in self._append_many(groups, names or {}):
            cur = self.db.execute(
                "INSERT INTO blobs (name, sealed_id, seg, off, length, plain_len, "
                "key_version) VALUES (?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            assert cur.lastrowid is not None
            known[pid] = cur.lastrowid
        return known

    def _append(self, p: Payload) -> tuple[bytes, bytes, int, int, int, int, int]:
        """Append one extent to the open segment; returns its future index row values."""
        return self._append_many([[p]], {})[0][1]

    def _append_many(
        self, groups: Iterable[Sequence[Payload]], names: dict[bytes, bytes]
    ) -> list[tuple[bytes, tuple[bytes, bytes, int, int, int, int, int]]]:
        """Append extents to the open segment(s), group by group as ``groups`` yields them:
        addresses are planned first (the XTS tweak is the address), then the extents are
        sealed, in this thread, straight into one buffer per segment run, written with one
        call. Sealing holds the GIL (the pool's threads would only take turns at it), so it
        stays here and overlaps the pool's compression of the next group. Returns
        ``(id, index row values)`` per payload."""
        kv = self.write_key_version if self.cipher is not None else 0
        out = []
        for payloads in groups:
            out.extend(self._append_group(kv, payloads, names))
        return out

    def _append_group(
        self, kv: int, payloads: Sequence[Payload], names: dict[bytes, bytes]
    ) -> list[tuple[bytes, tuple[bytes, bytes, int, int, int, int, int]]]:
        out = []
        i = 0
        while i < len(payloads):
            seg, off = self.writer.reserve(_extent_len(payloads[i], kv))
            room = self.writer.room()
            plans: list[tuple[Payload, int, int]] = []
            pos = off
            while i < len(payloads):
                total = _extent_len(payloads[i], kv)
                if plans and pos + total - off > room:
                    break
                plans.append((payloads[i], pos, total))
                pos += total
                i += 1

            # One buffer for the run, each extent sealed straight into its place (16 spare
            # bytes at the end: OpenSSL writes through a longer window).
            buf = bytearray(pos - off + extent.XTS_MIN)
            view = memoryview(buf)
            for p, o, _ in plans:
                self._seal_extent_into(kv, p, seg, o, view[o - off:])
            self.writer.write(view[:pos - off])
            for p, o, total in plans:
                name = names.get(p.id) or self.index.name(p.id)
                out.append((p.id, (name, self.index.seal(name, p.id), seg, o, total,
                                   p.plain_len, kv)))
        return out

    def _seal_extent_into(self, kv: int, p: Payload, seg: int, off: int, out: memoryview
                          ) -> None:
        """Write the extent (header, then the payload, encrypted when ``kv``) into ``out``."""
        flags = extent.FLAG_COMPRESSED if p.compressed else 0
        if kv:
            flags |= extent.FLAG_ENCRYPTED
        out[:extent.HEADER_SIZE] = extent.pack_header(flags, kv, len(p.data))
        body = out[extent.HEADER_SIZE:]
        if kv:
            assert self.cipher is not None
            self.cipher.encrypt_into(kv, seg, off, extent.pad(p.data), body)
        else:
            body[:len(p.data)] = p.data

    def rewrite(self, rows: Sequence[int]) -> int:
        """Copy extents to the open segment under the current write setting (new tweaks).

        Each extent is read and verified first; a damaged one raises ``IntegrityError`` and
        nothing is changed. Must be called inside a transaction; the caller deletes the old
        segment only after committing. Returns the bytes written.
        """
        written = 0
        for row in rows:
            info = self.row_info(row)
            want = self.id_of(row)
            raw = self.reader.read(info.seg, info.off, info.length)
            compressed, payload = self._open_raw(info, raw)
            p = Payload(want, compressed, payload, info.plain_len)
            if not _verify_payload(p):
                raise IntegrityError(f"blob at segment {info.seg:08d} offset {info.off} fails "
                                     "its integrity check; run 'dvx-dr datastore scrub'")
            _, _, seg, off, length, _, kv = self._append(p)
            self.db.execute("UPDATE blobs SET seg=?, off=?, length=?, key_version=? WHERE row=?",
                            (seg, off, length, kv, row))
            written += length
        self.writer.sync()
        return written

    # -- reading ---------------------------------------------------------------------------

    def row_info(self, row: int) -> BlobRow:
        r = self.db.execute(
            "SELECT seg, off, length, plain_len, key_version FROM blobs WHERE row=?", (row,)
        ).fetchone()
        if r is None:
            raise IntegrityError(f"blob row {row} is referenced but missing from the index")
        return BlobRow(row, *r)

    def read_payload(self, info: BlobRow) -> tuple[bool, bytes]:
        """Read and decrypt one extent: ``(compressed, payload)``; not yet verified."""
        return self._open_raw(info, self.reader.read(info.seg, info.off, info.length))

    def _open_raw(self, info: BlobRow, raw: bytes) -> tuple[bool, bytes]:
        where = f"segment {info.seg:08d} offset {info.off}"
        header = extent.unpack_header(raw, where)
        if header.total_len != info.length:
            raise IntegrityError(f"{where}: extent length differs from the index")
        body = raw[extent.HEADER_SIZE:]
        if header.encrypted:
            if self.cipher is None:
                raise IntegrityError(f"{where}: extent is encrypted but the store has no keys")
            body = self.cipher.decrypt(header.key_version, info.seg, info.off, body)
        return header.compressed, body[:header.payload_len]

    def _decode(self, info: BlobRow, raw: bytes, want: bytes) -> bytes:
        compressed, payload = self._open_raw(info, raw)
        try:
            plain = decompress(payload, info.plain_len) if compressed else payload
        except IntegrityError as exc:
            raise IntegrityError(
                f"blob at segment {info.seg:08d} offset {info.off} fails its integrity check "
                f"({exc}): the segment file is damaged or was tampered with"
            ) from None
        if blob_id(plain) != want:
            raise IntegrityError(
                f"blob at segment {info.seg:08d} offset {info.off} fails its integrity check "
                "(its content does not match its id): the segment file is damaged or was "
                "tampered with"
            )
        return plain

    def get_row(self, row: int, expect: bytes | None = None) -> bytes:
        """The verified plaintext of a blob row."""
        info = self.row_info(row)
        want = expect if expect is not None else self.id_of(row)
        return self._decode(info, self.reader.read(info.seg, info.off, info.length), want)

    def get_pages(self, pages: Sequence[tuple[bytes, int]]) -> list[bytes]:
        """Plaintexts of tree pages given as ``(id, row)``: from ``pages`` (the page cache)
        when there, else read and verified like ``get_rows``, and remembered."""
        found = {i: plain for i, _ in pages if (plain := self.pages.get(i)) is not None}
        misses = {i: row for i, row in pages if i not in found}
        for i, plain in zip(misses, self.get_rows(list(misses.values())), strict=True):
            self.pages.put(i, plain)
            found[i] = plain
        return [found[i] for i, _ in pages]

    def get_rows(self, rows: Sequence[int]) -> list[bytes]:
        """Verified plaintexts of many rows; decryption and checks run in the worker pool."""
        if not rows:
            return []
        unique = list(dict.fromkeys(rows))
        infos = {r[0]: (BlobRow(*r[:6]), self.index.unseal(r[6], r[7])) for r in dbmod.select_in(
            self.db, "SELECT row, seg, off, length, plain_len, key_version, name, sealed_id "
            "FROM blobs WHERE row IN (?*)", unique)}
        missing = [r for r in unique if r not in infos]
        if missing:
            raise IntegrityError(f"blob row {missing[0]} is referenced but missing from the index")
        jobs = [(infos[r][0], self.reader.read(infos[r][0].seg, infos[r][0].off,
                                               infos[r][0].length), infos[r][1]) for r in unique]
        plains = dict(zip(unique, self.pool.map(lambda j: self._decode(*j), jobs), strict=True))
        return [plains[r] for r in rows]

    def verify_rows(self, rows: Sequence[int]) -> list[tuple[int, bool, int]]:
        """``(row, good, plaintext bytes)`` for each row: read, decrypt, check the id."""
        results: dict[int, tuple[int, bool, int]] = {}
        jobs: list[tuple[int, BlobRow, bytes, bytes]] = []
        for row in rows:
            try:
                info = self.row_info(row)
                jobs.append((row, info, self.reader.read(info.seg, info.off, info.length),
                             self.id_of(row)))
            except IntegrityError:
                results[row] = (row, False, 0)

        def check(job: tuple[int, BlobRow, bytes, bytes]) -> tuple[int, bool, int]:
            row, info, raw, want = job
            try:
                return row, True, len(self._decode(info, raw, want))
            except IntegrityError:
                return row, False, 0

        for result in self.pool.map(check, jobs):
            results[result[0]] = result
        return [results[row] for row in rows]

    def get(self, blob: bytes) -> bytes:
        row = self.lookup([blob]).get(blob)
        if row is None:
            raise IntegrityError(f"blob {blob.hex()[:16]}… is referenced but not in the store")
        return self.get_row(row, blob)

    def get_payloads(self, ids: Sequence[bytes]) -> list[Payload]:
        """Blobs as sent to a peer (decrypted, still compressed), verified in the worker pool."""
        rows = self.lookup(ids)
        missing = [i for i in ids if i not in rows]
        if missing:
            raise IntegrityError(f"blob {missing[0].hex()[:16]}… is referenced but not in the "
                                 "store; run 'dvx-dr datastore scrub'")
        infos = self._row_infos(set(rows.values()))
        jobs = [(i, infos[rows[i]], self.reader.read(infos[rows[i]].seg, infos[rows[i]].off,
                                                     infos[rows[i]].length)) for i in ids]

        def open_some(part: Sequence[tuple[bytes, BlobRow, bytes]]) -> list[Payload]:
            out = []
            for blob, info, raw in part:
                compressed, payload = self._open_raw(info, raw)
                p = Payload(blob, compressed, payload, info.plain_len)
                if not _verify_payload(p):
                    raise IntegrityError(f"blob at segment {info.seg:08d} offset {info.off} "
                                         "fails its integrity check; run 'dvx-dr datastore "
                                         "scrub'")
                out.append(p)
            return out

        return [p for part in self.pool.map(open_some, _chunks(jobs)) for p in part]

    def _row_infos(self, rows: Iterable[int]) -> dict[int, BlobRow]:
        return {r[0]: BlobRow(*r) for r in dbmod.select_in(
            self.db, "SELECT row, seg, off, length, plain_len, key_version FROM blobs "
            "WHERE row IN (?*)", rows)}


def _extent_len(p: Payload, kv: int) -> int:
    return extent.HEADER_SIZE + extent.stored_length(len(p.data), bool(kv))


def _verify_payload(p: Payload) -> bool:
    try:
        plain = decompress(p.data, p.plain_len) if p.compressed else p.data
    except IntegrityError:
        return False
    return len(plain) == p.plain_len and blob_id(plain) == p.id
