"""Ingest benchmark: import one VM-like disk image into dvx-dr (encrypted and plain) and restic.

    python bench/ingest.py [--size 1GiB] [--seed 1] [--runs 3] [--json OUT]

The image comes from ``bench/datagen.py`` (kept in ``bench/.work/`` and reused for the same size
and seed) and is read once before measuring, so every tool starts with it in the page cache.
Each tool gets a fresh store or repository per run:

* ``dvx-dr encrypted``: ``site init --password-file`` then the measured
  ``volume import bench IMAGE``, then ``datastore stats --json``;
* ``dvx-dr plain``: the same with ``site init --no-encryption``;
* ``restic``: ``init`` (repository format 2, password via ``RESTIC_PASSWORD_FILE``) then the
  measured ``backup --compression auto IMAGE``.

Measured: wall seconds of the one command (process start to exit, so start-up and, for the
encrypted store, key unlocking count) and the peak resident set of that process (``ru_maxrss``
from ``os.wait4``). Stored bytes is each store's or repository's on-disk footprint: the sum of
the sizes of all files under its directory (data, index, metadata, keys), the same measure for
every tool. dvx-dr's own accounting (``datastore stats``) is printed and saved alongside.

With ``--runs N`` the tools are run in turn N times; each tool's fastest run, largest peak
memory and median stored size are reported, and the encryption overhead (the ingest throughput
lost) is the median over the rounds of the encrypted run against the plain run beside it (the
pair's order alternates from round to round, and the pair never follows restic directly).
Targets: encryption overhead < 5 %, dvx-dr encrypted >= 1.5x restic's speed, dvx-dr stored <=
restic stored, dvx-dr peak memory < 300 MB (every dvx-dr import: encrypted, plain and FIPS).
Timings on a shared or small VM vary by 10-30 % from run to run, hence 3 runs by default; use
more before reading much into a 5 % difference.
"""

from __future__ import annotations

import argparse
import json
import operator
import shutil
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import common
import datagen
from common import MB, BenchError

STATS_KEYS = ("logical_bytes", "unique_bytes", "stored_bytes", "dedup_ratio", "compression_ratio")
VOLUME = "bench"

TARGET_ENCRYPTION_OVERHEAD_PCT = 5.0
TARGET_SPEED_VS_RESTIC = 1.5
TARGET_STORED_VS_RESTIC = 1.0
TARGET_PEAK_RSS_BYTES = 300 * MB

_OPS = {"<": operator.lt, "<=": operator.le, ">=": operator.ge}

DVX_ENC = "dvx-dr encrypted"
DVX_PLAIN = "dvx-dr plain"
DVX_FIPS = "dvx-dr FIPS approved"
RESTIC = "restic"


@dataclass
class ToolRun:
    tool: str
    seconds: float
    peak_rss_bytes: int
    stored_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolResult:
    """The best of a tool's runs."""

    tool: str
    seconds: float
    mb_per_s: float
    stored_bytes: int
    reduction: float
    peak_rss_bytes: int
    runs: list[float]
    stored_runs: list[int]
    extra: dict[str, Any]


def run_dvx(exe: str, image: Path, base: Path, encrypted: bool) -> ToolRun:
    home = common.fresh_dir(base / ("dvx-enc" if encrypted else "dvx-plain"))
    store = home / "store"
    access: list[str] = ["--store", str(store)]
    if encrypted:
        access += ["--password-file", str(common.password_file(home))]
    init_mode = [] if encrypted else ["--no-encryption"]
    common.run([exe, "site", "init", *access, "--name", "bench", *init_mode])
    measured = common.run_measured([exe, "volume", "import", VOLUME, str(image), *access])
    stats_run = common.run_measured([exe, "datastore", "stats", *access, "--json"])
    try:
        stats = json.loads(stats_run.stdout)
    except ValueError as exc:
        raise BenchError(
            f"`dvx-dr datastore stats --json` did not print JSON: {stats_run.stdout[:200]!r}"
        ) from exc
    missing = [k for k in STATS_KEYS if k not in stats]
    if missing:
        raise BenchError(f"`dvx-dr datastore stats --json` lacks keys: {', '.join(missing)}")
    # Logical bytes are the volume's mapped (non-zero) blocks: never more than the image.
    if stats["logical_bytes"] > image.stat().st_size:
        print(
            f"warning: dvx-dr reports logical_bytes {stats['logical_bytes']}, "
            f"more than the image's {image.stat().st_size}",
            file=sys.stderr,
        )
    return ToolRun(
        tool=DVX_ENC if encrypted else DVX_PLAIN,
        seconds=measured.seconds,
        peak_rss_bytes=measured.peak_rss_bytes,
        stored_bytes=common.tree_bytes(store),
        extra={"stats": stats, "stats_command_seconds": round(stats_run.seconds, 3)},
    )


