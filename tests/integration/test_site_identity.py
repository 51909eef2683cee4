"""A store belongs to one site: ``site init --config`` takes site.yaml's name, and a site
whose site.yaml names another site's store does not start."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.sites import Sites, child_env, dvx


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    with Sites(tmp_path / "sites") as s:
        yield s


def test_init_with_config_takes_the_configured_name(sites: Sites, tmp_path: Path) -> None:
    site = sites.add("site-q")
    config = site.config
    fresh = tmp_path / "fresh"
    config.write_text(config.read_text().replace(str(site.store), str(fresh)))

    out = dvx("site", "init", "--config", config, "--name", "site-zzz", "--no-encryption",
              check=False)
    assert out.returncode == 2, out
    assert out.stderr.decode().strip().splitlines() == [
        f"dvx-dr: error: --name site-zzz differs from the name in {config} (site-q); leave "
        "--name out to use site-q"]
    assert not fresh.exists()

    out = dvx("site", "init", "--config", config, "--no-encryption")
    assert out.stdout.decode().startswith("created unencrypted store for site site-q at ")
    stats = dvx("datastore", "stats", "--store", fresh, "--json").stdout.decode()
    assert '"site": "site-q"' in stats


def test_a_site_does_not_serve_another_sites_store(sites: Sites) -> None:
    a = sites.add("site-a")
    b = sites.add("site-b")
    a.config.write_text(a.config.read_text().replace(str(a.store), str(b.store)))
    proc = subprocess.run(
        [sys.executable, "-m", "dvx_dr", "site", "serve", "--config", str(a.config),
         "--password-file", str(b.password_file)],
        capture_output=True, timeout=60, env=child_env())
    assert proc.returncode == 2, proc
    assert (f"the store at {b.store} belongs to site site-b, but {a.config} names site "
            "site-a") in proc.stderr.decode()
    assert not a.admin_socket.exists()
