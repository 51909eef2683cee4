"""The sender's batching and streams: a transfer's first batch is small and each next one
twice the last, up to ``BATCH_PAYLOAD``; every record reaches the queue once, in order; the
batches go out as bounded blob streams that carry each batch once, in order."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import struct
import time
from pathlib import Path

import aiohttp
import pytest

from dvx_dr.errors import TransientError
from dvx_dr.replicator import protocol
from dvx_dr.replicator.peer import PeerClient
from dvx_dr.replicator.pki import init_ca, issue_site
from dvx_dr.replicator.sender import (
    BATCH_PAYLOAD,
    FIRST_BATCH,
    TransferStats,
    _Batcher,
    _Streamer,
)
from dvx_dr.replicator.tls import client_context, server_context
from dvx_dr.site.blobs import Payload

PAYLOAD = 64 * 1024


def test_batches_start_small_and_double_up_to_the_most() -> None:
    blocks = [hashlib.sha256(str(i).encode()).digest() * (PAYLOAD // 32) for i in range(600)]

    async def run() -> list[bytes]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        batcher = _Batcher(queue, TransferStats("vm1@s", "site-b"))
        for block in blocks:
            await batcher.add(protocol.KIND_BLOCK,
                              Payload(hashlib.sha256(block).digest(), False, block, len(block)))
        await batcher.flush()
        return [b for _ in range(queue.qsize()) if (b := queue.get_nowait()) is not None]

    bodies = asyncio.run(run())
    batches = [protocol.decode_batch(body) for body in bodies]
    sizes = [sum(len(r.payload) for r in batch) for batch in batches]
    limit, expected = FIRST_BATCH, []
    left = len(blocks) * PAYLOAD
    while left > 0:
        expected.append(min(limit, left))
        left -= limit
        limit = min(2 * limit, BATCH_PAYLOAD)
    assert sizes == expected
    assert sizes[0] == FIRST_BATCH and max(sizes) == BATCH_PAYLOAD
    sent = [r.payload for batch in batches for r in batch]
    assert sent == blocks


def streams_of(batches: list[bytes]) -> tuple[list[bytes], TransferStats]:
    """The request bodies a streamer makes of ``batches`` queued by a producer that is done."""
    stats = TransferStats("vm1@s", "site-b")

    async def run() -> list[bytes]:
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        for b in [*batches, None]:
            queue.put_nowait(b)
        streamer = _Streamer(queue, stats, time.monotonic(), None, None, lambda: None)
        bodies = []
        while (body := await streamer.next_stream()) is not None:
            bodies.append(b"".join([bytes(piece) async for piece in body]))
        return bodies

    return asyncio.run(run()), stats


def read(body: bytes) -> list[bytes]:
    async def run() -> list[bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(body)
        reader.feed_eof()
        return [b async for b in protocol.read_stream(reader)]

    return asyncio.run(run())


def test_streams_end_at_their_bound_and_carry_every_batch_once_in_order(
        monkeypatch: pytest.MonkeyPatch) -> None:
    batches = [protocol.encode_batch([protocol.Record(
        protocol.KIND_BLOCK, False, PAYLOAD, hashlib.sha256(block).digest(), block)])
        for block in (bytes([i]) * PAYLOAD for i in range(10))]
    monkeypatch.setattr(protocol, "STREAM_BYTES", 3 * len(batches[0]))
    bodies, stats = streams_of(batches)
    streams = [read(body) for body in bodies]
    assert [len(s) for s in streams] == [3, 3, 3, 1]
    assert [b for s in streams for b in s] == batches
    assert stats.bytes_on_wire == sum(len(body) for body in bodies)


def test_no_stream_when_there_is_nothing_to_send() -> None:
    assert streams_of([]) == ([], TransferStats("vm1@s", "site-b"))


def test_a_target_that_dies_mid_batch_is_noticed_before_asyncio_logs_failed_writes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A TLS target reads the start of a stream carrying one 8 MiB batch, then its connection
    is reset. The streamer gives the event loop a turn every few pieces, so the lost
    connection ends the request before asyncio's "socket.send() raised exception" warning,
    which it logs from the fifth write after the loss (a batch is 128 pieces)."""
    ca = tmp_path / "ca"
    init_ca(ca)
    certs = {site: issue_site(ca, site, ["127.0.0.1"]) for site in ("site-a", "site-b")}
    batch = protocol.encode_batch([protocol.Record(
        protocol.KIND_BLOCK, False, 1024 * 1024, hashlib.sha256(block).digest(), block)
        for block in (bytes([i]) * (1024 * 1024) for i in range(8))])

    async def run() -> BaseException | None:
        async def target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(256 * 1024)
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()  # with SO_LINGER 0: a reset, as when a process dies

        server = await asyncio.start_server(
            target, "127.0.0.1", 0, ssl=server_context(*certs["site-b"], ca / "ca.crt"))
        port = server.sockets[0].getsockname()[1]
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        for b in (batch, None):
            queue.put_nowait(b)
        streamer = _Streamer(queue, TransferStats("vm1@s", "site-b"), time.monotonic(),
                             None, None, lambda: None)
        context = client_context(*certs["site-a"], ca / "ca.crt")
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as http:
            peer = PeerClient(http, "site-b", f"https://127.0.0.1:{port}")
            body = await streamer.next_stream()
            assert body is not None
            try:
                await peer.request("/sessions/s/blobs", data=body)
            except TransientError as exc:
                return exc
            finally:
                server.close()
        return None

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        failure = asyncio.run(run())
    assert isinstance(failure, TransientError)
    assert not [r for r in caplog.records if "socket.send() raised" in r.getMessage()]
