"""The site's side of the admin socket (``adminwire``): named store operations, streamed
reads of volumes and snapshots, one-shot replication with progress, status, metrics and
reload, for ``dvx-dr`` commands on this host. The site never opens a path a command names
for writing: the command writes its output itself from the streamed read.

A request that is not a JSON object of the expected shape, or larger than
``adminwire.MAX_REQUEST``, gets an error line naming what is wrong; the site goes on serving.
Nothing after the request line is read (the connection stops reading), so a client cannot make
the site buffer more than one request.

When the site stops (SIGTERM), it stops accepting connections; transfers in flight are
cancelled by the service (their commands are told to run them again), and the requests in
flight get up to ``DRAIN_SECONDS`` to finish and answer, since a store operation that has
started runs to its end in the store thread anyway. A request still running then, or a
command that does not read its answer, is cut off.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import stat
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvx_dr.errors import DvxError, IntegrityError, TransientError, UserError
from dvx_dr.replicator import adminwire
from dvx_dr.site import ops

if TYPE_CHECKING:
    from dvx_dr.replicator.server import SiteService

log = logging.getLogger("dvx_dr.site")

#: Key-manager operations that need the startup key path from site.yaml.
_STARTUP_KEY_OPS = {"encryption.rotate_key", "encryption.set", "encryption.crypto_erase"}

#: How long a stopping site lets admin requests in flight finish (systemd's unit gives the
#: whole stop 60 s).
DRAIN_SECONDS = 30.0
#: How long a stopping site waits for a command to take (the rest of) its answer.
CLOSE_SECONDS = 3.0

#: How long a streamed ``read`` waits for its command to take the next piece before it gives
#: up: the read runs in the store thread (one instant of the volume), which other commands
#: wait for meanwhile, so a command that stops reading must not hold the site for long.
STALL_SECONDS = 60.0
#: Pieces of a streamed read waiting for the command (each at most ``BATCH_BLOCKS`` blocks).
READ_QUEUE = 2

Send = Callable[..., Awaitable[None]]


async def _listening(path: Path) -> bool:
    """Whether a process accepts connections on the Unix socket at ``path``."""
    try:
        _, writer = await asyncio.open_unix_connection(str(path))
    except OSError:
        return False
    writer.close()
    return True


class AdminServer:
    """The listening socket and its connections."""

    def __init__(self, service: SiteService) -> None:
        self.service = service
        self.server: asyncio.Server | None = None
        self.connections: set[asyncio.Task[Any]] = set()
        #: connection -> when it began waiting for its command to take an answer
        self.sending: dict[asyncio.Task[Any], float] = {}
        #: Set when the site begins to stop: a command that connects from then on is told
        #: so (exit 4, to be retried), instead of finding nothing there and being told that
        #: no site runs while this one still holds the store.
        self.stopping = False

    async def start(self, path: Path) -> None:
        """Listen on ``path`` (replacing a stale socket file), mode 0600 from the start. Any
        other file there is refused, and so is a socket another process listens on (a
        second site configured with the same path would take the first one's socket)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise UserError(f"admin_socket {path} exists and is not a socket; name another "
                                "path in site.yaml, or remove that file")
            if await _listening(path):
                raise UserError(f"admin_socket {path} belongs to a running process (another "
                                "site?); give each site its own admin_socket in site.yaml")
            path.unlink()
        old = os.umask(0o177)
        try:
            self.server = await asyncio.start_unix_server(self._connected, str(path),
                                                          limit=adminwire.MAX_REQUEST)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    def refuse_new(self) -> None:
        """Answer every command that connects from now on that the site is stopping."""
        self.stopping = True

    def close(self) -> None:
        """Accept no more connections."""
        if self.server is not None:
            self.server.close()

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Let the requests in flight finish for up to ``timeout`` seconds, then cut off the
        rest. A connection whose command has not taken an answer for ``CLOSE_SECONDS`` (a
        stopped or stuck command) is cut off at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.connections and (left := deadline - loop.time()) > 0:
            now = loop.time()
            for task, since in list(self.sending.items()):
                if now - since >= CLOSE_SECONDS:
                    task.cancel()
            await asyncio.wait(set(self.connections), timeout=min(left, 0.5))
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(*self.connections, return_exceptions=True)

    async def _connected(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            if self.stopping:
                await _refuse_stopping(self.service, reader, writer)
            else:
                await _serve_one(self.service, reader, writer, self.sending)
        except asyncio.CancelledError:
            # Cut off while closing. End normally: Python 3.11's asyncio logs a connection
            # task that ends cancelled as an error.
            writer.transport.abort()
        finally:
            self.connections.discard(task)
            self.sending.pop(task, None)


async def _refuse_stopping(service: SiteService, reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
    """Tell a command that connects while the site stops that it is stopping (exit 4). Its
    request is read first, so that the command is not cut off while still sending it."""
    try:
        with contextlib.suppress(ValueError, TimeoutError, ConnectionError):  # answered anyway
            await asyncio.wait_for(reader.readline(), CLOSE_SECONDS)
        writer.write(adminwire.encode({
            "error": f"site {service.config.name} is stopping and takes no more commands; run "
                     "the command again once it is back",
            "exit_code": TransientError.exit_code}))
        with contextlib.suppress(ConnectionError, TimeoutError):  # the command went away
            await asyncio.wait_for(writer.drain(), CLOSE_SECONDS)
    finally:
        writer.close()


async def _serve_one(service: SiteService, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, sending: dict[asyncio.Task[Any], float]
                     ) -> None:
    task = asyncio.current_task()
    assert task is not None

    async def send(message: dict[str, Any], payload: bytes = b"") -> None:
        writer.write(adminwire.encode(message))
        if payload:
            writer.write(payload)
        sending[task] = asyncio.get_running_loop().time()
        try:
            await writer.drain()
        finally:
            sending.pop(task, None)

    try:
        try:
            line = await reader.readline()
        except ValueError:  # asyncio's limit: no line end within MAX_REQUEST bytes
            await send({"error": "the admin request is larger than "
                        f"{adminwire.MAX_REQUEST} bytes", "exit_code": UserError.exit_code})
            return
        if not line:
            return  # connected and went away: nothing to answer
        if isinstance(writer.transport, asyncio.ReadTransport):
            writer.transport.pause_reading()  # one request per connection: nothing more read
        try:
            call, params = _parse(line)
            if call == "replicate":
                await _replicate(service, params, send, _command_gone(reader, writer))
            elif call == "read":
                await _read(service, params, send)
            else:
                await send({"result": await _answer(
                    service, call, params, lambda: _command_gone(reader, writer))})
        except DvxError as exc:
            if isinstance(exc, IntegrityError):
                log.warning("admin request failed: %s", exc)
            await send({"error": str(exc), "exit_code": exc.exit_code})
        except ConnectionError:
            raise
        except Exception as exc:  # a bug: log it whole, answer with exit code 1
            log.exception("admin request failed")
            # The kind of error only: its text can hold what the request carried (a
            # password, say); the site's log has the traceback.
            await send({"error": f"internal error ({exc.__class__.__name__}) in the site; its "
                                 "log has the details", "exit_code": 1})
    except ConnectionError:
        pass  # the command went away (interrupted); nothing more to tell it
    except asyncio.CancelledError:
        # The site is stopping and did not wait any longer for this request (DRAIN_SECONDS).
        # Tell the command, and end this connection's task normally: Python 3.11's asyncio
        # logs a connection task that ends cancelled as an error.
        writer.write(adminwire.encode({
            "error": f"the site stopped before this request finished (it waited "
                     f"{DRAIN_SECONDS:.0f} s); check what it did before running it again",
            "exit_code": TransientError.exit_code}))
    finally:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), CLOSE_SECONDS)
        except (ConnectionError, TimeoutError):
            writer.transport.abort()  # the command does not take its answer