def run_dvx_fips(exe: str, image: Path, base: Path) -> ToolRun:
    """An encrypted store in FIPS *approved* mode (PBKDF2 for the password; the same ciphers)."""
    home = common.fresh_dir(base / "dvx-fips")
    store = home / "store"
    access = ["--store", str(store), "--password-file", str(common.password_file(home))]
    common.run([exe, "site", "init", *access, "--name", "bench"])
    common.run([exe, "datastore", "encryption", "set", "--fips-mode", "approved", *access])
    measured = common.run_measured([exe, "volume", "import", VOLUME, str(image), *access])
    return ToolRun(tool=DVX_FIPS, seconds=measured.seconds,
                   peak_rss_bytes=measured.peak_rss_bytes, stored_bytes=common.tree_bytes(store))


def run_convert(exe: str, image: Path, second: Path, base: Path) -> dict[str, Any]:
    """``convert --to encrypted`` on a store holding plain extents and two older key versions'
    worth of data: the image imported plain, a second image under key version 1, then
    key version 2 made current; measured: moving everything to version 2."""
    home = common.fresh_dir(base / "dvx-convert")
    store = home / "store"
    password = common.password_file(home)
    plain = ["--store", str(store)]
    access = [*plain, "--password-file", str(password)]
    common.run([exe, "site", "init", *plain, "--name", "bench", "--no-encryption"])
    common.run([exe, "volume", "import", "plain", str(image), *plain])
    common.run([exe, "datastore", "encryption", "enable", *plain,
                "--new-password-file", str(password), "--yes"])
    common.run([exe, "volume", "import", "v1", str(second), *access])
    common.run([exe, "datastore", "encryption", "rotate-key", *access])
    before = json.loads(common.run([exe, "datastore", "encryption", "status", "--json",
                                    *access]))
    to_move = before["plain"]["bytes"] + sum(
        k["bytes"] for k in before["key_versions"] if k["version"] != 2)
    measured = common.run_measured([exe, "datastore", "encryption", "convert", "--to",
                                    "encrypted", *access])
    after = json.loads(common.run([exe, "datastore", "encryption", "status", "--json",
                                   *access]))
    left = after["plain"]["bytes"] + sum(
        k["bytes"] for k in after["key_versions"] if k["version"] != 2)
    return {"seconds": round(measured.seconds, 3), "bytes_converted": to_move,
            "mb_per_s": round(to_move / MB / measured.seconds, 1),
            "peak_rss_bytes": measured.peak_rss_bytes, "bytes_left_in_old_form": left,
            "versions_before": {str(k["version"]): k["bytes"] for k in before["key_versions"]}
            | {"plain": before["plain"]["bytes"]}}


def run_restic(exe: str, image: Path, base: Path) -> ToolRun:
    home = common.fresh_dir(base / "restic")
    repo = home / "repo"
    env = {
        "RESTIC_REPOSITORY": str(repo),
        "RESTIC_PASSWORD_FILE": str(common.password_file(home)),
        "RESTIC_CACHE_DIR": str(home / "cache"),
    }
    common.run([exe, "init", "--repository-version", "2"], env)
    cmd = [exe, "backup", "--compression", "auto", "--host", "bench", "--json", str(image)]
    measured = common.run_measured(cmd, env)
    summary: dict[str, Any] = {}
    for line in measured.stdout.splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("message_type") == "summary":
            summary = message
    return ToolRun(
        tool=RESTIC,
        seconds=measured.seconds,
        peak_rss_bytes=measured.peak_rss_bytes,
        stored_bytes=common.tree_bytes(repo),
        extra={"data_added": summary.get("data_added")},
    )


