"""Reaching a running site through its admin socket: HTTP/1.1 over a Unix socket.

The client is the standard library's ``http.client`` with the connection pointed at the socket
file. A command that talks to a running site therefore starts without importing aiohttp or
asyncio (about 0.2 s on a small machine), which matters for commands run often from scripts
(``dvx-dr replicate``, ``dvx-dr status``). The site's side of the socket is aiohttp
(``replicator.server``); requests and answers are JSON, and ``/replicate`` answers with one
JSON object per line (NDJSON) while the transfer runs.
"""

from __future__ import annotations

import http.client
import json
import socket as socketmod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from dvx_dr.errors import DvxError, IntegrityError, TransientError, UserError

PREFIX = "/admin/v1"


class RemoteError(DvxError):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("site")  # the Host header; the socket file is the address
        self.socket_path = path

    def connect(self) -> None:
        sock = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _raise(body: Any, status: int) -> None:
    if not isinstance(body, dict):
        body = {}
    message = str(body.get("error") or f"HTTP {status}")
    code = int(body.get("exit_code", 2 if status < 500 else 1))
    if code == 3:
        raise IntegrityError(message)
    if code == 2:
        raise UserError(message)
    raise RemoteError(message, code)


def _decode(raw: bytes, socket: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise TransientError(f"the site at {socket} sent an answer that is not JSON: "
                             f"{raw[:200]!r}") from None


@contextmanager
def _request(socket: str, method: str, path: str, body: Any = None
             ) -> Iterator[http.client.HTTPResponse]:
    conn = _UnixConnection(socket)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {} if payload is None else {"Content-Type": "application/json"}
        conn.request(method, PREFIX + path, body=payload, headers=headers)
        response = conn.getresponse()
        if response.status >= 300:
            _raise(_decode(response.read(), socket), response.status)
        yield response
    except (OSError, http.client.HTTPException) as exc:
        raise TransientError(f"cannot reach the running site at {socket}: {exc}") from None
    finally:
        conn.close()


def call_path(socket: str, method: str, path: str, body: Any = None) -> Any:
    with _request(socket, method, path, body) as response:
        return _decode(response.read(), socket)


def call_op(socket: str, name: str, params: dict[str, Any]) -> Any:
    return call_path(socket, "POST", f"/ops/{name}", params)["result"]


def status(socket: str) -> dict[str, Any]:
    return dict(call_path(socket, "GET", "/status"))


def replicate(socket: str, params: dict[str, Any],
              on_line: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Start a transfer at the site; feeds progress lines to ``on_line``; returns the stats."""
    with _request(socket, "POST", "/replicate", params) as response:
        for raw in response:
            if not raw.strip():
                continue
            line = _decode(raw, socket)
            if "error" in line:
                _raise(line, 500)
            if "done" in line:
                return dict(line["done"])
            on_line(line)
    raise TransientError("the site closed the connection before the transfer ended")
