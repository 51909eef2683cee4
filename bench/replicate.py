"""Replication benchmark: dvx-dr site-to-site replication against restic copy and rsync.

    python bench/replicate.py [--size 1GiB] [--seed 1] [--json OUT] [--keep] [--no-verify]

One run, on one VM-like disk image from ``bench/datagen.py`` (kept in ``bench/.work/`` and reused
for the same size and seed), then on a copy of it with 1 % of its 64 KiB blocks overwritten
(``datagen.mutate``, seed 2):

1. **dvx-dr, initial.** Two encrypted sites on 127.0.0.1 (a CA and site certificates from
   ``dvx-dr pki``, ``site init --password-file``, one ``site.yaml`` each, as in
   ``deploy/demo.sh``). The image is imported into site-a before the sites start (not measured);
   then both ``site serve`` processes run and ``dvx-dr replicate --volume vm1 --to site-b
   --json`` is measured: mutual TLS 1.3 over loopback, site-a decrypting and site-b
   re-encrypting with its own key. Bytes on wire is the transfer's own ``bytes_on_wire``
   (blocks, tree pages and the ids exchanged; TLS framing not included).
2. **dvx-dr, incremental.** The mutated image is written into vm1 through the running site
   (``volume write``: timed and printed, not part of a ratio), then the same ``replicate`` is
   measured. Its bytes on wire are compared with the changed data's compressed size: zstd
   level 3 of each 64 KiB block of the mutated image that differs from the original (all-zero
   blocks skipped; a block that does not shrink counts at its length). Also printed: the ratio
   to the compressed size of only those changed blocks whose content the original image did
   not hold (the mutation copies some blocks from elsewhere in the image, which the target
   already has).
3. **restic copy, initial.** Two repositories (format 2) with different passwords, the second
   made with ``init --from-repo ... --copy-chunker-params`` (restic >= 0.14 flag names); the
   image is backed up into the first (not measured), then ``restic copy`` into the second is
   measured. Bytes on wire is what the copy added to the second repository (file sizes). Then
   the same copy selecting no snapshot (``--host no-such-host``) is timed: restic's fixed cost
   (start-up, both repositories' scrypt key opening, index loading), which dvx-dr's running
   sites paid before their transfer was timed; the ratio without it is printed too.
4. **rsync, incremental.** The original image is copied to a destination file (not measured),
   then ``rsync --inplace --no-whole-file --ignore-times --stats`` of the mutated image onto it
   is measured (``--no-whole-file`` forces the delta algorithm, which a local copy skips by
   default). Bytes on wire is rsync's ``Total bytes sent`` (its literal data plus block
   matches; the block checksums coming back are ``Total bytes received``, shown below).
5. **Both incrementals again, cold cache.** A second 1 % change (seed 3) of the mutated image
   is written into vm1; both stores' files are evicted from the page cache (``sync``, then
   ``posix_fadvise(DONTNEED)`` on every file; the sites keep running, with whatever they hold
   in their own memory) and ``replicate`` is measured again. rsync likewise copies the second
   change onto a copy of the first with both files evicted. This is the usual case for a
   scheduled replication: the image was written some time ago and is no longer cached. The
   warm case is measured and reported too, and both are held to the same target.
6. **Five more warm pairs.** A further 1 % change (seeds 12-16) is written into vm1 (not
   measured) and replicated (measured), then rsync copies the same change onto a copy of the
   image before it, both files cached (measured); five times. One pair is one sample of a
   command of about 0.1 s on a VM whose timings move by 10-30 %, so the median of the five
   pairs' ratios is held to the warm target too.

MB/s is always image bytes / seconds. Peak memory is ``ru_maxrss`` of the measured command for
restic and rsync, and for dvx-dr the ``VmHWM`` of each ``site serve`` process (read from /proc
before the sites stop): the initial row covers the site from its start through the initial
transfer, the incremental row the incremental transfer alone (the peak is reset after the
``volume write``), and the memory checks use each site's peak over the whole run (through the
cold-cache transfer).
Targets: initial replication >= 2x as fast as restic copy; incremental bytes on wire <= 1.1x
the changed data's compressed size; incremental < 1/10 of rsync's time (warm, and cold); peak
memory < 300 MB at each site. Timings on a shared or small VM vary by 10-30 % from run to run.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import operator
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import common
import datagen
from common import MB, BenchError

VOLUME = "vm1"
MUTATE_FRACTION = 0.01
MUTATE_SEED = 2
#: Further 1% changes after the cold-cache pair, each replicated by dvx-dr and then copied by
#: rsync, warm: one pair is one sample of a ~0.1 s command on a VM whose timings move by
#: 10-30%, so the warm verdict takes the median of these pairs' ratios.
PAIRS = 5
ZSTD_LEVEL = 3
SITES = ("site-a", "site-b")

TARGET_INITIAL_VS_RESTIC = 2.0
TARGET_WIRE_VS_CHANGED = 1.1
TARGET_INCREMENTAL_VS_RSYNC = 0.1
TARGET_PEAK_RSS_BYTES = 300 * MB

_OPS = {"<": operator.lt, "<=": operator.le, ">=": operator.ge}

DVX_INITIAL = "dvx-dr replicate, initial"
RESTIC_COPY = "restic copy, initial"
DVX_INCREMENTAL = "dvx-dr replicate, incremental"
RSYNC = "rsync --inplace, incremental"
DVX_COLD = "dvx-dr replicate, incremental, cold cache"
RSYNC_COLD = "rsync --inplace, incremental, cold cache"


@dataclass
class Result:
    """One measured transfer. ``peak_rss_bytes`` is keyed by process (site name or tool)."""

    case: str
    seconds: float
    mb_per_s: float
    bytes_on_wire: int
    peak_rss_bytes: dict[str, int]
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The changed data
# --------------------------------------------------------------------------------------------


def changed_blocks(original: Path, mutated: Path, block: int = datagen.BLOCK) -> dict[str, int]:
    """Compare the two images block by block; zstd-compress each changed, non-zero block.

    ``compressed_bytes`` counts every such block (the changed data, the issue's measure).
    ``new_compressed_bytes`` counts only the changed blocks whose content the original image
    did not hold at any 64 KiB-aligned place, each content once: what a transfer that skips
    what the target already holds has to move at the least (the mutation copies some blocks
    from elsewhere in the image)."""
    import hashlib

    import zstandard  # a dependency of dvx-dr, so in its venv

    cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    zero = bytes(block)
    chunk = 128 * block
    changed = zero_blocks = raw = compressed = 0
    held: set[bytes] = set()
    new_blocks: dict[bytes, int] = {}  # content hash -> compressed size
    with open(original, "rb") as fa, open(mutated, "rb") as fb:
        while True:
            a, b = fa.read(chunk), fb.read(chunk)
            if not a and not b:
                break
            for off in range(0, max(len(a), len(b)), block):
                old, new = a[off : off + block], b[off : off + block]
                held.add(hashlib.sha256(old).digest())
                if old == new:
                    continue
                changed += 1
                if new == zero[: len(new)]:
                    zero_blocks += 1
                    continue
                raw += len(new)
                size = min(len(cctx.compress(new)), len(new))
                compressed += size
                new_blocks[hashlib.sha256(new).digest()] = size
    fresh = {h: n for h, n in new_blocks.items() if h not in held}
    return {
        "changed_blocks": changed,
        "zero_blocks_skipped": zero_blocks,
        "raw_bytes": raw,
        "compressed_bytes": compressed,
        "new_blocks": len(fresh),
        "new_compressed_bytes": sum(fresh.values()),
    }


# --------------------------------------------------------------------------------------------
# dvx-dr: two sites on 127.0.0.1
# --------------------------------------------------------------------------------------------


class Site:
    """One site's directory (store, site.yaml, password, log) and its ``site serve`` process."""

    def __init__(self, exe: str, name: str, home: Path, socket_dir: Path) -> None:
        self.exe = exe
        self.name = name
        self.home = common.fresh_dir(home)
        self.store = home / "store"
        self.config = home / "site.yaml"
        self.log = home / "serve.log"
        # Unix socket paths are limited to ~107 bytes: keep them in a short temporary dir.
        self.socket = socket_dir / f"{name}.sock"
        self.port = common.free_port()
        self.password = common.password_file(home)
        self.proc: subprocess.Popen[bytes] | None = None

    def init(self, pki: Path, peer: Site) -> None:
        common.run(
            [
                self.exe,
                "site",
                "init",
                "--store",
                self.store,
                "--name",
                self.name,
                "--password-file",
                self.password,
            ]
        )
        (self.home / "policies").mkdir()

        def q(path: Path) -> str:  # a JSON string is a valid YAML double-quoted scalar
            return json.dumps(str(path))

        self.config.write_text(
            f"name: {self.name}\n"
            f"store: {q(self.store)}\n"
            f"listen: 127.0.0.1:{self.port}\n"
            "tls:\n"
            f"  cert: {q(pki / f'{self.name}.crt')}\n"
            f"  key: {q(pki / f'{self.name}.key')}\n"
            f"  ca: {q(pki / 'ca.crt')}\n"
            f"admin_socket: {q(self.socket)}\n"
            f"policy_dir: {q(self.home / 'policies')}\n"
            "peers:\n"
            f"  {peer.name}: https://127.0.0.1:{peer.port}\n"
        )

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    self.exe,
                    "site",
                    "serve",
                    "--config",
                    str(self.config),
                    "--password-file",
                    str(self.password),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches us, and we stop the site cleanly
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.name} exited ({self.proc.returncode}) at start-up:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} did not open {self.socket} in {timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} is not running"
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        code = common.stop_process(self.proc)
        if code not in (0, -15):
            print(f"warning: {self.name} exited with {code}:\n{self.log_tail()}", file=sys.stderr)
        self.proc = None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def replicate(exe: str, site: Site, target: str) -> tuple[common.Measured, dict[str, Any]]:
    cmd = [
        exe,
        "replicate",
        "--volume",
        VOLUME,
        "--to",
        target,
        "--config",
        str(site.config),
        "--json",
    ]
    measured = common.run_measured(cmd)
    try:
        stats = json.loads(measured.stdout)
    except ValueError as exc:
        raise BenchError(
            f"`dvx-dr replicate --json` did not print JSON: {measured.stdout[:200]!r}"
        ) from exc
    if not isinstance(stats, dict) or "bytes_on_wire" not in stats:
        raise BenchError(f"`dvx-dr replicate --json` lacks bytes_on_wire: {stats!r:.300}")
    if stats.get("already_replicated"):
        raise BenchError(f"{stats.get('snapshot')} was already replicated: nothing was measured")
    return measured, stats


