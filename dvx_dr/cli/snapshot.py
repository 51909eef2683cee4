"""``dvx-dr snapshot ...``: take, list, compare, read and delete snapshots."""

from __future__ import annotations

import argparse
from typing import Any

from dvx_dr.cli.context import add_store_args, open_store, print_json, print_table, progress_bar
from dvx_dr.cli.volume import copy_out, open_output
from dvx_dr.site import snapshots
from dvx_dr.units import format_size, parse_size


def register(groups: Any) -> None:
    p = groups.add_parser("snapshot", help="manage snapshots")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def cmd(name: str, func: Any, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        add_store_args(c)
        c.set_defaults(func=func)
        return c

    c = cmd("create", cmd_create, "snapshot a volume")
    c.add_argument("volume")
    c.add_argument("--name", help="snapshot name (default: the UTC time)")

    c = cmd("list", cmd_list, "list snapshots")
    c.add_argument("volume", nargs="?")
    c.add_argument("--json", action="store_true")

    c = cmd("delete", cmd_delete, "delete a snapshot")
    c.add_argument("snapshot", help="VOLUME@NAME")

    c = cmd("diff", cmd_diff, "byte ranges that differ between two snapshots")
    c.add_argument("a", help="VOLUME@NAME")
    c.add_argument("b", help="VOLUME@NAME")
    c.add_argument("--json", action="store_true")

    c = cmd("read", cmd_read, "read bytes of a snapshot as of its time")
    c.add_argument("snapshot", help="VOLUME@NAME")
    c.add_argument("--offset", default="0")
    c.add_argument("--length", required=True)
    c.add_argument("--output", "-o", default="-")

    c = cmd("export", cmd_export, "write a snapshot out as a raw disk image")
    c.add_argument("snapshot", help="VOLUME@NAME")
    c.add_argument("file", help="output file, or - for standard output")


def cmd_create(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        snap = snapshots.create(store, args.volume, args.name)
    print(f"created snapshot {snap.spec}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        snaps = snapshots.list_snapshots(store, args.volume)
        bs = store.block_size
    if args.json:
        print_json([{"snapshot": s.spec, "volume": s.volume, "name": s.name, "size": s.size,
                     "mapped_bytes": s.mapped_blocks * bs, "created": s.created,
                     "origin": s.origin} for s in snaps])
        return 0
    print_table(["SNAPSHOT", "SIZE", "STORED BLOCKS", "CREATED", "ORIGIN"],
                [[s.spec, format_size(s.size), str(s.mapped_blocks), s.created, s.origin]
                 for s in snaps])
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        snapshots.delete(store, args.snapshot)
    print(f"deleted snapshot {args.snapshot}; 'dvx-dr datastore gc' reclaims its space")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        ranges = snapshots.diff(store, args.a, args.b)
    if args.json:
        print_json([{"offset": o, "length": n} for o, n in ranges])
        return 0
    for o, n in ranges:
        print(f"{o}\t{n}")
    total = sum(n for _, n in ranges)
    print(f"# {len(ranges)} ranges, {total} bytes ({format_size(total)}) differ")
    return 0


def cmd_read(args: argparse.Namespace) -> int:
    offset = parse_size(args.offset, "--offset")
    length = parse_size(args.length, "--length")
    with open_store(args) as store:
        copy_out(snapshots.iter_range(store, args.snapshot, offset, length), args.output)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        snap = snapshots.get(store, args.snapshot)
        out = open_output(args.file)
        try:
            with progress_bar(snap.size, f"export {args.snapshot}") as bar:
                snapshots.export(store, args.snapshot, out, bar)
        finally:
            if args.file != "-":
                out.close()
    if args.file != "-":
        print(f"exported snapshot {args.snapshot} to {args.file} ({format_size(snap.size)})")
    return 0
