"""Reaching a running site through its admin socket (HTTP over a Unix socket)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp

from dvx_dr.errors import DvxError, IntegrityError, TransientError, UserError

BASE = "http://site/admin/v1"


class RemoteError(DvxError):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _raise(body: dict[str, Any], status: int) -> None:
    message = str(body.get("error") or f"HTTP {status}")
    code = int(body.get("exit_code", 2 if status < 500 else 1))
    if code == 3:
        raise IntegrityError(message)
    if code == 2:
        raise UserError(message)
    raise RemoteError(message, code)


def _session(socket: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=socket),
                                 timeout=aiohttp.ClientTimeout(total=None))


async def _call(socket: str, method: str, path: str, body: Any = None) -> Any:
    try:
        async with _session(socket) as http, http.request(method, BASE + path,
                                                          json=body) as resp:
            data = await resp.json(content_type=None)
            if resp.status >= 300:
                _raise(data, resp.status)
            return data
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, FileNotFoundError,
            ConnectionRefusedError) as exc:
        raise TransientError(f"cannot reach the running site at {socket}: {exc}") from None


def call_op(socket: str, name: str, params: dict[str, Any]) -> Any:
    return asyncio.run(_call(socket, "POST", f"/ops/{name}", params))["result"]


def call_path(socket: str, method: str, path: str, body: Any = None) -> Any:
    return asyncio.run(_call(socket, method, path, body))


def status(socket: str) -> dict[str, Any]:
    return dict(asyncio.run(_call(socket, "GET", "/status")))


def replicate(socket: str, params: dict[str, Any],
              on_line: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Start a transfer at the site; feeds progress lines to ``on_line``; returns the stats."""

    async def run() -> dict[str, Any]:
        try:
            async with _session(socket) as http, http.post(BASE + "/replicate",
                                                           json=params) as resp:
                if resp.status >= 300:
                    _raise(await resp.json(content_type=None), resp.status)
                async for raw in resp.content:
                    if not raw.strip():
                        continue
                    line = json.loads(raw)
                    if "error" in line:
                        _raise(line, 500)
                    if "done" in line:
                        return dict(line["done"])
                    on_line(line)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, FileNotFoundError,
                ConnectionRefusedError) as exc:
            raise TransientError(f"cannot reach the running site at {socket}: {exc}") from None
        raise TransientError("the site closed the connection before the transfer ended")

    return asyncio.run(run())
