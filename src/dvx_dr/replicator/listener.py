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


#: Seconds a connection whose certificate names no configured peer stays open: long enough
#: for one request to get its "not a configured peer" answer, so that the other site's
#: operator reads the reason, but a stranger cannot hold connections (file descriptors).
NON_PEER_SECONDS = 10.0


class _LoggingTLSProtocol(sslproto.SSLProtocol):
    check: Callable[[ssl.SSLObject], object] | None = None

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        transport = self._transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        if handshake_exc is not None:
            log.warning("refused TLS connection from %s: %s", peer,
                        describe_handshake_error(handshake_exc))
        elif self.check is not None and (ssl_object := getattr(self, "_sslobj", None)):
            try:
                self.check(ssl_object)
            except Exception as exc:
                log.warning("TLS connection from %s: %s; it is closed in %.0f s", peer, exc,
                            NON_PEER_SECONDS)
                if transport is not None:
                    self._loop.call_later(NON_PEER_SECONDS, transport.close)
        super()._on_handshake_complete(handshake_exc)


async def start(factory: Callable[[], asyncio.Protocol], host: str, port: int,
                context: ssl.SSLContext,
                check: Callable[[ssl.SSLObject], object] | None = None) -> asyncio.Server:
    """Listen on ``host:port``; each connection is TLS-wrapped around ``factory()``. A
    connection whose peer ``check`` refuses (it raises) is closed ``NON_PEER_SECONDS`` after
    its handshake."""
    loop = asyncio.get_running_loop()

    def protocol() -> asyncio.BaseProtocol:
        tls = _LoggingTLSProtocol(loop, factory(), context, None,  # type: ignore[arg-type]
                                  server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        tls.check = check
        return tls

    return await loop.create_server(protocol, host, port, reuse_address=True)