def run_dvx(
    exe: str, image: Path, mutated: Path, mutated2: Path, base: Path, verify: bool,
    rsync: str,
) -> tuple[Result, Result, Result, dict[str, Any]]:
    """The dvx-dr transfers between two fresh sites: initial, incremental, then a second
    incremental (``mutated2``) with both stores evicted from the page cache; then ``PAIRS``
    more warm incrementals, each paired with an rsync of the same change."""
    size = image.stat().st_size
    home = common.fresh_dir(base / "dvx")
    pki = home / "pki"
    socket_dir = Path(tempfile.mkdtemp(prefix="dvxb-"))
    sites: list[Site] = []
    try:
        common.run([exe, "pki", "init-ca", pki])
        for name in SITES:
            common.run([exe, "pki", "issue-site", pki, name, "--host", "127.0.0.1"])
            sites.append(Site(exe, name, home / name, socket_dir))
        a, b = sites
        a.init(pki, b)
        b.init(pki, a)
        print(f"  importing the image into {a.name} (not measured) ...", file=sys.stderr)
        common.run(
            [
                exe,
                "volume",
                "import",
                VOLUME,
                image,
                "--store",
                a.store,
                "--password-file",
                a.password,
            ]
        )
        for site in sites:
            site.start()
        for site in sites:
            site.wait_ready()
        # VmHWM per site at each step (cumulative unless reset; the reset is after "write").
        memory: dict[str, dict[str, int]] = {
            s.name: {"started": common.peak_rss(s.pid)} for s in sites
        }

        common.warm_cache(image)
        print("  dvx-dr initial replication ...", file=sys.stderr)
        initial_run, initial_stats = replicate(exe, a, b.name)
        for s in sites:
            memory[s.name]["initial"] = common.peak_rss(s.pid)

        print(f"  writing the mutated image into {VOLUME} (timed, not part of a ratio) ...",
              file=sys.stderr)
        write_run = common.run_measured(
            [exe, "volume", "write", VOLUME, mutated, "--store", a.store])
        reset = True
        for s in sites:
            memory[s.name]["write"] = common.peak_rss(s.pid)
            reset = common.reset_peak_rss(s.pid) and reset
        if not reset:
            print(
                "warning: cannot reset VmHWM: the incremental peak includes the earlier steps",
                file=sys.stderr,
            )

        print("  dvx-dr incremental replication ...", file=sys.stderr)
        incr_run, incr_stats = replicate(exe, a, b.name)
        for s in sites:
            memory[s.name]["incremental"] = common.peak_rss(s.pid)

        verified: bool | None = None
        if verify:
            print(
                f"  verifying {incr_stats['replica']} at {b.name} (not measured) ...",
                file=sys.stderr,
            )
            exported = home / "replica.raw"
            common.run(
                [exe, "snapshot", "export", incr_stats["replica"], exported, "--store", b.store]
            )
            verified = filecmp.cmp(exported, mutated, shallow=False)
            exported.unlink()
            if not verified:
                raise BenchError(
                    f"the replica {incr_stats['replica']} at {b.name} differs "
                    "from the mutated image"
                )

        print(f"  writing the second change into {VOLUME} and evicting both stores from the "
              "page cache (not measured) ...", file=sys.stderr)
        common.run([exe, "volume", "write", VOLUME, mutated2, "--store", a.store])
        common.drop_cache(a.store, b.store)
        print("  dvx-dr incremental replication, cold cache ...", file=sys.stderr)
        cold_run, cold_stats = replicate(exe, a, b.name)
        for s in sites:
            memory[s.name]["cold"] = common.peak_rss(s.pid)
        pairs = warm_pairs(exe, rsync, a, b.name, mutated2, base)
        for s in sites:
            memory[s.name]["pairs"] = common.peak_rss(s.pid)
    finally:
        for site in sites:
            site.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)

    whole = {name: max(steps.values()) for name, steps in memory.items()}
    initial = Result(
        case=DVX_INITIAL,
        seconds=initial_run.seconds,
        mb_per_s=size / initial_run.seconds / MB,
        bytes_on_wire=int(initial_stats["bytes_on_wire"]),
        peak_rss_bytes={name: steps["initial"] for name, steps in memory.items()},
        extra={"stats": initial_stats, "cli_peak_rss_bytes": initial_run.peak_rss_bytes},
    )
    incremental = Result(
        case=DVX_INCREMENTAL,
        seconds=incr_run.seconds,
        mb_per_s=size / incr_run.seconds / MB,
        bytes_on_wire=int(incr_stats["bytes_on_wire"]),
        peak_rss_bytes={name: steps["incremental"] for name, steps in memory.items()},
        extra={
            "stats": incr_stats,
            "cli_peak_rss_bytes": incr_run.peak_rss_bytes,
            "peak_rss_reset_before": reset,
        },
    )
    cold = Result(
        case=DVX_COLD,
        seconds=cold_run.seconds,
        mb_per_s=size / cold_run.seconds / MB,
        bytes_on_wire=int(cold_stats["bytes_on_wire"]),
        peak_rss_bytes={},
        extra={"stats": cold_stats, "cli_peak_rss_bytes": cold_run.peak_rss_bytes},
    )
    info = {"site_vmhwm_bytes": memory, "site_peak_rss_bytes": whole, "replica_verified": verified,
            "write_seconds": write_run.seconds, "warm_pairs": pairs}
    return initial, incremental, cold, info


