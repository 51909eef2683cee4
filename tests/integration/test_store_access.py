"""Who may use a store, and what a command says when it may not, or when no site answers: a
store another user owns, one this user may not write, a read-only file system, a site this
user cannot reach, a site that is not running, and ``datastore unlock`` with no site.

The tests run as root, who reads and writes any file: the other user's view is taken by
running the command as user 65534 (nobody) with ``setpriv``, and a read-only store is a
read-only bind mount made in a private mount namespace (``unshare -m``), which disappears
with the command.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dvx_dr.site import lockfile
from tests.conftest import ROOT
from tests.integration.sites import Sites, child_env, dvx, user_error

NOBODY = 65534
SETPRIV = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]

Run = Callable[..., subprocess.CompletedProcess[bytes]]


@pytest.fixture(scope="module")
def as_nobody() -> Run:
    """Run ``dvx-dr ARGS`` as user 65534, from ``/``. The interpreter is this one when that
    user may run it, else the system's of the same version (this one may sit under a home
    directory only root may enter), given this project and its installed dependencies."""
    if os.geteuid() != 0:
        pytest.skip("runs commands as another user (setpriv), which needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    env = child_env() | {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                        *site.getsitepackages()])}
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for python in dict.fromkeys([sys.executable, shutil.which(version), f"/usr/bin/{version}"]):
        if python and subprocess.run(
                [*SETPRIV, python, "-c", "import dvx_dr.site.store, dvx_dr.cli.volume"],
                env=env, cwd="/", capture_output=True, timeout=60).returncode == 0:
            break
    else:
        pytest.skip(f"no {version} that user {NOBODY} may run with this project's dependencies")

    def run(*args: str | Path) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*SETPRIV, python, "-m", "dvx_dr", *map(str, args)], env=env,
                              cwd="/", capture_output=True, timeout=120)
    return run


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory every user may enter (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="dvx-access-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def plain_store(path: Path) -> Path:
    dvx("site", "init", "--store", path, "--name", "site-a", "--no-encryption")
    dvx("volume", "create", "vm1", "--size", "1MiB", "--store", path)
    return path


def test_a_store_of_another_user_is_refused_in_one_line(as_nobody: Run, shared: Path) -> None:
    """Root's store, opened by another user: one line naming what it may not enter or write,
    the user and the owner, and what to do (it was a PermissionError traceback, exit 1)."""
    store = plain_store(shared / "store")
    line = user_error(as_nobody("volume", "list", "--store", store),
                      f"cannot open store {store}", f"uid {NOBODY}", "owner root",
                      "run as the store's owner or fix its permissions")
    # A new store is 0700: the directory itself is what the user may not enter.
    assert f"{store} is not accessible to this user" in line
    store.chmod(0o755)
    user_error(as_nobody("datastore", "stats", "--store", store),
               f"{store} is not writable by this user", f"uid {NOBODY}", "owner root")


@pytest.mark.parametrize(("target", "command"), [
    ("lock", ["datastore", "stats"]),
    ("store.db", ["volume", "create", "vm2", "--size", "1MiB"]),
    (".", ["datastore", "stats"]),
    ("segments", ["volume", "write", "vm1", "--offset", "0", "/etc/hostname"]),
])
def test_a_store_the_user_may_not_write_is_refused_in_one_line(
        as_nobody: Run, shared: Path, target: str, command: list[str]) -> None:
    """The user's own store with one part made read-only (chmod a-w) is refused, naming that
    part, also by a command that only reads. It was a traceback (PermissionError on the lock
    or on segments/next.tmp, SQLite's 'attempt to write a readonly database'), or, for the
    directory, exit 3: "store.db is unreadable ...: it is damaged ...; restore the store
    from a backup"."""
    store = plain_store(shared / "store")
    for path in [store, *store.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
    store.chmod(0o755)
    part = (store / target) if target != "." else store
    part.chmod(part.stat().st_mode & ~0o222)
    user_error(as_nobody(*command, "--store", store), f"cannot open store {store}",
               f"{part} is not writable by this user", f"uid {NOBODY}", "owner nobody")


def read_only(store: Path, *args: str | Path) -> subprocess.CompletedProcess[bytes]:
    """``dvx-dr ARGS`` (as root) with ``store`` mounted read-only, in a mount namespace of
    its own."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind '{store}' '{store}'"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.decode()}")
    script = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, str(store), sys.executable,
                           "-m", "dvx_dr", *map(str, args)],
                          env=child_env(), capture_output=True, timeout=120)


def test_a_store_on_a_read_only_file_system_is_refused_in_one_line(tmp_path: Path) -> None:
    """Root is refused too: it was 'Read-only file system' in a traceback."""
    store = plain_store(tmp_path / "store")
    for args in (["datastore", "stats"], ["volume", "list"]):
        user_error(read_only(store, *args, "--store", store), f"cannot open store {store}",
                   "read-only file system", "needs write access to its store, even to read it")
    assert b"vm1" in dvx("volume", "list", "--store", store).stdout


def test_site_serve_on_a_read_only_store_says_so_in_one_line(tmp_path: Path) -> None:
    with Sites(tmp_path / "sites") as sites:
        a = sites.add("site-a")
        proc = read_only(a.store, "site", "serve", "--config", a.config,
                         "--password-file", a.password_file)
    user_error(proc, f"cannot open store {a.store}", "read-only file system")


def test_a_site_this_user_cannot_reach_is_not_said_to_be_down(as_nobody: Run,
                                                               shared: Path) -> None:
    """A site runs as root; another user's commands say that they cannot reach it (the store's
    lock file, which names the admin socket, and that socket are root's alone), not that no
    site runs ('no site is running on store', or exit 4 'cannot reach the running site:
    Permission denied'), nor a traceback."""
    with Sites(shared / "sites") as sites:
        a = sites.add("site-a")
        a.start()
        a.store.chmod(0o700)  # as 'site init' makes it
        line = user_error(as_nobody("status", "--store", a.store),
                          f"cannot reach a site on store {a.store}",
                          f"{a.store} is not accessible to this user", f"uid {NOBODY}",
                          "owner root")
        assert "no site is running" not in line
        a.store.chmod(0o755)  # the lock file is what the user may not read
        user_error(as_nobody("status", "--store", a.store),
                   f"{a.store / 'lock'} is not readable by this user", "run the command as")
        user_error(as_nobody("status", "--config", a.config), f"uid {NOBODY}", "owner root",
                   "run the command as")
        user_error(as_nobody("volume", "list", "--store", a.store), f"uid {NOBODY}",
                   "owner root")
        assert a.running


def test_a_killed_site_is_said_not_to_run_by_config_and_by_store(tmp_path: Path) -> None:
    """A site killed outright leaves its admin socket and its lock file's line naming it:
    ``--config`` and ``--store`` both say that no site is running and how to start it,
    exit 2 (it was exit 4, 'cannot reach the running site at ...: Connection refused'; with
    the socket gone, 'No such file or directory')."""
    with Sites(tmp_path / "sites") as sites:
        a = sites.add("site-a")
        a.start()
        a.kill()
        assert a.admin_socket.exists()
        for how in (["--config", a.config], ["--store", a.store]):
            user_error(dvx("status", *how, check=False),
                       f"no site is running at {a.admin_socket}", "nothing listens",
                       "dvx-dr site serve --config")
        a.admin_socket.unlink()
        user_error(dvx("pg", "list", "--config", a.config, check=False),
                   f"no site is running at {a.admin_socket}", "does not exist",
                   "dvx-dr site serve --config")


def test_a_store_command_while_its_site_starts_is_told_to_retry(tmp_path: Path) -> None:
    """The store's lock is held by a site that has not opened its admin socket yet: the site
    runs, so the command says it is starting or stopping (exit 4, as a site that stops
    answering midway), not that no site runs."""
    store = plain_store(tmp_path / "store")
    fd = lockfile.acquire(store)
    try:
        lockfile.announce(fd, str(tmp_path / "not-yet.sock"))
        proc = dvx("volume", "list", "--store", store, check=False)
    finally:
        os.close(fd)
    err = proc.stderr.decode()
    assert proc.returncode == 4, err
    assert f"the site that owns store {store} (pid {os.getpid()}) does not answer" in err
    assert "starting or stopping; retry" in err


def test_unlock_with_no_site_running_is_refused_after_checking_the_password(
        tmp_path: Path) -> None:
    """Offline, 'datastore unlock' said "unlocked" and exited 0, though nothing stays
    unlocked when the command ends. It checks the password, then says there is nothing to
    unlock and how to start the site: exit 2, so that a script does not go on as if a site
    were there, unlocked."""
    password = tmp_path / "password"
    password.write_text("correct horse battery\n")
    password.chmod(0o600)
    store = tmp_path / "store"
    dvx("site", "init", "--store", store, "--name", "site-a", "--password-file", password)
    user_error(dvx("datastore", "unlock", "--store", store, "--password-file", password,
                   check=False),
               f"no site is running on store {store}, so there is nothing to unlock",
               "the password is correct", "dvx-dr site serve --config site.yaml")
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password at all\n")
    wrong.chmod(0o600)
    user_error(dvx("datastore", "unlock", "--store", store, "--password-file", wrong,
                   check=False), "wrong password")
    plain = plain_store(tmp_path / "plain")
    user_error(dvx("datastore", "unlock", "--store", plain, "--password-file", password,
                   check=False), "is not encrypted", "nothing to unlock")

