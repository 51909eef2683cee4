"""``dvx-dr volume ...``: create, fill, read and manage volumes."""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from dvx_dr import sparse
from dvx_dr.cli import remote
from dvx_dr.cli.common import print_json, print_table
from dvx_dr.cli.context import StoreCommands, progress_bar, run_op
from dvx_dr.errors import UserError
from dvx_dr.site import lockfile
from dvx_dr.units import count, format_size, format_size_exact, parse_size

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
    c.add_argument("--any-format", action="store_true",
                   help="import a qcow2, VMDK, VHD(X) or VDI file's bytes as they are, "
                        "instead of refusing it (convert it to raw with qemu-img first)")

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
    c.add_argument("--size", required=True, help="the new size, like 20GiB")
    c.add_argument("--shrink", action="store_true",
                   help="allow a smaller size: the bytes past it are dropped")

    c = cmd("delete", cmd_delete, "delete a volume (its snapshots stay)")
    c.add_argument("name")

    c = cmd("clone", cmd_clone, "create a writable volume from a snapshot")
    c.add_argument("name")
    c.add_argument("--from", dest="source", required=True, metavar="SNAPSHOT",
                   help="snapshot as VOLUME@NAME (a replica: SITE/VOLUME@NAME)")


def cmd_create(args: argparse.Namespace) -> int:
    info = run_op(args, "volume.create", {"name": args.name,
                                          "size": parse_size(args.size, "--size")})
    print(f"created volume {info['name']} ({format_size_exact(info['size'])})")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if str(args.file) == "-":
        raise UserError("volume import reads a disk image file or block device, not standard "
                        "input; from a pipe, create the volume ('dvx-dr volume create NAME "
                        "--size SIZE') and write it ('dvx-dr volume write NAME -')")
    path = args.file.resolve()
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise UserError(f"cannot read image {args.file}: {exc.strerror}") from None

    def local(store: Store) -> Any:
        from dvx_dr.site import ops, volumes

        with progress_bar(size, f"import {args.name}") as bar:
            volumes.import_file(store, args.name, args.file, bar, args.any_format)
        return ops.volume_get(store, args.name)

    # The site opens the file by its absolute path, and refuses a container format itself
    # (``volumes.import_file``) unless --any-format.
    info = run_op(args, "volume.import", {"name": args.name, "path": str(path),
                                          "any_format": args.any_format}, local)
    print(f"imported {args.file} as volume {info['name']} ({format_size_exact(info['size'])}, "
          f"{count(info['mapped_blocks'], 'block')} stored, the rest holes)")
    return 0


def is_stdout(target: str) -> bool:
    """Whether ``target`` is ``-`` or names the file that standard output already is
    (``/dev/stdout``, ``/proc/self/fd/1``, or the file it was redirected to)."""
    if target == "-":
        return True
    try:
        named, out = os.stat(target), os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return (named.st_dev, named.st_ino) == (out.st_dev, out.st_ino)


def copy_out(chunks: Iterable[bytes | int], target: str) -> bool:
    """Write ``chunks`` (bytes, or an int: that many zeros) to ``target``; whether it was
    standard output (``-``, or the same file: it gets only the data, and a command prints
    no status line there).

    A regular file (or a new one) is written sparsely (``dvx_dr.sparse``) into a temporary
    file next to it, synced, and renamed over it only once complete: a read that fails
    (damaged data, a full disk, Ctrl-C) leaves the file that was there as it was, and no
    partial one. A path that resolves into a store is refused (``lockfile``). A device, a
    FIFO or standard output gets every byte in place: it cannot be renamed over, and a
    disk may hold old data where a hole would be. The output is opened before the first
    chunk is asked for: a FIFO without a reader makes this command wait, not a running site
    that would be holding its store for the read meanwhile."""
    data = iter(chunks)
    try:
        if is_stdout(target):
            _write_through(sys.stdout.buffer, data, target)
            return True
        lockfile.check_output_path(target)
        path = os.path.realpath(target)
        try:
            old = os.stat(path)
        except FileNotFoundError:
            old = None
        except OSError as exc:
            raise UserError(f"cannot write {target}: {exc.strerror}") from None
        if old is None or stat.S_ISREG(old.st_mode):
            _replace(path, old, data, target)
            return False
        try:
            out = open(path, "wb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise UserError(f"cannot write {target}: {exc.strerror}") from None
        with out:
            _write_through(out, data, target)
        return False
    finally:
        close = getattr(data, "close", None)
        if close is not None:
            close()  # a read through a running site: its connection ends here


def _write_through(out: BinaryIO, data: Iterable[bytes | int], target: str) -> None:
    """Every byte to a stream that is written in place (standard output, a device)."""
    try:
        sparse.write(out, data, False)
        out.flush()
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            raise
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None


def _overwrite(path: str, data: Iterable[bytes | int], target: str) -> None:
    """Write over the existing file ``path`` in place (sparsely: it is truncated first), for
    a directory where no temporary file can be made; a failure then leaves a partial file."""
    try:
        with open(path, "wb") as out:
            sparse.write(out, data, sparse.is_new_regular_file(out))
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}; it was being written "
                        "in place (its directory takes no new file), so it holds part of the "
                        "image now: delete it or write it again") from None


