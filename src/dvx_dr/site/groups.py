"""Protection-group snapshots: every member volume snapshotted at one instant.

A group snapshot ``PG@NAME`` is taken in one store transaction (the store runs one operation
at a time, so no write lands between two members): each member volume gets a snapshot
``VOLUME@NAME`` and a group root blob lists their roots (format in ``tree``). A replica of a
group received from site S is ``S/PG@NAME`` with members ``S/VOLUME@NAME``. Member snapshots
are deleted with their group, never alone, so a group root never names a missing volume root.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from dvx_dr.errors import AlreadyExistsError, NotFoundError, UserError
from dvx_dr.site import snapshots, treeblobs, volumes
from dvx_dr.site.store import Store, now_iso
from dvx_dr.site.tree import GroupRoot, Root


@dataclass(frozen=True)
class GroupInfo:
    id: int
    pg: str
    name: str
    root_row: int
    created: str
    origin: str

    @property
    def spec(self) -> str:
        return f"{self.pg}@{self.name}"

    @property
    def created_at(self) -> datetime:
        return datetime.fromisoformat(self.created.replace("Z", "+00:00"))


_COLUMNS = "gsnap, pg, name, root, created, origin"


def list_groups(store: Store, pg: str | None = None) -> list[GroupInfo]:
    if pg is None:
        rows = store.db.execute(f"SELECT {_COLUMNS} FROM group_snapshots ORDER BY pg, gsnap")
    else:
        rows = store.db.execute(f"SELECT {_COLUMNS} FROM group_snapshots WHERE pg=? "
                                "ORDER BY gsnap", (pg,))
    return [GroupInfo(*r) for r in rows]


def get(store: Store, pg: str, name: str) -> GroupInfo:
    row = store.db.execute(f"SELECT {_COLUMNS} FROM group_snapshots WHERE pg=? AND name=?",
                           (pg, name)).fetchone()
    if row is None:
        raise NotFoundError(f"unknown group snapshot {pg}@{name}")
    return GroupInfo(*row)


def root_of(store: Store, group: GroupInfo) -> GroupRoot:
    return GroupRoot.unpack(store.blobs.get_row(group.root_row))


def member_volumes(store: Store, group: GroupInfo) -> list[str]:
    """The names of the volumes the group snapshot holds a snapshot of (as its root lists
    them: plain names for a local group, ``SITE/NAME`` for a replica's)."""
    return [name for name, _ in root_of(store, group).members]


def member_specs(store: Store, group: GroupInfo) -> list[str]:
    """The member volume snapshots, as ``snapshot`` specs."""
    prefix = group.pg.rpartition("/")[0]
    return [f"{prefix + '/' if prefix else ''}{name}@{group.name}"
            for name, _ in root_of(store, group).members]


def create(store: Store, pg: str, members: list[str], name: str | None = None) -> GroupInfo:
    """Snapshot every member volume at one instant and record the group snapshot."""
    if not members:
        raise UserError(f"protection group {pg!r} has no member volumes to snapshot")
    if twice := sorted({v for v in members if members.count(v) > 1}):
        raise UserError(f"volume {twice[0]!r} is named more than once; name each member once")
    name = name or snapshots.default_name()
    infos = [volumes.get(store, v) for v in members]
    with store.transaction() as db:
        if db.execute("SELECT 1 FROM group_snapshots WHERE pg=? AND name=?",
                      (pg, name)).fetchone():
            raise AlreadyExistsError(f"group snapshot {pg}@{name} already exists")
        created = now_iso()
        roots: list[tuple[str, bytes]] = []
        for info in infos:
            if db.execute("SELECT 1 FROM snapshots WHERE volume=? AND name=?",
                          (info.name, name)).fetchone():
                raise AlreadyExistsError(f"snapshot {info.name}@{name} already exists")
            root = snapshots.build_tree(store, info.id, info.size)
            snapshots.record(store, info.name, name, root, created=created)
            roots.append((info.name, snapshots.blob_id_of(root)))
        record(store, pg, name, GroupRoot(tuple(sorted(roots))), created=created)
    return get(store, pg, name)


def record(store: Store, pg: str, name: str, group: GroupRoot, origin: str = "local",
           created: str | None = None) -> int:
    """Store a group root blob and its row (inside a transaction, members already recorded)."""
    _, (row,) = store.blobs.put_many([group.pack()])
    treeblobs.mark(store.db, [row], treeblobs.GROUP)
    cur = store.db.execute(
        "INSERT INTO group_snapshots (pg, name, root, created, origin) VALUES (?, ?, ?, ?, ?)",
        (pg, name, row, created or now_iso(), origin))
    assert cur.lastrowid is not None
    return cur.lastrowid


def delete(store: Store, pg: str, name: str) -> None:
    """Delete a group snapshot and its member snapshots, except a member replica that a peer
    also sent on its own (``snapshots.mark_standalone``): that one stays, as a snapshot of
    its own."""
    group = get(store, pg, name)
    specs = member_specs(store, group)
    with store.transaction() as db:
        for spec in specs:
            if snapshots.is_standalone(db, spec):
                continue
            volume, snap = snapshots.parse_spec(spec)
            db.execute("DELETE FROM snapshots WHERE volume=? AND name=?", (volume, snap))
        db.execute("DELETE FROM group_snapshots WHERE gsnap=?", (group.id,))


def is_member(store: Store, volume: str, name: str) -> str | None:
    """The group snapshot a volume snapshot belongs to, if any."""
    for group in store.db.execute("SELECT pg FROM group_snapshots WHERE name=?", (name,)):
        info = get(store, group[0], name)
        if f"{volume}@{name}" in member_specs(store, info):
            return info.spec
    return None


def volume_roots(store: Store, group: GroupInfo) -> list[tuple[str, bytes, Root]]:
    """``(volume, root id, root)`` of each member."""
    out = []
    for volume, root_id in root_of(store, group).members:
        out.append((volume, root_id, Root.unpack(store.blobs.get(root_id))))
    return out
