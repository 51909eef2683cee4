"""Reaching a running site through its admin socket (``replicator.adminwire``: JSON lines over
a Unix socket).

The client needs only ``socket`` and ``json``, so a command that talks to a running site starts
without importing aiohttp, asyncio or an HTTP client; that start-up is most of the time of a
command run often from scripts (``dvx-dr replicate``, ``dvx-dr status``, a ``volume write``
routed to the site).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket as socketmod

from dvx_dr.errors import DvxError, IntegrityError, TransientError, UserError
from dvx_dr.replicator import adminwire
from dvx_dr.site import lockfile

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not loaded at run time (see cli.replicate)
    from collections.abc import Callable, Iterator
    from typing import Any


class RemoteError(DvxError):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class SiteNotRunningError(UserError):
    """No site listens on the admin socket: the file is not there, or it is one a site that
    was killed (or crashed) left behind. The operator must start the site: exit 2, as for a
    store that no site serves, not the ``TransientError`` of a site that stopped answering
    in the middle of a command."""


def _raise(answer: dict[str, Any]) -> None:
    message = str(answer.get("error") or "the site reported an error without a message")
    code = answer.get("exit_code")
    code = code if isinstance(code, int) else 1
    if code == 3:
        raise IntegrityError(message)
    if code == 2:
        raise UserError(message)
    raise RemoteError(message, code)


def _decode(raw: bytes, socket: str) -> dict[str, Any]:
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if isinstance(answer, dict):
        return answer
    if raw.startswith(b"HTTP/"):
        raise TransientError(f"the site at {socket} speaks an older admin protocol (HTTP): "
                             "restart it with this version of dvx-dr")
    raise TransientError(f"the site at {socket} sent an answer that is not a JSON object: "
                         f"{raw[:200]!r}")


START = "start it with 'dvx-dr site serve --config site.yaml'"


def connect(sock: socketmod.socket, socket: str) -> None:
    """Connect ``sock`` to the admin socket at ``socket``. A site that does not run
    (``SiteNotRunningError``) and a socket this user may not use (``UserError``) are said
    in one line that says what to do (exit 2); anything else is a ``TransientError``."""
    try:
        sock.connect(socket)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise SiteNotRunningError(f"no site is running at {socket}: the admin socket does "
                                      f"not exist; {START}") from None
        if exc.errno in (errno.ECONNREFUSED, errno.ENOTSOCK):
            raise SiteNotRunningError(
                f"no site is running at {socket}: nothing listens on the admin socket (a "
                f"site that was killed or crashed leaves it behind); {START}") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise UserError(f"cannot reach the site at {socket}: "
                            f"{lockfile.denied(socket, os.W_OK)}: run the command as the user "
                            "the site runs as") from None
        raise TransientError(f"cannot reach the running site at {socket}: {exc}") from None


def call(socket: str, name: str, params: dict[str, Any] | None = None,
         on_line: Callable[[dict[str, Any]], None] | None = None) -> Any:
    """Send one request; feed the lines before the final one to ``on_line``; return the
    final line's result (or raise its error)."""
    sock = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
    try:
        connect(sock, socket)
        try:
            # The site may answer (an error) before it has taken the whole request: read it.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(adminwire.request(name, params))
            answers = sock.makefile("rb")
            for raw in answers:
                if not raw.endswith(b"\n"):
                    raise TransientError(f"the site at {socket} closed the connection in the "
                                         "middle of its answer (it may have stopped; see its "
                                         "log)")
                answer = _decode(raw, socket)
                if "result" in answer:
                    return answer["result"]
                if "error" in answer:
                    _raise(answer)
                if on_line is not None:
                    on_line(answer)
        except OSError as exc:
            raise TransientError(f"cannot reach the running site at {socket}: {exc}") from None
    finally:
        sock.close()
    raise TransientError(f"the site at {socket} closed the connection before it answered "
                         "(it may have stopped; see its log)")


class Read:
    """A streamed read (``adminwire``: the ``read`` call): iterating it connects and yields
    the data as it comes, bytes or an int (a run of that many zeros), in bounded memory;
    ``result`` is the final line's result once all of it has come. The site's error, or a
    connection that ends early, is raised from the iteration, so the data taken so far is
    known to be incomplete."""

    def __init__(self, socket: str, params: dict[str, Any]) -> None:
        self.socket = socket
        self.params = params
        self.result: Any = None

    def __iter__(self) -> Iterator[bytes | int]:
        socket = self.socket
        cut = TransientError(f"the site at {socket} closed the connection in the middle of "
                             "its answer (it may have stopped; see its log)")
        sock = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
        try:
            connect(sock, socket)
            try:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(adminwire.request("read", self.params))
                answers = sock.makefile("rb")
                while raw := answers.readline():
                    if not raw.endswith(b"\n"):
                        raise cut
                    answer = _decode(raw, socket)
                    if "result" in answer:
                        self.result = answer["result"]
                        return
                    if "error" in answer:
                        _raise(answer)
                    zeros, n = "zeros" in answer, answer.get("zeros", answer.get("bytes"))
                    if not isinstance(n, int) or n < 0 or (
                            not zeros and n > adminwire.MAX_PIECE):
                        raise TransientError(f"the site at {socket} sent a line that is "
                                             f"not part of a read: {raw[:200]!r}")
                    if zeros:
                        yield n
                        continue
                    data = answers.read(n)
                    if len(data) != n:
                        raise cut
                    yield data
            except OSError as exc:
                raise TransientError(f"cannot reach the running site at {socket}: {exc}"
                                     ) from None
        finally:
            sock.close()
        raise TransientError(f"the site at {socket} closed the connection before it answered "
                             "(it may have stopped; see its log)")


def call_op(socket: str, name: str, params: dict[str, Any]) -> Any:
    """A named store operation (``site.ops``) run by the site."""
    return call(socket, "op", {"name": name, "params": params})


def status(socket: str) -> dict[str, Any]:
    return dict(call(socket, "status"))


def replicate(socket: str, params: dict[str, Any],
              on_line: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Start a transfer at the site; feeds progress lines to ``on_line``; returns the stats."""
    return dict(call(socket, "replicate", params, on_line))
