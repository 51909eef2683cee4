"""The target side of a transfer: answer have/want, store batches, commit replicas.

Every method is synchronous and runs in the site's store thread. A batch is parsed, every
payload verified (``SHA-256(plaintext) == id``) and every tree page and root checked for
completeness (each child it names is a hole, already durable here, or earlier in the same
batch) *before* anything is written; then the payloads are re-encrypted with this site's key,
fsync'ed and indexed in one transaction. A bad batch therefore writes nothing. Each entry is
checked against the level it must have: a leaf page's entries are stored blobs, a level-k
page's entries and a root's top are complete tree pages of the level below (``treeblobs``),
which the batch's pages and roots become once stored. A page that names a base page held
complete here is checked only where it differs from the base (see ``protocol``).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dvx_dr.errors import (
    IntegrityError,
    NotFoundError,
    ProtocolError,
    StoreFullError,
    TransientError,
    UserError,
)
from dvx_dr.policies.model import Retention
from dvx_dr.replicator import protocol
from dvx_dr.replicator.retention import prune_groups
from dvx_dr.site import groups, snapshots, tree, treeblobs, volumes
from dvx_dr.site.blobs import Payload, blob_id, decompress
from dvx_dr.site.store import PIN_IDLE, Store, utc_iso
from dvx_dr.site.tree import HOLE, GroupRoot, Root

log = logging.getLogger("dvx_dr.receiver")
#: Open sessions per peer: one peer's unfinished sessions never block another's transfers.
MAX_SESSIONS = 64
SESSION_IDLE = PIN_IDLE  # a session idle this long is dropped (and gc may sweep again)


@dataclass
class Session:
    id: str
    source: str
    volume: str  # the volume, or the protection group when ``group``
    snapshot: str
    root: bytes
    created: str
    group: bool = False
    started: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    blobs: int = 0
    bytes: int = 0

    @property
    def replica_volume(self) -> str:
        return f"{self.source}/{self.volume}"


@dataclass(frozen=True, slots=True)
class CheckedBatch:
    """A received batch, parsed, with every payload checked against its id."""

    records: list[protocol.Record]
    plains: list[bytes | None]  # the plaintext of each tree page or root; None for blocks
    size: int  # the batch's bytes on the wire


class Receiver:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.sessions: dict[str, Session] = {}

    def open(self, source: str, request: dict[str, Any]) -> dict[str, Any]:
        group = "group" in request
        try:
            version = request["version"]
            volume = str(request["group"] if group else request["volume"])
            name = str(request["snapshot"])
            root = bytes.fromhex(str(request["root"]))
            created = _utc(str(request.get("created") or ""))
            ask = protocol.decode_ask(request.get("ask"))
        except (KeyError, TypeError, ValueError, OverflowError):
            raise ProtocolError("session request is malformed: expected version, volume, "
                                "snapshot, root and (optional) an ISO 8601 'created' time "
                                "with its time zone, from 1970 to 9999"
                                ) from None
        if type(version) is not int or version != protocol.VERSION:
            raise ProtocolError(f"peer speaks protocol version {version!r}; this site speaks "
                                f"version {protocol.VERSION}: upgrade the older site")
        if len(root) != protocol.ID:
            raise ProtocolError("session root id is not 32 bytes")
        if not snapshots.SNAP_NAME.fullmatch(name) or not volumes.valid_name(volume):
            raise ProtocolError(f"session names an invalid snapshot {volume!r}@{name!r}")
        self._expire()
        session = Session(secrets.token_hex(16), source, volume, name, root, created, group)
        existing = self._existing(session)
        if existing is not None:
            if existing != root:
                raise UserError(f"replica {session.replica_volume}@{name} already exists here "
                                "with different content; delete it first")
            if not group:  # perhaps held as a group's member so far: now also on its own
                with self.store.transaction() as db:
                    snapshots.mark_standalone(db, f"{session.replica_volume}@{name}")
            return {"session": None, "complete": True, "lacking": []}
        if sum(s.source == source for s in self.sessions.values()) >= MAX_SESSIONS:
            raise TransientError(f"site {source} has {MAX_SESSIONS} replication sessions open "
                                 "here already; retry later (unfinished sessions expire after "
                                 f"{SESSION_IDLE:.0f} s)")
        self.sessions[session.id] = session
        self.store.pin(session.id)
        log.info("session %s from %s: %s@%s", session.id[:8], source, volume, name)
        held = self._complete(ask, treeblobs.ROOT, treeblobs.GROUP)
        return {"session": session.id, "complete": False,
                "lacking": [i.hex() for i in ask if i not in held]}

    def _existing(self, s: Session) -> bytes | None:
        """The root id of the session's replica (a volume's or a group's) if held here."""
        if not s.group:
            return self._held_root(s.replica_volume, s.snapshot)
        try:
            row = groups.get(self.store, s.replica_volume, s.snapshot).root_row
        except NotFoundError:
            return None
        return self.store.blobs.id_of(row)

    def drop_source(self, source: str) -> int:
        """Forget every session of ``source`` (no longer a peer); how many there were. What
        they stored stays (durable blobs, for gc to judge); a batch that comes later for one
        of them is refused as of an unknown session."""
        gone = [sid for sid, s in self.sessions.items() if s.source == source]
        for sid in gone:
            del self.sessions[sid]
            self.store.unpin(sid)
        return len(gone)

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [k for k, s in self.sessions.items() if now - s.last_used > SESSION_IDLE]:
            del self.sessions[sid]
            self.store.unpin(sid)

    def session(self, source: str, sid: str) -> Session:
        s = self.sessions.get(sid)
        if s is not None and sid not in self.store.pins:  # expired while gc ran: drop it
            del self.sessions[sid]
            s = None
        if s is None or s.source != source:
            # Transient: the source's attempt opens a new session when it retries (the
            # target restarted, or the session lapsed), instead of giving up until the next
            # trigger.
            raise TransientError(f"unknown replication session {sid[:8]}… (the target may "
                                 "have restarted, or it lapsed); the transfer starts again")
        s.last_used = time.monotonic()
        self.store.pin(sid)  # still in use
        return s

    def have(self, source: str, sid: str, body: bytes, level: int | None = None) -> bytes:
        """One byte per id, 0 when held: stored at all (blocks, ``level`` None), or held as a
        complete tree node of ``level``."""
        self.session(source, sid)
        ids = protocol.decode_ids(body)
        known = self.store.blobs.lookup(ids) if level is None else self._complete(ids, level)
        return bytes(0 if i in known else 1 for i in ids)

    def _complete(self, ids: Iterable[bytes], *levels: int) -> dict[bytes, int]:
        """Those of ``ids`` held here as complete tree nodes of (one of) ``levels``: id ->
        row."""
        found = self.store.blobs.lookup(ids)
        good: set[int] = set()
        for level in levels:
            good |= treeblobs.marked(self.store.db, found.values(), level)
        return {i: row for i, row in found.items() if row in good}

    def check_batch(self, body: bytes) -> CheckedBatch:
        """Parse a batch and check every payload against its id (in the worker pool), without
        the store: it runs while the store thread stores the batch before (``receive``)."""
        records = protocol.decode_batch(body)
        return CheckedBatch(records, self._verify(records), len(body))

    def end(self, source: str, sid: str) -> None:
        """End session ``sid`` of ``source`` after a refusal of one of its steps (a bad
        batch, a full disk, a block size this store cannot take): what a source does next is
        a new attempt with a new session, and this one's pin would only hold off gc here for
        ``SESSION_IDLE`` (gc that a full disk needs at once). What it stored stays, for gc to
        judge."""
        s = self.sessions.get(sid)
        if s is not None and s.source == source:
            del self.sessions[sid]
            self.store.unpin(sid)
            log.info("session %s from %s ended by the refusal", sid[:8], source)

    def receive(self, source: str, sid: str, checked: CheckedBatch) -> dict[str, int]:
        """Store a batch ``check_batch`` has checked, whole or not at all."""
        s = self.session(source, sid)
        records, plains = checked.records, checked.plains
        payloads = [Payload(r.id, r.compressed, r.payload, r.plain_len) for r in records]
        in_batch = {r.id for r in records}  # any record's bytes can be a block
        pages_in = {(r.id, r.level) for r in records if r.kind == protocol.KIND_PAGE}
        roots_in = {r.id for r in records if r.kind == protocol.KIND_ROOT}
        bases = self._base_pages({(r.base, r.level) for r in records if r.base})
        blocks: set[bytes] = set()
        pages: dict[int, set[bytes]] = defaultdict(set)  # level -> page ids
        roots: set[bytes] = set()
        for r, plain in zip(records, plains, strict=True):
            if r.kind == protocol.KIND_PAGE:
                assert plain is not None
                base = bases.get((r.base, r.level)) if r.base else None
                changed = (c for c, _ in tree.changed_entries(plain, base))
                (blocks if r.level == 0 else pages[r.level - 1]).update(changed)
            elif r.kind == protocol.KIND_ROOT:
                assert plain is not None
                root = Root.unpack(plain)
                if problem := _root_problem(root):
                    raise ProtocolError(f"snapshot root {r.id.hex()[:16]}… {problem}; batch "
                                        "rejected")
                self._check_block_size(source, root)
                if root.top != HOLE:
                    pages[root.depth - 1].add(root.top)
            elif r.kind == protocol.KIND_GROUP:
                assert plain is not None
                members = GroupRoot.unpack(plain).members
                if problem := _group_problem(members):
                    raise ProtocolError(f"group root {r.id.hex()[:16]}… {problem}; batch "
                                        "rejected")
                roots.update(root_id for _, root_id in members)
        lacking = blocks - in_batch
        held = self.store.blobs.lookup(lacking) if lacking else {}
        lacking -= set(held)
        self._check_blocks(blocks, {r.id: r.plain_len for r in records}, held)
        for level, ids in pages.items():
            ids = {i for i in ids if (i, level) not in pages_in}
            lacking |= ids - set(self._complete(ids, level))
        roots -= roots_in
        lacking |= roots - set(self._complete(roots, treeblobs.ROOT))
        if lacking:
            raise ProtocolError(f"batch sends a tree page or root before {len(lacking)} of the "
                                "blobs it names; pages must follow their children")
        node_level = {protocol.KIND_ROOT: treeblobs.ROOT, protocol.KIND_GROUP: treeblobs.GROUP}
        try:
            with self.store.transaction() as db:
                rows = self.store.blobs.put_payloads(payloads, verified=True)
                nodes: dict[int, list[int]] = defaultdict(list)  # level -> rows now complete
                for r in records:
                    if r.kind != protocol.KIND_BLOCK:
                        nodes[r.level if r.kind == protocol.KIND_PAGE
                              else node_level[r.kind]].append(rows[r.id])
                for level, marked in nodes.items():
                    treeblobs.mark(db, marked, level)
        except StoreFullError:
            # The batches before this one stay durable: a rerun sends only what is missing,
            # unless the gc that must now free space takes them (the session ends with this
            # refusal, ``end``, so its pin does not hold that gc off).
            raise StoreFullError(self.store.full_message(
                f"this transfer's session had stored {s.blobs} blobs" if s.blobs else None,
                "the session ended; free space at this site (delete snapshots or volumes, "
                "then 'dvx-dr datastore gc', which may also take the blobs of this session), "
                "then run the transfer again: it sends only what is still missing")) from None
        for r, plain in zip(records, plains, strict=True):
            if r.kind == protocol.KIND_PAGE and plain is not None:
                self.store.blobs.pages.put(r.id, plain)  # the next replica's base pages
        size = checked.size
        s.blobs += len(records)
        s.bytes += size
        return {"stored": len(records), "bytes": size}

    def _check_blocks(self, blocks: set[bytes], in_batch: dict[bytes, int],
                      held: dict[bytes, int]) -> None:
        """Every id a leaf page names (``blocks``, the entries that changed) must be a block:
        a blob of exactly the block size, sent in this batch or held here. Anything else
        would shift every byte after it in reads of the replica."""
        bs = self.store.block_size
        lengths = {i: n for i, n in in_batch.items() if i in blocks}
        if held:
            by_row = self.store.blobs.plain_lengths(held.values())
            lengths.update((i, by_row[row]) for i, row in held.items() if row in by_row)
        wrong = next(((i, n) for i, n in lengths.items() if n != bs), None)
        if wrong is not None:
            raise ProtocolError(f"a leaf page names blob {wrong[0].hex()[:16]}… of {wrong[1]} "
                                f"bytes as a block; blocks here are {bs} bytes; batch rejected")

    def _base_pages(self, wanted: set[tuple[bytes, int]]) -> dict[tuple[bytes, int], bytes]:
        """Each named base page (id, level) that this store holds complete at that level,
        read and verified. Any other base is left out, and its page is then checked entry by
        entry."""
        found: list[tuple[tuple[bytes, int], int]] = []
        for level in {lv for _, lv in wanted}:
            held = self._complete({i for i, lv in wanted if lv == level}, level)
            found.extend(((i, level), row) for i, row in held.items())
        plains = self.store.blobs.get_pages([(i, row) for (i, _), row in found])
        return {key: plain for (key, _), plain in zip(found, plains, strict=True)}

    def _verify(self, records: list[protocol.Record]) -> list[bytes | None]:
        """Check every payload against its id (in the worker pool); plaintext of pages/roots."""

        def check(part: list[protocol.Record]) -> list[bytes | None]:
            out: list[bytes | None] = []
            for r in part:
                plain = decompress(r.payload, r.plain_len) if r.compressed else r.payload
                if len(plain) != r.plain_len or blob_id(plain) != r.id:
                    raise IntegrityError(f"record for blob {r.id.hex()[:16]}… does not match "
                                         "its id: the data was corrupted or forged; batch "
                                         "rejected")
                out.append(plain if r.kind != protocol.KIND_BLOCK else None)
            return out

        parts = [records[k:k + 16] for k in range(0, len(records), 16)]
        return [p for part in self.store.pool.map(check, parts) for p in part]

    def commit(self, source: str, sid: str) -> dict[str, Any]:
        s = self.session(source, sid)
        blobs = self.store.blobs
        row = self._complete([s.root], treeblobs.GROUP if s.group else treeblobs.ROOT).get(s.root)
        if row is None:
            raise ProtocolError("commit before the snapshot root was sent")
        plain = blobs.get_row(row, s.root)
        members: list[tuple[str, Root]] = []
        group: GroupRoot | None = None
        if s.group:
            group = GroupRoot.unpack(plain)
            if problem := _group_problem(group.members):
                raise ProtocolError(f"the group root {problem}; replica not committed")
            for volume, root_id in group.members:
                if not self._complete([root_id], treeblobs.ROOT):
                    raise ProtocolError(f"commit before member {volume}'s root was sent")
                members.append((volume, Root.unpack(blobs.get(root_id))))
        else:
            members.append((s.volume, Root.unpack(plain)))
        for volume, root in members:
            if root.top != HOLE and not self._complete([root.top], root.depth - 1):
                raise ProtocolError(f"commit before {volume}'s top page was sent")
            self._check_block_size(s.source, root)
            self._check_shape(volume, root)
        prefix = f"{s.source}/"
        member_ids = (dict(group.members) if group is not None
                      else {s.volume: s.root})
        with self.store.transaction():
            existing = self._existing(s)
            if existing is not None and existing != s.root:
                raise UserError(f"replica {s.replica_volume}@{s.snapshot} was committed here "
                                "meanwhile with different content; delete it first")
            if existing is None:
                for volume, root in members:
                    held = self._held_root(prefix + volume, s.snapshot)
                    if held == member_ids[volume]:
                        continue  # this member was replicated on its own before
                    if held is not None:
                        raise UserError(f"replica {prefix}{volume}@{s.snapshot} already exists "
                                        "here with different content; delete it first")
                    snapshots.record(self.store, prefix + volume, s.snapshot, root,
                                     origin=s.source, created=s.created or None)
                if group is not None:
                    groups.record(self.store, s.replica_volume, s.snapshot, group,
                                  origin=s.source, created=s.created or None)
                else:
                    snapshots.mark_standalone(self.store.db,
                                              f"{s.replica_volume}@{s.snapshot}")
        del self.sessions[sid]
        self.store.unpin(sid)
        log.info("replica %s@%s committed (%d blobs, %d bytes received)", s.replica_volume,
                 s.snapshot, s.blobs, s.bytes)
        return {"replica": f"{s.replica_volume}@{s.snapshot}"}

    def _held_root(self, volume: str, snapshot: str) -> bytes | None:
        """The root id of replica ``volume@snapshot`` if this site holds it."""
        try:
            return self.store.blobs.id_of(snapshots.get(self.store,
                                                        f"{volume}@{snapshot}").root_row)
        except NotFoundError:
            return None

    def _check_block_size(self, source: str, root: Root) -> None:
        """A replica must have this store's block size: volumes and their snapshots are read
        in this store's blocks."""
        if root.block_size != self.store.block_size:
            raise UserError(f"site {source} sends a volume of {root.block_size}-byte blocks; "
                            f"this store uses {self.store.block_size}-byte blocks, and a "
                            "replica must have the target store's block size (create the "
                            "target store with the same --block-size)")

    def _check_shape(self, volume: str, root: Root) -> None:
        """Every page of the tree has the number of entries its place calls for (a page does
        not say where it sits, so this is checked once the whole tree is here). Leaf pages
        are checked by their length in the index; only the upper pages are read."""
        blobs = self.store.blobs
        if problem := _root_problem(root):
            raise ProtocolError(f"{volume}: the snapshot root {problem}; replica not committed")
        frontier = [(0, root.top)]
        for level in range(root.depth - 1, -1, -1):
            pages = [(index, page) for index, page in frontier if page != HOLE]
            rows = blobs.lookup(p for _, p in pages)
            lengths = blobs.plain_lengths(rows.values())
            frontier = []
            for index, page in pages:
                want = tree.child_count(root, level, index)
                row = rows.get(page)
                if row is None or lengths.get(row) != want * tree.ID:
                    raise ProtocolError(f"{volume}: the tree page at level {level}, index "
                                        f"{index} does not have the {want} entries its place "
                                        "calls for; replica not committed")
                if level:
                    children = tree.split_ids(blobs.get_row(row, page))
                    frontier.extend((index * tree.FANOUT + k, c) for k, c in enumerate(children))

    def retention(self, source: str, request: dict[str, Any]) -> dict[str, Any]:
        """Prune this site's replicas of one of ``source``'s groups by the target retention."""
        try:
            pg = str(request["group"])
            rule = Retention.model_validate(request["retention"])
            protect = [str(n) for n in request.get("protect", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"retention request is malformed ({exc})") from None
        keep, deleted = prune_groups(self.store, f"{source}/{pg}", rule, protect)
        return {"kept": sorted(keep), "deleted": deleted}


def _group_problem(members: Sequence[tuple[str, bytes]]) -> str | None:
    """What is wrong with a group root's member list, if anything."""
    if not members:
        return "has no members"
    names = [name for name, _ in members]
    if len(set(names)) != len(names):
        return "names a member twice"
    bad = next((name for name in names if not volumes.valid_name(name)), None)
    if bad is not None:
        return f"names a member {bad!r} that is not a valid volume name"
    return None


def _root_problem(root: Root) -> str | None:
    """What is wrong with a snapshot root's shape, if anything."""
    bs = root.block_size
    if not 4096 <= bs <= 1 << 20 or bs & (bs - 1):
        return f"has block size {bs}"
    if not 0 <= root.size <= volumes.MAX_VOLUME:
        return f"claims a volume of {root.size} bytes (the limit is {volumes.MAX_VOLUME})"
    if not 0 <= root.mapped_blocks <= root.nblocks:
        return f"claims {root.mapped_blocks} mapped blocks of {root.nblocks}"
    if root.depth != len(tree.level_counts(root.nblocks)):
        return f"claims a tree of depth {root.depth} over {root.nblocks} blocks"
    return None


def _utc(created: str) -> str:
    """A peer's ISO 8601 time as this store writes its own (UTC, ``Z``); empty stays empty.
    A time without a zone, or one outside 1970-9999 in UTC, raises ValueError or
    OverflowError."""
    if not created:
        return ""
    when = datetime.fromisoformat(created)
    if when.tzinfo is None:
        raise ValueError("no time zone")
    when = when.astimezone(UTC)
    if not 1970 <= when.year <= 9999:
        raise ValueError("out of range")
    return utc_iso(when)
