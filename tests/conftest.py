"""Test isolation: every test gets its own directories and a clean DVX_DR_* environment."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dvx_dr.site.store import Store

PASSWORD = "correct horse battery"
#: The project root, put on the child's import path so ``python -m dvx_dr`` works whether or
#: not the package is installed in the interpreter running the tests.
ROOT = Path(__file__).resolve().parent.parent
#: What the whole suite needs free on the disk of its temporary directory: at most about 2.1 GiB
#: was in use at once in a full run (passed tests' directories are removed as they end), plus room.
DISK_NEEDED = 3 << 30


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once, in one line, on a disk too full for the suite.

    On a nearly full disk the first tests pass, then every test that starts a site errors in its
    set-up (its certificate cannot be written), hundreds of them, and the cause is easy to miss.
    """
    temp = session.config._tmp_path_factory.getbasetemp().parent  # type: ignore[attr-defined]
    free = shutil.disk_usage(temp).free
    if free < DISK_NEEDED:
        pytest.exit(f"only {free / 2**30:.1f} GiB free on the disk of {temp}; the test suite "
                    f"needs about {DISK_NEEDED >> 30} GiB there: free some space and run it again",
                    returncode=3)


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.startswith("DVX_DR_"):
            monkeypatch.delenv(name)
    # Cheap keystore KDF: the cost is recorded per keystore, so this only affects test stores.
    monkeypatch.setenv("DVX_DR_KDF_COST", "test")
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    path = tmp_path / "password"
    path.write_text(PASSWORD + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def new_store(store_dir: Path) -> Iterator[Callable[..., Store]]:
    """Create a store in a fresh directory (encrypted unless ``encrypted=False``)."""
    opened: list[Store] = []

    def make(encrypted: bool = True, block_size: int = 64 * 1024, path: Path | None = None
             ) -> Store:
        store = Store.init(path or store_dir, "site-a", block_size,
                           PASSWORD if encrypted else None)
        opened.append(store)
        return store

    yield make
    for store in opened:
        with contextlib.suppress(Exception):
            store.close()


def run_cli(*args: str | Path, input: bytes | None = None, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[bytes]:
    """Run the real ``dvx-dr`` command in a child process."""
    proc = subprocess.run([sys.executable, "-m", "dvx_dr", *map(str, args)], input=input,
                          capture_output=True, timeout=timeout, env=cli_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"dvx-dr {' '.join(map(str, args))} exited {proc.returncode}: "
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


def cli_env() -> dict[str, str]:
    """The environment of a child ``dvx-dr``: this one, with the project on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                      env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[bytes]]:
    return run_cli
