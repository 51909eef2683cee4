"""A store on a device that fills up: a clear error, nothing half-written, nothing lost."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dvx_dr.site.store import RESERVE_BYTES, RESERVE_NAME
from tests.conftest import cli_env, run_cli
from tests.integration.sites import Sites

MiB = 1024 * 1024


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``tmpfs(mib)``: a tmpfs of that many MiB, a real file system that really runs out of
    space."""
    mounted: list[Path] = []

    def mount(mib: int) -> Path:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs",
                               str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    try:
        yield mount
    finally:
        for path in mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_disk(tmpfs: Callable[[int], Path]) -> Path:
    """A 24 MiB tmpfs."""
    return tmpfs(24)


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(disk: Path, leave: int) -> Path:
    """A file of zeros that leaves ``leave`` bytes free on ``disk``."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.posix_fallocate(fd, 0, max(1, free(disk) - leave))
    finally:
        os.close(fd)
    return filler


def random_file(path: Path, size: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def segments(store: Path) -> dict[str, int]:
    """Segment file name -> size."""
    return {p.name: p.stat().st_size for p in (store / "segments").glob("*.seg")}


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
    # Without its reserve (a store too full to open gives it up, and takes it back only once
    # the space is free): else the change would be made in the reserve's space.
    (store / RESERVE_NAME).unlink()
    filler = small_disk / "filler"
    with open(filler, "wb") as f, contextlib.suppress(OSError):  # until the disk is full
        while True:
            f.write(bytes(1024 * 1024))
    new = tmp_path / "new-password"
    new.write_text("a brand new password\n")
    new.chmod(0o600)
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


def test_a_target_whose_disk_fills_can_run_gc_at_once(
        tmp_path: Path, tmpfs: Callable[[int], Path]) -> None:
    """A replication that filled the target's disk left its session open there for 10
    minutes, and that session held off the very gc the error message asked for ("N
    replication transfers ... were running, so no blob was deleted"); a source that kept
    retrying kept opening more."""
    with Sites(tmp_path / "sites") as sites:
        a, b = sites.add_many("site-a", "site-b")
        sites.mesh()
        disk = tmpfs(20)
        shutil.copytree(b.store, disk / "store", symlinks=True)
        shutil.rmtree(b.store)
        b.store.symlink_to(disk / "store")
        sites.start()
        a.cli("volume", "import", "vm1", random_file(tmp_path / "vm1.img", 32 * MiB, 8))
        a.cli("snapshot", "create", "vm1", "--name", "s1")
        before = free(disk)

        failed = a.cli("replicate", "vm1@s1", "--to", "site-b", check=False)
        assert failed.returncode == 2, failed
        assert "no space left on the device holding store" in failed.stderr.decode()
        assert "the session ended" in failed.stderr.decode()
        assert free(disk) < before
        assert b.json("status")["sessions"] == 0
        assert "transfer vm1@s1 -> site-b failed (attempt 1): site site-b: no space left" \
            in a.log(), a.log()[-2000:]

        out = b.cli("datastore", "gc").stdout.decode()
        assert "no blob was deleted" not in out, out
        assert free(disk) >= before - MiB, "gc gave back what the failed transfer stored"
        # With room made, the transfer goes through and the replica is whole.
        subprocess.run(["mount", "-o", "remount,size=96m", str(disk)], check=True)
        a.cli("replicate", "vm1@s1", "--to", "site-b")
        replica = tmp_path / "replica.img"
        b.cli("snapshot", "export", "site-a/vm1@s1", replica)
        assert replica.read_bytes() == (tmp_path / "vm1.img").read_bytes()


def test_gc_frees_a_disk_the_store_filled_with_data_since_deleted(
    tmpfs: Callable[[int], Path], password_file: Path
) -> None:
    """The store's own writes fill its disk; the volume is deleted. gc had failed with "no
    space left" (its one sweep transaction needed more write-ahead log than was free) and
    told the operator to run gc: stuck for good. Now it sweeps in small transactions, with
    the store's reserve, and the store takes writes again."""
    disk = tmpfs(8)
    store = disk / "store"
    args = ["--store", store, "--password-file", password_file]
    run_cli("site", "init", "--name", "site-a", *args)
    run_cli("volume", "create", "v", "--size", "16MiB", *args)
    rng = random.Random(8)
    offset = 0
    for step in (MiB, 64 * 1024):  # acknowledged writes until one is refused
        while True:
            done = run_cli("volume", "write", "v", "--offset", offset, "-", *args,
                           input=rng.randbytes(step), check=False)
            if done.returncode:
                assert "no space left" in done.stderr.decode()
                break
            offset += step
    assert offset >= 2 * MiB and free(disk) < 256 * 1024
    run_cli("volume", "delete", "v", *args)

    out = run_cli("datastore", "gc", *args).stdout.decode()
    assert "deleted" in out and free(disk) > offset - MiB, out
    reserve = store / RESERVE_NAME
    assert reserve.stat().st_size == RESERVE_BYTES  # taken back once the space was free
    assert reserve.read_bytes() == bytes(RESERVE_BYTES)
    data = random_file(disk.parent / "w.img", 2 * MiB, 9)
    run_cli("volume", "import", "w", data, *args)
    assert run_cli("volume", "read", "w", "--length", 2 * MiB, *args).stdout \
        == data.read_bytes()
    assert run_cli("datastore", "scrub", *args).returncode == 0


def test_a_store_too_full_to_open_gives_up_its_reserve_so_gc_still_runs(
    tmpfs: Callable[[int], Path], tmp_path: Path, password_file: Path
) -> None:
    """A disk at 0 bytes free: SQLite cannot even open the store's database (it needs room
    for its log's index). The store gives up its reserve to open, so gc still reclaims the
    deleted volume, and the reserve is made again once the space is free."""
    disk = tmpfs(8)
    store = disk / "store"
    args = ["--store", store, "--password-file", password_file]
    run_cli("site", "init", "--name", "site-a", *args)
    run_cli("volume", "import", "v", random_file(tmp_path / "v.img", 2 * MiB, 13), *args)
    run_cli("volume", "delete", "v", *args)
    filler = fill(disk, 0)
    assert free(disk) == 0
    out = run_cli("datastore", "gc", *args).stdout.decode()
    assert "deleted 1 segment file" in out and free(disk) >= 2 * MiB, out
    filler.unlink()
    run_cli("volume", "list", *args)
    assert (store / RESERVE_NAME).stat().st_size == RESERVE_BYTES


def test_gc_deletes_dead_segments_when_a_compaction_does_not_fit(
    tmpfs: Callable[[int], Path], tmp_path: Path, password_file: Path
) -> None:
    """gc had compacted before deleting dead segment files, so a compaction that did not fit
    stopped it, and the dead segments stayed ("nothing of this operation was committed",
    though the sweep was). Now the dead segment goes first, and the compaction waits."""
    disk = tmpfs(64)
    store = disk / "store"
    args = ["--store", store, "--password-file", password_file]
    run_cli("site", "init", "--name", "site-a", *args)
    mix = random_file(tmp_path / "mix.img", 24 * MiB, 10)
    run_cli("volume", "import", "mix", mix, *args)  # one segment, one process
    over = random_file(tmp_path / "over.img", 13 * MiB, 11)
    run_cli("volume", "write", "mix", over, *args)  # its first segment is now 11/24 live
    run_cli("volume", "import", "big", random_file(tmp_path / "big.img", 4 * MiB, 12), *args)
    (big_segment,) = set(segments(store)) - {"00000001.seg", "00000002.seg"}
    run_cli("volume", "delete", "big", *args)
    filler = fill(disk, MiB)

    done = run_cli("datastore", "gc", *args)
    out = done.stdout.decode()
    assert big_segment not in segments(store), out
    assert "00000001.seg" in segments(store)  # 11 MiB to copy: no room
    assert "not compacted for lack of free space" in out, out
    assert free(disk) >= 4 * MiB

    filler.unlink()
    out = run_cli("datastore", "gc", *args).stdout.decode()
    assert "compacted 1 segment" in out and "00000001.seg" not in segments(store), out
    expected = over.read_bytes() + mix.read_bytes()[13 * MiB:]
    assert run_cli("volume", "read", "mix", "--length", 24 * MiB, *args).stdout == expected
    assert run_cli("datastore", "scrub", *args).returncode == 0


def test_convert_needs_room_for_one_segment_and_says_how_far_it_got(
    tmpfs: Callable[[int], Path], tmp_path: Path, password_file: Path
) -> None:
    """convert had rewritten every segment before deleting any old one: it needed room for a
    second copy of the store, and when it ran out it left the copies it had made on disk and
    said nothing was committed. Now each old segment goes once its copy is committed."""
    disk = tmpfs(72)
    store = disk / "store"
    run_cli("site", "init", "--name", "site-a", "--no-encryption", "--store", store)
    images = {f"v{i}": random_file(tmp_path / f"v{i}.img", 6 * MiB, 20 + i) for i in range(5)}
    images["large"] = random_file(tmp_path / "large.img", 14 * MiB, 30)
    for name, image in images.items():  # a segment each
        run_cli("volume", "import", name, image, "--store", store)
    args = ["--store", store, "--password-file", password_file]
    run_cli("datastore", "encryption", "enable", "--new-password-file", password_file, "--yes",
            *args)
    stored = sum(segments(store).values())
    filler = fill(disk, 12 * MiB)  # room for one 6 MiB segment (and its log), not 44 MiB

    failed = run_cli("datastore", "encryption", "convert", "--to", "encrypted", *args,
                     check=False)
    err = failed.stderr.decode()
    assert failed.returncode == 2 and len(err.strip().splitlines()) == 1, err
    assert "convert rewrote 5 segments (30.0 MiB" in err and "run convert again" in err, err
    assert "nothing of this operation was committed" not in err
    # No dead copies: the old file of every rewritten segment is gone.
    assert sum(segments(store).values()) <= stored + 64 * 1024
    for name, image in images.items():
        assert run_cli("volume", "read", name, "--length", image.stat().st_size,
                       *args).stdout == image.read_bytes()

    filler.unlink()
    fill(disk, 20 * MiB)  # room for the 14 MiB segment
    out = run_cli("datastore", "encryption", "convert", "--to", "encrypted", *args)
    assert "(1 segment rewritten, 0 extents left)" in out.stdout.decode()
    assert sum(segments(store).values()) <= stored + 64 * 1024
    assert run_cli("datastore", "scrub", *args).returncode == 0


#: Runs ``dvx-dr ARGS...`` and kills itself (SIGKILL) before or after its Nth unlink of a
#: segment file: ``python -c KILL_AT_UNLINK before|after N ARGS...``.
KILL_AT_UNLINK = """
import os, signal, sys
from dvx_dr.cli import run
when, nth, real, seen = sys.argv[1], int(sys.argv[2]), os.unlink, [0]
def unlink(path, *a, **k):
    seg = str(path).endswith(".seg")
    seen[0] += seg
    if seg and seen[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    real(path, *a, **k)
    if seg and seen[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
os.unlink = unlink
sys.argv = ["dvx-dr", *sys.argv[3:]]
sys.exit(run())
"""


def test_gc_killed_between_its_steps_loses_nothing(tmp_path: Path, password_file: Path
                                                   ) -> None:
    """gc killed around each segment file it deletes: the dead volume's segment (after the
    sweep commits) and then the compacted one (after its copies commit). The store opens,
    reads back and scrubs clean, and the next gc finishes the job. Dead segments go before any
    compaction begins (a kill at the first deletion finds no compaction's new segment)."""
    origin = tmp_path / "origin"
    args = ["--store", origin, "--password-file", password_file]
    run_cli("site", "init", "--name", "site-a", *args)
    keep = random_file(tmp_path / "keep.img", 2 * MiB, 40)
    run_cli("volume", "import", "keep", keep, *args)
    run_cli("snapshot", "create", "keep", "--name", "s", *args)
    mix = random_file(tmp_path / "mix.img", 4 * MiB, 41)
    run_cli("volume", "import", "mix", mix, *args)
    over = random_file(tmp_path / "over.img", 3 * MiB, 42)
    run_cli("volume", "write", "mix", over, *args)  # mix's first segment: 1/4 live
    run_cli("volume", "import", "dead", random_file(tmp_path / "d.img", 2 * MiB, 43), *args)
    run_cli("volume", "delete", "dead", *args)
    before = set(segments(origin))
    expected = over.read_bytes() + mix.read_bytes()[3 * MiB:]

    for when, nth in [("before", 1), ("after", 1), ("before", 2), ("after", 2)]:
        store = tmp_path / f"{when}-{nth}"
        shutil.copytree(origin, store)
        args = ["--store", store, "--password-file", password_file]
        killed = subprocess.run([sys.executable, "-c", KILL_AT_UNLINK, when, str(nth),
                                 "datastore", "gc", *map(str, args)],
                                capture_output=True, env=cli_env(), timeout=60)
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
        if nth == 1:  # the dead segment's file: no compaction has begun
            assert set(segments(store)) <= before, (when, nth)

        assert run_cli("snapshot", "read", "keep@s", "--length", 2 * MiB, *args).stdout \
            == keep.read_bytes()
        assert run_cli("volume", "read", "mix", "--length", 4 * MiB, *args).stdout == expected
        assert run_cli("datastore", "scrub", *args).returncode == 0
        run_cli("datastore", "gc", *args)
        # Nothing dead is left: keep's 2 MiB, over's 3 and mix's live last MiB.
        assert sum(segments(store).values()) < 6 * MiB + 256 * 1024, (when, nth)
        assert run_cli("volume", "read", "keep", "--length", 2 * MiB, *args).stdout \
            == keep.read_bytes()


def test_enable_on_a_full_disk_leaves_no_keystore(small_disk: Path, tmp_path: Path,
                                                 password_file: Path) -> None:
    """``encryption enable`` on a plain store whose disk fills while it re-indexes: it said
    nothing was committed, and it was not, but a new keystore file was left next to the
    plain store. Now that file is scrubbed, and enabling works once space is freed."""
    store = small_disk / "store"
    run_cli("site", "init", "--name", "site-a", "--store", store, "--block-size", "4KiB",
            "--no-encryption")
    image = random_file(tmp_path / "v.img", 4 * 1024 * 1024, 6)  # 1024 rows to re-index
    run_cli("volume", "import", "v", image, "--store", store)
    (store / RESERVE_NAME).unlink()  # (a store too full to open gives it up)
    filler = fill(small_disk, 64 * 1024)  # room for a keystore, not for the re-index
    failed = run_cli("datastore", "encryption", "enable", "--new-password-file", password_file,
                     "--yes", "--store", store, check=False)
    err = failed.stderr.decode()
    assert failed.returncode == 2, err
    assert "no space left" in err and "nothing of this operation was committed" in err, err
    assert not (store / "keystore.json").exists()
    filler.unlink()
    assert run_cli("volume", "export", "v", "-", "--store", store).stdout == image.read_bytes()
    run_cli("datastore", "encryption", "enable", "--new-password-file", password_file, "--yes",
            "--store", store)
    assert run_cli("volume", "export", "v", "-", "--store", store, "--password-file",
                   password_file).stdout == image.read_bytes()


def test_a_large_volume_can_be_deleted_on_a_disk_filled_to_the_last_byte(
        small_disk: Path, tmp_path: Path) -> None:
    """Deleting a volume removed its whole block map in one transaction, whose log grows with
    the volume: on a full disk it failed, and only gc (which frees nothing while the volume
    lives) could use the reserve. Now the deletion is marked in one small transaction (with
    the reserve when even that does not fit) and the map goes in bounded ones."""
    store = small_disk / "store"
    run_cli("site", "init", "--name", "site-a", "--store", store, "--block-size", "4KiB",
            "--no-encryption")
    block = random.Random(8).randbytes(4096)
    image = tmp_path / "same.img"
    with image.open("wb") as f:  # 512k blocks, all alike: a large map, one stored block
        for _ in range(512):
            f.write(block * 1024)
    run_cli("volume", "import", "v", image, "--store", store)
    filler = fill(small_disk, 0)
    assert free(small_disk) < 64 * 1024
    done = run_cli("volume", "delete", "v", "--store", store, check=False)
    assert done.returncode == 0, done.stderr
    filler.unlink()
    assert run_cli("volume", "list", "--store", store, "--json").stdout.strip() == b"[]"
    run_cli("volume", "import", "v", image, "--store", store)  # the name is free again
    assert run_cli("datastore", "scrub", "--store", store).returncode == 0


def test_a_deletion_a_crash_interrupted_is_finished_when_the_store_opens(tmp_path: Path
                                                                        ) -> None:
    store = tmp_path / "store"
    run_cli("site", "init", "--name", "site-a", "--store", store, "--no-encryption")
    run_cli("volume", "create", "v", "--size", "1MiB", "--store", store)
    run_cli("volume", "write", "v", "-", "--store", store, input=b"x" * 70_000)
    # What a kill after the marking transaction leaves.
    db = sqlite3.connect(store / "store.db")
    with db:
        db.execute("UPDATE volumes SET state='deleting', name='(deleting 1)'")
    db.close()
    assert run_cli("volume", "list", "--store", store, "--json").stdout.strip() == b"[]"
    db = sqlite3.connect(store / "store.db")
    assert db.execute("SELECT COUNT(*) FROM volumes").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM blocks").fetchone()[0] == 0
    db.close()
