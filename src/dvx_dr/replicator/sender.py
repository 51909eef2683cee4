"""The source side of a transfer: walk the snapshot tree against the target, stream what it lacks.

1. Open a session naming the snapshot and its root id, asking at once whether the target holds
   the root and the roots of the last few earlier snapshots (candidate *bases*). If the target
   already holds the replica, stop. If it holds the root as a complete tree node (see
   ``site.treeblobs``), everything under it is there too, so only the commit is left.
2. Walk the tree top-down, level by level, beside the newest base the target holds, asking
   the target which pages of that level it lacks (``have``) and descending only into those;
   an id equal to the base's at the same place is known to be there and is not asked about.
   Leaves are handled many at a time: their changed block ids are asked for, the missing
   blocks sent, then the leaf pages themselves, each naming its base page so that the target
   checks only the entries that changed.
3. Send the missing upper pages bottom-up, then the root, then commit.

Store reads (decrypting with this site's key, checking each blob's id) run in the store thread
and its worker pool, never on the event loop. A producer task builds batches while the
consumer posts the previous one, with at most ``QUEUE_DEPTH`` batches in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from dvx_dr.errors import IntegrityError, ProtocolError, UserError
from dvx_dr.replicator import protocol
from dvx_dr.replicator.peer import PeerClient
from dvx_dr.replicator.storethread import StoreThread
from dvx_dr.site import groups, snapshots, tree, treeblobs
from dvx_dr.site.blobs import Payload, blob_id, decompress
from dvx_dr.site.tree import HOLE, Root

LEAVES_PER_ROUND = 64
#: Payload bytes per ``blobs`` request: the first is small and each next one twice the last,
#: up to the most, so the target starts on a small transfer's first blocks while the rest are
#: read, and a large transfer still moves in large requests.
FIRST_BATCH = 512 * 1024
BATCH_PAYLOAD = 8 * 1024 * 1024
#: Blocks read from the store at once, growing the same way.
FIRST_READ = 16
MAX_READ = 256
QUEUE_DEPTH = 2
#: A batch goes to the TLS layer in pieces of this size (see ``PeerClient.request``).
WRITE_PIECE = 64 * 1024
#: The event loop gets a turn after this many pieces. aiohttp writes a piece without yielding
#: unless the socket's buffer is full, so a whole batch could be written in one go; when the
#: target dies meanwhile, the loop learns of the lost connection only at its next turn, and
#: every piece written before then made asyncio log "socket.send() raised exception" (128
#: lines for one 8 MiB batch). It logs from the fifth such write on.
YIELD_PIECES = 4


@dataclass
class TransferStats:
    snapshot: str
    target: str
    replica: str = ""
    ids_exchanged: int = 0
    id_bytes: int = 0
    blocks_sent: int = 0
    pages_sent: int = 0
    payload_bytes: int = 0
    bytes_on_wire: int = 0
    bytes_skipped: int = 0
    logical_bytes: int = 0
    seconds: float = 0.0
    already_replicated: bool = False

    @property
    def rate(self) -> float:
        """Logical bytes per second made available at the target."""
        return self.logical_bytes / self.seconds if self.seconds else 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"rate": self.rate}


Progress = Callable[[TransferStats], None]
#: A bandwidth limit in bytes per second (None: none), or a function that says the current
#: one, so that a reload changing it applies to the transfer in flight.
Limit = float | None | Callable[[], float | None]


class _Batcher:
    def __init__(self, queue: asyncio.Queue[bytes | None], stats: TransferStats) -> None:
        self.queue = queue
        self.stats = stats
        self.records: list[protocol.Record] = []
        self.size = 0
        self.limit = FIRST_BATCH

    async def add(self, kind: int, p: Payload, base: bytes | None = None, level: int = 0
                  ) -> None:
        self.records.append(protocol.Record(kind, p.compressed, p.plain_len, p.id, p.data,
                                            base if base and base != HOLE else None, level))
        self.size += len(p.data)
        if kind == protocol.KIND_BLOCK:
            self.stats.blocks_sent += 1
        else:
            self.stats.pages_sent += 1
        self.stats.payload_bytes += len(p.data)
        # At most BATCH_PAYLOAD plus one payload (MAX_PLAIN): well inside MAX_BATCH.
        if self.size >= self.limit or len(self.records) >= protocol.MAX_RECORDS:
            await self.flush()

    async def flush(self) -> None:
        if self.records:
            await self.queue.put(protocol.encode_batch(self.records))
            self.records, self.size = [], 0
            self.limit = min(2 * self.limit, BATCH_PAYLOAD)


class _Streamer:
    """The producer's batches as blob streams (``protocol``), one per request: a stream ends
    at the producer's end mark, or after ``STREAM_BYTES`` or ``STREAM_SECONDS``, and the next
    one carries on. Applies the bandwidth limit and reports progress per batch sent."""

    def __init__(self, queue: asyncio.Queue[bytes | None], stats: TransferStats,
                 started: float, progress: Progress | None,
                 bandwidth_limit: Limit, check: Callable[[], None]) -> None:
        self.queue = queue
        self.check = check  # raises when the transfer must stop (the peer was removed)
        self.stats = stats
        self.started = started
        self.progress = progress
        self.limit = bandwidth_limit if callable(bandwidth_limit) else lambda: bandwidth_limit
        self.bandwidth_limit = self.limit()
        self.window_start = time.monotonic()
        self.window_bytes = 0
        self.done = False

    async def next_stream(self) -> AsyncIterator[bytes | memoryview] | None:
        """The next stream's body, once there is a batch for it; None when the producer is
        done and every batch was sent."""
        first = None if self.done else await self.queue.get()
        return None if first is None else self._stream(first)

    async def _stream(self, first: bytes) -> AsyncIterator[bytes | memoryview]:
        opened = time.monotonic()
        sent = 0
        batch: bytes | None = first
        while batch is not None:
            yield protocol.STREAM_LENGTH.pack(len(batch))
            view = memoryview(batch)
            for n, k in enumerate(range(0, len(batch), WRITE_PIECE), 1):
                yield view[k:k + WRITE_PIECE]
                if n % YIELD_PIECES == 0:
                    await asyncio.sleep(0)
                    self.check()
            size = protocol.STREAM_LENGTH.size + len(batch)
            sent += size
            await self._sent(size)
            if sent >= protocol.STREAM_BYTES or \
                    time.monotonic() - opened >= protocol.STREAM_SECONDS:
                break
            batch = await self.queue.get()
        self.done = batch is None
        yield protocol.STREAM_END
        self.stats.bytes_on_wire += len(protocol.STREAM_END)

    def _follow_limit(self) -> None:
        """Take up a limit a reload changed; the new rate counts from now."""
        if (limit := self.limit()) != self.bandwidth_limit:
            self.bandwidth_limit = limit
            self.window_start = time.monotonic()
            self.window_bytes = 0

    def _ahead(self) -> float:
        """Seconds the stream is ahead of the limit (none without one)."""
        if not self.bandwidth_limit:
            return 0.0
        return self.window_bytes / self.bandwidth_limit - (time.monotonic() - self.window_start)

    async def _sent(self, size: int) -> None:
        self.stats.bytes_on_wire += size
        self._follow_limit()
        self.window_bytes += size
        while (ahead := self._ahead()) > 0:  # in slices: a removed peer, or a reload
            await asyncio.sleep(min(ahead, 0.5))  # that changes the limit, ends the wait too
            self.check()
            self._follow_limit()
        if self.progress:
            self.stats.seconds = time.monotonic() - self.started
            self.progress(self.stats)


async def send_snapshot(
    store: StoreThread,
    peer: PeerClient,
    spec: str,
    progress: Progress | None = None,
    bandwidth_limit: Limit = None,
) -> TransferStats:
    """One attempt at replicating volume snapshot ``spec``. Safe to rerun after a failure."""
    with _holding_gc_off(store, f"{spec} -> {peer.site}"):
        return await _send_snapshot(store, peer, spec, progress, bandwidth_limit)


async def _send_snapshot(store: StoreThread, peer: PeerClient, spec: str,
                         progress: Progress | None, bandwidth_limit: Limit
                         ) -> TransferStats:
    snap, root_id, root, bases = await store.run(_snapshot_and_bases, store, spec)
    request = {"version": protocol.VERSION, "volume": snap.volume, "snapshot": snap.name,
               "root": root_id.hex(), "created": snap.created}
    stats = TransferStats(snapshot=spec, target=peer.site,
                          replica=f"{store.store.site}/{snap.volume}@{snap.name}")
    return await _transfer(store, peer, request, root_id, [(root_id, root)], None, bases,
                           stats, progress, bandwidth_limit)


def _snapshot_and_bases(store: StoreThread, spec: str
                        ) -> tuple[snapshots.SnapshotInfo, bytes, Root, Bases]:
    """The snapshot to send, its root and its candidate bases, in one call to the store
    thread (each call is a round trip between threads, on the path of every transfer)."""
    snap = snapshots.get(store.store, spec)
    if "/" in snap.volume:
        raise UserError(f"{spec} is a replica received from another site; replicate from its "
                        "home site, or clone it into a volume and snapshot that")
    root_id, root = _root(store, snap)
    return snap, root_id, root, _volume_bases(store, snap, root_id)


async def send_group(
    store: StoreThread,
    peer: PeerClient,
    pg: str,
    name: str,
    progress: Progress | None = None,
    bandwidth_limit: Limit = None,
) -> TransferStats:
    """One attempt at replicating group snapshot ``pg@name`` (all members, one commit)."""
    with _holding_gc_off(store, f"{pg}@{name} -> {peer.site}"):
        return await _send_group(store, peer, pg, name, progress, bandwidth_limit)


async def _send_group(store: StoreThread, peer: PeerClient, pg: str, name: str,
                      progress: Progress | None, bandwidth_limit: Limit
                      ) -> TransferStats:
    if "/" in pg:
        raise UserError(f"{pg}@{name} is a group replica received from another site; "
                        "replicate it from its home site")
    group, members, group_blob, bases = await store.run(_group_and_bases, store, pg, name)
    group_id = blob_id(group_blob)
    request = {"version": protocol.VERSION, "group": pg, "snapshot": name,
               "root": group_id.hex(), "created": group.created}
    stats = TransferStats(snapshot=group.spec, target=peer.site,
                          replica=f"{store.store.site}/{pg}@{name}")
    return await _transfer(store, peer, request, group_id, [(r, root) for _, r, root in members],
                           group_blob, bases, stats, progress, bandwidth_limit)


def _group_and_bases(store: StoreThread, pg: str, name: str
                     ) -> tuple[groups.GroupInfo, list[tuple[str, bytes, Root]], bytes, Bases]:
    """The group snapshot to send, its members' roots, its root blob and the members'
    candidate bases, in one call to the store thread (as ``_snapshot_and_bases``)."""
    group = groups.get(store.store, pg, name)
    members = groups.volume_roots(store.store, group)
    return (group, members, store.store.blobs.get_row(group.root_row),
            _group_bases(store, group, members))


@contextlib.contextmanager
def _holding_gc_off(store: StoreThread, what: str) -> Iterator[None]:
    """gc at this site deletes nothing while a transfer runs (``Store.pin``, as for a session
    a peer has open here): the snapshot being sent, or the base it is sent against, may be
    deleted by hand meanwhile, and their blocks and pages must stay readable until the
    transfer has read them."""
    key = f"sending {what} {secrets.token_hex(4)}"
    store.store.pin(key)
    try:
        with store.store.pin_busy(key):
            yield
    finally:
        store.store.unpin(key)


async def _transfer(
    store: StoreThread,
    peer: PeerClient,
    request: dict[str, Any],
    top_id: bytes,
    roots: list[tuple[bytes, Root]],
    group_blob: bytes | None,
    bases: Bases,
    stats: TransferStats,
    progress: Progress | None,
    bandwidth_limit: Limit,
) -> TransferStats:
    started = time.monotonic()
    stats.logical_bytes = sum(r.mapped_blocks * r.block_size for _, r in roots)
    ask = _ask_list(top_id, bases)
    opened = await peer.post_json("/sessions", request | {"ask": [i.hex() for i in ask]})
    stats.ids_exchanged += len(ask)
    stats.id_bytes += 2 * protocol.ID * len(ask)
    if opened["complete"]:
        stats.already_replicated = True
        stats.bytes_skipped = stats.logical_bytes
        stats.seconds = time.monotonic() - started
        return stats
    sid = opened["session"]
    try:
        lacking = {bytes.fromhex(i) for i in opened.get("lacking", [])}
    except (TypeError, ValueError):
        raise ProtocolError("the target's session answer has a malformed 'lacking' list"
                            ) from None

    async def have(ids: list[bytes], level: int | None = None) -> list[bytes]:
        """The ids the target lacks: as blocks, or as complete tree nodes of ``level``."""
        missing: list[bytes] = []
        query = "" if level is None else f"?level={level}"
        for start in range(0, len(ids), protocol.MAX_HAVE_IDS):
            part = ids[start:start + protocol.MAX_HAVE_IDS]
            body = protocol.encode_ids(part)
            answer = await peer.request(f"/sessions/{sid}/have{query}", data=body)
            if len(answer) != len(part):
                raise ProtocolError("have answer has the wrong length")
            stats.ids_exchanged += len(part)
            stats.id_bytes += len(body) + len(answer)
            missing.extend(i for i, flag in zip(part, answer, strict=True) if flag)
        return missing

    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=QUEUE_DEPTH)
    batcher = _Batcher(queue, stats)

    sent = _Sent()  # shared by a group's members: identical blocks and pages go once

    async def produce() -> None:
        try:
            if top_id not in lacking:
                return  # the target holds the top blob, so everything under it
            usable = await store.run(_usable_bases, store, bases, set(ask) - lacking)
            for root_id, root in roots:
                if (root_id, treeblobs.ROOT) in sent.pages:
                    continue  # a member identical to one before it
                if group_blob is not None and not await have([root_id], treeblobs.ROOT):
                    continue
                await _walk(store, root, have, batcher, usable.get(root_id), sent)
                packed = root.pack()
                await batcher.add(protocol.KIND_ROOT, Payload(root_id, False, packed,
                                                              len(packed)))
                sent.pages.add((root_id, treeblobs.ROOT))
            if group_blob is not None:
                await batcher.add(protocol.KIND_GROUP, Payload(top_id, False, group_blob,
                                                               len(group_blob)))
            await batcher.flush()
        finally:
            # The end mark for the consumer; but when cancelled, the consumer is gone (it failed,
            # or the transfer is stopping) and a full queue would block this task forever.
            task = asyncio.current_task()
            if task is None or not task.cancelling():
                await queue.put(None)

    # A reload that removes the peer cuts the stream off (PeerRemoved): the batch on the wire
    # is lost to the target, the ones before are durable there.
    streamer = _Streamer(queue, stats, started, progress, bandwidth_limit,
                         peer.ensure_configured)

    async def consume() -> None:
        while (body := await streamer.next_stream()) is not None:
            await peer.request(f"/sessions/{sid}/blobs", data=body)

    producer = asyncio.create_task(produce())
    try:
        await consume()
        await producer
    finally:
        if not producer.done():
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
    await peer.post_json(f"/sessions/{sid}/commit", {})
    stats.bytes_on_wire += stats.id_bytes
    block_size = roots[0][1].block_size if roots else 0
    stats.bytes_skipped = max(0, stats.logical_bytes - stats.blocks_sent * block_size)
    stats.seconds = time.monotonic() - started
    if progress:
        progress(stats)
    return stats


# -- bases: earlier snapshots the target may hold whole ---------------------------------------

#: How many earlier snapshots of a volume are offered as bases, newest first. They are asked
#: about when the session opens (at most ``protocol.MAX_ASK`` ids in all), so a target that
#: missed a few transfers still gets an incremental walk.
BASE_CANDIDATES = 32
#: new root id -> candidate base root ids, newest first
Bases = dict[bytes, list[bytes]]


def _volume_bases(store: StoreThread, snap: snapshots.SnapshotInfo, root_id: bytes) -> Bases:
    """The last few snapshots of the same volume taken before this one."""
    earlier = [s for s in snapshots.list_snapshots(store.store, snap.volume) if s.id < snap.id]
    ids = [store.store.blobs.id_of(s.root_row) for s in reversed(earlier[-BASE_CANDIDATES:])]
    return {root_id: [b for b in ids if b != root_id]}


def _group_bases(store: StoreThread, group: groups.GroupInfo,
                 members: list[tuple[str, bytes, Root]]) -> Bases:
    """Each member's roots in the last few group snapshots taken before this one."""
    earlier = [g for g in groups.list_groups(store.store, group.pg) if g.id < group.id]
    out: Bases = {r: [] for _, r, _ in members}
    for g in reversed(earlier[-BASE_CANDIDATES:]):
        before = {v: r for v, r, _ in groups.volume_roots(store.store, g)}
        for v, r, _ in members:
            if v in before and before[v] != r:
                out[r].append(before[v])
    return out


