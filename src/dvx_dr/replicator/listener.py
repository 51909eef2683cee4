"""The peer API's TLS listener, which logs every refused handshake with its reason.

asyncio's own TLS server drops a failed handshake silently (it logs only in debug mode), but an
operator needs to see "site X's certificate is from another CA" or "a client sent no
certificate" in the site's log. So the listener builds the TLS protocol itself, as
``loop.create_server(ssl=...)`` would, with one addition: a failed handshake is logged with
the peer address and the reason.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from asyncio import sslproto
from collections.abc import Callable

log = logging.getLogger("dvx_dr.tls")
HANDSHAKE_TIMEOUT = 30


def describe_handshake_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate rejected: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).upper()
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason or "CERTIFICATE_REQUIRED" in reason:
            return "no client certificate: peers must present their site certificate"
        if "UNSUPPORTED_PROTOCOL" in reason or "VERSION" in reason:
            return "TLS version refused: sites talk TLS 1.3 only"
        if "UNKNOWN_CA" in reason:
            return "the peer does not trust this site's CA"
        return f"TLS error: {exc.reason or exc}"
    return f"{exc.__class__.__name__}: {exc}"


class _LoggingTLSProtocol(sslproto.SSLProtocol):
    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            transport = self._transport
            peer = transport.get_extra_info("peername") if transport is not None else None
            log.warning("refused TLS connection from %s: %s", peer,
                        describe_handshake_error(handshake_exc))
        super()._on_handshake_complete(handshake_exc)


async def start(factory: Callable[[], asyncio.Protocol], host: str, port: int,
                context: ssl.SSLContext) -> asyncio.Server:
    """Listen on ``host:port``; each connection is TLS-wrapped around ``factory()``."""
    loop = asyncio.get_running_loop()

    def protocol() -> asyncio.BaseProtocol:
        return _LoggingTLSProtocol(loop, factory(), context, None,  # type: ignore[arg-type]
                                   server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)

    return await loop.create_server(protocol, host, port, reuse_address=True)
