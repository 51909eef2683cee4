"""Fixtures for integration tests that run real sites (see ``sites``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.sites import Sites, internal_errors


@pytest.fixture
def two_sites(tmp_path: Path) -> Iterator[Sites]:
    """site-a and site-b, peers of each other, serving on 127.0.0.1 with mutual TLS.

    On teardown both are stopped, and the test fails if either logged an internal error.
    """
    with Sites(tmp_path / "sites") as sites:
        sites.add_many("site-a", "site-b")
        sites.mesh()
        sites.start()
        yield sites
    bugs = {name: internal_errors(site.log()) for name, site in sites.sites.items()}
    bugs = {name: lines for name, lines in bugs.items() if lines}
    assert not bugs, f"sites logged internal errors: {bugs}"