def _parse(line: bytes) -> tuple[str, dict[str, Any]]:
    try:
        request = json.loads(line)
    except ValueError:
        raise UserError("the admin request is not one line of JSON (dvx-dr commands send "
                        f"{{\"v\": {adminwire.VERSION}, \"call\": ..., \"params\": {{...}}}})"
                        ) from None
    if not isinstance(request, dict):
        raise UserError("the admin request must be a JSON object")
    if request.get("v") != adminwire.VERSION:
        raise UserError(f"admin protocol version {request.get('v')!r} is not supported "
                        f"(this site speaks {adminwire.VERSION}); use the dvx-dr command of "
                        "the same version as the running site")
    call, params = request.get("call"), request.get("params", {})
    if call not in adminwire.CALLS:
        raise UserError(f"unknown admin call {call!r} (known: {', '.join(adminwire.CALLS)})")
    if not isinstance(params, dict):
        raise UserError("the admin request's 'params' must be a JSON object")
    return call, params


async def _answer(service: SiteService, call: str, params: dict[str, Any],
                  gone: Callable[[], Awaitable[None]]) -> Any:
    """The answer to a call other than ``replicate`` and ``read``. An operation that
    ``ops.STOPPABLE`` names stops when its command goes away (what ``gone()`` awaits
    returns): an import interrupted at the command (Ctrl-C) is dropped here too, as it is
    offline."""
    name = params.get("name") if call == "op" else None
    if name not in ops.STOPPABLE:
        return await _answer_now(service, call, params)
    stopped = threading.Event()
    watch = asyncio.ensure_future(gone())

    def went_away(future: asyncio.Future[None]) -> None:
        if not future.cancelled():
            stopped.set()

    watch.add_done_callback(went_away)
    try:
        return await _answer_now(service, call, params, stopped.is_set)
    except ops.CommandGone as exc:
        log.info("%s", exc)
        raise
    finally:
        watch.cancel()


