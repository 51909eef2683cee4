"""The key manager through the real ``dvx-dr`` command: enable/disable/convert on live data,
password change, key rotation, locked startup of a real site, crypto erase, wrong passwords and
damaged keystores, and SIGKILL in the middle of change-password, rotate-key and convert.

Every command under test runs in its own child process. Checks that need the store's insides
(the unwrapped keys, a full read-back, a scrub after a crash) open it in this process, after the
child has exited or been killed.
"""

from __future__ import annotations

import base64
import copy
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dvx_dr.errors import StoreFullError, WrongPasswordError
from dvx_dr.site import keys as keys_module
from dvx_dr.site import keystore as keystore_module
from dvx_dr.site import scrub, volumes
from dvx_dr.site.store import Store
from tests.conftest import PASSWORD, cli_env, run_cli
from tests.integration.sites import Site, Sites, child_env, dvx, internal_errors, user_error

BLOCK = 64 * 1024
MiB = 1024 * 1024
SITE = "site-a"


# -- helpers --------------------------------------------------------------------------------


def marker(rng: random.Random) -> bytes:
    """A byte string that occurs nowhere by chance."""
    return b"DVX-MARKER-" + rng.randbytes(16).hex().encode()


def random_blocks(rng: random.Random, n: int, mark: bytes | None = None) -> bytes:
    """``n`` incompressible blocks (zstd stores them as they are, so a plain extent holds its
    bytes verbatim), with ``mark`` embedded in the first one."""
    data = bytearray(rng.randbytes(n * BLOCK))
    if mark is not None:
        data[100:100 + len(mark)] = mark
    return bytes(data)


def files_under(*roots: Path) -> Iterator[Path]:
    for root in roots:
        if root.is_file():
            yield root
        elif root.is_dir():
            yield from sorted(p for p in root.rglob("*") if p.is_file())


def holding(needle: bytes, *roots: Path) -> list[str]:
    """The files under ``roots`` whose bytes contain ``needle``."""
    return [str(p) for p in files_under(*roots) if needle in p.read_bytes()]


def digests(store: Path, *skip: str) -> dict[str, str]:
    """SHA-256 of every file in the store, except the lock file (it holds the owner's pid)."""
    skipped = {"lock", *skip}
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files_under(store) if p.name not in skipped}


def segments(store: Path) -> dict[str, int]:
    """Segment file name -> size."""
    return {p.name: p.stat().st_size for p in (store / "segments").glob("*.seg")}


def write_password(path: Path, password: str) -> Path:
    path.write_text(password + "\n")
    path.chmod(0o600)
    path.chmod(0o600)
    return path


class Cli:
    """``dvx-dr ARGS --store STORE [--password-file F]`` in a child process."""

    def __init__(self, store: Path, password_file: Path | None) -> None:
        self.store = store
        self.password_file = password_file

    def __call__(self, *args: str | Path | int, check: bool = True,
                 password_file: Path | None = None) -> subprocess.CompletedProcess[bytes]:
        pw = password_file or self.password_file
        extra: list[str | Path] = ["--password-file", pw] if pw else []
        return run_cli(*map(str, args), "--store", self.store, *extra, check=check)

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self("datastore", "encryption", "status", "--json").stdout))

    def export(self, volume: str = "vm1", password_file: Path | None = None) -> bytes:
        return self("volume", "export", volume, "-", password_file=password_file).stdout

    def enable(self, password_file: Path) -> None:
        self("datastore", "encryption", "enable", "--new-password-file", password_file, "--yes")


def by_version(status: dict[str, Any]) -> dict[int, tuple[int, int]]:
    """Key version -> (extents, bytes); version 0 is the plain extents."""
    out = {int(k["version"]): (k["extents"], k["bytes"]) for k in status["key_versions"]}
    out[0] = (status["plain"]["extents"], status["plain"]["bytes"])
    return out


def verify(store: Path, password: str, images: dict[str, bytes]) -> Store:
    """Open the store in this process, read every volume back whole, scrub it; return it
    (still open: the caller closes it)."""
    s = Store.open(store, lambda: password)
    try:
        for name, image in images.items():
            info = volumes.get(s, name)
            h = hashlib.sha256()
            for chunk in volumes.iter_range(s, info.id, info.size, 0, info.size):
                h.update(chunk)
            assert info.size == len(image), name
            assert h.hexdigest() == hashlib.sha256(image).hexdigest(), f"{name} reads back wrong"
        report = scrub.scrub(s)
        assert report.damaged == [], report.damaged
        return s
    except BaseException:
        s.close()
        raise


def opens_with(store: Path, password: str) -> bool:
    try:
        Store.open(store, lambda: password).close()
    except WrongPasswordError:
        return False
    return True


def spawn(*args: str | Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "dvx_dr", *map(str, args)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=cli_env())


def _reap(proc: subprocess.Popen[bytes], killed: bool) -> bool:
    out, err = proc.communicate()
    if not killed:
        assert proc.returncode == 0, f"exited {proc.returncode}: {err.decode(errors='replace')}"
    return killed


