"""A crypto erase on a running site: the site and its peers then speak of erased keys, not of
a lock an operator could undo."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.sites import Sites


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    with Sites(tmp_path / "sites") as s:
        yield s


def test_an_erased_site_is_reported_as_erased_not_locked(sites: Sites) -> None:
    a, b = sites.add_many("site-a", "site-b")
    sites.mesh()
    sites.start()
    a.cli("volume", "create", "vm1", "--size", "1MiB")
    a.cli("volume", "write", "vm1", "-", input=b"x" * 4096)
    a.cli("snapshot", "create", "vm1", "--name", "s1")
    b.cli("datastore", "encryption", "crypto-erase", "--confirm-name", "site-b", "--yes")

    status = b.cli("status")
    assert status.stderr.decode() == (
        "dvx-dr: warning: the site's keys were crypto-erased: it sends and receives no "
        "replicas, and its encrypted data cannot be read\n")
    refused = a.cli("replicate", "vm1@s1", "--to", "site-b", check=False)
    assert refused.returncode == 2, refused
    assert "site-b had its keys crypto-erased: it takes no replicas" in refused.stderr.decode()
    assert "unlock" not in refused.stderr.decode()
    own = b.cli("volume", "list", check=False)
    assert own.returncode == 2
    assert "keys destroyed" in own.stderr.decode() and "unlock" not in own.stderr.decode()
