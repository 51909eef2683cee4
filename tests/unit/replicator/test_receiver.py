"""The target's checks, driven in-process with hand-made batches from a source that lies.

Each case is a batch a buggy or hostile peer could send. The target must refuse it, or at
least never commit a replica with something missing under it: "a stored tree page or root
means its whole subtree is stored" is what every later transfer relies on.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tracemalloc
from collections.abc import Callable

import pytest
import zstandard

from dvx_dr.errors import (
    IntegrityError,
    KeysDestroyedError,
    ProtocolError,
    StoreFullError,
    TransientError,
)
from dvx_dr.replicator import protocol
from dvx_dr.replicator.receiver import Receiver
from dvx_dr.site import gc, keys, snapshots
from dvx_dr.site import store as storemod
from dvx_dr.site.store import Store
from dvx_dr.site.tree import Root

BS = 4096


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def rec(kind: int, data: bytes, base: bytes | None = None, level: int = 0) -> protocol.Record:
    return protocol.Record(kind, False, len(data), sha(data), data, base, level)


def blocks(n: int, seed: int) -> list[bytes]:
    return [bytes([seed]) * (BS - 4) + i.to_bytes(4, "little") for i in range(n)]


def open_session(rx: Receiver, snapshot: str, root: bytes, ask: list[bytes] | None = None
                 ) -> tuple[str, list[str]]:
    opened = rx.open("src", {"version": protocol.VERSION, "volume": "vm1",
                             "snapshot": snapshot, "root": root.hex(),
                             "ask": [i.hex() for i in ask or []]})
    return opened["session"], opened["lacking"]


def send(rx: Receiver, sid: str, *records: protocol.Record) -> None:
    rx.receive("src", sid, rx.check_batch(protocol.encode_batch(records)))


@pytest.fixture
def rx(new_store: Callable[..., Store]) -> Receiver:
    return Receiver(new_store(block_size=BS))


def replicate_one_leaf(rx: Receiver, name: str, data: list[bytes]) -> tuple[bytes, bytes]:
    """A well-behaved transfer of a one-leaf volume; returns (leaf page, root blob)."""
    leaf = b"".join(sha(b) for b in data)
    root = root_of(leaf)
    sid, _ = open_session(rx, name, sha(root))
    send(rx, sid, *[rec(protocol.KIND_BLOCK, b) for b in data],
         rec(protocol.KIND_PAGE, leaf), rec(protocol.KIND_ROOT, root))
    rx.commit("src", sid)
    return leaf, root


def incremental(rx: Receiver, first: str, second: str, seed: int
                ) -> tuple[list[bytes], bytes, bytes, bytes, str]:
    """Replicate a one-leaf volume as ``first``, then open the session of ``second``, in
    which the first block changed; returns (data, changed block, base leaf, new leaf,
    session id)."""
    data = blocks(512, seed)
    leaf, root = replicate_one_leaf(rx, first, data)
    changed = bytes([seed + 1]) * BS
    leaf2 = sha(changed) + leaf[32:]
    root2 = Root(1, BS, BS * 512, 512, sha(leaf2)).pack()
    sid, lacking = open_session(rx, second, sha(root2), ask=[sha(root)])
    assert lacking == []  # the earlier root is held, complete: a usable base
    return data, changed, leaf, leaf2, sid


def root_of(leaf: bytes) -> bytes:
    return Root(1, BS, BS * 512, 512, sha(leaf)).pack()


def test_a_data_block_is_not_accepted_as_a_base_page(rx: Receiver) -> None:
    made_up = [sha(b"nothing %d" % i) for i in range(512)]
    decoy = b"".join(made_up)  # a "block" whose bytes look like a leaf page
    child = b"\1" * BS
    page = sha(child) + decoy[32:]  # equal to the decoy but for one real entry
    root = Root(1, BS, BS * 512, 512, sha(page)).pack()
    sid, _ = open_session(rx, "s1", sha(root))
    send(rx, sid, rec(protocol.KIND_BLOCK, decoy), rec(protocol.KIND_BLOCK, child))
    with pytest.raises(ProtocolError, match="pages must follow their children"):
        send(rx, sid, rec(protocol.KIND_PAGE, page, base=sha(decoy)))


def test_a_root_whose_top_is_a_data_block_is_refused(rx: Receiver) -> None:
    decoy = b"".join(sha(b"nothing %d" % i) for i in range(512))
    root = Root(1, BS, BS * 512, 512, sha(decoy)).pack()
    sid, _ = open_session(rx, "s1", sha(root))
    send(rx, sid, rec(protocol.KIND_BLOCK, decoy))
    with pytest.raises(ProtocolError, match="pages must follow their children"):
        send(rx, sid, rec(protocol.KIND_ROOT, root))
    with pytest.raises(ProtocolError, match="root was sent"):
        rx.commit("src", sid)


def test_an_upper_page_must_list_complete_pages_of_the_level_below(rx: Receiver) -> None:
    data = blocks(3, 1)
    for b in data:
        sid, _ = open_session(rx, "s0", sha(b"x"))
        send(rx, sid, rec(protocol.KIND_BLOCK, b))
    upper = b"".join(sha(b) for b in data)  # names blocks, claiming they are leaf pages
    root = Root(2, BS, BS * 512 * 3, 3, sha(upper)).pack()
    sid, _ = open_session(rx, "s1", sha(root))
    with pytest.raises(ProtocolError, match="pages must follow their children"):
        send(rx, sid, rec(protocol.KIND_PAGE, upper, level=1))
    # The same bytes as a leaf page are fine (its entries are blocks) ...
    send(rx, sid, rec(protocol.KIND_PAGE, upper, level=0))
    # ... but that does not make them a level-1 page: asked as one, it is lacking.
    answer = rx.have("src", sid, sha(upper), 1)
    assert answer == b"\1"
    assert rx.have("src", sid, sha(upper), 0) == b"\0"


def test_a_real_base_page_lets_the_target_check_only_the_changes(rx: Receiver) -> None:
    data, changed, leaf, leaf2, sid = incremental(rx, "s1", "s2", 2)
    forged = sha(b"never sent") + leaf[32:]
    with pytest.raises(ProtocolError, match="pages must follow their children"):
        send(rx, sid, rec(protocol.KIND_PAGE, forged, base=sha(leaf)))
    send(rx, sid, rec(protocol.KIND_BLOCK, changed), rec(protocol.KIND_PAGE, leaf2, sha(leaf)),
         rec(protocol.KIND_ROOT, root_of(leaf2)))
    rx.commit("src", sid)
    assert snapshots.read(rx.store, "src/vm1@s2", BS, BS) == data[1]


def test_gc_while_a_session_is_open_deletes_nothing_the_session_relies_on(rx: Receiver) -> None:
    """The session's new leaf names, through its base, blocks that only the older replica
    named; that replica is deleted and gc runs before the session commits."""
    data, changed, leaf, leaf2, sid = incremental(rx, "a", "b", 4)
    send(rx, sid, rec(protocol.KIND_BLOCK, changed), rec(protocol.KIND_PAGE, leaf2, sha(leaf)))
    snapshots.delete(rx.store, "src/vm1@a")
    report = gc.gc(rx.store)
    assert report.sessions_open == 1 and report.blobs_deleted == 0
    send(rx, sid, rec(protocol.KIND_ROOT, root_of(leaf2)))
    rx.commit("src", sid)
    assert snapshots.read(rx.store, "src/vm1@b", 0, 2 * BS) == changed + data[1]
    # With the session over, gc collects what nothing names any more.
    assert gc.gc(rx.store).blobs_deleted == 3  # vm1@a's root, its leaf, its first block


def test_gc_keeps_a_page_mark_only_where_the_blob_is_still_that_page(rx: Receiver) -> None:
    """vm1's one leaf page is 4 KiB, the size of a block; vm2 holds a block with exactly its
    bytes. Once vm1's replica is gone, gc keeps the blob (vm2 names it as a block) but not
    its mark as a complete leaf page: its blocks are gone."""
    data = blocks(128, 6)
    leaf = b"".join(sha(b) for b in data)
    assert len(leaf) == BS
    root = Root(1, BS, BS * 128, 128, sha(leaf)).pack()
    sid, _ = open_session(rx, "s1", sha(root))
    send(rx, sid, *[rec(protocol.KIND_BLOCK, b) for b in data], rec(protocol.KIND_PAGE, leaf),
         rec(protocol.KIND_ROOT, root))
    rx.commit("src", sid)
    leaf2 = sha(leaf)  # vm2: one block whose bytes are vm1's leaf page
    root2 = Root(1, BS, BS, 1, sha(leaf2)).pack()
    opened = rx.open("src", {"version": protocol.VERSION, "volume": "vm2", "snapshot": "s1",
                             "root": sha(root2).hex()})
    send(rx, opened["session"], rec(protocol.KIND_BLOCK, leaf), rec(protocol.KIND_PAGE, leaf2),
         rec(protocol.KIND_ROOT, root2))
    rx.commit("src", opened["session"])
    snapshots.delete(rx.store, "src/vm1@s1")
    gc.gc(rx.store)
    sid, lacking = open_session(rx, "s2", sha(root), ask=[sha(root)])
    assert lacking == [sha(root).hex()]
    assert rx.have("src", sid, sha(leaf), 0) == b"\1"  # not held as a leaf page any more
    with pytest.raises(ProtocolError, match="pages must follow their children"):
        send(rx, sid, rec(protocol.KIND_ROOT, root))


@pytest.mark.parametrize("depth, size, block_size, phrase", [
    (0, BS, BS, "depth 0"),
    (1, BS * 10**6, BS, "depth 1 over 1000000 blocks"),
    (1, 0, 0, "block size 0"),
])
def test_a_root_claiming_an_impossible_tree_is_refused(rx: Receiver, depth: int, size: int,
                                                       block_size: int, phrase: str) -> None:
    data = blocks(1, 7)
    leaf = sha(data[0])
    root = Root(depth, block_size, size, 1, sha(leaf)).pack()
    sid, _ = open_session(rx, "s1", sha(root))
    with pytest.raises(ProtocolError, match=phrase):
        send(rx, sid, rec(protocol.KIND_BLOCK, data[0]), rec(protocol.KIND_PAGE, leaf),
             rec(protocol.KIND_ROOT, root))


def test_an_idle_session_stops_holding_off_gc_and_is_over(
        rx: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    data, changed, leaf, leaf2, sid = incremental(rx, "a", "b", 8)
    send(rx, sid, rec(protocol.KIND_BLOCK, changed))
    assert gc.gc(rx.store).sessions_open == 1
    monkeypatch.setattr(storemod, "PIN_IDLE", -1.0)  # every pin has lapsed
    report = gc.gc(rx.store)
    assert report.sessions_open == 0 and report.blobs_deleted == 1  # the unnamed new block
    # Transient: the source's retry opens a new session (it had given up until the next
    # trigger, as for an error of its own).
    with pytest.raises(TransientError, match="the transfer starts again"):
        send(rx, sid, rec(protocol.KIND_PAGE, leaf2, sha(leaf)))


def test_a_tree_whose_pages_do_not_fit_their_places_is_not_committed(rx: Receiver) -> None:
    """600 blocks make two leaves (512 and 88 entries) under one upper page; a first leaf of
    100 entries has every entry stored, but reading the replica would fail."""
    data = blocks(600, 9)
    ids = [sha(b) for b in data]
    short, last = b"".join(ids[:100]), b"".join(ids[512:])
    upper = sha(short) + sha(last)
    root = Root(2, BS, BS * 600, 600, sha(upper)).pack()
    sid, _ = open_session(rx, "s1", sha(root))
    send(rx, sid, *[rec(protocol.KIND_BLOCK, b) for b in data[:100] + data[512:]],
         rec(protocol.KIND_PAGE, short), rec(protocol.KIND_PAGE, last),
         rec(protocol.KIND_PAGE, upper, level=1), rec(protocol.KIND_ROOT, root))
    with pytest.raises(ProtocolError, match="level 0, index 0 does not have the 512 entries"):
        rx.commit("src", sid)
    assert snapshots.list_snapshots(rx.store) == []


def test_a_session_waiting_behind_a_long_operation_does_not_lapse(
        rx: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A request of the session is queued at the store thread (behind a scrub, say): its pin
    holds however long that takes, and the request then finds its session."""
    data, changed, leaf, leaf2, sid = incremental(rx, "a", "b", 10)
    monkeypatch.setattr(storemod, "PIN_IDLE", -1.0)  # idle for longer than allowed ...
    with rx.store.pin_busy(sid):  # ... but a request is in progress
        assert gc.gc(rx.store).sessions_open == 1
        send(rx, sid, rec(protocol.KIND_BLOCK, changed))
    assert gc.gc(rx.store).sessions_open == 0  # idle again, and no request: it lapses


