"""HTTPS requests from one site to a peer.

The peer's identity is checked by TLS itself: the request goes out with SNI and host-name
verification set to the peer's *site name*, which every site certificate carries as a DNS name
(see ``pki``), so a server whose certificate names another site, or comes from another CA, is
refused during the handshake.

Connection failures, timeouts and 5xx answers become ``TransientError`` (retried by the
caller with backoff); 4xx answers become the error the peer described.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from dvx_dr.errors import (
    IntegrityError,
    NotFoundError,
    ProtocolError,
    TransientError,
    UserError,
)
from dvx_dr.replicator.tls import PeerRejected

T = TypeVar("T")
PREFIX = "/v1/replication"


class PeerClient:
    def __init__(self, http: aiohttp.ClientSession, site: str, url: str) -> None:
        self.http = http
        self.site = site
        self.url = url.rstrip("/")

    async def request(self, path: str, data: bytes | AsyncIterable[bytes | memoryview] | None
                      = None, json_body: Any = None) -> bytes:
        """POST ``data`` (bytes, or a stream of pieces sent with chunked encoding) or
        ``json_body``; the answer's body."""
        # A large body goes to the TLS layer in 64 KiB pieces (aiohttp reads a BytesIO that
        # way, with the Content-Length known): asyncio encrypts one big write into a
        # growing memory buffer, which measured 7x slower (14 ms against 2 ms per 5 MB).
        sent = io.BytesIO(data) if isinstance(data, bytes) else data
        try:
            async with self.http.post(self.url + PREFIX + path, data=sent, json=json_body,
                                      server_hostname=self.site) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError) as exc:
            raise PeerRejected(f"site {self.site} at {self.url} failed the TLS check: "
                               f"{exc}") from None
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            raise TransientError(f"site {self.site} at {self.url} is unreachable: "
                                 f"{exc.__class__.__name__} {exc}".strip()) from None
        if status < 300:
            return body
        message = _error_text(body) or f"HTTP {status}"
        if status >= 500:
            raise TransientError(f"site {self.site} failed: {message}")
        if status == 404:
            raise NotFoundError(f"site {self.site}: {message}")
        if status == 422:
            raise IntegrityError(f"site {self.site}: {message}")
        if status == 400:
            raise ProtocolError(f"site {self.site}: {message}")
        raise UserError(f"site {self.site}: {message}")

    async def post_json(self, path: str, body: Any) -> Any:
        return json.loads(await self.request(path, json_body=body))


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:200].decode(errors="replace")


async def with_retries(
    attempt: Callable[[], Awaitable[T]],
    *,
    attempts: int = 8,
    base: float = 0.5,
    cap: float = 30.0,
    on_retry: Callable[[int, float, TransientError], None] | None = None,
) -> T:
    """Run ``attempt`` until it succeeds, retrying ``TransientError`` with full-jitter backoff."""
    for n in range(1, attempts + 1):
        try:
            return await attempt()
        except TransientError as exc:
            if n == attempts:
                raise
            delay = random.uniform(0, min(cap, base * 2 ** n))
            if on_retry:
                on_retry(n, delay, exc)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")
