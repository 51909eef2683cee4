"""``dvx-dr volume ...``: create, fill, read and manage volumes."""

from __future__ import annotations

import argparse
import base64
import itertools
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from dvx_dr import sparse
from dvx_dr.cli.common import print_json, print_table
from dvx_dr.cli.context import StoreCommands, progress_bar, run_op
from dvx_dr.errors import UserError
from dvx_dr.site import lockfile
from dvx_dr.units import format_size, parse_size

if TYPE_CHECKING:
    from dvx_dr.site.store import Store


def register(groups: Any) -> None:
    commands = StoreCommands(groups, "volume", "manage volumes")
    cmd = commands.add

    c = cmd("create", cmd_create, "create an empty (all-zero) volume")
    c.add_argument("name")
    c.add_argument("--size", required=True, help="size, like 10GiB")

    c = cmd("import", cmd_import, "create a volume from a raw disk image")
    c.add_argument("name")
    c.add_argument("file", type=Path)

    c = cmd("export", cmd_export, "write a volume out as a raw disk image")
    c.add_argument("name")
    c.add_argument("file", help="output file, or - for standard output")

    c = cmd("write", cmd_write, "write a file (or - for standard input) at a byte offset")
    c.add_argument("name")
    c.add_argument("file")
    c.add_argument("--offset", default="0")

    c = cmd("read", cmd_read, "read bytes of a volume to standard output")
    c.add_argument("name")
    c.add_argument("--offset", default="0")
    c.add_argument("--length", required=True)
    c.add_argument("--output", "-o", default="-", help="output file (default standard output)")

    c = cmd("list", cmd_list, "list volumes")
    c.add_argument("--json", action="store_true")

    c = cmd("resize", cmd_resize, "grow or shrink a volume")
    c.add_argument("name")
    c.add_argument("--size", required=True)

    c = cmd("delete", cmd_delete, "delete a volume (its snapshots stay)")
    c.add_argument("name")

    c = cmd("clone", cmd_clone, "create a writable volume from a snapshot")
    c.add_argument("name")
    c.add_argument("--from", dest="source", required=True, metavar="SNAPSHOT",
                   help="snapshot as VOLUME@NAME (a replica: SITE/VOLUME@NAME)")


def cmd_create(args: argparse.Namespace) -> int:
    info = run_op(args, "volume.create", {"name": args.name,
                                          "size": parse_size(args.size, "--size")})
    print(f"created volume {info['name']} ({format_size(info['size'])})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    path = args.file.resolve()
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise UserError(f"cannot read image {args.file}: {exc.strerror}") from None

    def local(store: Store) -> Any:
        from dvx_dr.site import ops, volumes

        with progress_bar(size, f"import {args.name}") as bar:
            volumes.import_file(store, args.name, path, bar)
        return ops.volume_get(store, args.name)

    info = run_op(args, "volume.import", {"name": args.name, "path": str(path)}, local)
    print(f"imported {args.file} as volume {info['name']} ({format_size(info['size'])}, "
          f"{info['mapped_blocks']} blocks stored, the rest holes)")
    return 0


def open_output(target: str) -> BinaryIO:
    if target == "-":
        return sys.stdout.buffer
    lockfile.check_output_path(Path(target))
    try:
        return open(target, "wb")  # noqa: SIM115 - closed by the caller
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror}") from None


def copy_out(chunks: Iterable[bytes | int], target: str) -> None:
    """Write ``chunks`` to ``target`` (a file, or ``-``); a new regular file is written
    sparsely (``dvx_dr.sparse``: its zero runs are holes). The file is opened only once the
    first chunk is at hand, so a read that fails at once (an unknown snapshot, a range past
    the end) leaves an existing file as it was; a write that fails (a full disk) removes the
    partial file and is reported in one line."""
    chunks = iter(chunks)
    first = next(chunks, b"")
    out = open_output(target)
    try:
        sparse.write(out, itertools.chain([first], chunks),
                     out is not sys.stdout.buffer and sparse.is_new_regular_file(out))
        out.flush()
    except OSError as exc:
        if out is not sys.stdout.buffer:
            out.close()
            if os.path.isfile(target):
                os.unlink(target)
        if isinstance(exc, BrokenPipeError):
            raise
        raise UserError(f"cannot write {target}: {exc.strerror or exc}; nothing was kept"
                        ) from None
    finally:
        if out is not sys.stdout.buffer:
            out.close()