def best_of(size: int, runs: list[ToolRun]) -> ToolResult:
    """Fastest time, largest peak memory, median stored size (restic picks a random chunker
    polynomial per repository, so its stored size varies from run to run by a few %)."""
    best = min(runs, key=lambda r: r.seconds)
    stored = statistics.median_low(r.stored_bytes for r in runs)
    return ToolResult(
        tool=best.tool,
        seconds=best.seconds,
        mb_per_s=size / best.seconds / MB,
        stored_bytes=stored,
        reduction=size / stored if stored else float("inf"),
        peak_rss_bytes=max(r.peak_rss_bytes for r in runs),
        runs=[round(r.seconds, 3) for r in runs],
        stored_runs=[r.stored_bytes for r in runs],
        extra=best.extra,
    )


def paired_overhead_pct(enc: ToolResult, plain: ToolResult) -> float:
    """The encryption overhead, as the share of ingest throughput lost: the median, over the
    rounds, of the encrypted import against the plain import run beside it. On a VM whose
    speed drifts by 10-30 % between minutes, pairing neighbouring runs cancels the drift that
    comparing each tool's fastest run does not (one lucky plain run moved that comparison by
    10 points)."""
    return statistics.median(_lost_pct(e, p) for e, p in zip(enc.runs, plain.runs, strict=True))


def _lost_pct(enc_seconds: float, plain_seconds: float) -> float:
    return (1 - plain_seconds / enc_seconds) * 100


