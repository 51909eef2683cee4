"""A store on a device that fills up: a clear error, nothing half-written, nothing lost."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.integration.sites import Sites


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: a real file system that really runs out of space."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_the_write_cleanly_and_loses_nothing(
    small_disk: Path, tmp_path: Path, password_file: Path
) -> None:
    store = small_disk / "store"
    args = ["--store", store, "--password-file", password_file]
    run_cli("site", "init", "--name", "site-a", *args)
    keep = random.Random(1).randbytes(4 * 1024 * 1024)
    (tmp_path / "keep.img").write_bytes(keep)
    run_cli("volume", "import", "keep", tmp_path / "keep.img", *args)
    run_cli("snapshot", "create", "keep", "--name", "before", *args)

    # Incompressible data larger than the free space.
    big = tmp_path / "big.img"
    with open(big, "wb") as f:
        rng = random.Random(2)
        for _ in range(48):
            f.write(rng.randbytes(1024 * 1024))
    failed = run_cli("volume", "import", "big", big, *args, check=False)
    err = failed.stderr.decode()
    assert failed.returncode == 2, err
    assert "no space left" in err and "nothing of this operation was committed" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1

    # A write into an existing volume fails the same way and leaves it as it was.
    run_cli("volume", "create", "v", "--size", "40MiB", *args)
    chunk = tmp_path / "chunk"
    chunk.write_bytes(random.Random(3).randbytes(32 * 1024 * 1024))
    failed = run_cli("volume", "write", "v", chunk, *args, check=False)
    assert failed.returncode == 2 and "no space left" in failed.stderr.decode()
    assert run_cli("volume", "read", "v", "--length", "1MiB", *args).stdout == bytes(1 << 20)

    # Nothing half-written is visible and every acknowledged write reads back.
    listed = run_cli("volume", "list", "--json", *args).stdout.decode()
    assert '"big"' not in listed
    assert run_cli("volume", "read", "keep", "--length", str(len(keep)), *args).stdout == keep
    assert run_cli("snapshot", "read", "keep@before", "--length", str(len(keep)),
                   *args).stdout == keep
    assert run_cli("datastore", "scrub", *args).returncode == 0

    # gc gives the space of the failed attempts back, and the store takes writes again.
    run_cli("datastore", "gc", *args)
    small = tmp_path / "small.img"
    small.write_bytes(random.Random(4).randbytes(2 * 1024 * 1024))
    run_cli("volume", "import", "small", small, *args)
    assert run_cli("volume", "read", "small", "--length", str(2 << 20),
                   *args).stdout == small.read_bytes()
    assert os.statvfs(small_disk).f_bavail > 0


def test_key_changes_on_a_full_disk_say_so_and_keep_the_old_password(
    small_disk: Path, tmp_path: Path, password_file: Path
) -> None:
    """The disk holding the store fills up: a password change is one line naming the full
    disk (it had been told to restore the store from a backup, its database "damaged"), and
    the store opens with the old password once space is freed."""
    store = small_disk / "store"
    args = ["--store", store, "--password-file", password_file]
    run_cli("site", "init", "--name", "site-a", *args)
    data = random.Random(5).randbytes(1024 * 1024)
    (tmp_path / "v.img").write_bytes(data)
    run_cli("volume", "import", "v", tmp_path / "v.img", *args)
    filler = small_disk / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):  # until the disk is full
        while True:
            f.write(bytes(1024 * 1024))
    new = tmp_path / "new-password"
    new.write_text("a brand new password\n")
    failed = run_cli("datastore", "encryption", "change-password", "--new-password-file", new,
                     *args, check=False)
    err = failed.stderr.decode()
    assert failed.returncode == 2, err
    assert "full" in err or "no space left" in err, err
    assert "restore" not in err and "Traceback" not in err and len(err.splitlines()) == 1
    filler.unlink()
    assert run_cli("volume", "read", "v", "--length", str(len(data)), *args).stdout == data


def test_an_import_that_fills_the_disk_of_a_running_site_can_be_retried(
    tmp_path: Path, small_disk: Path
) -> None:
    """An import through a running site that runs out of space: its volume stayed behind,
    hidden ('importing'), so the retry the error suggests failed with "already exists" (and
    "unknown volume" to a delete) until the site restarted. Now the volume goes with the
    failed import, and the retry works at once."""
    with Sites(small_disk / "sites") as sites:
        site = sites.add("site-a")
        sites.start()
        big = tmp_path / "big.img"
        with open(big, "wb") as f:
            rng = random.Random(6)
            for _ in range(48):
                f.write(rng.randbytes(1024 * 1024))
        failed = site.cli("volume", "import", "big", big, check=False)
        assert failed.returncode == 2 and "no space left" in failed.stderr.decode()
        small = tmp_path / "small.img"
        small.write_bytes(random.Random(7).randbytes(1024 * 1024))
        site.cli("volume", "import", "big", small)
        assert site.cli("volume", "read", "big", "--length", str(1024 * 1024)).stdout \
            == small.read_bytes()