def warm_pairs(exe: str, rsync: str, a: Site, target: str, current: Path, base: Path
               ) -> list[dict[str, float]]:
    """``PAIRS`` times: a further 1% change of the image the volume now holds (``current``)
    is written into it (not measured), replicated by dvx-dr (measured), and then copied by
    rsync onto a copy of the image before the change, both files in the page cache
    (measured). Each pair's two commands run a few seconds apart, on the same change."""
    pairs = []
    before = base / "pair-before.raw"
    after = base / "pair-after.raw"
    dst = base / "pair-dst.raw"
    common.copy_sparse(current, before)
    for k in range(PAIRS):
        print(f"  warm pair {k + 1}/{PAIRS}: dvx-dr, then rsync ...", file=sys.stderr)
        common.copy_sparse(before, after)
        datagen.mutate(after, MUTATE_FRACTION, MUTATE_SEED + 10 + k)
        common.run([exe, "volume", "write", VOLUME, after, "--store", a.store])
        dvx_run, stats = replicate(exe, a, target)
        common.copy_sparse(before, dst)
        common.warm_cache(dst)
        common.warm_cache(after)
        rsync_run = rsync_onto(rsync, after, dst)
        pairs.append({"dvx_seconds": dvx_run.seconds, "dvx_transfer_seconds": stats["seconds"],
                      "rsync_seconds": rsync_run.seconds,
                      "ratio": dvx_run.seconds / rsync_run.seconds})
        after.replace(before)
    for path in (before, dst):
        path.unlink(missing_ok=True)
    return pairs


