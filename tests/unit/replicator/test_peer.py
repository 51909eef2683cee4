"""The connecting side's check of whom it reached (``peer.SiteCheckingConnector``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from aiohttp import web

from dvx_dr.replicator.peer import PREFIX, PeerClient, SiteCheckingConnector
from dvx_dr.replicator.pki import init_ca, issue_site
from dvx_dr.replicator.tls import PeerRejected, client_context, server_context


def test_a_pooled_connection_to_one_site_is_not_used_for_another_at_its_address(
        tmp_path: Path) -> None:
    """site-b's URL is site-a's address (a mistyped URL, or one proxy in front of both):
    after a request to site-a, a request to site-b must not go out on site-a's pooled
    connection, which was checked only as site-a's when it was made (aiohttp before 3.14
    pooled connections by address alone)."""
    init_ca(tmp_path)
    for site in ("site-a", "site-b", "site-c"):
        issue_site(tmp_path, site, ["127.0.0.1"])

    def files(site: str) -> tuple[Path, Path, Path]:
        return tmp_path / f"{site}.crt", tmp_path / f"{site}.key", tmp_path / "ca.crt"

    received: list[bytes] = []

    async def whoami(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(body=b"site-a")

    async def main() -> list[str]:
        app = web.Application()
        app.router.add_post(PREFIX + "/whoami", whoami)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(*files("site-a")))
        await site.start()
        port = runner.addresses[0][1]
        url = f"https://127.0.0.1:{port}"
        outcomes = []
        connector = SiteCheckingConnector(ssl=client_context(*files("site-c")))
        try:
            async with aiohttp.ClientSession(connector=connector) as http:
                for name in ("site-a", "site-b", "site-a", "site-b"):
                    try:
                        answer = await PeerClient(http, name, url).request(
                            "/whoami", f"for {name}".encode())
                        outcomes.append(f"{name}: {answer.decode()}")
                    except PeerRejected as exc:
                        outcomes.append(f"{name}: refused: {exc}")
        finally:
            await runner.cleanup()
        return outcomes

    outcomes = asyncio.run(asyncio.wait_for(main(), 30))
    assert outcomes[0] == outcomes[2] == "site-a: site-a"
    for refused in (outcomes[1], outcomes[3]):
        assert refused.startswith("site-b: refused:"), outcomes
        assert "not valid for 'site-b'" in refused or "not for site 'site-b'" in refused
    assert received == [b"for site-a", b"for site-a"]  # nothing meant for site-b reached it