def cmd_export(args: argparse.Namespace) -> int:
    def local(store: Store) -> Any:
        from dvx_dr.site import volumes

        info = volumes.get(store, args.name)
        with progress_bar(info.size, f"export {args.name}") as bar:
            copy_out(counted(volumes.iter_range(store, info.id, info.size, 0, info.size, True),
                             bar), args.file)
        return {"size": info.size, "exported": True}

    if args.file == "-":
        result = run_op(args, "volume.get", {"name": args.name}, local)
        if not result.get("exported"):
            data = run_op(args, "volume.read", {"name": args.name, "offset": 0,
                                                "length": result["size"]})
            copy_out([base64.b64decode(data["data"])], "-")
    else:
        target = str(Path(args.file).resolve())
        result = run_op(args, "volume.export", {"name": args.name, "path": target}, local)
        print(f"exported volume {args.name} to {args.file} ({format_size(result['size'])})")
    return 0


def counted(chunks: Iterable[bytes | int], bar: Callable[[int], None] | None
            ) -> Iterable[bytes | int]:
    """``chunks``, advancing the progress ``bar`` (when there is one) by each one's length
    (an int chunk is a run of that many zeros)."""
    for chunk in chunks:
        if bar:
            bar(chunk if isinstance(chunk, int) else len(chunk))
        yield chunk


def cmd_write(args: argparse.Namespace) -> int:
    offset = parse_size(args.offset, "--offset")
    if args.file == "-":
        source: BinaryIO = sys.stdin.buffer
    else:
        try:
            source = open(args.file, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise UserError(f"cannot read {args.file}: {exc.strerror}") from None

    def local(store: Store) -> Any:
        from dvx_dr.site import volumes

        if args.file != "-":
            end = offset + os.fstat(source.fileno()).st_size
            size = volumes.get(store, args.name).size
            if end > size:
                raise UserError(f"write past the end of volume {args.name!r}: it is {size} "
                                f"bytes, the write reaches byte {end}; nothing was written "
                                "(resize it first)")
        return {"written": volumes.write(store, args.name, offset, source)}

    def remote_params() -> dict[str, Any]:
        if args.file != "-":
            return {"name": args.name, "offset": offset, "path": str(Path(args.file).resolve())}
        from dvx_dr.site.ops import MAX_INLINE

        data = source.read(MAX_INLINE + 1)
        if len(data) > MAX_INLINE:
            raise UserError("a write through a running site is limited to "
                            f"{MAX_INLINE} bytes")
        return {"name": args.name, "offset": offset, "data": base64.b64encode(data).decode()}

    try:
        result = run_op(args, "volume.write", _Lazy(remote_params), local)
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    print(f"wrote {result['written']} bytes to volume {args.name} at offset {offset}")
    return 0


class _Lazy(dict[str, Any]):
    """Parameters built only when the operation goes to a running site (reads the input)."""

    def __init__(self, build: Any) -> None:
        super().__init__()
        self._build = build

    def materialise(self) -> dict[str, Any]:
        return dict(self._build())


def cmd_read(args: argparse.Namespace) -> int:
    offset = parse_size(args.offset, "--offset")
    length = parse_size(args.length, "--length")

    def local(store: Store) -> Any:
        from dvx_dr.site import volumes

        info = volumes.get(store, args.name)
        if offset + length > info.size:
            raise UserError(f"range {offset}+{length} is outside volume {args.name!r} of "
                            f"{info.size} bytes")
        copy_out(volumes.iter_range(store, info.id, info.size, offset, length, True),
                 args.output)
        return None

    result = run_op(args, "volume.read", {"name": args.name, "offset": offset,
                                          "length": length}, local)
    if result is not None:
        copy_out([base64.b64decode(result["data"])], args.output)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    infos = run_op(args, "volume.list", {})
    if args.json:
        print_json(infos)
        return 0
    print_table(["NAME", "SIZE", "STORED BLOCKS", "CREATED"],
                [[v["name"], format_size(v["size"]), str(v["mapped_blocks"]), v["created"]]
                 for v in infos])
    return 0


def cmd_resize(args: argparse.Namespace) -> int:
    info = run_op(args, "volume.resize", {"name": args.name,
                                          "size": parse_size(args.size, "--size")})
    print(f"volume {info['name']} is now {format_size(info['size'])}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    run_op(args, "volume.delete", {"name": args.name})
    print(f"deleted volume {args.name}; 'dvx-dr datastore gc' reclaims its space")
    return 0


def cmd_clone(args: argparse.Namespace) -> int:
    info = run_op(args, "volume.clone", {"name": args.name, "source": args.source})
    print(f"created volume {info['name']} from snapshot {args.source}")
    return 0
