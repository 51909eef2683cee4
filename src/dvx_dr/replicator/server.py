"""``dvx-dr site serve``: one aiohttp process per site.

Two listeners share one ``SiteService``:

- the **peer API** (``/v1/replication/...``, see ``protocol``) on the configured address, HTTPS
  with mutual TLS 1.3; every request's client certificate must name a configured peer site;
- the **admin socket** (``admin``, JSON lines, see ``adminwire``; a Unix socket, mode 0600)
  through which ``dvx-dr`` commands reach the running site: named store operations
  (``site.ops``), one-shot replication with progress, status, metrics and reload.

The store is opened once and touched only from the store thread (``storethread``). SIGTERM
stops accepting work, cancels transfers in flight (they resume by rerunning: durable blobs are
not sent again) and closes the store; SIGHUP reloads ``site.yaml``'s peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc as pygc
import itertools
import json
import logging
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from dvx_dr.errors import (
    DvxError,
    IntegrityError,
    KeysDestroyedError,
    NotFoundError,
    ProtocolError,
    StoreFullError,
    StoreLockedError,
    TransientError,
    UserError,
)
from dvx_dr.replicator import admin, listener, protocol
from dvx_dr.replicator.peer import PeerClient, SiteCheckingConnector, with_retries
from dvx_dr.replicator.receiver import CheckedBatch, Receiver
from dvx_dr.replicator.scheduler import Scheduler
from dvx_dr.replicator.sender import TransferStats, send_group, send_snapshot
from dvx_dr.replicator.storethread import StoreThread
from dvx_dr.replicator.tls import (
    EXPIRY_WARNING_DAYS,
    PeerRejected,
    certificate_ends,
    check_own_certificate,
    check_peer,
    client_context,
    server_context,
)
from dvx_dr.site.config import SiteConfig, load_site_config
from dvx_dr.site.store import PasswordSource, Store

log = logging.getLogger("dvx_dr.site")


class SiteService:
    """Everything a running site holds: config, store thread, receiver, peer sessions."""

    def __init__(self, config: SiteConfig, config_path: Path | None, store: Store) -> None:
        self.config = config
        self.config_path = config_path
        self.store = StoreThread(store)
        self.receiver = Receiver(store)
        self.http: aiohttp.ClientSession | None = None
        self.transfers: dict[int, dict[str, Any]] = {}
        self._transfer_ids = itertools.count(1)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.started = time.time()
        self.scheduler = Scheduler(self)
        # The TLS files stay until a restart (a reload keeps them), so their end dates too.
        self.certificate_ends = certificate_ends(config.tls.cert, config.tls.ca)

    def peer(self, site: str) -> PeerClient:
        url = self.config.peers.get(site)
        if url is None:
            known = ", ".join(sorted(self.config.peers)) or "none"
            where = self.config_path or "the site configuration"
            raise UserError(f"unknown site {site!r}: not a peer in {where} (configured: {known})")
        assert self.http is not None
        return PeerClient(self.http, site, url, configured=lambda: self.config.peers.get(site))

    async def start_http(self, context: ssl.SSLContext) -> None:
        """The client session for requests to peers, over TLS ``context``."""
        self.http = aiohttp.ClientSession(
            connector=SiteCheckingConnector(ssl=context, limit=16),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=300),
        )

    def check_transfer(self, target: str) -> PeerClient:
        """The peer a transfer to ``target`` would use; raises what would refuse it now (a
        locked store, a site that is not a peer)."""
        if (refused := self.store.store.refusal()) is not None:
            raise refused
        return self.peer(target)

    async def replicate(self, spec: str, target: str,
                        progress: Callable[[TransferStats], None] | None = None,
                        attempts: int = 8, group: bool = False,
                        retrying: Callable[[dict[str, Any]], None] | None = None
                        ) -> TransferStats:
        """Replicate a volume snapshot (VOLUME@NAME) or, with ``group``, a group snapshot
        (PG@NAME), retrying transient failures with backoff; ``retrying`` is told of each
        failed attempt before its wait."""
        peer = self.check_transfer(target)
        label = f"{spec} -> {target}"
        # Keyed by transfer, not by snapshot and target: two commands may send the same
        # snapshot to the same site at once, and each reports (and ends) its own.
        key = next(self._transfer_ids)
        self.transfers[key] = {"snapshot": spec, "target": target, "started": time.time(),
                               "attempt": 1, "last_error": None}

        def on_retry(n: int, delay: float, exc: TransientError) -> None:
            log.warning("transfer %s: attempt %d failed (%s); retrying in %.1fs", label, n,
                        exc, delay)
            self.transfers[key].update(attempt=n + 1, last_error=str(exc))
            if retrying:
                retrying({"attempt": n, "attempts": attempts, "error": str(exc),
                          "delay": round(delay, 1)})

        pg, _, name = spec.rpartition("@")

        def attempt() -> Awaitable[TransferStats]:
            if group:
                return send_group(self.store, peer, pg, name, progress)
            return send_snapshot(self.store, peer, spec, progress)

        # A group snapshot sent by hand is kept from local retention like a scheduled one.
        sending = self.scheduler.sending(pg, name) if group else contextlib.nullcontext()
        # The outcome is logged here as the scheduler logs its own: the command that asked
        # may be gone, and the log is where an operator looks afterwards.
        try:
            with sending:
                stats = await with_retries(attempt, attempts=attempts, on_retry=on_retry)
        except asyncio.CancelledError:
            log.info("transfer %s: stopped (the command went away or the site is stopping)",
                     label)
            raise
        except DvxError as exc:
            log.warning("transfer %s failed (attempt %d): %s", label,
                        self.transfers[key]["attempt"], exc)
            raise
        finally:
            self.transfers.pop(key, None)
        log.info("transfer %s: %s (%d bytes on the wire, %d skipped, %.2fs)", label,
                 "already replicated" if stats.already_replicated else "replicated",
                 stats.bytes_on_wire, stats.bytes_skipped, stats.seconds)
        return stats

    def status(self) -> dict[str, Any]:
        return {"site": self.config.name, "pid": os.getpid(), "started": self.started,
                "locked": self.store.store.locked,
                "keys_destroyed": isinstance(self.store.store.refusal(), KeysDestroyedError),
                "peers": dict(self.config.peers),
                "transfers": list(self.transfers.values()),
                "sessions": len(self.receiver.sessions), "tls": self.tls_status()
                } | self.scheduler.report()

    def tls_status(self) -> dict[str, Any]:
        """When the site's certificate and its CA's end, and the days left until the first
        of them (peers refuse the site from then on)."""
        ends = self.certificate_ends
        first = min(ends.values())
        return {"certificate_ends": ends["site"].isoformat(), "ca_ends": ends["ca"].isoformat(),
                "days_left": (first - dt.datetime.now(dt.UTC)).days,
                "warning_days": EXPIRY_WARNING_DAYS}

    def metrics(self) -> str:
        """The Prometheus text: the scheduler's metrics and the TLS certificates' ends."""
        lines = ["# HELP dvx_dr_tls_certificate_end_timestamp_seconds Unix time from which "
                 "the certificate is no longer valid (peers refuse the site).",
                 "# TYPE dvx_dr_tls_certificate_end_timestamp_seconds gauge"]
        lines += [f'dvx_dr_tls_certificate_end_timestamp_seconds{{certificate="{which}"}} '
                  f"{end.timestamp():.0f}" for which, end in self.certificate_ends.items()]
        return self.scheduler.metrics() + "\n".join(lines) + "\n"

    async def reload(self) -> dict[str, Any]:
        """SIGHUP: re-read site.yaml (peers, policy directory) and the policies."""
        if self.config_path is not None:
            try:
                new = load_site_config(self.config_path)
            except DvxError as exc:
                log.error("reload failed, keeping the running configuration: %s", exc)
                return {"loaded": sorted(self.scheduler.policies), "errors": [str(exc)]}
            removed = set(self.config.peers) - set(new.peers)
            self._apply_config(new)
            # Transfers from here to a removed (or moved) peer stop at their next request
            # (PeerClient); transfers from it here lose their sessions, and with them the
            # pins that held gc off.
            for site in sorted(removed):
                dropped = await self.store.run(self.receiver.drop_source, site)
                log.info("site %s is no longer a peer: %d of its replication sessions here "
                         "dropped", site, dropped)
        return await self.scheduler.load()

    def _apply_config(self, new: SiteConfig) -> None:
        # What the running site holds open or was started as stays until a restart: its
        # name, store, listen address, admin socket and TLS files (the TLS contexts are
        # built once; a reload that reported them applied would mislead).
        kept = ("name", "store", "listen", "admin_socket", "tls")
        changed = [field for field in kept if getattr(new, field) != getattr(self.config, field)]
        if changed:
            log.warning("reload: changes to %s need a restart; applying the rest",
                        ", ".join(changed))
        self.config = new.model_copy(update={field: getattr(self.config, field)
                                             for field in kept})
        log.info("configuration reloaded: peers %s", ", ".join(self.config.peers) or "none")


def _reload_in_background(service: SiteService) -> None:
    task = asyncio.get_running_loop().create_task(service.reload())
    service.tasks.add(task)
    task.add_done_callback(service.tasks.discard)


SERVICE = web.AppKey("service", SiteService)

# -- errors -----------------------------------------------------------------------------


#: HTTP status per error class; the first match wins, so subclasses come before bases.
_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (PeerRejected, 403),
    (StoreLockedError, 423),
    (ProtocolError, 400),
    (NotFoundError, 404),
    (IntegrityError, 422),
    (UserError, 409),
    (TransientError, 503),
)


def error_response(exc: BaseException) -> web.Response:
    status = next((code for cls, code in _STATUS if isinstance(exc, cls)), 500)
    code = exc.exit_code if isinstance(exc, DvxError) else 1
    return web.json_response({"error": str(exc) or exc.__class__.__name__, "exit_code": code},
                             status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except DvxError as exc:
        peer = request.get("peer") or (
            request.transport.get_extra_info("peername") if request.transport else None)
        serious = isinstance(exc, ProtocolError | IntegrityError | StoreFullError)
        log.log(logging.WARNING if serious else logging.INFO, "%s %s from %s rejected: %s",
                request.method, request.path, peer, exc)
        if isinstance(exc, ProtocolError | IntegrityError):
            # A rejected batch's records and plaintexts stay reachable through the cycles of
            # the exception, its traceback and the worker pool's futures until the cyclic
            # collector runs: up to gigabytes if a peer keeps sending bad batches.
            pygc.collect()
        return error_response(exc)
    except (ConnectionResetError, aiohttp.ClientPayloadError) as exc:
        # The peer went away mid-request (a cut link, a killed process): nothing was
        # committed from this request, and the sender retries.
        log.warning("%s %s: the peer disconnected mid-request (%s)", request.method,
                    request.path, exc.__class__.__name__)
        return error_response(TransientError("the peer disconnected mid-request"))
    except Exception as exc:  # a bug: log it whole, answer 500
        log.exception("%s %s failed", request.method, request.path)
        return error_response(exc)


@web.middleware
async def peer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    service = request.app[SERVICE]
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    try:
        request["peer"] = check_peer(ssl_object, set(service.config.peers))
    except PeerRejected as exc:
        peername = request.transport.get_extra_info("peername") if request.transport else None
        log.warning("rejected connection from %s: %s", peername, exc)
        return error_response(exc)
    refused = service.store.store.refusal()
    if isinstance(refused, StoreLockedError):
        return error_response(StoreLockedError(
            f"site {service.config.name} is locked: its operator must unlock it first"))
    if refused is not None:
        return error_response(KeysDestroyedError(
            f"site {service.config.name} had its keys crypto-erased: it takes no replicas"))
    return await handler(request)


# -- peer API -------------------------------------------------------------------------------


#: Seconds a peer has to send a whole request body (sessions, have, retention; a blob stream
#: has its own idle limit). aiohttp puts no limit on a body in progress: a peer that stops
#: halfway would hold its connection and buffer for ever.
BODY_SECONDS = 60.0
#: Seconds between requests before an idle peer connection is closed.
KEEPALIVE_SECONDS = 75.0
#: Seconds a stopping site gives a peer's request in progress to end, and then again to
#: unwind once cancelled. A commit ends well within it; a blob stream still coming in is
#: cancelled (the source's retry resends only what was not durable). aiohttp's default of 60 s
#: kept a target told to stop for a minute, its source hearing nothing all that time.
PEER_SHUTDOWN_SECONDS = 3.0


async def _body(request: web.Request) -> bytes:
    try:
        async with asyncio.timeout(BODY_SECONDS):
            return await request.read()
    except TimeoutError:
        raise ProtocolError(f"the request body did not arrive within {BODY_SECONDS:.0f} s"
                            ) from None


async def _json_object(request: web.Request, what: str) -> dict[str, Any]:
    """The request's body, which must be a JSON object (``what`` names the request)."""
    raw = await _body(request)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json parses
        raise ProtocolError(f"{what} is not JSON (or is nested too deeply)") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return body


