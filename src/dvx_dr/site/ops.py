"""Named store operations, shared by the CLI (store opened in-process) and a running site's
admin socket (store owned by the site). Each takes the store and JSON-able parameters and
returns a JSON-able result, so both paths run exactly the same code.
"""

from __future__ import annotations

import base64
import io
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dvx_dr.errors import NotFoundError, UserError
from dvx_dr.site import gc, groups, keys, scrub, snapshots, stats, volumes
from dvx_dr.site.store import Store

#: Reads and writes that travel inside a JSON message through the admin socket are capped
#: (``open_read`` streams reads of any length; a command sends a write from a file by path).
MAX_INLINE = 256 * 1024 * 1024

Op = Callable[..., Any]
OPS: dict[str, Op] = {}


def op(name: str) -> Callable[[Op], Op]:
    def register(fn: Op) -> Op:
        OPS[name] = fn
        return fn
    return register


#: What a locked store (keys not unwrapped yet) still answers.
LOCKED_OK = {"encryption.status", "datastore.unlock", "encryption.crypto_erase"}


#: Operations that stop when ``run``'s ``stopped`` says so (a running site: when their
#: command went away), as they stop at Ctrl-C offline.
STOPPABLE = {"volume.import"}


def run(store: Store, name: str, params: dict[str, Any],
        stopped: Callable[[], bool] | None = None) -> Any:
    fn = OPS.get(name)
    if fn is None:
        raise NotFoundError(f"unknown operation {name!r}")
    if name not in LOCKED_OK:
        check_usable(store)
    extra = {"stopped": stopped} if stopped is not None and name in STOPPABLE else {}
    try:
        return fn(store, **params, **extra)
    except TypeError as exc:
        raise UserError(f"operation {name}: bad parameters ({exc})") from None


def check_usable(store: Store) -> None:
    """Refuse an operation on a store whose keys are destroyed or not unwrapped yet."""
    if (refused := store.refusal()) is not None:
        raise refused


def _volume_json(store: Store, v: volumes.VolumeInfo) -> dict[str, Any]:
    return {"name": v.name, "size": v.size, "mapped_blocks": v.mapped_blocks,
            "mapped_bytes": v.mapped_blocks * store.block_size, "created": v.created}


def _snapshot_json(store: Store, s: snapshots.SnapshotInfo) -> dict[str, Any]:
    return {"snapshot": s.spec, "volume": s.volume, "name": s.name, "size": s.size,
            "mapped_blocks": s.mapped_blocks, "mapped_bytes": s.mapped_blocks * store.block_size,
            "created": s.created, "origin": s.origin}


@op("volume.create")
def volume_create(store: Store, name: str, size: int) -> dict[str, Any]:
    return _volume_json(store, volumes.create(store, name, size))


@op("volume.get")
def volume_get(store: Store, name: str) -> dict[str, Any]:
    return _volume_json(store, volumes.get(store, name))


@op("volume.list")
def volume_list(store: Store) -> list[dict[str, Any]]:
    return [_volume_json(store, v) for v in volumes.list_volumes(store)]


class CommandGone(UserError):
    """A running site's operation stopped because its command went away."""


@op("volume.import")
def volume_import(store: Store, name: str, path: str, any_format: bool = False,
                  stopped: Callable[[], bool] | None = None) -> dict[str, Any]:
    def progress(_: int) -> None:
        if stopped is not None and stopped():
            raise CommandGone(f"the import of volume {name!r} was stopped: its command went "
                              "away (interrupted); the volume was dropped")

    volumes.import_file(store, name, Path(path), progress if stopped is not None else None,
                        any_format is True)
    return _volume_json(store, volumes.get(store, name))


@op("volume.write")
def volume_write(store: Store, name: str, offset: int, data: str | None = None,
                 path: str | None = None) -> dict[str, Any]:
    """Write inline ``data`` (base64) or the file at ``path`` at ``offset``, atomically.

    ``path`` must be a regular file or a block device. It is opened without blocking and
    checked before anything is read: a running site must never wait on a path a command
    names (opening a FIFO waits for a writer, and the site's store thread would wait with
    it). A command sends what it reads from a pipe, a FIFO or a terminal inline instead."""
    if path is None:
        raw = base64.b64decode(data or "")
        _check_write_end(store, name, offset, len(raw))
        n = volumes.write(store, name, offset, io.BytesIO(raw))
        return {"name": name, "offset": offset, "written": n}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    with open(fd, "rb") as source:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise UserError(f"cannot read {path}: not a regular file or block device; a "
                            "running site does not open pipes, FIFOs or terminals: send the "
                            "data on standard input ('-'), or stop the site")
        if stat.S_ISREG(st.st_mode):
            _check_write_end(store, name, offset, st.st_size)
        try:
            n = volumes.write(store, name, offset, source)
        except OSError as exc:
            raise UserError(f"cannot read {path}: {exc.strerror}") from None
    return {"name": name, "offset": offset, "written": n}


