"""What a command says when no site listens on the admin socket it was given."""

from __future__ import annotations

import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dvx_dr.cli import remote
from dvx_dr.errors import UserError


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a path short enough for a Unix socket (pytest's may not be)."""
    path = Path(tempfile.mkdtemp(prefix="dvx", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_no_admin_socket_is_a_site_not_running(short_dir: Path) -> None:
    """It was a TransientError (exit 4): "cannot reach the running site at ...: [Errno 2] No
    such file or directory"."""
    path = short_dir / "site.sock"
    with pytest.raises(UserError, match=f"^no site is running at {path}: the admin socket "
                                        "does not exist; start it with 'dvx-dr site serve"):
        remote.status(str(path))
    with pytest.raises(remote.SiteNotRunningError, match="does not exist"):
        list(remote.Read(str(short_dir / "gone" / "site.sock"), {}))


def test_a_socket_nothing_listens_on_is_a_site_not_running(short_dir: Path) -> None:
    """A site killed outright leaves its socket file behind: connecting is refused."""
    path = short_dir / "left.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left:
        left.bind(str(path))
    with pytest.raises(remote.SiteNotRunningError,
                       match=f"^no site is running at {path}: nothing listens on the admin "
                             "socket .a site that was killed or crashed leaves it behind."
                       ) as caught:
        remote.call(str(path), "status")
    assert caught.value.exit_code == 2