def _replace(path: str, old: os.stat_result | None, data: Iterable[bytes | int],
             target: str) -> None:
    """Write a temporary file next to ``path`` and rename it over ``path`` once complete.
    The temporary file has the replaced file's owner and mode when it can (else the usual
    mode for a new file); on any failure it is removed."""
    directory, name = os.path.split(path)
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".dvx-dr-part", dir=directory)
    except OSError as exc:
        if old is not None and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            _overwrite(path, data, target)  # a file that may be written, in a directory
            return                          # that takes no new one
        raise UserError(f"cannot write {target}: {exc.strerror}") from None
    try:
        with open(fd, "wb") as out:
            if old is not None:
                with contextlib.suppress(OSError):
                    os.fchown(fd, old.st_uid, old.st_gid)
                os.fchmod(fd, stat.S_IMODE(old.st_mode))
            else:
                umask = os.umask(0)
                os.umask(umask)
                os.fchmod(fd, 0o666 & ~umask)
            sparse.write(out, data, True)
            out.flush()
            os.fsync(fd)
        os.replace(temp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            kept = f"{target} is as it was" if old is not None else "nothing was kept"
            raise UserError(f"cannot write {target}: {exc.strerror or exc}; {kept}") from None
        raise
    with contextlib.suppress(OSError):  # the rename itself, durable
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _same_file(path: str, opened: os.stat_result | None) -> bool:
    """Whether the site, opening ``path`` itself, finds the file this command opened: not so
    for standard input that is a deleted file (a shell's here-document, named /dev/stdin)."""
    try:
        st = os.stat(os.path.realpath(path))
    except OSError:
        return False
    return opened is not None and (st.st_dev, st.st_ino) == (opened.st_dev, opened.st_ino)


def cmd_export(args: argparse.Namespace) -> int:
    def local(store: Store) -> Any:
        from dvx_dr.site import volumes

        info = volumes.get(store, args.name)
        with progress_bar(info.size, f"export {args.name}") as bar:
            to_stdout = copy_out(counted(volumes.iter_range(store, info.id, info.size, 0,
                                                            info.size, True), bar), args.file)
        return {"size": info.size, "stdout": to_stdout}

    def through_site(socket: str) -> Any:
        read = remote.Read(socket, {"volume": args.name})
        to_stdout = copy_out(read, args.file)
        return {"size": read.result["size"], "stdout": to_stdout}

    result = run_op(args, "volume.get", {"name": args.name}, local, remote_call=through_site)
    if not result["stdout"]:
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
    # A running site reads a regular file or a block device by its path. A pipe, a FIFO, a
    # terminal or standard input (also as /dev/stdin or <(...)) is read here and sent inline:
    # the site cannot open another process's pipe, and must never wait on a FIFO.
    opened = None if args.file == "-" else os.fstat(source.fileno())
    mode = opened.st_mode if opened else 0
    by_path = (stat.S_ISREG(mode) or stat.S_ISBLK(mode)) and _same_file(args.file, opened)

    def local(store: Store) -> Any:
        from dvx_dr.site import volumes

        if stat.S_ISREG(mode):
            end = offset + os.fstat(source.fileno()).st_size
            size = volumes.get(store, args.name).size
            if end > size:
                raise UserError(f"write past the end of volume {args.name!r}: it is {size} "
                                f"bytes, the write reaches byte {end}; nothing was written "
                                "(resize it first)")
        return {"written": volumes.write(store, args.name, offset, source)}

    def remote_params() -> dict[str, Any]:
        if by_path:
            return {"name": args.name, "offset": offset, "path": os.path.realpath(args.file)}
        from dvx_dr.site.ops import MAX_INLINE

        data = source.read(MAX_INLINE + 1)
        if len(data) > MAX_INLINE:
            raise UserError(f"a write through a running site from standard input, a pipe or "
                            f"a device is limited to {MAX_INLINE} bytes; nothing was written "
                            "(write it from a regular file, or stop the site)")
        return {"name": args.name, "offset": offset, "data": base64.b64encode(data).decode()}

    try:
        result = run_op(args, "volume.write", _Lazy(remote_params), local)
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    print(f"wrote {count(result['written'], 'byte')} to volume {args.name} at offset {offset}")
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

    def through_site(socket: str) -> Any:
        copy_out(remote.Read(socket, {"volume": args.name, "offset": offset,
                                      "length": length}), args.output)

    run_op(args, "volume.read", {}, local, remote_call=through_site)
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
    # A smaller size is refused in ``volumes.resize`` without --shrink, here and in a running
    # site alike.
    info = run_op(args, "volume.resize", {"name": args.name, "shrink": args.shrink,
                                          "size": parse_size(args.size, "--size")})
    print(f"volume {info['name']} is now {format_size_exact(info['size'])}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    run_op(args, "volume.delete", {"name": args.name})
    print(f"deleted volume {args.name}; 'dvx-dr datastore gc' reclaims its space")
    return 0


def cmd_clone(args: argparse.Namespace) -> int:
    info = run_op(args, "volume.clone", {"name": args.name, "source": args.source})
    print(f"created volume {info['name']} from snapshot {args.source}")
    return 0
