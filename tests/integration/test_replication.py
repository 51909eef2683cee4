"""Replication between two real sites: ``dvx-dr site serve`` processes on 127.0.0.1 talking
mutual TLS with certificates from ``dvx-dr pki``, encrypted stores, and the real CLI.

Covers: a full transfer is byte-identical at the target and stored under the target's own
key; a repeat sends nothing and increments send only what changed; killing the target
mid-transfer leaves no partial replica and a rerun sends only what is missing; a connection
cut mid-stream is retried and completes; peers with the wrong certificate are refused and
logged; malformed batches are refused with a clear error and change nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import json
import random
import re
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
import zstandard

from dvx_dr.replicator import listener, protocol
from dvx_dr.replicator.peer import PREFIX
from dvx_dr.replicator.receiver import MAX_SESSIONS
from dvx_dr.replicator.tls import client_context
from dvx_dr.site import tree
from dvx_dr.site.blobs import BlobRow
from dvx_dr.site.store import Store
from tests.conftest import ROOT
from tests.integration.sites import HOST, Site, Sites, dvx

KiB = 1024
MiB = 1024 * KiB
BS = 64 * KiB
IMAGE_SIZE = 256 * MiB
#: Planted in the source volume; must never appear in the target store's files.
MARKER = b"DVX-PLAINTEXT-MARKER-5c0ffee-do-not-leak"
EXTENT_HEADER = 16


# -- data -------------------------------------------------------------------------------------


def _load_datagen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dvx_bench_datagen",
                                                  ROOT / "bench" / "datagen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


datagen = _load_datagen()


def mixed_image(path: Path, seed: int, size: int = IMAGE_SIZE) -> None:
    """A disk-image-like file: text, binaries, zero runs, random data, repeated blocks."""
    datagen.generate(path, size, seed)


def random_image(path: Path, seed: int, size: int = IMAGE_SIZE) -> None:
    """Mostly incompressible data (a slow, large transfer), with some zero and text MiBs."""
    rng = random.Random(seed)
    line = b"a line of a log file, compressible and never repeated across MiBs: %d\n"
    with open(path, "wb") as f:
        for i in range(size // MiB):
            if i % 32 == 5:
                f.write(bytes(MiB))
            elif i % 32 == 17:
                f.write(b"".join(line % (i * MiB + n) for n in range(MiB // 64))[:MiB]
                        .ljust(MiB, b"."))
            else:
                f.write(rng.randbytes(MiB))


def plant_markers(path: Path, seed: int) -> dict[str, int]:
    """Overwrite two blocks with data holding ``MARKER``: one incompressible (stored as is
    before encryption), one compressible. Returns their block indices."""
    rng = random.Random(seed)
    nblocks = path.stat().st_size // BS
    random_index, text_index = rng.sample(range(nblocks // 4, nblocks), 2)
    noisy = bytearray(rng.randbytes(BS))
    for off in range(1000, BS - len(MARKER), 8 * KiB):
        noisy[off:off + len(MARKER)] = MARKER
    text = (MARKER + b" appears in a config file\n") * (BS // (len(MARKER) + 26) + 1)
    with open(path, "r+b") as f:
        f.seek(random_index * BS)
        f.write(noisy)
        f.seek(text_index * BS)
        f.write(text[:BS])
    return {"random": random_index, "text": text_index}


def read_block(path: Path, index: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(index * BS)
        return f.read(BS)


def blocks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(BS):
            yield block


def assert_same_file(got: Path, want: Path) -> None:
    assert got.stat().st_size == want.stat().st_size, \
        f"{got} is {got.stat().st_size} bytes, {want} is {want.stat().st_size}"
    for n, (a, b) in enumerate(zip(blocks(got), blocks(want), strict=True)):
        if a != b:
            raise AssertionError(f"{got} differs from {want} in block {n} (byte {n * BS})")


def changed_payload(old: Path, new: Path) -> tuple[int, int]:
    """(blocks of ``new`` that differ from ``old`` and are not all zero, their summed
    zstd-3 size per 64 KiB block, or the raw size when zstd does not shrink it)."""
    cctx = zstandard.ZstdCompressor(level=3)
    count = size = 0
    seen: set[bytes] = set()
    for a, b in zip(blocks(old), blocks(new), strict=True):
        if a == b or not b.strip(b"\0"):
            continue
        digest = hashlib.sha256(b).digest()
        if digest in seen:
            continue
        seen.add(digest)
        count += 1
        size += min(len(cctx.compress(b)), len(b))
    return count, size


def incremental_budget(stats: dict[str, Any], compressed: int) -> int:
    """What an incremental may put on the wire: 1.2x the compressed changed blocks, plus ids
    (those exchanged in have/want, and those the changed tree pages carry)."""
    page_ids = stats["pages_sent"] * tree.FANOUT * tree.ID
    return int(1.2 * compressed) + stats["id_bytes"] + page_ids


def payload_bytes(stats: dict[str, Any]) -> int:
    """Payload bytes of all blobs in a store, from ``datastore stats``: each extent is a
    16-byte header plus its payload (padded to 16 bytes only when shorter)."""
    extents = sum(k["extents"] for k in stats["by_key_version"])
    return int(stats["extent_bytes"]) - EXTENT_HEADER * extents


def segment_bytes(site: Site) -> int:
    return sum(p.stat().st_size for p in (site.store / "segments").glob("*.seg"))


# -- a full transfer ----------------------------------------------------------------------------


@pytest.mark.slow
def test_full_replica_is_identical_and_encrypted_with_the_target_key(
        two_sites: Sites, tmp_path: Path) -> None:
    a, b = two_sites["site-a"], two_sites["site-b"]
    image = tmp_path / "vm1.img"
    mixed_image(image, seed=11)
    planted = plant_markers(image, seed=12)
    a.cli("volume", "import", "vm1", image)
    a.cli("snapshot", "create", "vm1", "--name", "s1")

    stats = a.replicate("vm1@s1", to="site-b")

    assert stats["replica"] == "site-a/vm1@s1"
    assert stats["blocks_sent"] > 0 and not stats["already_replicated"]
    assert b.snapshots() == ["site-a/vm1@s1"]
    replica = tmp_path / "replica.img"
    b.cli("snapshot", "export", "site-a/vm1@s1", replica)
    assert_same_file(replica, image)

    a.stop()
    b.stop()
    leaks = [p for p in b.store.rglob("*") if p.is_file() and MARKER in p.read_bytes()]
    assert not leaks, f"plaintext of the volume found in site-b's store files: {leaks}"

    # The same block lies at both sites, each encrypted under its own site's key.
    with a.open_store() as store_a, b.open_store() as store_b:
        for kind, index in planted.items():
            block = read_block(image, index)
            info_a, raw_a, payload_a = extent_of(store_a, block)
            info_b, raw_b, payload_b = extent_of(store_b, block)
            assert payload_a == payload_b, "the target must store the payload the source sent"
            if kind == "random":  # incompressible: stored as is, so unencrypted it would show
                assert MARKER in payload_b
            assert MARKER not in raw_a and MARKER not in raw_b
            assert raw_a[EXTENT_HEADER:] != raw_b[EXTENT_HEADER:], \
                f"the {kind} block has the same ciphertext at both sites"
            cipher_a = store_a.blobs.cipher
            assert cipher_a is not None
            own = cipher_a.decrypt(info_a.key_version, info_a.seg, info_a.off,
                                   raw_a[EXTENT_HEADER:])
            assert own.startswith(payload_a)  # the check below can tell a match
            other = cipher_a.decrypt(info_b.key_version, info_b.seg, info_b.off,
                                     raw_b[EXTENT_HEADER:])
            assert not other.startswith(payload_b), "site-a's key decrypts site-b's extent"


def extent_of(store: Store, block: bytes) -> tuple[BlobRow, bytes, bytes]:
    """Where ``block`` lies in ``store``: its index row, the raw extent and the decrypted
    payload; checks that it reads back as ``block``."""
    blob = hashlib.sha256(block).digest()
    row = store.blobs.lookup([blob]).get(blob)
    assert row is not None, f"{store.site} lacks the block {blob.hex()[:16]}"
    assert store.blobs.get_row(row, blob) == block
    info = store.blobs.row_info(row)
    raw = store.reader.read(info.seg, info.off, info.length)
    _, payload = store.blobs.read_payload(info)
    return info, raw, payload


# -- what a transfer sends ---------------------------------------------------------------------


@pytest.mark.slow
def test_repeat_sends_nothing_and_increments_send_only_what_changed(
        two_sites: Sites, tmp_path: Path) -> None:
    a, b = two_sites["site-a"], two_sites["site-b"]
    image = tmp_path / "vm1.img"
    mixed_image(image, seed=21)
    a.cli("volume", "import", "vm1", image)
    a.cli("snapshot", "create", "vm1", "--name", "s1")
    full = a.replicate("vm1@s1", to="site-b")
    assert full["blocks_sent"] > 1000

    again = a.replicate("vm1@s1", to="site-b")
    assert again["blocks_sent"] == 0 and again["payload_bytes"] == 0
    assert again["already_replicated"]

    # 1% of the blocks change, written through the running site.
    before = tmp_path / "vm1-s1.img"
    image.rename(before)
    image.write_bytes(before.read_bytes())
    datagen.mutate(image, 0.01, seed=22)
    a.cli("volume", "write", "vm1", image)
    a.cli("snapshot", "create", "vm1", "--name", "s2")
    changed, compressed = changed_payload(before, image)
    assert changed > 0

    incr = a.replicate("vm1@s2", to="site-b")

    assert 0 < incr["blocks_sent"] <= changed
    assert incr["bytes_on_wire"] <= incremental_budget(incr, compressed), incr
    assert incr["bytes_on_wire"] < full["bytes_on_wire"] / 20
    # The target holds s1 whole, so the walk asks only about ids that differ from s1's at
    # the same place (changed blocks and the pages above them), not every id under each
    # changed leaf page.
    pages = -(-image.stat().st_size // (64 * 1024 * 512)) + 2
    assert incr["ids_exchanged"] <= changed + pages + 2, incr

    # A second volume sharing most of its blocks with vm1: only the difference moves.
    copy = tmp_path / "vm2.img"
    copy.write_bytes(image.read_bytes())
    datagen.mutate(copy, 0.02, seed=23)
    a.cli("volume", "import", "vm2", copy)
    a.cli("snapshot", "create", "vm2", "--name", "s1")
    changed2, compressed2 = changed_payload(image, copy)

    second = a.replicate("vm2@s1", to="site-b")

    assert 0 < second["blocks_sent"] <= changed2
    assert second["bytes_on_wire"] <= incremental_budget(second, compressed2), second
    assert sorted(b.snapshots()) == ["site-a/vm1@s1", "site-a/vm1@s2", "site-a/vm2@s1"]
    for spec, want in (("site-a/vm1@s2", image), ("site-a/vm2@s1", copy)):
        out = tmp_path / "replica.img"
        b.cli("snapshot", "export", spec, out)
        assert_same_file(out, want)


# -- the target dies mid-transfer --------------------------------------------------------------


@pytest.mark.slow
def test_target_killed_mid_transfer_leaves_no_partial_replica_and_rerun_resumes(
        two_sites: Sites, tmp_path: Path) -> None:
    a, b = two_sites["site-a"], two_sites["site-b"]
    image = tmp_path / "vm1.img"
    random_image(image, seed=31)
    a.cli("volume", "import", "vm1", image)
    a.cli("snapshot", "create", "vm1", "--name", "s1")
    full_payload = payload_bytes(a.stats())
    rng = random.Random(32)
    delivered = 0  # payload bytes durable (indexed) at site-b

    for round_ in range(3):
        start = segment_bytes(b)
        kill_at = start + int(rng.uniform(0.15, 0.5) * (full_payload - delivered))
        transfer = a.popen("replicate", "vm1@s1", "--to", "site-b", "--json")
        deadline = time.monotonic() + 60
        while segment_bytes(b) < kill_at:
            assert transfer.poll() is None, (
                f"round {round_}: the transfer ended before site-b received {kill_at} bytes: "
                f"{transfer.communicate()}")
            assert time.monotonic() < deadline, f"round {round_}: no progress"
            time.sleep(0.002)
        b.kill()
        # Stop the source too, so that its retries do not race the checks below.
        a.stop()
        out, err = transfer.communicate(timeout=60)
        # The command waiting on site-a is told that the site stopped (a transient error).
        assert transfer.returncode == 4, f"round {round_}: {out!r} {err!r}"
        assert b"the site stopped during the transfer; run the command again" in err, \
            err.decode()
        assert b"Traceback" not in err, err.decode()

        # Restarted, site-b shows no replica, and keeps the blobs it had made durable.
        two_sites.start("site-a", "site-b")
        assert b.snapshots() == [], f"round {round_}: a partial replica is visible"
        now = payload_bytes(b.stats())
        assert now >= delivered, f"round {round_}: durable blobs were lost"
        delivered = now

    assert 0 < delivered < full_payload
    resumed = a.replicate("vm1@s1", to="site-b")

    assert b.snapshots() == ["site-a/vm1@s1"]
    assert resumed["payload_bytes"] < full_payload
    # The rerun sent what was missing, not what was already durable at site-b.
    assert delivered + resumed["payload_bytes"] <= 1.05 * full_payload, (
        delivered, resumed["payload_bytes"], full_payload)
    replica = tmp_path / "replica.img"
    b.cli("snapshot", "export", "site-a/vm1@s1", replica)
    assert_same_file(replica, image)
    assert b.json("datastore", "scrub")["damaged"] == []


# -- the network cuts the connection ------------------------------------------------------------


class CuttingProxy:
    """A plain TCP relay (TLS stays end to end) that drops the connection carrying the
    upstream traffic each time the total relayed upstream crosses one of ``cut_at``."""

    def __init__(self, upstream_port: int, cut_at: list[int]) -> None:
        self.upstream = (HOST, upstream_port)
        self.cut_at = sorted(cut_at)
        self.relayed = 0
        self.cuts = 0
        self.lock = threading.Lock()
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            pair = (client, server)
            threading.Thread(target=self._pump, args=(client, server, pair, True),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, pair, False),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, pair: tuple[socket.socket, ...],
              count: bool) -> None:
        with contextlib.suppress(OSError):  # either side closing ends the relay
            while data := src.recv(256 * KiB):
                dst.sendall(data)
                if count and self._crossed(len(data)):
                    break
        self._cut(pair)

    def _crossed(self, n: int) -> bool:
        with self.lock:
            self.relayed += n
            if self.cut_at and self.relayed >= self.cut_at[0]:
                self.cut_at.pop(0)
                self.cuts += 1
                return True
            return False

    @staticmethod
    def _cut(pair: tuple[socket.socket, ...]) -> None:
        for s in pair:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()


@pytest.mark.slow
def test_target_stopped_mid_stream_exits_in_seconds_and_the_transfer_resumes(
        two_sites: Sites, tmp_path: Path) -> None:
    """SIGTERM to a site receiving a blob stream: it waited for the stream's handler for
    aiohttp's default 60 s, the source hearing nothing all that time, and a command sent to
    it meanwhile was told that no site runs (exit 2) and to start one."""
    a, b = two_sites["site-a"], two_sites["site-b"]
    image = tmp_path / "vm1.img"
    random_image(image, seed=35)
    a.cli("volume", "import", "vm1", image)
    a.cli("snapshot", "create", "vm1", "--name", "s1")
    start = segment_bytes(b)
    transfer = a.popen("replicate", "vm1@s1", "--to", "site-b", "--json")
    deadline = time.monotonic() + 60
    while segment_bytes(b) < start + 24 * MiB:
        assert transfer.poll() is None, f"the transfer ended early: {transfer.communicate()}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.002)

    stopping = time.monotonic()
    assert b.proc is not None
    b.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    # While it stops, a command is told so (exit 4, to be retried), not that no site runs.
    told = b.cli("status", check=False)
    assert told.returncode == 4, told
    assert told.stderr.decode() == ("dvx-dr: error: site site-b is stopping and takes no more "
                                    "commands; run the command again once it is back\n")
    assert b.stop(timeout=15) == 0
    assert time.monotonic() - stopping < 10
    # The source, retrying meanwhile, finishes the transfer once site-b is back.
    two_sites.start("site-b")
    out, err = transfer.communicate(timeout=120)
    assert transfer.returncode == 0, err.decode()
    assert json.loads(out)["replica"] == "site-a/vm1@s1"
    replica = tmp_path / "replica.img"
    b.cli("snapshot", "export", "site-a/vm1@s1", replica)
    assert_same_file(replica, image)


@pytest.mark.slow
def test_connection_cut_mid_stream_is_retried_and_completes(
        two_sites: Sites, tmp_path: Path) -> None:
    a, b = two_sites["site-a"], two_sites["site-b"]
    image = tmp_path / "vm1.img"
    mixed_image(image, seed=41)
    a.cli("volume", "import", "vm1", image)
    a.cli("snapshot", "create", "vm1", "--name", "s1")
    full_payload = payload_bytes(a.stats())
    proxy = CuttingProxy(b.port, cut_at=[24 * MiB, 60 * MiB])
    try:
        a.set_peer("site-b", f"https://{HOST}:{proxy.port}")
        a.restart()

        done = a.cli("replicate", "vm1@s1", "--to", "site-b", "--json")
    finally:
        proxy.close()

    stats = json.loads(done.stdout)
    assert proxy.cuts == 2
    retries = [line for line in a.log().splitlines() if "retrying in" in line]
    assert len(retries) == 2, retries
    # The command says so too, instead of going quiet while the site waits to retry.
    told = done.stderr.decode().splitlines()
    assert len(told) == 2, told
    for n, line in enumerate(told, 1):
        assert re.fullmatch(rf"dvx-dr: attempt {n} of 8 failed: .+; retrying in \d+\.\d s",
                            line), line
    # The site's log says how it ended (it stopped at the last retry).
    assert re.search(r"transfer vm1@s1 -> site-b: replicated \(\d+ bytes on the wire",
                     a.log()), a.log()[-2000:]
    assert stats["payload_bytes"] < full_payload, "the last attempt resent durable blobs"
    assert b.snapshots() == ["site-a/vm1@s1"]
    replica = tmp_path / "replica.img"
    b.cli("snapshot", "export", "site-a/vm1@s1", replica)
    assert_same_file(replica, image)


# -- peers that are not who they must be --------------------------------------------------------


async def _post(port: int, context: ssl.SSLContext, path: str, data: bytes | None = None,
                json_body: Any = None) -> tuple[int, dict[str, Any]]:
    url = f"https://{HOST}:{port}{PREFIX}{path}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http, \
            http.post(url, data=data, json=json_body, server_hostname="site-b") as resp:
        body = await resp.read()
    try:
        return resp.status, json.loads(body)
    except ValueError:
        return resp.status, {"raw": body[:200].decode(errors="replace")}


def post(port: int, context: ssl.SSLContext, path: str, data: bytes | None = None,
         json_body: Any = None) -> tuple[int, dict[str, Any]]:
    return asyncio.run(_post(port, context, path, data, json_body))


def tls_client(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A TLS 1.3 client that trusts ``ca`` and presents ``cert`` (or no certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_verify_locations(cafile=ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


def new_log(site: Site, since: int) -> str:
    return site.log()[since:]


def wait_for_log(site: Site, since: int, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in (log := new_log(site, since)):
            return log
        time.sleep(0.05)
    raise AssertionError(f"{site.name} did not log {text!r}; it logged:\n{new_log(site, since)}")


def test_peers_with_wrong_or_missing_certificates_are_refused_and_logged(
        two_sites: Sites) -> None:
    a, b = two_sites["site-a"], two_sites["site-b"]
    session = {"version": protocol.VERSION, "volume": "vm1", "snapshot": "s1", "root": "00" * 32}
    other_cert, other_key = two_sites.issue("site-a", two_sites.other_ca())
    stranger_cert, stranger_key = two_sites.issue("site-c")

    # The client itself works: the right certificate reaches the API.
    status, body = post(b.port, client_context(a.cert, a.key, a.ca), "/sessions",
                        json_body=session)
    assert status == 200 and body["session"], body

    cases = [
        ("a certificate from another CA", tls_client(b.ca, other_cert, other_key),
         "refused TLS connection", "certificate rejected"),
        ("no certificate", tls_client(b.ca), "refused TLS connection", "no client certificate"),
    ]
    for what, context, logged, reason in cases:
        since = len(b.log())
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            post(b.port, context, "/sessions", json_body=session)
        log = wait_for_log(b, since, logged)
        assert reason in log, f"{what}: site-b logged no reason: {log}"

    since = len(b.log())
    status, body = post(b.port, tls_client(b.ca, stranger_cert, stranger_key), "/sessions",
                        json_body=session)
    assert status == 403
    assert "site-c" in body["error"] and "not a configured peer" in body["error"]
    log = wait_for_log(b, since, "rejected connection")
    assert "site-c" in log and "not a configured peer" in log

    assert b.snapshots() == []
    assert b.json("status")["sessions"] == 1  # only the session the valid client opened


def test_a_stranger_cannot_hold_connections_a_peer_can(two_sites: Sites) -> None:
    """A certificate from the CA that names no configured peer (a retired site, say) had its
    idle connections held for ever, so it could take the site's file descriptors. Now such a
    connection closes NON_PEER_SECONDS after its handshake; a peer's stays open."""
    a, b = two_sites["site-a"], two_sites["site-b"]
    stranger_cert, stranger_key = two_sites.issue("site-c")
    socks = {}
    for who, context in (("stranger", tls_client(b.ca, stranger_cert, stranger_key)),
                         ("peer", tls_client(b.ca, a.cert, a.key))):
        raw = socket.create_connection((HOST, b.port), timeout=5)
        socks[who] = context.wrap_socket(raw, server_hostname="site-b")
    try:
        since = time.monotonic()
        socks["stranger"].settimeout(listener.NON_PEER_SECONDS + 10)
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            assert socks["stranger"].recv(1) == b""  # closed by the site
        waited = time.monotonic() - since
        assert listener.NON_PEER_SECONDS - 2 < waited < listener.NON_PEER_SECONDS + 5, waited
        socks["peer"].settimeout(1)
        with pytest.raises(TimeoutError):
            socks["peer"].recv(1)  # still open, nothing to read
    finally:
        for sock in socks.values():
            sock.close()
    assert "TLS connection from" in b.log() and "site-c" in b.log()