# --------------------------------------------------------------------------------------------
# restic copy
# --------------------------------------------------------------------------------------------


def run_restic(exe: str, image: Path, base: Path) -> Result:
    home = common.fresh_dir(base / "restic")
    src_home = common.fresh_dir(home / "src")
    dst_home = common.fresh_dir(home / "dst")
    src_repo, dst_repo = src_home / "repo", dst_home / "repo"
    src_password = common.password_file(src_home)
    cache = {"RESTIC_CACHE_DIR": str(home / "cache")}
    src_env = cache | {
        "RESTIC_REPOSITORY": str(src_repo),
        "RESTIC_PASSWORD_FILE": str(src_password),
    }
    dst_env = cache | {
        "RESTIC_REPOSITORY": str(dst_repo),
        "RESTIC_PASSWORD_FILE": str(common.password_file(dst_home)),
    }
    # restic 0.14 names the other repository --from-repo / --from-password-file (0.13: --repo2).
    source = ["--from-repo", str(src_repo), "--from-password-file", str(src_password)]

    common.run([exe, "init", "--repository-version", "2"], src_env)
    print("  restic backup into the first repository (not measured) ...", file=sys.stderr)
    common.run(
        [exe, "backup", "--compression", "auto", "--host", "bench", "--quiet", image], src_env
    )
    common.run(
        [exe, "init", "--repository-version", "2", *source, "--copy-chunker-params"], dst_env
    )
    before = common.tree_bytes(dst_repo)
    print("  restic copy ...", file=sys.stderr)
    measured = common.run_measured([exe, "copy", "--compression", "auto", *source], dst_env)
    added = common.tree_bytes(dst_repo) - before
    # restic's fixed cost in that time (start-up, both repositories' scrypt key opening, index
    # loading): the same copy selecting no snapshot. dvx-dr's sites were started and unlocked
    # before its transfer was timed, so the ratio is also printed with this taken out.
    fixed = common.run_measured(
        [exe, "copy", "--compression", "auto", *source, "--host", "no-such-host"], dst_env)
    size = image.stat().st_size
    return Result(
        case=RESTIC_COPY,
        seconds=measured.seconds,
        mb_per_s=size / measured.seconds / MB,
        bytes_on_wire=added,
        peak_rss_bytes={"restic": measured.peak_rss_bytes},
        extra={"source_repo_bytes": common.tree_bytes(src_repo),
               "fixed_seconds": fixed.seconds},
    )


