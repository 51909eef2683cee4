"""``dvx-dr datastore ...``: statistics, scrub and garbage collection."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from dvx_dr.cli import encryption
from dvx_dr.cli.common import print_json
from dvx_dr.cli.context import StoreCommands, progress_bar, run_op
from dvx_dr.units import count, format_size

if TYPE_CHECKING:
    from dvx_dr.site.store import Store


def register(groups: Any) -> None:
    commands = StoreCommands(groups, "datastore", "store-wide operations")
    cmd = commands.add

    c = cmd("stats", cmd_stats, "logical, unique and stored bytes; dedup and compression")
    c.add_argument("--json", action="store_true")
    c = cmd("scrub", cmd_scrub, "verify every live extent")
    c.add_argument("--json", action="store_true")
    c = cmd("gc", cmd_gc, "reclaim space of deleted volumes and snapshots, compact segments")
    c.add_argument("--json", action="store_true")
    encryption.register(commands.sub)


def cmd_stats(args: argparse.Namespace) -> int:
    s = run_op(args, "datastore.stats", {})
    if args.json:
        print_json(s)
        return 0
    print(f"site               {s['site']}")
    print(f"encryption         {'on (AES-256-XTS)' if s['encryption'] else 'off'}")
    print(f"block size         {format_size(s['block_size'])}")
    print(f"volumes            {s['volumes']}")
    print(f"snapshots          {s['snapshots']}")
    for key in ("logical_bytes", "unique_bytes", "stored_bytes", "tree_unique_bytes",
                "metadata_bytes"):
        label = key.replace("_", " ")
        print(f"{label:<18} {format_size(s[key])}  ({s[key]})")
    print(f"dedup ratio        {s['dedup_ratio']:.2f}x")
    print(f"compression ratio  {s['compression_ratio']:.2f}x")
    print(f"reduction ratio    {s['reduction_ratio']:.2f}x")
    for k in s["by_key_version"]:
        label = f"key version {k['key_version']}" if k["key_version"] else "plain (unencrypted)"
        print(f"  {label:<20} {k['extents']} extents, {format_size(k['stored_bytes'])}")
    return 0


def cmd_scrub(args: argparse.Namespace) -> int:
    report = run_op(args, "datastore.scrub", {}, _local_scrub)
    if args.json:
        print_json(report)
    else:
        for line in report["damaged"]:
            print(f"DAMAGED {line}")
        state = "clean" if not report["damaged"] else f"{len(report['damaged'])} damaged"
        print(f"scrub {state}: verified {report['checked_blobs']} blobs "
              f"({format_size(report['checked_bytes'])})")
    if report["damaged"]:
        print("dvx-dr: error: scrub found damaged data; restore the named volumes or snapshots "
              "from a replica", file=sys.stderr)
        return 3
    return 0


def _local_scrub(store: Store) -> dict[str, Any]:
    from dvx_dr.site import scrub

    with progress_bar(None, "scrub") as bar:
        report = scrub.scrub(store, bar)
    return {"checked_blobs": report.checked_blobs, "checked_bytes": report.checked_bytes,
            "damaged": report.damaged}


def cmd_gc(args: argparse.Namespace) -> int:
    report = run_op(args, "datastore.gc", {})
    if args.json:
        print_json(report)
        return 0
    print(f"gc: removed {count(report['blobs_deleted'], 'unused blob')}, compacted "
          f"{count(report['segments_compacted'], 'segment')}, deleted "
          f"{count(report['segments_deleted'], 'segment file')}; "
          f"reclaimed {format_size(report['reclaimed'])}")
    if report["blobs_deleted"] and report["reclaimed"] <= 0:
        print("gc: the removed blobs' space stays inside their segment files for now: a "
              "segment is rewritten without its dead extents once under half of it is live, "
              "and deleted once none is")
    if report.get("sessions_open"):
        print(f"gc: {report['sessions_open']} replication sessions (sent or received) or "
              "snapshot reads through the site were open, so no blob was deleted; run gc "
              "again when they have ended (a session an interrupted transfer left is kept "
              "for its resume until 10 minutes after its last use)")
    if report.get("segments_skipped"):
        print(f"gc: {report['segments_skipped']} sparse segments were not compacted for lack "
              f"of free space (the smallest needs {format_size(report['space_needed'])} free); "
              "run gc again once there is more")
    return 0