def kill_after(proc: subprocess.Popen[bytes], delay: float) -> bool:
    """SIGKILL ``proc`` after ``delay`` seconds. True if it was killed, False if it had
    already finished (successfully: anything else fails the test)."""
    try:
        proc.wait(delay)
        return _reap(proc, False)
    except subprocess.TimeoutExpired:
        proc.kill()
        return _reap(proc, True)


def kill_when(proc: subprocess.Popen[bytes], condition: Callable[[], bool],
              timeout: float = 60) -> bool:
    """SIGKILL ``proc`` the moment ``condition()`` holds (polled in a tight loop). True if it
    was killed, False if it finished first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if condition():
            proc.kill()
            return _reap(proc, True)
        assert time.monotonic() < deadline, "the command did not finish in time"
    return _reap(proc, False)


def timed(*args: str | Path) -> float:
    start = time.monotonic()
    run_cli(*args)
    return time.monotonic() - start


# -- enable, disable, convert on live data ---------------------------------------------------


def test_enable_on_plain_data_then_convert_and_back(tmp_path: Path, password_file: Path) -> None:
    rng = random.Random(1)
    store = tmp_path / "store"
    cli = Cli(store, None)
    old_mark, enc_mark, plain_mark = marker(rng), marker(rng), marker(rng)
    image = bytearray(random_blocks(rng, 32))
    image[3 * BLOCK + 100:3 * BLOCK + 100 + len(old_mark)] = old_mark
    (tmp_path / "image").write_bytes(image)
    run_cli("site", "init", "--store", store, "--name", SITE, "--no-encryption")
    cli("volume", "import", "vm1", tmp_path / "image")
    assert holding(old_mark, store), "a plain marker must be visible on disk (check the check)"
    plain_segments = segments(store)

    # Enable: old data stays readable (and plain); new data is encrypted.
    cli.enable(password_file)
    cli.password_file = password_file
    block = random_blocks(rng, 1, enc_mark)
    (tmp_path / "block").write_bytes(block)
    cli("volume", "write", "vm1", tmp_path / "block", "--offset", 16 * BLOCK)
    image[16 * BLOCK:17 * BLOCK] = block
    assert cli.export() == image
    # Neither the data nor its content hash (the raw block id) is anywhere on disk.
    for needle in (enc_mark, hashlib.sha256(block).digest()):
        assert holding(needle, store) == [], "data written after enable is on disk in the clear"
    assert holding(old_mark, store), "enable alone must not rewrite old extents"
    new_segments = {k: v for k, v in segments(store).items() if k not in plain_segments}
    # Each process writes its own segment files: the ones from before enable hold exactly the
    # plain extents, the one written after it exactly the encrypted extent.
    assert by_version(cli.status()) == {0: (32, sum(plain_segments.values())),
                                        1: (1, sum(new_segments.values()))}

    # Convert and gc: the old plain data is gone from the disk.
    cli("datastore", "encryption", "convert", "--to", "encrypted")
    cli("datastore", "gc")
    assert holding(old_mark, store) == []
    assert holding(enc_mark, store) == []
    assert by_version(cli.status()) == {0: (0, 0), 1: (32, sum(segments(store).values()))}
    assert cli.export() == image

    # Enabling what is enabled says that nothing changed (it said "encryption enabled").
    assert cli("datastore", "encryption", "enable").stdout == \
        b"encryption is already enabled; nothing changed\n"
    # Disable: new data is plain again; convert --to plain decrypts the rest.
    assert cli("datastore", "encryption", "disable").stdout.startswith(b"encryption disabled:")
    assert cli("datastore", "encryption", "disable").stdout == \
        b"encryption is already disabled; nothing changed\n"
    block = random_blocks(rng, 1, plain_mark)
    (tmp_path / "block").write_bytes(block)
    cli("volume", "write", "vm1", tmp_path / "block", "--offset", 0)
    image[0:BLOCK] = block
    found = holding(plain_mark, store)
    assert found and all(p.endswith(".seg") for p in found), found
    assert holding(enc_mark, store) == []
    cli("datastore", "encryption", "convert", "--to", "plain")
    assert by_version(cli.status()) == {0: (32, sum(segments(store).values())), 1: (0, 0)}
    assert holding(enc_mark, store), "convert --to plain must have decrypted every extent"
    assert cli.export() == image


# -- password change and key rotation -------------------------------------------------------


def test_change_password_rewraps_without_touching_data(tmp_path: Path,
                                                       password_file: Path) -> None:
    rng = random.Random(2)
    store = tmp_path / "store"
    cli = Cli(store, password_file)
    image = random_blocks(rng, 16)
    (tmp_path / "image").write_bytes(image)
    run_cli("site", "init", "--store", store, "--name", SITE, "--password-file", password_file)
    cli("volume", "import", "vm1", tmp_path / "image")
    before = digests(store / "segments")
    keystore = (store / "keystore.json").read_bytes()
    new = write_password(tmp_path / "new-password", "a brand new password")

    out = cli("datastore", "encryption", "change-password", "--new-password-file", new)
    assert b"password changed" in out.stdout
    user_error(cli("volume", "export", "vm1", "-", check=False), "wrong password")
    assert cli.export(password_file=new) == image
    assert digests(store / "segments") == before
    assert (store / "keystore.json").read_bytes() != keystore


def test_rotate_key_twice_then_convert_to_newest(tmp_path: Path, password_file: Path) -> None:
    rng = random.Random(3)
    store = tmp_path / "store"
    cli = Cli(store, password_file)
    image = bytearray(random_blocks(rng, 32))
    (tmp_path / "image").write_bytes(image)
    run_cli("site", "init", "--store", store, "--name", SITE, "--password-file", password_file)
    cli("volume", "import", "vm1", tmp_path / "image")
    written = {1: segments(store)}
    # Distinct random data after each rotation (nothing deduplicates), a different number of
    # blocks per version so that counts cannot be mixed up: 32, 8, 4.
    for version, (offset, n) in ((2, (0, 8)), (3, (8, 4))):
        out = cli("datastore", "encryption", "rotate-key")
        assert f"new key version {version}".encode() in out.stdout
        seen = segments(store)
        data = random_blocks(rng, n)
        (tmp_path / "data").write_bytes(data)
        cli("volume", "write", "vm1", tmp_path / "data", "--offset", offset * BLOCK)
        image[offset * BLOCK:(offset + n) * BLOCK] = data
        written[version] = {k: v for k, v in segments(store).items() if k not in seen}
    status = cli.status()
    assert status["current_key_version"] == 3
    assert by_version(status) == {0: (0, 0), 1: (32, sum(written[1].values())),
                                  2: (8, sum(written[2].values())),
                                  3: (4, sum(written[3].values()))}
    assert cli.export() == image  # extents of three key versions

    cli("datastore", "encryption", "convert", "--to", "encrypted")
    status = cli.status()
    # 20 live blocks of version 1, 8 of version 2, 4 of version 3: all now under version 3.
    assert by_version(status) == {0: (0, 0), 1: (0, 0), 2: (0, 0),
                                  3: (32, sum(segments(store).values()))}
    assert cli.export() == image


# -- locked startup of a real site ----------------------------------------------------------


class StartupKeySite(Site):
    """A site whose site.yaml names a startup key file, started without a password."""

    @property
    def startup_key(self) -> Path:
        return self.root / f"{self.name}.startup-key"

    def write_config(self) -> None:
        super().write_config()
        with self.config.open("a") as f:
            f.write(f"startup_key: {json.dumps(str(self.startup_key))}\n")

    def spawn(self) -> None:
        assert not self.running
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed by Site._reap
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dvx_dr", "site", "serve", "--config", str(self.config)],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            env=child_env())


def test_locked_startup_and_startup_key(tmp_path: Path) -> None:
    with Sites(tmp_path / "sites") as sites:
        site = StartupKeySite(SITE, sites.base / SITE, sites.pki, sites.sockets / "a.sock")
        sites.sites[SITE] = site
        site.create()
        image = random_blocks(random.Random(4), 4)
        (tmp_path / "image").write_bytes(image)
        site.cli("volume", "import", "vm1", tmp_path / "image")

        def volume_list() -> subprocess.CompletedProcess[bytes]:
            # No password: the command goes to the running site's admin socket.
            return dvx("volume", "list", "--store", site.store, check=False)

        def locked_status() -> bool:
            out = dvx("datastore", "encryption", "status", "--json", "--store", site.store)
            return bool(json.loads(out.stdout)["locked"])

        # No startup key yet: the site starts locked and refuses volume operations.
        site.start()
        user_error(volume_list(), "locked")
        user_error(dvx("volume", "export", "vm1", "-", "--store", site.store, check=False),
                   "locked")
        assert locked_status()
        # The site's status says so too: nothing replicates while it is locked.
        status = site.cli("status")
        assert b"store is locked" in status.stderr
        assert site.json("status")["locked"] is True
        wrong = write_password(tmp_path / "wrong", "not the password")
        user_error(dvx("datastore", "unlock", "--store", site.store, "--password-file", wrong,
                       check=False), "wrong password")
        assert locked_status()
        dvx("datastore", "unlock", "--store", site.store, "--password-file", site.password_file)
        assert not locked_status()
        assert site.json("status")["locked"] is False
        # Unlocking again checks the password and changes nothing; the log says "unlocked"
        # once, when it was.
        dvx("datastore", "unlock", "--store", site.store, "--password-file", site.password_file)
        assert site.log().count("store unlocked") == 1
        assert b"vm1" in volume_list().stdout
        assert dvx("volume", "export", "vm1", "-", "--store", site.store).stdout == image

        # Unlocked startup mode, set through the running site (key path from site.yaml).
        dvx("datastore", "encryption", "set", "--startup-mode", "unlocked", "--store",
            site.store)
        key = site.startup_key
        assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
        site.restart()
        assert not locked_status()
        listed = volume_list()
        assert listed.returncode == 0 and b"vm1" in listed.stdout, listed.stderr

        # A startup key file others may read is not used (it had been, silently): the site
        # starts locked and its log says why.
        site.stop()
        key.chmod(0o644)
        site.start()
        user_error(volume_list(), "locked")
        assert f"startup key {key} is not used: its mode is 0644" in site.log()
        key.chmod(0o600)
        site.restart()
        assert not locked_status()

        # Startup key file gone: back to a locked start, and the password still unlocks.
        site.stop()
        key.unlink()
        site.start()
        user_error(volume_list(), "locked")
        assert f"startup key {key} cannot be read (No such file or directory)" in site.log()
        dvx("datastore", "unlock", "--store", site.store, "--password-file", site.password_file)
        assert dvx("volume", "export", "vm1", "-", "--store", site.store).stdout == image
    assert internal_errors(site.log()) == []


# -- crypto erase ---------------------------------------------------------------------------


def _forms(secret: bytes) -> list[bytes]:
    """A key as it could be written: raw, base64, hex."""
    return [secret, base64.b64encode(secret), secret.hex().encode()]


def test_crypto_erase_destroys_every_copy_of_the_keys(tmp_path: Path,
                                                      password_file: Path) -> None:
    store = tmp_path / "store"
    cli = Cli(store, password_file)
    image = random_blocks(random.Random(5), 8)
    (tmp_path / "image").write_bytes(image)
    run_cli("site", "init", "--store", store, "--name", SITE, "--password-file", password_file)
    cli("volume", "import", "vm1", tmp_path / "image")
    startup = tmp_path / "keys" / "site-a.startup-key"
    cli("datastore", "encryption", "set", "--startup-mode", "unlocked", "--startup-key", startup)
    cli("datastore", "encryption", "rotate-key", "--startup-key", startup)

    with Store.open(store, lambda: PASSWORD) as s:
        assert s.keys is not None
        keys = [s.keys.index_key, *s.keys.teks.values()]
    assert len(keys) == 3
    doc = json.loads((store / "keystore.json").read_text())
    wrapped = [doc["index_key"]["password"], doc["index_key"]["startup"],
               *(e[slot] for e in doc["teks"] for slot in ("password", "startup"))]
    assert None not in wrapped
    secrets = [*keys, startup.read_bytes(), *(base64.b64decode(w) for w in wrapped)]
    needles = [form for secret in secrets for form in _forms(secret)]
    # The wrapped keys and the startup key are on disk before the erase (check the check).
    assert all(holding(w.encode(), store) for w in wrapped)
    assert holding(startup.read_bytes(), startup)

    # Hard links keep the key files' inodes reachable after they are deleted: an erase that
    # only unlinked them, without overwriting their bytes, leaves the keys in these.
    links = tmp_path / "links"
    links.mkdir()
    os.link(store / "keystore.json", links / "keystore.json")
    os.link(startup, links / "startup-key")

    # No --startup-key: the path recorded in the store is found and destroyed too.
    out = run_cli("datastore", "encryption", "crypto-erase", "--confirm-name", SITE, "--yes",
                  "--store", store)
    assert b"keys destroyed" in out.stdout and b"NOT erased" not in out.stdout
    for args in (("volume", "export", "vm1", "-"),
                 ("volume", "read", "vm1", "--offset", "0", "--length", "64KiB")):
        user_error(cli(*args, check=False), "keys destroyed")
    assert not startup.exists()
    left = [(p, n) for p in files_under(store, startup.parent, links) for n in needles
            if n in p.read_bytes()]
    assert left == [], "key material left on disk after crypto erase"


def test_crypto_erase_with_plain_data_left(tmp_path: Path, password_file: Path) -> None:
    rng = random.Random(6)
    store = tmp_path / "store"
    cli = Cli(store, None)
    plain_mark, enc_mark = marker(rng), marker(rng)
    (tmp_path / "image").write_bytes(random_blocks(rng, 8, plain_mark))
    run_cli("site", "init", "--store", store, "--name", SITE, "--no-encryption")
    cli("volume", "import", "vm1", tmp_path / "image")
    cli.enable(password_file)
    (tmp_path / "block").write_bytes(random_blocks(rng, 1, enc_mark))
    cli("volume", "write", "vm1", tmp_path / "block", "--offset", BLOCK,
        password_file=password_file)
    plain = cli.status()["plain"]
    assert plain["extents"] == 8

    erase = ("datastore", "encryption", "crypto-erase", "--confirm-name", SITE, "--yes")
    out = cli(*erase).stdout.decode()
    assert "still on disk in the clear" in out and f"({plain['extents']} extents)" in out, out
    assert "--delete-plain" in out
    assert holding(plain_mark, store), "the plain data is still on disk, as reported"
    after = cli.status()
    assert after["keys_destroyed"] and after["plain"] == plain
    user_error(cli("volume", "export", "vm1", "-", check=False, password_file=password_file),
               "keys destroyed")

    out = cli(*erase, "--delete-plain").stdout.decode()
    assert "deleted all data" in out, out
    assert holding(plain_mark, store) == []
    assert segments(store) == {}
    assert by_version(cli.status())[0] == (0, 0)


# -- wrong passwords and damaged keystores --------------------------------------------------


def test_wrong_password_five_times_changes_nothing(tmp_path: Path, password_file: Path) -> None:
    store = tmp_path / "store"
    image = random_blocks(random.Random(7), 8)
    (tmp_path / "image").write_bytes(image)
    run_cli("site", "init", "--store", store, "--name", SITE, "--password-file", password_file)
    Cli(store, password_file)("volume", "import", "vm1", tmp_path / "image")
    wrong = write_password(tmp_path / "wrong", "not the password at all")
    cli = Cli(store, wrong)
    before = digests(store)
    attempts: list[tuple[str | Path, ...]] = [
        ("volume", "list"),
        ("volume", "export", "vm1", "-"),
        ("datastore", "scrub"),
        ("datastore", "encryption", "change-password", "--new-password-file", wrong),
        ("datastore", "encryption", "rotate-key"),
    ]
    for args in attempts:
        line = user_error(cli(*args, check=False), "wrong password")
        assert PASSWORD not in line
        assert digests(store) == before, f"{args} with a wrong password changed files"
    # No lockout: the right password still works.
    assert Cli(store, password_file).export() == image


def _damaged_keystores(original: bytes) -> dict[str, bytes]:
    doc = json.loads(original)
    wrapped = bytearray(base64.b64decode(doc["teks"][0]["password"]))
    wrapped[5] ^= 1
    altered_key = json.loads(original)
    altered_key["teks"][0]["password"] = base64.b64encode(bytes(wrapped)).decode()
    return {
        "truncated": original[:len(original) // 2],
        "empty": b"",
        "field edited": json.dumps(doc | {"site": "site-b"}).encode(),
        "wrapped key edited": json.dumps(altered_key).encode(),
        "unknown version": json.dumps(doc | {"version": 99}).encode(),
        "not json": b"\x00\xff" * 100,
    }


def store_with_volume(tmp_path: Path, password_file: Path, seed: int, blocks: int
                      ) -> tuple[Path, Cli, bytes]:
    """An encrypted store holding volume vm1 of ``blocks`` random blocks: its path, a CLI
    for it, and the volume's bytes."""
    store = tmp_path / "store"
    cli = Cli(store, password_file)
    image = random_blocks(random.Random(seed), blocks)
    (tmp_path / "image").write_bytes(image)
    run_cli("site", "init", "--store", store, "--name", SITE, "--password-file", password_file)
    cli("volume", "import", "vm1", tmp_path / "image")
    return store, cli, image