def compare(results: dict[str, ToolResult]) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Ratios between the tools and the verdicts against the targets (None when not measured)."""
    enc, plain, restic = (results.get(k) for k in (DVX_ENC, DVX_PLAIN, RESTIC))
    ratios: dict[str, float | None] = {
        "encryption_overhead_pct": paired_overhead_pct(enc, plain) if enc and plain else None,
        "speed_vs_restic": enc.mb_per_s / restic.mb_per_s if enc and restic else None,
        "stored_vs_restic": enc.stored_bytes / restic.stored_bytes if enc and restic else None,
    }
    dvx = [r for r in (enc, plain, results.get(DVX_FIPS)) if r]
    peak = max(r.peak_rss_bytes for r in dvx) / MB if dvx else None
    checks = [
        ("encryption overhead %", ratios["encryption_overhead_pct"], "<",
         TARGET_ENCRYPTION_OVERHEAD_PCT),
        ("speed vs restic (x)", ratios["speed_vs_restic"], ">=", TARGET_SPEED_VS_RESTIC),
        ("stored vs restic (x)", ratios["stored_vs_restic"], "<=", TARGET_STORED_VS_RESTIC),
        ("dvx-dr peak RSS MB", peak, "<", TARGET_PEAK_RSS_BYTES / MB),
    ]  # fmt: skip
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


def report(
    size: int, seed: int, results: dict[str, ToolResult], versions: dict[str, str]
) -> dict[str, Any]:
    rows = [
        (
            r.tool,
            r.seconds,
            f"{r.mb_per_s:.1f}",
            r.stored_bytes,
            r.reduction,
            f"{r.peak_rss_bytes / MB:.0f}",
        )
        for r in results.values()
    ]
    print(f"\ningest of a {common.human_size(size)} VM-like image (seed {seed})\n")
    headers = ("tool", "seconds", "MB/s", "stored bytes", "reduction", "peak RSS MB")
    print(common.format_table(headers, rows))
    for r in results.values():
        stats = r.extra.get("stats")
        if stats:
            print(
                f"  {r.tool} (datastore stats): logical {stats['logical_bytes']}, "
                f"unique {stats['unique_bytes']}, stored {stats['stored_bytes']}, "
                f"dedup {stats['dedup_ratio']:.2f}x, compression {stats['compression_ratio']:.2f}x;"
                f"\n    the stats command took {r.extra['stats_command_seconds']:.2f} s "
                "(start-up and key unlock, which the import also pays)"
            )
    enc, plain = results.get(DVX_ENC), results.get(DVX_PLAIN)
    if enc and plain and len(enc.runs) > 1:
        pairs = ", ".join(f"{_lost_pct(e, p):+.1f}%"
                          for e, p in zip(enc.runs, plain.runs, strict=True))
        best = _lost_pct(enc.seconds, plain.seconds)
        fixed_e = enc.extra.get("stats_command_seconds", 0.0)
        fixed_p = plain.extra.get("stats_command_seconds", 0.0)
        print(
            f"  encryption overhead (throughput lost), each round's encrypted run against the "
            f"plain run beside it: {pairs}; median {paired_overhead_pct(enc, plain):.1f}% "
            f"(the target's measure). Fastest against fastest: {best:.1f}%.\n  The stats "
            f"command (start-up and key unlock, which the import also pays) took "
            f"{fixed_e:.2f} s encrypted, {fixed_p:.2f} s plain."
        )
    ratios, targets = compare(results)
    print()
    target_rows = [(t["name"], t["value"], t["target"], common.verdict(t["pass"])) for t in targets]
    print(common.format_table(("check", "value", "target", "result"), target_rows))
    return {
        "benchmark": "ingest",
        "image": {"size": size, "seed": seed, "generator": datagen.GENERATOR_VERSION},
        "host": common.host_info(),
        "versions": versions,
        "results": {name: asdict(r) for name, r in results.items()},
        "ratios": ratios,
        "targets": targets,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=common.parse_size, default=common.parse_size("1GiB"),
                        help="image size, e.g. 256MiB or 4GiB (default 1GiB)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=1, help="image seed (default 1)")
    parser.add_argument("--runs", type=int, default=3,
                        help="runs per tool (default 3); the fastest counts, and the "
                             "encryption overhead is the median of the rounds' pairs")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the results here")
    parser.add_argument("--skip-restic", action="store_true", help="measure dvx-dr only")
    parser.add_argument("--skip-dvx", action="store_true", help="measure restic only")
    parser.add_argument("--keep", action="store_true",
                        help="keep the stores and repositories in bench/.work/ingest/")  # fmt: skip
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    try:
        dvx = None if args.skip_dvx else common.find_dvx_dr()
        restic = None if args.skip_restic else common.find_restic()
        if dvx is None and restic is None:
            parser.error("nothing to measure")
        image = common.ensure_image(args.size, args.seed)
        common.warm_cache(image)
        base = common.work_dir("ingest")
        runs: dict[str, list[ToolRun]] = {}
        for i in range(args.runs):
            suffix = f" (run {i + 1}/{args.runs})" if args.runs > 1 else ""
            if dvx:
                # The FIPS run goes first, so that neither of the pair measured for the
                # encryption overhead follows restic; and the pair's order alternates from
                # round to round, so that whatever the run before leaves behind (write-back,
                # freed space, a cooler or hotter CPU) weighs on each side equally.
                print(f"{DVX_FIPS}{suffix} ...", file=sys.stderr)
                runs.setdefault(DVX_FIPS, []).append(run_dvx_fips(dvx, image, base))
                for encrypted in (True, False) if i % 2 == 0 else (False, True):
                    name = DVX_ENC if encrypted else DVX_PLAIN
                    print(f"{name}{suffix} ...", file=sys.stderr)
                    runs.setdefault(name, []).append(run_dvx(dvx, image, base, encrypted))
            if restic:
                print(f"restic{suffix} ...", file=sys.stderr)
                runs.setdefault(RESTIC, []).append(run_restic(restic, image, base))
        results = {name: best_of(args.size, tool_runs) for name, tool_runs in runs.items()}
        versions = {"restic": common.run([restic, "version"]).strip()} if restic else {}
        out = report(args.size, args.seed, results, versions)
        if dvx:
            print("dvx-dr convert ...", file=sys.stderr)
            second = common.ensure_image(max(args.size // 4, 1 << 20), args.seed + 1)
            conv = run_convert(dvx, image, second, base)
            out["convert"] = conv
            print(f"\nconvert --to encrypted of a mixed store (plain + key version 1 -> key "
                  f"version 2): {conv['bytes_converted'] / MB:.1f} MB in {conv['seconds']:.2f} s "
                  f"= {conv['mb_per_s']:.1f} MB/s, peak RSS {conv['peak_rss_bytes'] / MB:.0f} MB "
                  f"({common.verdict(conv['peak_rss_bytes'] < TARGET_PEAK_RSS_BYTES)} "
                  f"against the < {TARGET_PEAK_RSS_BYTES / MB:.0f} MB target); "
                  f"left in the old form: {conv['bytes_left_in_old_form']} bytes")
        if args.json:
            common.write_json(args.json, out)
            print(f"\nresults written to {args.json}")
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    except BenchError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