# --------------------------------------------------------------------------------------------
# rsync
# --------------------------------------------------------------------------------------------

_RSYNC_STATS = {
    "total_bytes_sent": r"Total bytes sent:\s*([\d,.]+)",
    "total_bytes_received": r"Total bytes received:\s*([\d,.]+)",
    "literal_data": r"Literal data:\s*([\d,.]+)",
    "matched_data": r"Matched data:\s*([\d,.]+)",
}


def rsync_onto(exe: str, src: Path, dst: Path) -> common.Measured:
    """``rsync --inplace --no-whole-file --ignore-times --stats SRC DST``, measured; checks
    that DST then equals SRC. (``--no-whole-file`` forces the delta algorithm, which a local
    copy skips by default.)"""
    measured = common.run_measured(
        [exe, "--inplace", "--no-whole-file", "--ignore-times", "--stats", str(src), str(dst)])
    if not filecmp.cmp(dst, src, shallow=False):
        raise BenchError(f"rsync's destination differs from {src.name}")
    return measured


def run_rsync(exe: str, image: Path, mutated: Path, base: Path, cold: bool = False) -> Result:
    """rsync ``mutated`` onto a copy of ``image``; both files in the page cache, or (``cold``)
    both evicted from it."""
    home = common.fresh_dir(base / ("rsync-cold" if cold else "rsync"))
    dst = home / "dst.raw"
    common.copy_sparse(image, dst)
    if cold:
        common.drop_cache(dst, mutated)
    else:
        common.warm_cache(dst)
        common.warm_cache(mutated)
    print("  rsync" + (", cold cache" if cold else "") + " ...", file=sys.stderr)
    measured = rsync_onto(exe, mutated, dst)
    stats: dict[str, int] = {}
    for key, pattern in _RSYNC_STATS.items():
        m = re.search(pattern, measured.stdout)
        if m is None:
            raise BenchError(f"rsync --stats printed no {key!r}:\n{measured.stdout[-1000:]}")
        stats[key] = int(re.sub(r"[,.]", "", m.group(1)))
    size = mutated.stat().st_size
    return Result(
        case=RSYNC_COLD if cold else RSYNC,
        seconds=measured.seconds,
        mb_per_s=size / measured.seconds / MB,
        bytes_on_wire=stats["total_bytes_sent"],
        peak_rss_bytes={"rsync": measured.peak_rss_bytes},
        extra={"stats": stats},
    )


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def compare(
    results: dict[str, Result], changed: dict[str, int], dvx_info: dict[str, Any]
) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Ratios between the transfers and the verdicts against the targets."""
    initial, restic = results.get(DVX_INITIAL), results.get(RESTIC_COPY)
    incr, rsync = results.get(DVX_INCREMENTAL), results.get(RSYNC)
    cold, rsync_cold = results.get(DVX_COLD), results.get(RSYNC_COLD)
    ratios: dict[str, float | None] = {
        "initial_speedup_vs_restic_copy": _ratio(
            restic.seconds if restic else None, initial.seconds if initial else None
        ),
        "incremental_wire_vs_changed_compressed": _ratio(
            incr.bytes_on_wire if incr else None, changed["compressed_bytes"]
        ),
        "incremental_wire_vs_new_compressed": _ratio(
            incr.bytes_on_wire if incr else None, changed["new_compressed_bytes"]
        ),
        "initial_speedup_vs_restic_copy_without_its_fixed_cost": _ratio(
            restic.seconds - restic.extra["fixed_seconds"] if restic else None,
            initial.seconds if initial else None,
        ),
        "incremental_time_vs_rsync": _ratio(
            incr.seconds if incr else None, rsync.seconds if rsync else None
        ),
        "incremental_cold_time_vs_rsync_cold": _ratio(
            cold.seconds if cold else None, rsync_cold.seconds if rsync_cold else None
        ),
        "incremental_time_vs_rsync_median_of_pairs": (
            statistics.median(p["ratio"] for p in pairs) if (pairs := dvx_info.get("warm_pairs"))
            else None
        ),
    }
    checks: list[tuple[str, float | None, str, float]] = [
        (
            "initial: restic copy time / dvx-dr time (x)",
            ratios["initial_speedup_vs_restic_copy"],
            ">=",
            TARGET_INITIAL_VS_RESTIC,
        ),
        (
            "incremental: bytes on wire / changed compressed (x)",
            ratios["incremental_wire_vs_changed_compressed"],
            "<=",
            TARGET_WIRE_VS_CHANGED,
        ),
        (
            "incremental: dvx-dr time / rsync time, page cache warm",
            ratios["incremental_time_vs_rsync"],
            "<",
            TARGET_INCREMENTAL_VS_RSYNC,
        ),
        (
            f"incremental, warm: median of {PAIRS} more pairs' ratios",
            ratios["incremental_time_vs_rsync_median_of_pairs"],
            "<",
            TARGET_INCREMENTAL_VS_RSYNC,
        ),
        (
            "incremental: dvx-dr time / rsync time, cold cache",
            ratios["incremental_cold_time_vs_rsync_cold"],
            "<",
            TARGET_INCREMENTAL_VS_RSYNC,
        ),
    ]
    for name, peak in dvx_info.get("site_peak_rss_bytes", {}).items():
        checks.append(
            (f"{name} peak RSS MB (whole run)", peak / MB, "<", TARGET_PEAK_RSS_BYTES / MB)
        )
    targets = [
        {
            "name": name,
            "value": value,
            "target": f"{op} {limit:g}",
            "pass": None if value is None else _OPS[op](value, limit),
        }
        for name, value, op, limit in checks
    ]
    return ratios, targets


def _peak_cell(peaks: dict[str, int]) -> str:
    return " / ".join(f"{v / MB:.0f}" for v in peaks.values())


def report(
    size: int,
    seed: int,
    results: dict[str, Result],
    changed: dict[str, int],
    dvx_info: dict[str, Any],
    versions: dict[str, str],
) -> dict[str, Any]:
    print(
        f"\nreplication of a {common.human_size(size)} VM-like image (seed {seed}), "
        f"incremental after {MUTATE_FRACTION:.0%} of its 64 KiB blocks changed "
        f"(seed {MUTATE_SEED})\n"
    )
    rows = [
        (r.case, r.seconds, f"{r.mb_per_s:.1f}", r.bytes_on_wire, _peak_cell(r.peak_rss_bytes))
        for r in results.values()
    ]
    headers = ("transfer", "seconds", "MB/s", "bytes on wire", "peak RSS MB")
    print(common.format_table(headers, rows))
    print("  MB/s = image bytes / seconds; dvx-dr peak RSS is site-a / site-b (VmHWM)")

    memory = dvx_info.get("site_vmhwm_bytes")
    if memory:
        steps = " / ".join(next(iter(memory.values())))
        per_site = "; ".join(
            f"{name} " + " / ".join(f"{v / MB:.0f}" for v in by_step.values())
            for name, by_step in memory.items()
        )
        print(f"  dvx-dr site VmHWM MB after {steps}: {per_site} (reset after write)")
        clis = [
            r.extra["cli_peak_rss_bytes"] / MB
            for r in results.values()
            if "cli_peak_rss_bytes" in r.extra
        ]
        print(
            f"  dvx-dr replicate CLI peak RSS: {max(clis):.0f} MB; "
            f"replica verified: {dvx_info.get('replica_verified')}"
        )
    incr = results.get(DVX_INCREMENTAL)
    print(
        f"  changed data: {changed['changed_blocks']} blocks of 64 KiB changed "
        f"({changed['zero_blocks_skipped']} now all zero, skipped), {changed['raw_bytes']} "
        f"bytes, zstd-{ZSTD_LEVEL} per block {changed['compressed_bytes']} bytes; of them "
        f"{changed['new_blocks']} blocks of content the original image did not hold, "
        f"{changed['new_compressed_bytes']} bytes compressed"
    )
    if incr:
        s = incr.extra["stats"]
        print(
            f"  dvx-dr incremental: {s['blocks_sent']} blocks + {s['pages_sent']} tree pages "
            f"sent ({s['payload_bytes']} payload bytes), {s['ids_exchanged']} ids "
            f"({s['id_bytes']} bytes), skipped {s['bytes_skipped']} bytes the target had"
        )
    dvx_rows = [r for r in (results.get(DVX_INITIAL), incr, results.get(DVX_COLD)) if r]
    if dvx_rows:
        inside = ", ".join(
            f"{r.case.split(', ', 1)[-1]} {r.extra['stats']['seconds']:.3f} s of {r.seconds:.3f}"
            for r in dvx_rows
        )
        print(
            f"  dvx-dr transfer time as the site reports it: {inside} (the rest of the command "
            "is process start-up, the snapshot and the admin-socket call)"
        )
    rsync = results.get(RSYNC)
    if rsync:
        s = rsync.extra["stats"]
        print(
            f"  rsync: literal data {s['literal_data']}, total sent {s['total_bytes_sent']}, "
            f"received (block checksums) {s['total_bytes_received']}"
        )

    ratios, targets = compare(results, changed, dvx_info)
    print()
    target_rows = [(t["name"], t["value"], t["target"], common.verdict(t["pass"])) for t in targets]
    print(common.format_table(("check", "value", "target", "result"), target_rows))
    restic = results.get(RESTIC_COPY)
    notes = [
        ("incremental: bytes on wire / new content's compressed size (x)",
         ratios["incremental_wire_vs_new_compressed"],
         "the changed blocks the original image already held are not sent; the check above "
         "counts them as changed data"),
        ("initial: restic copy time less its fixed cost / dvx-dr time (x)",
         ratios["initial_speedup_vs_restic_copy_without_its_fixed_cost"],
         f"restic's copy of no snapshot took {restic.extra['fixed_seconds']:.2f} s "
         "(start-up, key opening, index loading)" if restic else ""),
    ]
    print()
    for name, value, why in notes:
        print(f"  also: {name} {'-' if value is None else f'{value:.2f}'}: {why}")
    if dvx_info.get("warm_pairs"):
        cells = ", ".join(f"{p['dvx_seconds']:.3f}/{p['rsync_seconds']:.2f} s"
                          for p in dvx_info["warm_pairs"])
        print(f"  also: the warm pairs (dvx-dr / rsync, each on a further 1% change): {cells}")
    if "write_seconds" in dvx_info:
        print(f"  also: the volume write of the mutated image through site-a (it reads and "
              f"hashes the whole image, as rsync does) took {dvx_info['write_seconds']:.2f} s")
    return {
        "benchmark": "replicate",
        "image": {"size": size, "seed": seed, "generator": datagen.GENERATOR_VERSION},
        "mutation": {"fraction": MUTATE_FRACTION, "seed": MUTATE_SEED, **changed},
        "host": common.host_info(),
        "versions": versions,
        "results": {name: asdict(r) for name, r in results.items()},
        "dvx_dr": dvx_info,
        "ratios": ratios,
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--size",
        type=common.parse_size,
        default=common.parse_size("1GiB"),
        help="image size, e.g. 256MiB or 4GiB (default 1GiB)",
    )
    parser.add_argument("--seed", type=int, default=1, help="image seed (default 1)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the sites, repositories and files in bench/.work/replicate/",
    )
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="do not export the replica at site-b and compare it with the source",
    )
    args = parser.parse_args(argv)

    base = common.work_dir("replicate")
    try:
        dvx = common.find_dvx_dr()
        restic = common.find_restic()
        rsync = common.find_rsync()
        image = common.ensure_image(args.size, args.seed)
        mutated = base / "mutated.raw"
        print(
            f"mutating a copy of the image ({MUTATE_FRACTION:.0%} of its blocks) ...",
            file=sys.stderr,
        )
        common.copy_sparse(image, mutated)
        datagen.mutate(mutated, MUTATE_FRACTION, MUTATE_SEED)
        changed = changed_blocks(image, mutated)
        mutated2 = base / "mutated2.raw"  # the second change, for the cold-cache pair
        common.copy_sparse(mutated, mutated2)
        datagen.mutate(mutated2, MUTATE_FRACTION, MUTATE_SEED + 1)

        results: dict[str, Result] = {}
        print("dvx-dr ...", file=sys.stderr)
        initial, incremental, cold, dvx_info = run_dvx(
            dvx, image, mutated, mutated2, base, not args.no_verify, rsync)
        print("restic ...", file=sys.stderr)
        common.warm_cache(image)
        restic_result = run_restic(restic, image, base)
        print("rsync ...", file=sys.stderr)
        rsync_result = run_rsync(rsync, image, mutated, base)
        rsync_cold = run_rsync(rsync, mutated, mutated2, base, cold=True)
        for r in (initial, restic_result, incremental, rsync_result, cold, rsync_cold):
            results[r.case] = r

        versions = {
            "restic": common.run([restic, "version"]).strip(),
            "rsync": common.run([rsync, "--version"]).splitlines()[0].strip(),
        }
        out = report(args.size, args.seed, results, changed, dvx_info, versions)
        if args.json:
            common.write_json(args.json, out)
            print(f"\nresults written to {args.json}")
    except BenchError as exc:
        print(f"replicate: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