def test_damaged_keystore_is_a_clear_error(tmp_path: Path, password_file: Path) -> None:
    store, cli, image = store_with_volume(tmp_path, password_file, 8, 8)
    keystore = store / "keystore.json"
    original = keystore.read_bytes()
    before = digests(store, "keystore.json")
    for what, damaged in _damaged_keystores(original).items():
        keystore.write_bytes(damaged)
        line = user_error(cli("volume", "export", "vm1", "-", check=False))
        assert str(keystore) in line, f"{what}: the error does not name the file: {line}"
        assert digests(store, "keystore.json") == before, f"{what}: data was touched"
        assert keystore.read_bytes() == damaged, f"{what}: the keystore was rewritten"
    keystore.write_bytes(original)
    verify(store, PASSWORD, {"vm1": image}).close()


# -- SIGKILL in the middle of key operations ------------------------------------------------


def test_kill_during_change_password(tmp_path: Path, password_file: Path) -> None:
    rng = random.Random(9)
    store = tmp_path / "store"
    image = random_blocks(rng, 16)
    (tmp_path / "image").write_bytes(image)
    run_cli("site", "init", "--store", store, "--name", SITE, "--password-file", password_file)
    Cli(store, password_file)("volume", "import", "vm1", tmp_path / "image")
    tmp_keystore = store / "keystore.json.tmp"

    def change(old: tuple[Path, str], new: tuple[Path, str]) -> tuple[str | Path, ...]:
        return ("datastore", "encryption", "change-password", "--store", store,
                "--password-file", old[0], "--new-password-file", new[0])

    # One uninterrupted run sets the scale of the delays.
    current = (write_password(tmp_path / "pw", "password number 0"), "password number 0")
    full = timed(*change((password_file, PASSWORD), current))
    outcomes = []
    # Random delays around the command's whole run, then two kills placed by watching the
    # keystore: while its temporary copy is being written, and the moment keystore.json itself
    # changes in any way (replaced, truncated or written in place).
    plan: list[float | str] = [rng.uniform(0.3, 1.0) for _ in range(5)] + ["tmp", "changed"]
    for i, when in enumerate(plan, 1):
        new = (write_password(tmp_path / f"pw{i}", f"password number {i}"), f"password number {i}")
        tmp_keystore.unlink(missing_ok=True)  # a leftover from an earlier kill
        seen = _identity(store / "keystore.json")
        proc = spawn(*change(current, new))
        if when == "tmp":
            killed = kill_when(proc, tmp_keystore.exists)
        elif when == "changed":
            def changed(seen: tuple[int, int, int] | None = seen) -> bool:
                return _identity(store / "keystore.json") != seen
            killed = kill_when(proc, changed)
        else:
            assert isinstance(when, float)
            killed = kill_after(proc, when * full)
        opening = [pw for pw in (current, new) if opens_with(store, pw[1])]
        assert len(opening) == 1, f"try {i} ({when}): opened by {len(opening)} passwords"
        if not killed:
            assert opening == [new]
        outcomes.append((when, killed, opening[0] is new))
        current = opening[0]
        verify(store, current[1], {"vm1": image}).close()
    assert any(killed for _, killed, _ in outcomes), outcomes


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def test_kill_during_rotate_key(tmp_path: Path, password_file: Path) -> None:
    rng = random.Random(10)
    store = tmp_path / "store"
    cli = Cli(store, password_file)
    image = bytearray(random_blocks(rng, 16))
    (tmp_path / "image").write_bytes(image)
    run_cli("site", "init", "--store", store, "--name", SITE, "--password-file", password_file)
    cli("volume", "import", "vm1", tmp_path / "image")
    args = ("datastore", "encryption", "rotate-key", "--store", store,
            "--password-file", password_file)
    full = timed(*args)
    version = 2
    outcomes = []
    plan: list[float | str] = [rng.uniform(0.3, 1.0) for _ in range(5)] + ["tmp"]
    for i, when in enumerate(plan):
        proc = spawn(*args)
        if when == "tmp":
            (store / "keystore.json.tmp").unlink(missing_ok=True)
            killed = kill_when(proc, (store / "keystore.json.tmp").exists)
        else:
            assert isinstance(when, float)
            killed = kill_after(proc, when * full)
        s = verify(store, PASSWORD, {"vm1": bytes(image)})
        try:
            assert s.keys is not None
            now = int(s.meta("key_version") or 0)
            assert now in s.keys.teks, f"try {i}: current key version {now} has no key"
            assert now >= version and (killed or now > version), f"try {i}: {now} after {version}"
        finally:
            s.close()
        outcomes.append((when, killed, now))
        version = now
    # Whatever was left behind, the store keeps working: new data under the current version.
    cli("datastore", "encryption", "rotate-key")
    data = random_blocks(rng, 2)
    (tmp_path / "data").write_bytes(data)
    cli("volume", "write", "vm1", tmp_path / "data", "--offset", 0)
    image[:2 * BLOCK] = data
    # The new current version is above the last one, and above any version a killed rotation
    # had already added to the keystore (without making it current).
    status = cli.status()
    current = status["current_key_version"]
    assert current > version, outcomes
    assert by_version(status)[current][0] >= 2, outcomes
    verify(store, PASSWORD, {"vm1": bytes(image)}).close()
    assert any(killed for _, killed, _ in outcomes), outcomes