async def open_session(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body = await _json_object(request, "session request")
    result = await service.store.run(service.receiver.open, request["peer"], body)
    return web.json_response(result)


@contextlib.asynccontextmanager
async def _session_step(request: web.Request, sid: str) -> AsyncIterator[None]:
    """A request of session ``sid``: its pin cannot lapse meanwhile (``Store.pin_busy``), and
    a refusal (any error but a passing one) aborts the session: the source's next attempt
    opens a new one, and this one would hold off gc here until it lapsed."""
    service = request.app[SERVICE]
    with service.store.store.pin_busy(sid):
        try:
            yield
        except TransientError:
            raise
        except DvxError:
            with contextlib.suppress(DvxError):  # the refusal is what the peer hears
                await service.store.run(service.receiver.end, request["peer"], sid)
            raise


async def have(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    sid = request.match_info["sid"]
    async with _session_step(request, sid):
        body = await _body(request)
        level = protocol.decode_level(request.query.get("level"))
        answer = await service.store.run(service.receiver.have, request["peer"], sid, body,
                                         level)
    return web.Response(body=answer, content_type="application/octet-stream")


async def blobs(request: web.Request) -> web.Response:
    """A blob stream (``protocol``): each batch is stored in the store thread while the next
    one is read off the connection and checked against its ids in the worker pool (which
    needs no store), so at most two batches are in memory. Checking had waited for the
    store thread: on a target that decompresses and hashes every block it receives, it is
    half the work."""
    service = request.app[SERVICE]
    receiver = service.receiver
    sid = request.match_info["sid"]
    totals = {"stored": 0, "bytes": 0}
    storing: asyncio.Future[dict[str, int]] | None = None
    checking: asyncio.Future[CheckedBatch] | None = None
    loop = asyncio.get_running_loop()

    async def stored() -> None:
        assert storing is not None
        for key, value in (await storing).items():
            totals[key] += value

    async def store(checking: asyncio.Future[CheckedBatch]) -> dict[str, int]:
        checked = await checking
        return await service.store.run(receiver.receive, request["peer"], sid, checked)

    # An unknown session is refused before anything of the stream is read.
    await service.store.run(receiver.session, request["peer"], sid)
    async with _session_step(request, sid):
        try:
            async for batch in protocol.read_stream(request.content):
                # Not the store's pool: checking fans out to it, and waiting there for it
                # could take both of its threads.
                checking = loop.run_in_executor(None, receiver.check_batch, batch)
                if storing is not None:
                    await stored()
                storing = asyncio.ensure_future(store(checking))
            if storing is not None:
                await stored()
        finally:
            # A batch the store thread has taken is finished there whatever happens here;
            # wait for it, so that the session stays pinned until it is. When the stream
            # broke first, that error is the one reported.
            if storing is not None:
                await asyncio.wait([storing])
                if not storing.cancelled():
                    storing.exception()
            if checking is not None:  # a batch checked after the stream broke: its error
                checking.add_done_callback(_consumed)  # is not the one reported
    return web.json_response(totals)


def _consumed(future: asyncio.Future[Any]) -> None:
    """Retrieve a future's error, that no one else will report, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()


async def commit(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    sid = request.match_info["sid"]
    async with _session_step(request, sid):
        result = await service.store.run(service.receiver.commit, request["peer"], sid)
    return web.json_response(result)


async def retention(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    body = await _json_object(request, "retention request")
    result = await service.store.run(service.receiver.retention, request["peer"], body)
    return web.json_response(result)


def create_app(service: SiteService) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, peer_middleware],
                          client_max_size=1024 * 1024)  # the blob stream is read as a stream
    app[SERVICE] = service
    p = "/v1/replication"
    app.router.add_routes([
        web.post(f"{p}/sessions", open_session),
        web.post(f"{p}/sessions/{{sid}}/have", have),
        web.post(f"{p}/sessions/{{sid}}/blobs", blobs),
        web.post(f"{p}/sessions/{{sid}}/commit", commit),
        web.post(f"{p}/retention", retention),
    ])
    return app


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics`` on ``metrics_listen``, for Prometheus."""
    return web.Response(text=request.app[SERVICE].metrics(), content_type="text/plain")


# -- the process ----------------------------------------------------------------------------


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's handler: everything goes to asyncio's default (an ERROR in the log),
    except one known asyncio bug (CPython gh-156512, fixed upstream in 2026, not in the
    Pythons this runs on). When a TLS connection breaks while a request body is streamed,
    the socket transport calls its ``_call_connection_lost`` twice; the second call finds
    the transport already torn down and raises AttributeError. The connection is closed
    either way and the transfer retries, so this is logged as a warning."""
    handle = context.get("handle")
    callback = getattr(handle, "_callback", None)
    transport = getattr(callback, "__self__", None)
    if (isinstance(context.get("exception"), AttributeError)
            and getattr(callback, "__name__", None) == "_call_connection_lost"
            and transport is not None and getattr(transport, "_sock", True) is None):
        log.warning("a broken connection was closed twice by asyncio (CPython gh-156512); "
                    "harmless, the transfer retries")
        return
    loop.default_exception_handler(context)


async def serve(config: SiteConfig, config_path: Path | None,
                password: PasswordSource | None) -> None:
    tls = config.tls
    peer_ssl: ssl.SSLContext = server_context(tls.cert, tls.key, tls.ca)
    client_ssl = client_context(tls.cert, tls.key, tls.ca)
    check_own_certificate(peer_ssl, client_ssl, tls.cert, tls.ca, config.name)
    store = Store.open(config.store, password, startup_key=config.startup_key,
                       allow_locked=True)
    if store.site != config.name:
        store.close()
        raise UserError(f"the store at {config.store} belongs to site {store.site}, but "
                        f"{config_path or 'site.yaml'} names site {config.name}: point 'store' "
                        "at this site's own store, or fix 'name'")
    if isinstance(store.refusal(), KeysDestroyedError):
        log.warning("the store's keys were crypto-erased: serving only status")
    elif store.locked:
        log.warning("store is locked: serving only status and unlock until "
                    "'dvx-dr datastore unlock' gives the password")
    service = SiteService(config, config_path, store)
    if (days := service.tls_status()["days_left"]) < EXPIRY_WARNING_DAYS:
        log.warning("the site's TLS certificate or its CA certificate ends in %d days "
                    "(certificate %s, CA %s); peers refuse the site from then on: issue a new "
                    "one and restart", days, service.certificate_ends["site"].date(),
                    service.certificate_ends["ca"].date())
    store.announce(str(config.admin_socket))
    await service.start_http(client_ssl)
    peer_runner = web.AppRunner(create_app(service), access_log=None,
                                keepalive_timeout=KEEPALIVE_SECONDS,
                                shutdown_timeout=PEER_SHUTDOWN_SECONDS)
    listening: asyncio.Server | None = None
    admin_server = admin.AdminServer(service)
    metrics_runner: web.AppRunner | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(loop_exception_handler)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_in_background, service)
    try:
        await peer_runner.setup()
        assert peer_runner.server is not None
        listening = await listener.start(
            peer_runner.server, config.listen.host, config.listen.port, peer_ssl,
            lambda ssl_object: check_peer(ssl_object, set(service.config.peers)))
        # The policies load before the admin socket opens: a command that reaches the site
        # finds its groups there (they load off the event loop, which takes a moment).
        await service.scheduler.start()
        sock = config.admin_socket
        await admin_server.start(sock)
        if config.metrics_listen is not None:
            metrics_app = web.Application()
            metrics_app[SERVICE] = service
            metrics_app.router.add_get("/metrics", metrics)
            metrics_runner = web.AppRunner(metrics_app, access_log=None)
            await metrics_runner.setup()
            await web.TCPSite(metrics_runner, config.metrics_listen.host,
                              config.metrics_listen.port).start()
        log.info("site %s serving peers on %s, admin socket %s", config.name, config.listen,
                 sock)
        print(f"site {config.name} ready on https://{config.listen} (admin socket {sock})",
              flush=True)
        await stop.wait()
        log.info("stopping: cancelling %d transfers and reloads, finishing %d admin requests",
                 len(service.tasks), len(admin_server.connections))
    finally:
        admin_server.refuse_new()  # commands that connect now are told the site is stopping
        await service.scheduler.stop()
        for task in list(service.tasks):
            task.cancel()
        await asyncio.gather(*service.tasks, return_exceptions=True)
        await admin_server.drain()  # requests in flight answer, transfers' commands are told
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if listening is not None:
            listening.close()
        await peer_runner.cleanup()
        if service.http is not None:
            await service.http.close()
        admin_server.close()
        if admin_server.server is not None:  # this site's socket, not a file it refused
            with contextlib.suppress(FileNotFoundError):
                config.admin_socket.unlink()
        service.store.close()