def _ask_list(top_id: bytes, bases: Bases) -> list[bytes]:
    """What to ask about when the session opens: the top blob, then the candidate bases,
    each root's newest first, round-robin so that a group's every member gets its newest
    candidates within the ``MAX_ASK`` limit."""
    ask = {top_id: None}
    depth = max((len(c) for c in bases.values()), default=0)
    for k in range(depth):
        for cands in bases.values():
            if k < len(cands) and len(ask) < protocol.MAX_ASK:
                ask.setdefault(cands[k], None)
    return list(ask)


def _usable_bases(store: StoreThread, bases: Bases, held: set[bytes]) -> dict[bytes, Root]:
    """For each new root, the root of its newest candidate base that the target holds
    (holding a root means holding its whole tree)."""
    chosen = {}
    for root_id, cands in bases.items():
        base = next((b for b in cands if b in held), None)
        if base is not None:
            chosen[root_id] = Root.unpack(store.store.blobs.get(base))
    return chosen


def _root(store: StoreThread, snap: snapshots.SnapshotInfo) -> tuple[bytes, Root]:
    blobs = store.store.blobs
    return blobs.id_of(snap.root_row), Root.unpack(blobs.get_row(snap.root_row))


Pair = tuple[bytes, bytes | None]  # a page or block id, and what the base has there