def _check_write_end(store: Store, name: str, offset: int, length: int) -> None:
    """Refuse, before reading any of it, a write of ``length`` bytes that would run past the
    volume's end, naming where it would reach."""
    size = volumes.get(store, name).size
    if offset + length > size:
        raise UserError(f"write past the end of volume {name!r}: it is {size} bytes, the write "
                        f"reaches byte {offset + length}; nothing was written (resize it "
                        "first)")


def open_read(store: Store, volume: str | None = None, snapshot: str | None = None,
              offset: int = 0, length: int | None = None
              ) -> tuple[int, Iterator[bytes | int]]:
    """What the admin socket's ``read`` call streams: ``length`` bytes (default: to the end)
    from ``offset`` of a live volume or a snapshot, as ``volumes.iter_range`` and
    ``snapshots.iter_range`` give them with zero runs (an int: that many zero bytes). Returns
    the size of the volume or snapshot and the chunks; the range is checked here, so an
    error comes before any data. The chunks are to be taken in the store's thread."""
    check_usable(store)
    if (volume is None) == (snapshot is None):
        raise UserError("a 'read' call names a 'volume' or a 'snapshot'")
    for field, value in (("offset", offset), ("length", length)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 0):
            raise UserError(f"a 'read' call's {field!r} must be a non-negative integer")
    if volume is not None:
        info = volumes.get(store, volume)
        size, what = info.size, f"volume {volume!r}"
    else:
        assert snapshot is not None
        size, what = snapshots.get(store, snapshot).size, f"snapshot {snapshot!r}"
    length = size - offset if length is None else length
    if offset + length > size:
        raise UserError(f"range {offset}+{length} is outside {what} of {size} bytes")
    if volume is not None:
        return size, volumes.iter_range(store, info.id, info.size, offset, length, True)
    assert snapshot is not None
    return size, snapshots.iter_range(store, snapshot, offset, length, True)


@op("volume.read")
def volume_read(store: Store, name: str, offset: int, length: int) -> dict[str, Any]:
    _check_inline(length)
    return {"data": base64.b64encode(volumes.read(store, name, offset, length)).decode()}


@op("volume.resize")
def volume_resize(store: Store, name: str, size: int, shrink: bool = False) -> dict[str, Any]:
    volumes.resize(store, name, size, shrink is True)
    return _volume_json(store, volumes.get(store, name))


@op("volume.delete")
def volume_delete(store: Store, name: str) -> dict[str, Any]:
    volumes.delete(store, name)
    return {"deleted": name}


@op("volume.clone")
def volume_clone(store: Store, name: str, source: str) -> dict[str, Any]:
    return _volume_json(store, snapshots.clone(store, name, source))


@op("snapshot.create")
def snapshot_create(store: Store, volume: str, name: str | None = None) -> dict[str, Any]:
    return _snapshot_json(store, snapshots.create(store, volume, name))


@op("snapshot.get")
def snapshot_get(store: Store, snapshot: str) -> dict[str, Any]:
    return _snapshot_json(store, snapshots.get(store, snapshot))


@op("snapshot.list")
def snapshot_list(store: Store, volume: str | None = None) -> list[dict[str, Any]]:
    return [_snapshot_json(store, s) for s in snapshots.list_snapshots(store, volume)]


@op("snapshot.delete")
def snapshot_delete(store: Store, snapshot: str) -> dict[str, Any]:
    volume, name = snapshots.parse_spec(snapshot)
    group = groups.is_member(store, volume, name)
    if group is not None:
        raise UserError(f"snapshot {snapshot} is part of group snapshot {group}; delete the "
                        f"group snapshot ('dvx-dr pg snapshot-delete {group}') instead")
    snapshots.delete(store, snapshot)
    return {"deleted": snapshot}


