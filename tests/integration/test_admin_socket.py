"""The admin socket of a real running site (``replicator.adminwire``): its mode, its answers
to requests that break the format, and the client's message for a site of the older protocol.

A bad request gets one error line naming what is wrong (exit code 2, as the command would
exit), and the site goes on serving.
"""

from __future__ import annotations

import json
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvx_dr.cli import remote
from dvx_dr.errors import TransientError, UserError
from tests.integration.sites import Site, Sites


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    with Sites(tmp_path / "sites") as sites:
        (site,) = sites.add_many("site-a")
        sites.start()
        yield site


def exchange(path: Path, raw: bytes) -> list[dict[str, object]]:
    """Send ``raw`` as is; every answer line until the site closes the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        return [json.loads(line) for line in sock.makefile("rb")]


def test_admin_socket_is_private_to_its_owner(site: Site) -> None:
    assert stat.S_IMODE(site.admin_socket.stat().st_mode) == 0o600


@pytest.mark.parametrize(("raw", "says"), [
    (b"GET /admin/v1/status HTTP/1.1\r\nHost: site\r\n\r\n", "not one line of JSON"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b'{"v": 99, "call": "status"}\n', "admin protocol version 99 is not supported"),
    (b'{"v": 1, "call": "format-disk"}\n', "unknown admin call 'format-disk'"),
    (b'{"v": 1, "call": "status", "params": [1]}\n', "'params' must be a JSON object"),
    (b'{"v": 1, "call": "op", "params": {"name": 7}}\n', "names the operation"),
    (b'{"v": 1, "call": "op", "params": {"name": "volume.shred", "params": {}}}\n',
     "volume.shred"),
    (b'{"v": 1, "call": "replicate", "params": {"to": "site-b"}}\n', "names a 'snapshot'"),
])
def test_bad_request_gets_an_error_line_and_the_site_keeps_serving(
        site: Site, raw: bytes, says: str) -> None:
    answers = exchange(site.admin_socket, raw)
    assert len(answers) == 1, answers
    assert answers[0]["exit_code"] == 2
    assert says in str(answers[0]["error"])
    assert remote.status(str(site.admin_socket))["site"] == "site-a"


def test_connection_closed_without_a_request_leaves_the_site_serving(site: Site) -> None:
    assert exchange(site.admin_socket, b"") == []
    assert remote.status(str(site.admin_socket))["site"] == "site-a"


def test_operation_error_reaches_the_command_with_its_exit_code(site: Site) -> None:
    with pytest.raises(UserError, match="no-such-volume"):
        remote.call_op(str(site.admin_socket), "volume.read",
                       {"name": "no-such-volume", "offset": 0, "length": 1})
    proc = site.cli("volume", "read", "no-such-volume", "--offset", "0", "--length", "1",
                    check=False)
    assert proc.returncode == 2
    assert b"no-such-volume" in proc.stderr


def _serve_once(path: Path, answer: bytes) -> threading.Thread:
    """A one-connection Unix socket server that reads a request and sends ``answer``."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def run() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_client_names_a_site_of_the_older_http_protocol(tmp_path: Path) -> None:
    path = tmp_path / "old.sock"
    thread = _serve_once(path, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(TransientError, match="older admin protocol .HTTP.: restart it"):
        remote.status(str(path))
    thread.join(10)


def test_client_reports_a_site_that_closes_before_answering(tmp_path: Path) -> None:
    path = tmp_path / "closing.sock"
    thread = _serve_once(path, b'{"progress": {}}\n')
    with pytest.raises(TransientError, match="closed the connection before it answered"):
        remote.replicate(str(path), {"volume": "vm1", "to": "site-b"}, lambda line: None)
    thread.join(10)
