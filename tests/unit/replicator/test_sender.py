"""The sender's batching: a transfer's first request is small and each next one twice the
last, up to ``BATCH_PAYLOAD``, and every record reaches the queue once, in order."""

from __future__ import annotations

import asyncio
import hashlib

from dvx_dr.replicator import protocol
from dvx_dr.replicator.sender import BATCH_PAYLOAD, FIRST_BATCH, TransferStats, _Batcher
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