def test_kill_during_convert(tmp_path: Path, password_file: Path) -> None:
    rng = random.Random(11)
    store = tmp_path / "store"
    cli = Cli(store, password_file)
    run_cli("site", "init", "--store", store, "--name", SITE, "--no-encryption")
    # 64 MiB of random data before enable, in four volumes written by four processes: four
    # segments, so that a convert killed half-way leaves some converted and some not.
    images = {f"vm{i}": rng.randbytes(16 * MiB) for i in range(4)}
    for name, image in images.items():
        (tmp_path / name).write_bytes(image)
        cli("volume", "import", name, tmp_path / name)
    cli.enable(password_file)
    total = by_version(cli.status())[0][1]
    args = ("datastore", "encryption", "convert", "--to", "encrypted", "--password-file",
            password_file)
    # The scale of the delays: how long a command takes to start, and a whole convert (timed
    # on a copy of the store).
    start_up = timed("datastore", "encryption", "status", "--store", store)
    shutil.copytree(store, tmp_path / "copy")
    whole = timed(*args, "--store", tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy")
    outcomes = []
    for _ in range(5):
        proc = spawn(*args, "--store", store)
        killed = kill_after(proc, rng.uniform(0.8 * start_up, 0.9 * whole))
        verify(store, PASSWORD, images).close()
        plain = by_version(cli.status())[0][1]
        outcomes.append((killed, plain))
        if not killed:
            break
    # Rerunning it completes the conversion.
    cli("datastore", "encryption", "convert", "--to", "encrypted")
    status = by_version(cli.status())
    assert status[0] == (0, 0), outcomes
    assert status[1][1] >= total, outcomes
    cli("datastore", "scrub")
    s = verify(store, PASSWORD, images)
    with s:
        live = {f"{seg:08d}.seg" for (seg,) in s.db.execute("SELECT DISTINCT seg FROM blobs")}
    # What the killed runs wrote and never committed is garbage for gc; no segment file is
    # left that holds nothing live.
    assert set(segments(store)) == live, outcomes
    assert any(killed for killed, _ in outcomes), outcomes



# -- found by an adversarial review of the key manager ------------------------------------


def test_a_crash_between_link_and_rename_does_not_cost_the_keystore(
        tmp_path: Path, password_file: Path) -> None:
    """A keystore write killed between linking the live file to ``.old`` and renaming the
    new one in left ``.old`` as a second name of the live keystore; the next write scrubbed
    ``.old`` first, writing random bytes over the live keystore: no password opened the
    store again. Now a leftover that is the live file is only unlinked."""
    store, cli, image = store_with_volume(tmp_path, password_file, 11, 4)
    live = store / "keystore.json"
    os.link(live, store / "keystore.json.old")  # what the crash leaves
    # The next write fails before its rename (here: its temporary file cannot be made).
    (store / "keystore.json.tmp").mkdir()
    new = write_password(tmp_path / "new-password", "a brand new password")
    user_error(cli("datastore", "encryption", "change-password", "--new-password-file", new,
                   check=False), "keystore.json.tmp is in the way", "nothing was changed")
    assert cli.export() == image  # the old password still opens it
    (store / "keystore.json.tmp").rmdir()
    cli("datastore", "encryption", "change-password", "--new-password-file", new)
    assert not (store / "keystore.json.old").exists()
    assert cli.export(password_file=new) == image


def test_a_keystore_write_that_fails_changes_nothing_in_memory(
        tmp_path: Path, password_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while the keystore is written (a running site keeps it in memory): the
    new password, key version or startup wrapping had stayed in memory though the file kept
    the old ones, so the site then refused the password its file still had. Now the change
    takes effect only once written, and the error says the disk is full. (The full disk is
    simulated: making one takes a mount.)"""
    store = tmp_path / "store"
    run_cli("site", "init", "--store", store, "--name", SITE, "--password-file", password_file)
    password = password_file.read_text().strip()
    s = Store.open(store, lambda: password)
    try:
        def full(path: Path, data: bytes, mode: int = 0o600) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(keystore_module, "write_atomic", full)
        before = copy.deepcopy(s.keystore.doc)
        versions = dict(s.keys.teks)
        with pytest.raises(StoreFullError, match="no space left"):
            keys_module.change_password(s, password, "a brand new password")
        with pytest.raises(StoreFullError):
            keys_module.rotate_key(s, password)
        assert s.keystore.doc == before
        assert s.keys.teks == versions
        s.keystore.verify_password(password)
    finally:
        s.close()
    assert opens_with(store, password)


def test_startup_key_paths_that_are_not_keys_are_refused(tmp_path: Path,
                                                         password_file: Path) -> None:
    """``set --startup-mode unlocked --startup-key PATH`` wrote the key over whatever PATH was
    (a disk image, the password file), and a store named through a symlink took a startup
    key inside itself. ``rotate-key --startup-key`` wrapped the keys under any 32-byte file.
    Each is refused, and nothing changes."""
    store = tmp_path / "store"
    cli = Cli(store, password_file)
    run_cli("site", "init", "--store", store, "--name", SITE, "--password-file", password_file)
    precious = tmp_path / "disk.img"
    precious.write_bytes(b"precious data\n" * 100)
    keystore = (store / "keystore.json").read_bytes()
    user_error(cli("datastore", "encryption", "set", "--startup-mode", "unlocked",
                   "--startup-key", precious, check=False), "is not a startup key")
    assert precious.read_bytes() == b"precious data\n" * 100
    link = tmp_path / "store-link"
    link.symlink_to(store)
    proc = run_cli("datastore", "encryption", "set", "--startup-mode", "unlocked",
                   "--startup-key", link / "startup.key", "--store", link,
                   "--password-file", password_file, check=False)
    user_error(proc, "outside the store directory")
    assert (store / "keystore.json").read_bytes() == keystore
    key = tmp_path / "startup.key"
    cli("datastore", "encryption", "set", "--startup-mode", "unlocked", "--startup-key", key)
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    keystore = (store / "keystore.json").read_bytes()
    user_error(cli("datastore", "encryption", "rotate-key", "--startup-key", other,
                   check=False), "its mode is 0644, which lets others read it")
    other.chmod(0o600)
    user_error(cli("datastore", "encryption", "rotate-key", "--startup-key", other,
                   check=False), "is not this store's startup key")
    assert (store / "keystore.json").read_bytes() == keystore
    cli("datastore", "encryption", "rotate-key", "--startup-key", key)


def test_enabling_again_keeps_the_password_and_refuses_a_new_one(
        tmp_path: Path, password_file: Path) -> None:
    """After ``disable``, ``enable`` reuses the store's keys and password; it had asked for a
    new password, ignored it and reported success, so an operator could throw away the
    only password that opens the store."""
    store = tmp_path / "store"
    cli = Cli(store, password_file)
    run_cli("site", "init", "--store", store, "--name", SITE, "--password-file", password_file)
    cli("datastore", "encryption", "disable")
    new = write_password(tmp_path / "new-password", "a brand new password")
    user_error(cli("datastore", "encryption", "enable", "--new-password-file", new, "--yes",
                   check=False), "uses them and their password")
    assert cli.status()["encryption"] == "off"
    out = cli("datastore", "encryption", "enable", "--yes")
    assert b"password is unchanged" in out.stdout
    assert cli.status()["encryption"] == "on"
    assert opens_with(store, password_file.read_text().strip())


def test_a_new_startup_key_is_kept_only_if_the_keystore_takes_it(
        tmp_path: Path, password_file: Path) -> None:
    """Re-keying unlocked startup mode when the keystore cannot be written (here: its
    temporary file cannot be made): the old startup key file had already been replaced, so
    the store lost its unattended start while the error said nothing changed. Now the
    keystore is written first, and the old key still opens the store."""
    store, cli, image = store_with_volume(tmp_path, password_file, 12, 2)
    key = tmp_path / "startup.key"
    cli("datastore", "encryption", "set", "--startup-mode", "unlocked", "--startup-key", key)
    before = key.read_bytes()
    (store / "keystore.json.tmp").mkdir()
    user_error(cli("datastore", "encryption", "set", "--startup-mode", "unlocked",
                   "--startup-key", key, check=False), "nothing was changed")
    assert key.read_bytes() == before
    (store / "keystore.json.tmp").rmdir()
    assert run_cli("volume", "export", "vm1", "-", "--store", store).stdout == image  # no password


def test_a_keystore_replaced_but_not_scrubbed_counts_as_changed(
        tmp_path: Path, password_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new keystore is in place when scrubbing the old one fails (a copy-on-write file
    system with no space to overwrite it; simulated): the change had been reported as failed
    and undone in memory, though the file held it. Now it stands, with a warning."""
    store = tmp_path / "store"
    run_cli("site", "init", "--store", store, "--name", SITE, "--password-file", password_file)
    password = password_file.read_text().strip()
    s = Store.open(store, lambda: password)
    try:
        def no_space(path: Path) -> None:
            if path.exists():  # only the old keystore, after the rename
                raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(keystore_module, "scrub_file", no_space)
        keys_module.change_password(s, password, "a brand new password")
        s.keystore.verify_password("a brand new password")
    finally:
        s.close()
    assert opens_with(store, "a brand new password")


_KILL_AFTER_RENAME = """
import os, signal, sys
from dvx_dr.cli import run
replace = os.replace
def killed_after(*args, **kwargs):
    replace(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)  # between the keystore's rename and its scrub
os.replace = killed_after
sys.argv[0] = "dvx-dr"
sys.exit(run())
"""


def test_what_a_killed_keystore_write_leaves_is_scrubbed_when_the_store_opens(
        tmp_path: Path, password_file: Path) -> None:
    """``change-password`` killed between putting the new keystore in place and scrubbing
    the old one left ``keystore.json.old``, which the old password still opened, until the
    next keystore write (maybe never). Now the next opening of the store scrubs it, and a
    leftover ``.tmp`` (a write killed before its rename) too."""
    store, cli, image = store_with_volume(tmp_path, password_file, 12, 4)
    new = write_password(tmp_path / "new-password", "a brand new password")
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_RENAME, "datastore", "encryption",
         "change-password", "--new-password-file", new, "--store", store,
         "--password-file", password_file], capture_output=True, env=child_env())
    assert killed.returncode == -signal.SIGKILL
    old = store / "keystore.json.old"
    assert old.exists()
    leftover = old.read_bytes()
    (store / "keystore.json.tmp").write_bytes(leftover)  # as a write killed before its rename
    assert cli.export(password_file=new) == image  # opens, with the new password
    assert not old.exists() and not (store / "keystore.json.tmp").exists()
    for path in store.rglob("*"):
        if path.is_file():
            assert leftover not in path.read_bytes(), f"{path} holds the old keystore"
    assert not opens_with(store, password_file.read_text().strip())