# -- malformed sessions --------------------------------------------------------------------------


_BATCH = struct.Struct("<4sB3x")
_RECORD = struct.Struct("<BBHII32s")
_END = _RECORD.pack(protocol.KIND_END, 0, 0, 0, 0, bytes(32))


def batch(*records: bytes, version: int = protocol.VERSION) -> bytes:
    return _BATCH.pack(protocol.BATCH_MAGIC, version) + b"".join(records) + _END


def stream(*batches: bytes, end: bool = True) -> bytes:
    """A blob stream of ``batches``, with its end mark unless ``end`` is false."""
    framed = b"".join(protocol.STREAM_LENGTH.pack(len(b)) + b for b in batches)
    return framed + (protocol.STREAM_END if end else b"")


def record(data: bytes, kind: int = protocol.KIND_BLOCK, blob: bytes | None = None,
           length: int | None = None) -> bytes:
    blob = hashlib.sha256(data).digest() if blob is None else blob
    return _RECORD.pack(kind, 0, 0, len(data), len(data) if length is None else length,
                        blob) + data


def test_malformed_batches_are_refused_and_change_nothing(
        two_sites: Sites, tmp_path: Path) -> None:
    a, b = two_sites["site-a"], two_sites["site-b"]
    client = client_context(a.cert, a.key, a.ca)
    before = b.stats()
    block = random.Random(51).randbytes(BS)
    other = random.Random(52).randbytes(BS)

    def new_session() -> str:
        status, opened = post(b.port, client, "/sessions", json_body={
            "version": protocol.VERSION, "volume": "evil", "snapshot": "s1",
            "root": hashlib.sha256(b"no such root").hexdigest()})
        assert status == 200, opened
        return str(opened["session"])

    sid = new_session()
    good = record(block)
    cases = [
        ("truncated frame", stream(batch(good)[:_BATCH.size + _RECORD.size + 1000]), 400,
         "truncated"),
        ("a stream cut inside a batch", stream(batch(good))[:1000], 400,
         "truncated inside batch 0"),
        ("a stream without its end mark", stream(end=False), 400, "without its end mark"),
        ("a batch length above the limit",
         protocol.STREAM_LENGTH.pack(protocol.MAX_BATCH + 1) + batch(good), 400,
         "above the limit"),
        ("bytes after the end mark", stream() + b"\0", 400, "follow the end mark"),
        ("oversize length", stream(batch(record(block, length=protocol.MAX_PLAIN + 1))), 400,
         "above the limit"),
        ("wrong id for the data",
         stream(batch(good, record(other, blob=hashlib.sha256(b"x").digest()))),
         422, "does not match its id"),
        ("unknown protocol version", stream(batch(good, version=protocol.VERSION + 1)), 400,
         f"protocol version {protocol.VERSION + 1}"),
        ("a base page on a data block", stream(batch(_RECORD.pack(
            protocol.KIND_BLOCK, protocol.FLAG_BASE, 0, BS, BS, hashlib.sha256(block).digest())
            + bytes(32) + block)), 400, "not a tree page"),
        ("garbage", stream(random.Random(53).randbytes(4096)), 400, "magic"),
        ("a page before its children", stream(batch(good, record(
            hashlib.sha256(b"c").digest() * 4, kind=protocol.KIND_PAGE))),
         400, "pages must follow their children"),
        ("trailing bytes", stream(batch(good) + b"\0" * 7), 400,
         "follow the end-of-batch record"),
    ]
    since = len(b.log())
    for what, body, want_status, phrase in cases:
        status, answer = post(b.port, client, f"/sessions/{sid}/blobs", data=body)
        assert status == want_status, f"{what}: HTTP {status} {answer}"
        assert phrase in answer.get("error", ""), f"{what}: {answer}"
        # The refusal aborted the session: nothing more goes into it, and it holds off no gc.
        status, answer = post(b.port, client, f"/sessions/{sid}/blobs", data=stream(batch(good)))
        assert status == 503 and "unknown replication session" in answer["error"], answer
        sid = new_session()

    status, answer = post(b.port, client, f"/sessions/{sid}/have", data=b"\1" * 33)
    assert status == 400 and "multiple of 32" in answer["error"], answer
    sid = new_session()
    status, answer = post(b.port, client, f"/sessions/{sid}/commit", json_body={})
    assert status == 400 and "root" in answer["error"], answer
    sid = new_session()
    status, answer = post(b.port, client, "/sessions/0123abcd/blobs", data=stream(batch(good)))
    assert status == 503 and "unknown replication session" in answer["error"], answer

    log = new_log(b, since)
    assert log.count("rejected:") >= len(cases), log
    after = b.stats()
    for field in ("unique_bytes", "extent_bytes", "stored_bytes", "by_key_version",
                  "snapshots", "volumes"):
        assert after[field] == before[field], f"{field}: {before[field]} -> {after[field]}"
    assert b.snapshots() == []

    # A bad batch ends the stream, but the good batches before it are durable (as when the
    # connection is cut), so that a rerun does not send them again.
    status, answer = post(b.port, client, f"/sessions/{sid}/blobs", data=stream(
        batch(good), batch(record(other, blob=hashlib.sha256(b"x").digest()))))
    assert status == 422 and "does not match its id" in answer["error"], answer
    sid = new_session()
    status, answer = post(b.port, client, f"/sessions/{sid}/have",
                          data=hashlib.sha256(block).digest() + hashlib.sha256(other).digest())
    assert status == 200 and answer == {"raw": "\0\1"}, answer  # held, lacking
    assert b.snapshots() == []

    # site-b still takes a normal transfer.
    image = tmp_path / "small.img"
    mixed_image(image, seed=54, size=16 * MiB)
    a.cli("volume", "import", "small", image)
    a.cli("snapshot", "create", "small", "--name", "s1")
    stats = a.replicate("small@s1", to="site-b")
    assert stats["blocks_sent"] > 0
    out = tmp_path / "replica.img"
    b.cli("snapshot", "export", "site-a/small@s1", out)
    assert_same_file(out, image)