async def _walk(store: StoreThread, root: Root, have: Any, batcher: _Batcher,
                base: Root | None = None, sent: _Sent | None = None) -> None:
    """Send what the target lacks of ``root``'s tree, children before parents.

    ``base`` is a tree of the same shape that the target is known to hold whole (it holds
    its root). Descending both trees side by side, an id equal to the base's at the same
    place is known to be at the target and is not asked about, so after scattered changes
    only the changed blocks' ids cross the wire, not every id under each changed leaf.
    ``sent`` holds what this transfer already sent (for an earlier member of a group): the
    target may not have stored it yet when it is asked, so it is left out here instead.
    """
    blobs = store.store.blobs
    sent = _Sent() if sent is None else sent
    if base is not None and (base.depth, base.nblocks) != (root.depth, root.nblocks):
        base = None
    # missing pages of levels >= 1, top level first: (pages, their base pages, level)
    upper: list[tuple[list[Payload], list[bytes | None], int]] = []
    frontier: list[Pair] = [] if root.top == HOLE else [(root.top, base.top if base else None)]
    level = root.depth - 1
    while level >= 1 and frontier:
        missing = await _missing_pairs(sent.unsent_pages(frontier, level), have, level)
        page_bases = [b for _, b in missing]
        pages, frontier = await store.run(_pages_and_children, store,
                                          [p for p, _ in missing], page_bases)
        upper.append((pages, page_bases, level))
        sent.pages.update((p, level) for p, _ in missing)
        level -= 1
    frontier = sent.unsent_pages(frontier, 0)
    leaves = await _missing_pairs(frontier, have, 0) if frontier else []
    sent.pages.update((p, 0) for p, _ in leaves)
    step = FIRST_READ
    for start in range(0, len(leaves), LEAVES_PER_ROUND):
        chunk = leaves[start:start + LEAVES_PER_ROUND]
        leaf_pages, pairs = await store.run(_pages_and_children, store,
                                            [page for page, _ in chunk], [b for _, b in chunk])
        wanted = list(dict.fromkeys(c for c, _ in pairs if c not in sent.blocks))
        lacking: list[bytes] = await have(wanted) if wanted else []
        at = 0
        while at < len(lacking):
            part = lacking[at:at + step]
            at += step
            step = min(2 * step, MAX_READ)
            for p in await store.run(blobs.get_payloads, part):
                await batcher.add(protocol.KIND_BLOCK, p)
            sent.blocks.update(part)
        for p, (_, b) in zip(leaf_pages, chunk, strict=True):
            await batcher.add(protocol.KIND_PAGE, p, b)
    for pages, page_bases, page_level in reversed(upper):
        for p, b in zip(pages, page_bases, strict=True):
            await batcher.add(protocol.KIND_PAGE, p, b, page_level)