async def _answer_now(service: SiteService, call: str, params: dict[str, Any],
                      stopped: Callable[[], bool] | None = None) -> Any:
    if call == "status":
        return service.status()
    if call == "metrics":
        return service.metrics()
    if call == "reload":
        return await service.reload()
    name, op_params = params.get("name"), params.get("params", {})
    if not isinstance(name, str) or not isinstance(op_params, dict):
        raise UserError("an 'op' call names the operation ('name') and its 'params' object")
    if name in _STARTUP_KEY_OPS and not op_params.get("startup_key") \
            and service.config.startup_key is not None:
        op_params["startup_key"] = str(service.config.startup_key)
    result = await service.store.run(ops.run, service.store.store, name, op_params, stopped)
    if name == "datastore.unlock" and isinstance(result, dict) and result.get("was_locked"):
        log.info("store unlocked")
    return result


GROUP_AND_VOLUME = ("--volume snapshots one volume and --group sends a group snapshot "
                    "(PG@NAME): give one of them (a group snapshot is taken with "
                    "'dvx-dr pg snapshot-create')")


async def _command_gone(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Return once the command closes its end of the connection. A ``replicate`` command
    sends nothing after its request line, and may wait long without a line from the site
    (while a transfer backs off between retries), when no send would find it gone. A client
    that sends more is not listened to any further."""
    transport = writer.transport
    if isinstance(transport, asyncio.ReadTransport):
        transport.resume_reading()
        try:
            if not await reader.read(1):
                return
        except ConnectionError:
            return
        transport.pause_reading()
    await asyncio.Event().wait()  # unable to tell: a failed send is what finds it gone


async def _replicate(service: SiteService, params: dict[str, Any], send: Send,
                     gone: Awaitable[None]) -> None:
    """Snapshot first when asked, then one transfer; progress lines while it runs. The
    transfer is cancelled when the command goes away (it resumes when run again)."""
    lines: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    watch = asyncio.ensure_future(gone)

    async def run() -> Any:
        spec = params.get("snapshot")
        # Whatever would refuse the transfer is checked before a snapshot is taken for it:
        # a snapshot of a command that fails is named by no group, so no retention removes it.
        if not isinstance(params.get("to"), str) or not (
                isinstance(spec, str) or isinstance(params.get("volume"), str)):
            raise UserError("a 'replicate' call names a 'snapshot' (or a 'volume') and 'to'")
        if params.get("volume") and params.get("group"):
            raise UserError(GROUP_AND_VOLUME)
        service.check_transfer(params["to"])
        if params.get("volume"):
            snap = await service.store.run(ops.run, service.store.store, "snapshot.create",
                                           {"volume": params["volume"],
                                            "name": params.get("name")})
            spec = snap["snapshot"]
            lines.put_nowait({"snapshot_created": spec})
        if not isinstance(spec, str) or not isinstance(params.get("to"), str):
            raise UserError("a 'replicate' call names a 'snapshot' (or a 'volume') and 'to'")
        stats = await service.replicate(
            spec, params["to"], lambda s: lines.put_nowait({"progress": s.to_json()}),
            group=bool(params.get("group")),
            retrying=lambda r: lines.put_nowait({"retrying": r}))
        return stats.to_json()

    task = asyncio.create_task(run())
    service.tasks.add(task)  # cancelled first when the site stops
    task.add_done_callback(service.tasks.discard)
    getter: asyncio.Future[dict[str, Any]] | None = None
    try:
        while not task.done() or not lines.empty():
            getter = asyncio.ensure_future(lines.get())
            await asyncio.wait([getter, task, watch], return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                raise ConnectionError("the replicate command went away")
            if getter.done():
                await send(getter.result())
            else:
                getter.cancel()
    except BaseException:
        task.cancel()
        if getter is not None:
            getter.cancel()
        raise
    finally:
        watch.cancel()
    if task.cancelled():
        raise TransientError("the site stopped during the transfer; run the command again "
                             "once the site is back (what the target already holds is not "
                             "sent again)")
    await send({"result": task.result()})  # or the transfer's error, as the error line


#: How long, in all, a read of a live volume may keep other work waiting for the store while
#: its command does not take the data (a reader that pauses now and then, as a disk does,
#: costs others little; one that stalls, or reads far slower than the store, is given up).
YIELD_SECONDS = 10.0
#: Pieces a read of a snapshot takes per turn in the store thread (each at most
#: ``BATCH_BLOCKS`` blocks); other work runs between turns.
SLICE_PIECES = 4


async def _read_sliced(service: SiteService, params: dict[str, Any], send: Send) -> None:
    """A read of a snapshot, which cannot change: taken in turns of ``SLICE_PIECES`` pieces
    in the store thread, each sent before the next is read, so that a slow command holds up
    nothing else. A pin keeps gc from deleting the snapshot's blobs meanwhile (the snapshot
    may be deleted while it is read)."""
    store = service.store
    key = f"read-{id(params)}"

    def first_turn() -> tuple[int, Iterator[bytes | int], list[bytes | int]]:
        # The snapshot is found, pinned and its first pieces read in one turn: what is read
        # is the snapshot of that name when the read began, whatever is deleted or taken
        # under the name afterwards.
        try:
            size, chunks = ops.open_read(store.store, **params)
        except TypeError as exc:  # parameters the operation does not take
            raise UserError(f"a 'read' call has bad parameters ({exc})") from None
        store.store.pin(key)
        return size, chunks, next_turn(chunks)

    def next_turn(chunks: Iterator[bytes | int]) -> list[bytes | int]:
        store.store.pin(key)  # renewed each turn
        return list(itertools.islice(chunks, SLICE_PIECES))


    chunks: Iterator[bytes | int] | None = None
    length = 0
    try:
        size, chunks, pieces = await store.run(first_turn)
        while True:
            for piece in pieces:
                try:  # a command that takes nothing must not hold gc off (the pin) for long
                    await asyncio.wait_for(_send_piece(send, piece), STALL_SECONDS)
                except TimeoutError:
                    raise TransientError(f"the command took no data for {STALL_SECONDS:.0f} "
                                         "s; the site stopped the read") from None
                length += piece if isinstance(piece, int) else len(piece)
            if len(pieces) < SLICE_PIECES:
                break
            pieces = await store.run(next_turn, chunks)
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            await asyncio.shield(store.run(close))  # its code runs in the store thread
        store.store.unpin(key)
    await send({"result": {"size": size, "length": length}})


async def _send_piece(send: Send, piece: bytes | int) -> None:
    """One piece of a streamed read: raw bytes, or a run of zeros (an int)."""
    if isinstance(piece, int):
        await send({"zeros": piece})
    else:
        await send({"bytes": len(piece)}, piece)


class _ReadStopped(Exception):
    """The streamed read's connection ended: the store thread stops producing pieces."""