def page_record(page: bytes, base: bytes) -> bytes:
    """A tree-page record naming ``base`` as its base page (protocol flag bit 1)."""
    return _RECORD.pack(protocol.KIND_PAGE, protocol.FLAG_BASE, 0, len(page), len(page),
                        hashlib.sha256(page).digest()) + base + page


def test_page_naming_a_base_is_checked_where_it_differs(two_sites: Sites,
                                                        tmp_path: Path) -> None:
    """A page that names a base page the target holds is checked only where it differs from
    it, and a difference naming a blob the target lacks is still refused."""
    a, b = two_sites["site-a"], two_sites["site-b"]
    image = tmp_path / "small.img"
    mixed_image(image, seed=61, size=16 * MiB)  # 256 blocks: one leaf page, the tree's top
    a.cli("volume", "import", "small", image)
    a.cli("snapshot", "create", "small", "--name", "s1")
    a.replicate("small@s1", to="site-b")
    data = image.read_bytes()
    ids = [bytes(32) if data[o:o + BS] == bytes(BS) else hashlib.sha256(data[o:o + BS]).digest()
           for o in range(0, len(data), BS)]
    held = [i for i in ids if i != bytes(32)]
    base = hashlib.sha256(b"".join(ids)).digest()
    root = hashlib.sha256(tree.Root(1, BS, len(data), len(held), base).pack()).digest()

    client = client_context(a.cert, a.key, a.ca)
    unknown = hashlib.sha256(b"never stored").digest()

    def new_session() -> str:
        """A session of the crafted replica (a refusal ends the one it happened in)."""
        status, opened = post(b.port, client, "/sessions", json_body={
            "version": protocol.VERSION, "volume": "crafted", "snapshot": "s1",
            "root": unknown.hex(), "ask": [root.hex(), base.hex(), unknown.hex()]})
        assert status == 200, opened
        # The 'ask' folded into the opening is about roots: a page, even one held, is not
        # one.
        assert opened["lacking"] == [base.hex(), unknown.hex()]
        return str(opened["session"])

    sid = new_session()
    forged = list(ids)
    forged[3] = unknown
    status, answer = post(b.port, client, f"/sessions/{sid}/blobs",
                          data=stream(batch(page_record(b"".join(forged), base))))
    assert status == 400 and "pages must follow their children" in answer["error"], answer

    sid = new_session()
    revised = list(ids)
    revised[3], revised[4] = held[-1], bytes(32)  # a block the target holds, and a hole
    status, answer = post(b.port, client, f"/sessions/{sid}/blobs",
                          data=stream(batch(page_record(b"".join(revised), base))))
    assert status == 200 and answer["stored"] == 1, answer

    # A base the target does not hold is no help: every entry is checked.
    revised[5] = held[-2]
    status, answer = post(b.port, client, f"/sessions/{sid}/blobs",
                          data=stream(batch(page_record(b"".join(revised), unknown))))
    assert status == 200 and answer["stored"] == 1, answer
    forged[5] = held[-2]
    status, answer = post(b.port, client, f"/sessions/{sid}/blobs",
                          data=stream(batch(page_record(b"".join(forged), unknown))))
    assert status == 400 and "pages must follow their children" in answer["error"], answer