def test_an_enable_killed_before_its_commit_leaves_no_keystore(tmp_path: Path,
                                                              password_file: Path) -> None:
    """``encryption enable`` on a plain store killed after writing the new keystore but
    before committing: the store stayed plain, next to a keystore of keys nothing was written
    with (and the command had said to back it up). The next opening scrubs it."""
    store = tmp_path / "store"
    run_cli("site", "init", "--store", store, "--name", SITE, "--no-encryption")
    image = random_blocks(random.Random(13), 4)
    (tmp_path / "image").write_bytes(image)
    run_cli("volume", "import", "vm1", tmp_path / "image", "--store", store)
    killed = subprocess.run(
        [sys.executable, "-c", _KILL_AFTER_RENAME, "datastore", "encryption", "enable",
         "--new-password-file", password_file, "--yes", "--store", store],
        capture_output=True, env=child_env())
    assert killed.returncode == -signal.SIGKILL
    keystore = store / "keystore.json"
    written = keystore.read_bytes()
    out = run_cli("volume", "export", "vm1", "-", "--store", store)
    assert out.stdout == image  # still plain: no password asked
    assert "left by an 'encryption enable' that did not finish" in out.stderr.decode()
    assert not keystore.exists()
    for path in store.rglob("*"):
        if path.is_file():
            assert written not in path.read_bytes(), f"{path} holds the stray keystore"
    run_cli("datastore", "encryption", "enable", "--new-password-file", password_file,
            "--yes", "--store", store)  # and enabling works
    assert run_cli("volume", "export", "vm1", "-", "--store", store, "--password-file",
                   password_file).stdout == image
