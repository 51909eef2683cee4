"""HTTPS requests from one site to a peer.

The peer's identity is checked twice. TLS itself refuses a server whose certificate comes
from another CA or does not carry the peer's *site name* as a DNS name (the request goes out
with SNI and host-name verification set to it; see ``pki``). Then each new connection is
refused, before any request goes out on it, unless the certificate is *for* that site
(``SiteCheckingConnector``): a certificate of the same CA could list another site's name as
a host name.

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
from dvx_dr.replicator.tls import PeerRejected, peer_site_from_ssl_object

T = TypeVar("T")
PREFIX = "/v1/replication"


class SiteCheckingConnector(aiohttp.TCPConnector):
    """aiohttp's connector, checking each new connection right after its TLS handshake and
    before any request goes out on it: the server's certificate must be *for* the site the
    request is addressed to (``server_hostname``), that is its dvx-dr URI (or common name)
    must name it, as the receiving side checks its clients. TLS itself checked only that the
    certificate lists the site's name as a host name, which a certificate of the same CA for
    another site may do too. (``_create_connection`` is the connector's hook for making a
    connection.) aiohttp 3.14.5 or later is required: earlier versions pooled connections by
    address alone, so a request for one site could go out on a connection checked as another's
    when two peers share an address (a mistyped URL, a proxy in front of several sites)."""

    async def _create_connection(self, req: Any, traces: Any, timeout: Any) -> Any:
        proto = await super()._create_connection(req, traces, timeout)
        expected = req.server_hostname
        if expected is not None:
            transport = proto.transport
            ssl_object = transport.get_extra_info("ssl_object") if transport else None
            name = peer_site_from_ssl_object(ssl_object) if ssl_object is not None else None
            if name != expected:
                proto.close()
                raise PeerRejected(
                    f"the server at {req.url.origin()} presented a certificate for "
                    f"{'site ' + repr(name) if name else 'no dvx-dr site'}, not for site "
                    f"{expected!r}; check the peers in site.yaml")
        return proto


class PeerRemoved(UserError):
    """A reload took the peer out of site.yaml, or gave it another URL, during a transfer."""


class PeerClient:
    """Requests to one peer site at one URL. ``configured``, when given, returns the URL the
    site's running configuration has for the peer now: once a reload removed the peer or
    gave it another URL, no further request goes to this one (``PeerRemoved``)."""

    def __init__(self, http: aiohttp.ClientSession, site: str, url: str,
                 configured: Callable[[], str | None] | None = None) -> None:
        self.http = http
        self.site = site
        self.url = url.rstrip("/")
        self._configured = configured

    def ensure_configured(self) -> None:
        """Raise ``PeerRemoved`` once a reload removed the peer or gave it another URL."""
        now = self._configured() if self._configured is not None else self.url
        if now is None or now.rstrip("/") != self.url:
            raise PeerRemoved(f"site {self.site} at {self.url} is no longer a peer in the "
                              "site's configuration (it was reloaded); the transfer to it "
                              "stopped")

    async def request(self, path: str, data: bytes | AsyncIterable[bytes | memoryview] | None
                      = None, json_body: Any = None) -> bytes:
        """POST ``data`` (bytes, or a stream of pieces sent with chunked encoding) or
        ``json_body``; the answer's body."""
        self.ensure_configured()
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
            self.ensure_configured()  # a stream that stopped because the peer was removed
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