async def _read(service: SiteService, params: dict[str, Any], send: Send) -> None:
    """A streamed read (``adminwire``: ``read``): of a snapshot, in slices (``_read_sliced``);
    of a live volume, as one store operation, so that the data is one instant of it. The
    store thread walks the range and hands its pieces over a small queue to this connection,
    which sends them as the command takes them: memory stays bounded whatever the length.
    The store thread waits for the command while the queue is full, which holds up every
    other use of the store (commands, scheduled snapshots, transfers); so it gives up (an
    error to the command, advising a snapshot's export) once the command has kept it
    waiting for ``YIELD_SECONDS`` while other work waited, after ``STALL_SECONDS`` without
    progress in any case, and at once when the connection ends or the site stops."""
    if params.get("snapshot") is not None:
        await _read_sliced(service, params, send)
        return
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[bytes | int] = asyncio.Queue(maxsize=READ_QUEUE)
    stop = threading.Event()

    def hand(piece: bytes | int) -> None:  # in the store thread
        put = asyncio.run_coroutine_threadsafe(pieces.put(piece), loop)
        waited = 0.0
        while True:
            try:
                put.result(timeout=0.25)
                return
            except concurrent.futures.TimeoutError:
                waited += 0.25
                if service.store.pending:
                    held[0] += 0.25
                if stop.is_set() or waited >= STALL_SECONDS or held[0] >= YIELD_SECONDS:
                    put.cancel()
                    if stop.is_set():
                        raise _ReadStopped from None
                    why = (f"the command took no data for {waited:.0f} s"
                           if waited >= STALL_SECONDS else
                           f"the command took the data more slowly than the site read it, "
                           f"which kept other work (commands, scheduled snapshots, transfers) "
                           f"waiting {held[0]:.0f} s longer for the store")
                    raise TransientError(
                        f"the site stopped reading volume {params.get('volume')!r}: {why}. A "
                        "read of a live volume holds the store to give one instant of it; "
                        "export a snapshot instead ('dvx-dr snapshot create', then 'snapshot "
                        "export'), which holds up nothing") from None

    held = [0.0]  # how long, in all, other work waited on this read's full queue

    def produce(store: Any) -> dict[str, Any]:  # in the store thread
        size, chunks = ops.open_read(store, **params)
        length = 0
        try:
            for chunk in chunks:
                hand(chunk)
                length += chunk if isinstance(chunk, int) else len(chunk)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        return {"size": size, "length": length}


    producer = asyncio.ensure_future(service.store.run(produce, service.store.store))
    # Its error is taken below, or it ended because this connection did: never unretrieved.
    producer.add_done_callback(lambda f: f.cancelled() or f.exception())
    getter: asyncio.Future[bytes | int] | None = None
    try:
        while True:
            getter = asyncio.ensure_future(pieces.get())
            await asyncio.wait([getter, producer], return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                break
            await _send_piece(send, getter.result())
        getter.cancel()  # not started, or woken and not yet resumed: the piece stays queued
        if producer.exception() is None:
            while not pieces.empty():
                await _send_piece(send, pieces.get_nowait())
        try:
            result = producer.result()
        except TypeError as exc:  # parameters the operation does not take
            raise UserError(f"a 'read' call has bad parameters ({exc})") from None
        await send({"result": result})
    finally:
        stop.set()
        if getter is not None:
            getter.cancel()