def empty_root(size: int, block_size: int = BS) -> bytes:
    """A packed snapshot root of a volume of ``size`` bytes that holds no data."""
    nblocks = -(-size // block_size)
    return tree.Root(len(tree.level_counts(nblocks)), block_size, size, 0, tree.HOLE).pack()


def group_root(*members: tuple[bytes, bytes]) -> bytes:
    """A packed group root naming ``(name, root id)`` members (names as raw bytes)."""
    body = b"".join(bytes([len(n)]) + n + r for n, r in members)
    return struct.pack("<4sB3xI", tree.GROUP_MAGIC, tree.GROUP_VERSION, len(members)) + body


def test_hand_made_sessions_that_break_the_rules_are_refused(two_sites: Sites) -> None:
    """Sessions, roots and commits a site could not have made: each is refused with an error
    that names it, nothing becomes visible, nothing is logged as an internal error (the
    fixture checks), and a real transfer still works afterwards."""
    a, b = two_sites["site-a"], two_sites["site-b"]
    client = client_context(a.cert, a.key, a.ca)

    def open_session(volume: str, root: bytes, **extra: Any) -> tuple[int, dict[str, Any]]:
        return post(b.port, client, "/sessions", json_body={
            "version": protocol.VERSION, "volume": volume, "snapshot": "s1",
            "root": hashlib.sha256(root).hexdigest()} | extra)

    def send_root(volume: str, root: bytes, kind: int = protocol.KIND_ROOT
                  ) -> tuple[int, dict[str, Any]]:
        status, opened = open_session(volume, root)
        assert status == 200, opened
        return post(b.port, client, f"/sessions/{opened['session']}/blobs",
                    data=stream(batch(record(root, kind=kind))))

    # A root for an empty volume far above the size limit (it made gc and scrub walk every
    # hole of a 4 EiB tree).
    status, answer = send_root("huge", empty_root(1 << 62))
    assert status == 400 and "claims a volume of" in answer["error"], answer
    # A root of another block size than the target store's (it made a corrupt replica).
    status, answer = send_root("small-blocks", empty_root(40 * KiB, block_size=4 * KiB))
    assert status == 409 and "4096-byte blocks" in answer["error"], answer
    # A group root naming a member that is not UTF-8.
    member = hashlib.sha256(empty_root(BS)).digest()
    status, answer = send_root("pg", group_root((b"\xff\xfe", member)),
                               kind=protocol.KIND_GROUP)
    assert status == 422 and "not UTF-8" in answer["error"], answer
    # Each refusal ended its session: none is left to hold off gc at site-b (they did, for
    # their 10 idle minutes, though no source would resume them).
    assert b.json("status")["sessions"] == 0
    assert "no blob was deleted" not in b.cli("datastore", "gc").stdout.decode()

    for extra, phrase in [
        ({"version": 3.9}, "protocol version 3.9"),
        ({"version": "3"}, "protocol version '3'"),
        ({"created": "not a date"}, "ISO 8601"),
    ]:
        status, answer = open_session("v", b"r", **extra)
        assert status == 400 and phrase in answer["error"], (extra, answer)
    for volume in ("..", "a\nb", "x" * 3000, ""):
        status, answer = open_session(volume, b"r")
        assert status == 400 and "invalid snapshot" in answer["error"], (volume, answer)
    status, answer = post(b.port, client, "/sessions",
                          data=b"[" * 100000, json_body=None)
    assert status == 400, answer

    # Two sessions for one replica with different roots: the second commit is refused.
    first, second = empty_root(BS), empty_root(2 * BS)
    sids = []
    for root in (first, second):
        status, opened = open_session("dup", root)
        assert status == 200, opened
        sids.append(opened["session"])
        status, answer = post(b.port, client, f"/sessions/{sids[-1]}/blobs",
                              data=stream(batch(record(root, kind=protocol.KIND_ROOT))))
        assert status == 200, answer
    assert post(b.port, client, f"/sessions/{sids[0]}/commit", json_body={})[0] == 200
    status, answer = post(b.port, client, f"/sessions/{sids[1]}/commit", json_body={})
    assert status == 409 and "with different content" in answer["error"], answer

    assert b.snapshots() == ["site-a/dup@s1"]
    stats = b.stats()
    a.cli("volume", "create", "real", "--size", "1MiB")
    a.cli("volume", "write", "real", "-", input=b"R" * 65536)
    a.cli("snapshot", "create", "real", "--name", "s1")
    assert a.replicate("real@s1", to="site-b")["replica"] == "site-a/real@s1"
    assert b.stats()["logical_bytes"] > stats["logical_bytes"]


def test_one_peer_cannot_hold_every_session(two_sites: Sites) -> None:
    """Unfinished sessions are limited per peer, and the limit is a transient error (503) that
    the sender retries, not a protocol error."""
    a, b = two_sites["site-a"], two_sites["site-b"]
    client = client_context(a.cert, a.key, a.ca)
    for k in range(MAX_SESSIONS):
        status, answer = post(b.port, client, "/sessions", json_body={
            "version": protocol.VERSION, "volume": "v", "snapshot": f"s{k}",
            "root": "11" * 32})
        assert status == 200, answer
    status, answer = post(b.port, client, "/sessions", json_body={
        "version": protocol.VERSION, "volume": "v", "snapshot": "one-more", "root": "11" * 32})
    assert status == 503 and "site site-a has 64 replication sessions open" in answer["error"]


def test_malformed_ask_in_the_session_opening_is_refused(two_sites: Sites) -> None:
    a, b = two_sites["site-a"], two_sites["site-b"]
    client = client_context(a.cert, a.key, a.ca)
    cases: list[tuple[Any, str]] = [
        ("0" * 64, "must be a list"),
        (["zz" * 32], "not a hex id"),
        (["00" * 31], "not 32 bytes"),
        (["00" * 32] * (protocol.MAX_ASK + 1), f"at most {protocol.MAX_ASK}"),
    ]
    for ask, phrase in cases:
        status, answer = post(b.port, client, "/sessions", json_body={
            "version": protocol.VERSION, "volume": "v", "snapshot": "s1", "root": "11" * 32,
            "ask": ask})
        assert status == 400 and phrase in answer["error"], (ask, answer)


def test_gc_keeps_a_replica_whose_new_top_page_stands_above_no_new_leaf(
        two_sites: Sites, tmp_path: Path) -> None:
    """A 40 MiB volume (two leaves) whose second leaf becomes all zeros between two replicas:
    the second replica's top page is new, but nothing under it is. gc at the target deleted
    that page, destroying the committed replica; at the source it deleted the snapshot's page
    once the volume moved on, and incrementals from that snapshot failed. Both now survive gc,
    and the next incremental works."""
    a, b = two_sites["site-a"], two_sites["site-b"]
    size = 40 * MiB
    a.cli("volume", "create", "v", "--size", str(size))
    rng = random.Random(40)
    head, tail = rng.randbytes(BS), rng.randbytes(BS)
    for offset, data in ((0, head), (33 * MiB, tail)):
        a.cli("volume", "write", "v", "--offset", str(offset), "-", input=data)
    a.cli("snapshot", "create", "v", "--name", "s1")
    a.replicate("v@s1", "site-b")
    a.cli("volume", "write", "v", "--offset", str(33 * MiB), "-", input=bytes(BS))
    a.cli("snapshot", "create", "v", "--name", "s2")
    a.replicate("v@s2", "site-b")
    want = head + bytes(size - BS)
    b.cli("datastore", "gc")
    assert b.cli("snapshot", "read", "site-a/v@s2", "--length", str(size)).stdout == want
    a.cli("volume", "write", "v", "--offset", str(BS), "-", input=head)
    a.cli("snapshot", "create", "v", "--name", "s3")
    a.cli("datastore", "gc")
    assert a.cli("snapshot", "read", "v@s2", "--length", str(size)).stdout == want
    a.replicate("v@s3", "site-b")
    assert b.cli("snapshot", "read", "site-a/v@s3", "--length", str(2 * BS)).stdout == head * 2
    for site in (a, b):
        assert b"clean" in site.cli("datastore", "scrub").stdout


def test_a_server_whose_certificate_is_for_another_site_is_refused(tmp_path: Path) -> None:
    """site-x's certificate, from the same CA, also lists "site-b" as a host name, and site-a's
    peers point site-b at site-x's address (a wrong URL, or traffic redirected): the TLS host
    check passed, and site-a sent its snapshot to site-x. Now site-a checks whose certificate
    it is, and refuses before sending any block."""
    with Sites(tmp_path / "sites") as sites:
        a, b, x = sites.add_many("site-a", "site-b", "site-x")
        x.cert.unlink()
        x.key.unlink()
        dvx("pki", "issue-site", sites.pki, "site-x", "--host", "127.0.0.1", "--host", "site-b")
        a.peers = {"site-b": x.url}
        a.write_config()
        x.peers = {"site-a": a.url}
        x.write_config()
        sites.start("site-a", "site-x")
        a.cli("volume", "create", "vm1", "--size", "1MiB")
        a.cli("volume", "write", "vm1", "-", input=b"secret" * 1000)
        a.cli("snapshot", "create", "vm1", "--name", "s1")
        refused = a.cli("replicate", "vm1@s1", "--to", "site-b", check=False)
        assert refused.returncode == 2, refused.stderr
        assert b"a certificate for site 'site-x', not for site 'site-b'" in refused.stderr, \
            refused.stderr
        assert x.snapshots() == []
        assert x.stats()["unique_bytes"] == 0
