"""Shared pieces of the benchmarks: measured command runs, tool lookup, work dir, table output.

Used by ``bench/ingest.py`` and meant for ``bench/replicate.py``. Benchmarks are run as scripts
(``python bench/ingest.py``), so this module is imported as ``common`` from the ``bench`` folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, NamedTuple

import datagen

BENCH_DIR = Path(__file__).resolve().parent
WORK_DIR = BENCH_DIR / ".work"
MB = 1_000_000  # MB and MB/s in the output are decimal, like disk and network rates

# The smallest restic with compression (repository format version 2).
RESTIC_MIN_VERSION = (0, 14, 0)


class BenchError(Exception):
    """A problem the benchmark cannot continue past; the message says what to do."""


class CommandFailed(BenchError):
    def __init__(self, cmd: Sequence[str], returncode: int, stderr: str) -> None:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        super().__init__(f"command failed (exit {returncode}): {' '.join(cmd)}\n{tail}")
        self.returncode = returncode
        self.stderr = stderr


class Measured(NamedTuple):
    """One command run: wall seconds, the child's peak resident set, what it printed."""

    seconds: float
    peak_rss_bytes: int
    stdout: str


# --------------------------------------------------------------------------------------------
# Running commands
# --------------------------------------------------------------------------------------------


def _merged_env(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = dict(os.environ)
    if env:
        merged.update(env)
    return merged


def _drain(stream: IO[bytes], sink: list[bytes]) -> None:
    for chunk in iter(lambda: stream.read(65536), b""):
        sink.append(chunk)


def run_measured(
    cmd: Sequence[str | os.PathLike[str]],
    env: Mapping[str, str] | None = None,
    *,
    cwd: Path | None = None,
    check: bool = True,
) -> Measured:
    """Run ``cmd`` (``env`` is added to this process's environment) and measure it, after a
    ``sync``.

    Wall time runs from just before the process is started until it has been reaped. The peak
    resident set is the ``ru_maxrss`` that ``os.wait4`` reports for this child alone (it covers
    the child and any descendants it waited for), so runs do not blur into each other the way
    ``getrusage(RUSAGE_CHILDREN)`` maxima do. stdout and stderr are captured; with ``check``, a
    non-zero exit raises :class:`CommandFailed` with the end of stderr.
    """
    args = [os.fspath(c) for c in cmd]
    out: list[bytes] = []
    err: list[bytes] = []
    # The previous command's dirty pages are written back now, not inside this measurement.
    os.sync()
    start = time.perf_counter()
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_merged_env(env),
            cwd=cwd,
        )
    except FileNotFoundError as exc:
        raise BenchError(f"cannot run {args[0]}: {exc.strerror}") from exc
    assert proc.stdout is not None and proc.stderr is not None
    readers = [
        threading.Thread(target=_drain, args=(proc.stdout, out), daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, err), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    for reader in readers:
        reader.join()
    proc.stdout.close()
    proc.stderr.close()
    stdout = b"".join(out).decode(errors="replace")
    if check and proc.returncode != 0:
        raise CommandFailed(args, proc.returncode, b"".join(err).decode(errors="replace"))
    # Linux reports ru_maxrss in KiB (macOS in bytes).
    scale = 1 if sys.platform == "darwin" else 1024
    return Measured(seconds, usage.ru_maxrss * scale, stdout)


def run(
    cmd: Sequence[str | os.PathLike[str]],
    env: Mapping[str, str] | None = None,
    *,
    cwd: Path | None = None,
) -> str:
    """Run an unmeasured set-up command; returns stdout, raises CommandFailed on failure."""
    return run_measured(cmd, env, cwd=cwd).stdout


# --------------------------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------------------------


def find_dvx_dr() -> str:
    """The ``dvx-dr`` executable on PATH, or a BenchError saying how to get it there."""
    exe = shutil.which("dvx-dr")
    if exe is None:
        raise BenchError(
            "dvx-dr is not on PATH. Run the benchmark with `make bench` (it puts .venv/bin "
            "first on PATH), or install the project (`pip install -e .`) into the active venv."
        )
    return exe


def _restic_version(exe: str) -> tuple[int, ...]:
    text = run([exe, "version"])
    m = re.search(r"restic (\d+)\.(\d+)\.(\d+)", text)
    if not m:
        raise BenchError(f"cannot tell the version of {exe} from {text.strip()!r}")
    return tuple(int(g) for g in m.groups())


def find_restic(install: bool = True) -> str:
    """The ``restic`` executable (>= 0.14, for compression).

    When it is missing and we run as root on a Debian-like system, installs it with
    ``apt-get install -y restic`` (running ``apt-get update`` first if that fails).
    """
    exe = shutil.which("restic")
    if exe is None and install and os.geteuid() == 0 and shutil.which("apt-get"):
        print("restic not found: installing it with apt-get", file=sys.stderr)
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        try:
            run(["apt-get", "install", "-y", "restic"], env)
        except CommandFailed:
            run(["apt-get", "update"], env)
            run(["apt-get", "install", "-y", "restic"], env)
        exe = shutil.which("restic")
    if exe is None:
        raise BenchError(
            "restic is not installed. Install it with `sudo apt-get install -y restic` "
            "(Debian/Ubuntu), `dnf install restic`, `brew install restic`, or a release binary "
            "from https://github.com/restic/restic/releases (0.14 or newer), then rerun."
        )
    version = _restic_version(exe)
    if version < RESTIC_MIN_VERSION:
        found = ".".join(map(str, version))
        raise BenchError(
            f"{exe} is restic {found}; compression needs 0.14 or newer "
            "(https://github.com/restic/restic/releases)"
        )
    return exe


def find_rsync() -> str:
    """The ``rsync`` executable on PATH, or a BenchError saying how to install it."""
    exe = shutil.which("rsync")
    if exe is None:
        raise BenchError(
            "rsync is not installed. Install it with `sudo apt-get install -y rsync` "
            "(Debian/Ubuntu), `dnf install rsync` or `brew install rsync`, then rerun."
        )
    return exe


# --------------------------------------------------------------------------------------------
# Long-running processes (servers measured from outside)
# --------------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _proc_status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError as exc:
        raise BenchError(f"cannot read /proc/{pid}/status: {exc.strerror}") from exc
    raise BenchError(f"/proc/{pid}/status has no {key} (this needs Linux)")


def peak_rss(pid: int) -> int:
    """Peak resident set of a running process, in bytes: ``VmHWM`` of /proc/PID/status (since
    the process started, or since the last :func:`reset_peak_rss`)."""
    return _proc_status_kib(pid, "VmHWM") * 1024


def reset_peak_rss(pid: int) -> bool:
    """Reset a running process's ``VmHWM`` to its current RSS (``echo 5 > /proc/PID/clear_refs``,
    Linux 4.0+; needs the same user or root). Returns False when the kernel refused."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> int:
    """SIGTERM ``proc`` and wait for it (SIGKILL after ``timeout`` seconds); its exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"pid {proc.pid} did not stop in {timeout:.0f} s: killing it", file=sys.stderr)
            proc.kill()
            proc.wait()
    return proc.returncode


