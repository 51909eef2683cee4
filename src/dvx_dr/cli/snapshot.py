"""``dvx-dr snapshot ...``: take, list, compare, read and delete snapshots."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from dvx_dr.cli import remote
from dvx_dr.cli.common import print_json, print_table
from dvx_dr.cli.context import StoreCommands, progress_bar, run_op
from dvx_dr.cli.volume import copy_out, counted
from dvx_dr.units import count, format_size, parse_size

if TYPE_CHECKING:
    from dvx_dr.site.store import Store


def register(groups: Any) -> None:
    commands = StoreCommands(groups, "snapshot", "manage snapshots")
    cmd = commands.add

    c = cmd("create", cmd_create, "snapshot a volume")
    c.add_argument("volume")
    c.add_argument("--name", help="snapshot name (default: the UTC time)")

    c = cmd("list", cmd_list, "list snapshots (and replicas received from other sites)")
    c.add_argument("volume", nargs="?")
    c.add_argument("--json", action="store_true")

    c = cmd("delete", cmd_delete, "delete a snapshot")
    c.add_argument("snapshot", help="VOLUME@NAME")

    c = cmd("diff", cmd_diff, "byte ranges that differ between two snapshots, in whole "
            "blocks (and the space only the larger one has)")
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
    snap = run_op(args, "snapshot.create", {"volume": args.volume, "name": args.name})
    print(f"created snapshot {snap['snapshot']}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    snaps = run_op(args, "snapshot.list", {"volume": args.volume})
    if args.json:
        print_json(snaps)
        return 0
    print_table(["SNAPSHOT", "SIZE", "STORED BLOCKS", "CREATED", "ORIGIN"],
                [[s["snapshot"], format_size(s["size"]), str(s["mapped_blocks"]), s["created"],
                  s["origin"]] for s in snaps])
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    run_op(args, "snapshot.delete", {"snapshot": args.snapshot})
    print(f"deleted snapshot {args.snapshot}; 'dvx-dr datastore gc' reclaims its space")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    found = run_op(args, "snapshot.diff", {"a": args.a, "b": args.b})
    ranges, sizes = found["ranges"], found["sizes"]
    if args.json:
        print_json(ranges)
        return 0
    for r in ranges:
        print(f"{r['offset']}\t{r['length']}")
    total = sum(r["length"] for r in ranges)
    print(f"# {count(len(ranges), 'range')}, {count(total, 'byte')} ({format_size(total)}) "
          "differ, in whole blocks")
    if sizes[0] != sizes[1]:
        print(f"# {args.a} is {sizes[0]} bytes ({format_size(sizes[0])}), {args.b} "
              f"{sizes[1]} bytes ({format_size(sizes[1])})")
    return 0


def cmd_read(args: argparse.Namespace) -> int:
    offset = parse_size(args.offset, "--offset")
    length = parse_size(args.length, "--length")

    def local(store: Store) -> Any:
        from dvx_dr.site import snapshots

        copy_out(snapshots.iter_range(store, args.snapshot, offset, length, True), args.output)

    def through_site(socket: str) -> Any:
        copy_out(remote.Read(socket, {"snapshot": args.snapshot, "offset": offset,
                                      "length": length}), args.output)

    run_op(args, "snapshot.read", {}, local, remote_call=through_site)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    def local(store: Store) -> Any:
        from dvx_dr.site import snapshots

        size = snapshots.get(store, args.snapshot).size
        with progress_bar(size, f"export {args.snapshot}") as bar:
            to_stdout = copy_out(counted(snapshots.iter_range(store, args.snapshot, 0, size,
                                                              True), bar), args.file)
        return {"size": size, "stdout": to_stdout}

    def through_site(socket: str) -> Any:
        read = remote.Read(socket, {"snapshot": args.snapshot})
        to_stdout = copy_out(read, args.file)
        return {"size": read.result["size"], "stdout": to_stdout}

    result = run_op(args, "snapshot.get", {"snapshot": args.snapshot}, local,
                    remote_call=through_site)
    if not result["stdout"]:
        print(f"exported snapshot {args.snapshot} to {args.file} "
              f"({format_size(result['size'])})")
    return 0
