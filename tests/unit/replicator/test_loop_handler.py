"""The site's event-loop exception handler: asyncio's double ``_call_connection_lost`` on a
broken connection (CPython gh-156512) is a warning; any other callback error stays an ERROR."""

from __future__ import annotations

import asyncio
import logging

import pytest

from dvx_dr.replicator.server import loop_exception_handler


async def _connected_transport() -> tuple[asyncio.BaseTransport, asyncio.Server]:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await asyncio.get_running_loop().create_connection(
        asyncio.Protocol, "127.0.0.1", port)
    return transport, server


def test_connection_lost_twice_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(loop_exception_handler)
        transport, server = await _connected_transport()
        # What asyncio does in the bug: tear the transport down twice.
        lost = transport._call_connection_lost  # type: ignore[attr-defined]
        loop.call_soon(lost, BrokenPipeError())
        loop.call_soon(lost, None)
        await asyncio.sleep(0.05)
        server.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert any("gh-156512" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_other_callback_errors_stay_errors(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise AttributeError("a real bug")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(loop_exception_handler)
        loop.call_soon(broken)
        await asyncio.sleep(0.01)

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and "Exception in callback" in errors[0].getMessage()