class _Sent:
    """The blocks and tree pages (with their level) one transfer has sent so far."""

    def __init__(self) -> None:
        self.blocks: set[bytes] = set()
        self.pages: set[tuple[bytes, int]] = set()

    def unsent_pages(self, pairs: list[Pair], level: int) -> list[Pair]:
        """``pairs`` less the pages of ``level`` already sent, each with everything under it
        (children go before their parents)."""
        return [(p, b) for p, b in pairs if (p, level) not in self.pages]


async def _missing_pairs(pairs: list[Pair], have: Any, level: int) -> list[Pair]:
    """The pairs whose page (of ``level``) the target lacks; a page equal to the base's is
    not asked."""
    ask = [p for p, b in pairs if p != b]
    missing = set(await have(ask, level)) if ask else set()
    return [(p, b) for p, b in pairs if p in missing]


def _pages_and_children(store: StoreThread, ids: list[bytes], bases: list[bytes | None]
                        ) -> tuple[list[Payload], list[Pair]]:
    """The pages ``ids`` as they will be sent, and their children that differ from their
    base pages' (``_child_pairs``): one call to the store thread for both."""
    pages = store.store.blobs.get_payloads(ids)
    return pages, _child_pairs(store, pages, bases)


def _child_pairs(store: StoreThread, pages: list[Payload], bases: list[bytes | None]
                 ) -> list[Pair]:
    """Each page's non-hole children that differ from the base page's child at the same
    place, paired with it (``tree.changed_entries``); the others are at the target with the
    base. The pages come as the payloads about to be sent (already read and verified), not
    read again."""
    blobs = store.store.blobs
    wanted = list(dict.fromkeys(b for b in bases if b is not None and b != HOLE))
    rows = blobs.lookup(wanted)
    missing = [b for b in wanted if b not in rows]
    if missing:
        raise IntegrityError(f"tree page {missing[0].hex()[:16]}… of an earlier snapshot is "
                             "referenced but not in the store; run 'dvx-dr datastore scrub'")
    known = dict(zip(wanted, blobs.get_pages([(b, rows[b]) for b in wanted]), strict=True))
    out: list[Pair] = []
    for page, base in zip(pages, bases, strict=True):
        plain = decompress(page.data, page.plain_len) if page.compressed else page.data
        out.extend(tree.changed_entries(plain, known.get(base) if base is not None else None))
    return out
