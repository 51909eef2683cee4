"""The command line's start-up: commands that talk to a running site load only what they use."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dvx_dr.cli.replicate import socket_from_config
from dvx_dr.errors import UserError
from dvx_dr.site.config import load_site_config
from tests.conftest import cli_env

SITE_YAML = """\
name: site-a
store: store
listen: 127.0.0.1:8443
tls: {cert: a.crt, key: a.key, ca: ca.crt}
admin_socket: %s
"""


@pytest.mark.parametrize("socket", ["run/admin.sock", "/run/dvx-dr/a.sock", "~/a.sock"])
def test_admin_socket_from_config_matches_the_validated_config(tmp_path: Path,
                                                               socket: str) -> None:
    path = tmp_path / "conf" / "site.yaml"
    path.parent.mkdir()
    path.write_text(SITE_YAML % socket)
    assert socket_from_config(path) == str(load_site_config(path).admin_socket)


def test_config_without_admin_socket_gets_the_full_validation_error(tmp_path: Path) -> None:
    path = tmp_path / "site.yaml"
    path.write_text(textwrap.dedent(SITE_YAML % "x").replace("admin_socket: x\n", ""))
    with pytest.raises(UserError, match="admin_socket"):
        socket_from_config(path)


HEAVY = ("aiohttp", "pydantic", "cryptography", "zstandard", "sqlite3", "tqdm", "http",
         "email", "ssl")


def loaded_modules(args: list[str]) -> tuple[int, str, list[str]]:
    """Run ``dvx-dr ARGS`` in a fresh interpreter: its exit code, stderr and the modules it
    had loaded when it returned."""
    probe = textwrap.dedent(f"""
        import json, sys
        from dvx_dr.cli import main
        code = main({args!r})
        print(json.dumps([code, sorted(sys.modules)]))
    """)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=cli_env(), timeout=60, check=True)
    code, modules = json.loads(proc.stdout.splitlines()[-1])
    return code, proc.stderr, modules


def heavy(modules: list[str]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in HEAVY
            or m in ("dvx_dr.site.store", "dvx_dr.replicator.server", "asyncio")]


def test_status_command_loads_no_store_server_http_or_pydantic_code(tmp_path: Path) -> None:
    """``dvx-dr status`` against a site: the run fails (no site listens on the socket), and
    the modules it loaded on the way are listed."""
    path = tmp_path / "site.yaml"
    path.write_text(SITE_YAML % "admin.sock")
    code, stderr, modules = loaded_modules(["status", "--config", str(path)])
    assert code == 4, stderr  # TransientError: cannot reach the running site
    assert "cannot reach the running site" in stderr
    assert heavy(modules) == []


def test_status_named_by_store_does_not_load_pyyaml(tmp_path: Path) -> None:
    """``--store``: the running site is found through the store's lock file, so PyYAML
    (about 14 ms of start-up) is not loaded; with ``--config`` it is."""
    (tmp_path / "store").mkdir()
    code, stderr, modules = loaded_modules(["status", "--store", str(tmp_path / "store")])
    assert code == 2, stderr  # UserError: no site is running on the store
    assert "no site is running on store" in stderr
    assert heavy(modules) == []
    assert "yaml" not in modules
    path = tmp_path / "site.yaml"
    path.write_text(SITE_YAML % "admin.sock")
    assert "yaml" in loaded_modules(["status", "--config", str(path)])[2]