# --------------------------------------------------------------------------------------------
# Work dir, images, sizes
# --------------------------------------------------------------------------------------------


def work_dir(*parts: str) -> Path:
    """``bench/.work/<parts>``, created. The whole of bench/.work is scratch (git-ignored)."""
    path = WORK_DIR.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fresh_dir(path: Path) -> Path:
    """An empty directory at ``path`` (anything there before is removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def ensure_image(size: int, seed: int = 1) -> Path:
    """The generated image of ``size`` bytes for ``seed`` in the work dir, made if missing.

    An image is reused only when its sidecar ``.json`` records the same size, seed and
    generator version; it is written under a temporary name and renamed when complete.
    """
    image = work_dir() / f"image-{size}-seed{seed}.raw"
    meta_path = image.with_suffix(".json")
    meta = {"size": size, "seed": seed, "generator": datagen.GENERATOR_VERSION}
    with contextlib.suppress(OSError, ValueError):  # no or stale sidecar: generate anew
        if json.loads(meta_path.read_text()) == meta and image.stat().st_size == size:
            return image
    tmp = image.with_suffix(".tmp")
    print(f"generating {human_size(size)} image (seed {seed}) -> {image}", file=sys.stderr)
    start = time.perf_counter()
    datagen.generate(tmp, size, seed)
    seconds = time.perf_counter() - start
    print(f"  {seconds:.1f} s, {size / seconds / MB:.0f} MB/s", file=sys.stderr)
    tmp.replace(image)
    meta_path.write_text(json.dumps(meta) + "\n")
    return image


def warm_cache(path: Path) -> None:
    """Read ``path`` once so that every measured run starts with it in the page cache."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * 1024 * 1024)
        while f.readinto(buf) > 0:
            continue


def drop_cache(*paths: Path) -> None:
    """Evict ``paths`` (files, or every file under a directory) from the page cache, so that
    the next command reads them from the disk: ``sync``, then ``posix_fadvise(DONTNEED)`` on
    each file. It needs no privileges (unlike ``/proc/sys/vm/drop_caches``) and leaves the
    rest of the system's cache alone. Memory inside running processes (a site's SQLite page
    cache) is not touched."""
    os.sync()
    for path in paths:
        files = [path] if path.is_file() else [
            Path(root) / name for root, _dirs, names in os.walk(path) for name in names]
        for file in files:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                continue  # a socket, or a file removed meanwhile
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def copy_sparse(src: Path, dst: Path, chunk: int = 1024 * 1024) -> None:
    """Copy ``src`` to ``dst`` leaving all-zero ``chunk``-sized pieces as holes (like
    ``cp --sparse=always``), so a copy of a thin image stays thin."""
    zero = bytes(chunk)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while data := fin.read(chunk):
            if data == zero[: len(data)]:
                fout.seek(len(data), os.SEEK_CUR)
            else:
                fout.write(data)
        fout.truncate()


def tree_bytes(path: Path) -> int:
    """Sum of the sizes of the regular files under ``path`` (what ``du --apparent-size -b``
    shows, without directory entries)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            total += st.st_size
    return total


def password_file(directory: Path) -> Path:
    """A fresh random password in ``directory/password`` (mode 0600)."""
    path = directory / "password"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_urlsafe(24) + "\n")
    return path


def parse_size(text: str) -> int:
    return datagen.parse_size(text)


def human_size(n: float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table; the first column is left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def host_info() -> dict[str, object]:
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
        "machine": os.uname().machine,
    }