@op("snapshot.diff")
def snapshot_diff(store: Store, a: str, b: str) -> dict[str, Any]:
    return {"ranges": [{"offset": o, "length": n} for o, n in snapshots.diff(store, a, b)],
            "sizes": [snapshots.get(store, s).size for s in (a, b)]}


@op("snapshot.read")
def snapshot_read(store: Store, snapshot: str, offset: int, length: int) -> dict[str, Any]:
    _check_inline(length)
    return {"data": base64.b64encode(snapshots.read(store, snapshot, offset, length)).decode()}


def _group_json(store: Store, g: groups.GroupInfo) -> dict[str, Any]:
    return {"snapshot": g.spec, "pg": g.pg, "name": g.name, "created": g.created,
            "origin": g.origin, "members": groups.member_specs(store, g)}


@op("group.create")
def group_create(store: Store, pg: str, members: list[str], name: str | None = None
                 ) -> dict[str, Any]:
    return _group_json(store, groups.create(store, pg, members, name))


@op("group.list")
def group_list(store: Store, pg: str | None = None) -> list[dict[str, Any]]:
    return [_group_json(store, g) for g in groups.list_groups(store, pg)]


@op("group.delete")
def group_delete(store: Store, pg: str, name: str) -> dict[str, Any]:
    groups.delete(store, pg, name)
    return {"deleted": f"{pg}@{name}"}


@op("datastore.stats")
def datastore_stats(store: Store) -> dict[str, Any]:
    return stats.collect(store).to_json()


@op("datastore.scrub")
def datastore_scrub(store: Store) -> dict[str, Any]:
    report = scrub.scrub(store)
    return {"checked_blobs": report.checked_blobs, "checked_bytes": report.checked_bytes,
            "damaged": report.damaged}


@op("datastore.gc")
def datastore_gc(store: Store) -> dict[str, Any]:
    report = gc.gc(store)
    return vars(report) | {"reclaimed": report.reclaimed}


@op("encryption.status")
def encryption_status(store: Store) -> dict[str, Any]:
    return keys.status(store)


@op("encryption.enable")
def encryption_enable(store: Store, new_password: str | None = None) -> dict[str, Any]:
    return keys.enable(store, new_password)


@op("encryption.disable")
def encryption_disable(store: Store) -> dict[str, Any]:
    return keys.disable(store)


@op("encryption.change_password")
def encryption_change_password(store: Store, password: str | None, new_password: str
                               ) -> dict[str, Any]:
    return keys.change_password(store, password, new_password)


@op("encryption.rotate_key")
def encryption_rotate_key(store: Store, password: str | None,
                          startup_key: str | None = None) -> dict[str, Any]:
    return keys.rotate_key(store, password, _startup_path(store, startup_key))


@op("encryption.convert")
def encryption_convert(store: Store, to: str) -> dict[str, Any]:
    return keys.convert(store, to)


@op("encryption.set")
def encryption_set(store: Store, fips_mode: str | None = None, password: str | None = None,
                   startup_mode: str | None = None, startup_key: str | None = None
                   ) -> dict[str, Any]:
    return keys.set_modes(store, fips_mode, password, startup_mode,
                          _startup_path(store, startup_key))


@op("encryption.crypto_erase")
def encryption_crypto_erase(store: Store, confirm_name: str, delete_plain: bool = False,
                            startup_key: str | None = None) -> dict[str, Any]:
    return keys.crypto_erase(store, confirm_name, delete_plain,
                             _startup_path(store, startup_key))


@op("datastore.unlock")
def datastore_unlock(store: Store, password: str) -> dict[str, Any]:
    was_locked = store.locked
    store.unlock(password)
    if not was_locked and store.keystore is not None:
        store.keystore.verify_password(password)
    return {"unlocked": True, "was_locked": was_locked}


def _startup_path(store: Store, given: str | None) -> Path | None:
    """The startup key file: as given (site.yaml), else where the store recorded it."""
    if given:
        return Path(given)
    recorded = store.meta("startup_key")
    return Path(recorded) if recorded else None


def _check_inline(length: int) -> None:
    if length > MAX_INLINE:
        raise UserError(f"an inline read is limited to {MAX_INLINE} bytes; the admin "
                        "socket's 'read' call streams any length (as 'dvx-dr volume read' "
                        "and 'export' do)")