def test_a_full_disk_says_the_batches_before_stay_stored(
        rx: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that does not fit said "nothing of this operation was committed", though
    the transfer's earlier batches are durable and a rerun does not send them again. (The
    full disk is simulated here; tests/integration/test_disk_full.py fills real ones.)"""
    data = blocks(4, 40)
    leaf = b"".join(sha(b) for b in data)
    sid, _ = open_session(rx, "s1", sha(root_of(leaf)))
    send(rx, sid, *[rec(protocol.KIND_BLOCK, b) for b in data[:2]])

    def full(*args: object, **kwargs: object) -> object:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rx.store.blobs, "put_payloads", full)
    with pytest.raises(StoreFullError) as failed:
        send(rx, sid, *[rec(protocol.KIND_BLOCK, b) for b in data[2:]])
    message = str(failed.value)
    assert "had stored 2 blobs before it stopped, and that is committed" in message
    assert "nothing of this operation was committed" not in message
    assert "sends only what is still missing" in message
    assert set(rx.store.blobs.lookup([sha(b) for b in data])) == {sha(b) for b in data[:2]}
    # The site ends the session on such a refusal (server._session_step), so it holds off
    # no gc: the operator must run one to free space. (It had: for its 10 idle minutes, and
    # a source retrying opened one more each time.)
    assert gc.gc(rx.store).sessions_open == 1
    rx.end("src", sid)
    with pytest.raises(TransientError, match="unknown replication session"):
        rx.session("src", sid)
    report = gc.gc(rx.store)
    assert report.sessions_open == 0 and report.blobs_deleted == 2


def test_a_session_under_way_when_the_keys_are_erased_writes_nothing_more(
        rx: Receiver) -> None:
    store = rx.store
    data = [b"marker of the peer's data " + bytes([i]) * (BS - 26) for i in range(8)]
    leaf = b"".join(sha(b) for b in data)
    sid, _ = open_session(rx, "s1", sha(root_of(leaf)))
    send(rx, sid, *[rec(protocol.KIND_BLOCK, b) for b in data[:4]])
    segments = {p: p.read_bytes() for p in (store.path / "segments").glob("*.seg")}

    keys.crypto_erase(store, "site-a")
    with pytest.raises(KeysDestroyedError):
        send(rx, sid, *[rec(protocol.KIND_BLOCK, b) for b in data[4:]])
    with pytest.raises(KeysDestroyedError):
        rx.commit("src", sid)
    # Not one byte more on disk, and above all no extent in the clear.
    after = {p: p.read_bytes() for p in (store.path / "segments").glob("*.seg")}
    assert after == segments
    assert store.db.execute("SELECT COUNT(*) FROM blobs WHERE key_version=0").fetchone()[0] == 0


def test_a_leaf_page_naming_a_blob_that_is_not_a_block_is_refused(rx: Receiver) -> None:
    data = blocks(3, 7)
    short = b"only a hundred bytes".ljust(100, b".")
    leaf = sha(data[0]) + sha(short) + sha(data[2])
    root = Root(1, BS, BS * 3, 3, sha(leaf)).pack()
    sid, _ = open_session(rx, "s1", sha(root))
    with pytest.raises(ProtocolError, match=r"of 100 bytes as a block; blocks here are 4096"):
        send(rx, sid, *[rec(protocol.KIND_BLOCK, b) for b in (data[0], short, data[2])],
             rec(protocol.KIND_PAGE, leaf), rec(protocol.KIND_ROOT, root))
    # Held from an earlier batch, it is refused all the same.
    send(rx, sid, rec(protocol.KIND_BLOCK, short), *[rec(protocol.KIND_BLOCK, b) for b in data])
    with pytest.raises(ProtocolError, match=r"of 100 bytes as a block"):
        send(rx, sid, rec(protocol.KIND_PAGE, leaf), rec(protocol.KIND_ROOT, root))
    with pytest.raises(ProtocolError):
        rx.commit("src", sid)


def compressed(data: bytes, claims: int, extra: bytes = b"") -> protocol.Record:
    payload = zstandard.ZstdCompressor(level=3).compress(data) + extra
    return protocol.Record(protocol.KIND_BLOCK, True, claims, sha(data[:claims]), payload,
                           None, 0)


def test_a_payload_declaring_more_than_it_claims_is_refused_before_it_is_inflated(
        rx: Receiver) -> None:
    bomb = compressed(bytes(64 * 1024 * 1024), BS)  # a small frame declaring 64 MiB
    assert len(bomb.payload) < 64 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(IntegrityError, match="declares 67108864 bytes"):
            rx.check_batch(protocol.encode_batch([bomb]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"{peak} bytes allocated for a {len(bomb.payload)}-byte record"


def test_bytes_after_the_compressed_frame_are_refused(rx: Receiver) -> None:
    block = blocks(1, 9)[0]
    padded = compressed(block, BS, extra=os.urandom(64 * 1024))
    with pytest.raises(IntegrityError, match="unused data"):
        rx.check_batch(protocol.encode_batch([padded]))


@pytest.mark.parametrize(("sent", "kept"), [
    ("2026-11-29T10:00:00+02:00", "2026-11-29T08:00:00Z"),
    ("2026-11-29T08:00:00.123456Z", "2026-11-29T08:00:00Z"),
    ("2026-11-29T08:00:00", None),            # no time zone
    ("0001-01-01T00:00:00+14:00", None),      # before 1970 in UTC (and out of range)
    ("9999-12-31T23:59:59-14:00", None),      # past 9999 in UTC
])
def test_a_peers_snapshot_time_is_kept_in_utc_or_refused(rx: Receiver, sent: str,
                                                         kept: str | None) -> None:
    request = {"version": protocol.VERSION, "volume": "vm1", "snapshot": "s1",
               "root": sha(b"r").hex(), "created": sent}
    if kept is None:
        with pytest.raises(ProtocolError, match="time zone, from 1970 to 9999"):
            rx.open("src", request)
        return
    sid = rx.open("src", request)["session"]
    assert rx.sessions[sid].created == kept
