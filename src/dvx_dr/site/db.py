"""The store's metadata database (SQLite, WAL, synchronous=FULL, secure_delete).

Schema version 2, created by ``create_schema``; an older database is brought up to it by the
numbered migrations in ``MIGRATIONS``, applied in order by ``open_db``. A database of a newer
schema than this build knows is refused.

Versions: 1, the first; 2 adds ``dirty_blocks`` (snapshots patch the cached leaf pages over
written blocks instead of rebuilding whole leaves); 3 adds ``tree_blobs`` (which blobs are
complete tree nodes, see ``treeblobs``).

Nothing here names a blob by its raw id: ``blobs.name`` is ``HMAC-SHA256(index key, id)`` on
a store with keys (the raw id only on a store that never had encryption), ``blobs.sealed_id``
is the id sealed with AES-GCM, and every other table refers to blobs by ``blobs.row``.
Volume, snapshot and group names are not secret, but the file is its owner's alone (``MODE``,
0600, whatever the umask), as are the log and index SQLite keeps next to it.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from dvx_dr.errors import FormatError, IntegrityError, StoreFullError

SCHEMA_VERSION = 3


def create_schema(db: sqlite3.Connection) -> None:
    db.executescript(
        """
        -- Store-wide settings: schema_version, store_id, site, block_size, encryption
        -- ('on'/'off': how new extents are written), key_version (the TEK version new
        -- extents use), created.
        CREATE TABLE meta (
            key   TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );

        -- The blob index: where each content-addressed blob's extent lies.
        CREATE TABLE blobs (
            row         INTEGER PRIMARY KEY,
            name        BLOB NOT NULL UNIQUE,   -- keyed name of the id (see module docstring)
            sealed_id   BLOB NOT NULL,          -- the id, sealed (AES-GCM) on a keyed store
            seg         INTEGER NOT NULL,       -- segment number
            off         INTEGER NOT NULL,       -- offset of the extent header in the segment
            length      INTEGER NOT NULL,       -- header + stored bytes
            plain_len   INTEGER NOT NULL,       -- bytes of plaintext
            key_version INTEGER NOT NULL        -- TEK version, 0 when stored plain
        );
        CREATE INDEX blobs_by_segment ON blobs (seg);

        -- Volumes. state 'ready', or 'importing' for a volume import not yet finished
        -- (such leftovers of a crash are dropped when the store opens).
        CREATE TABLE volumes (
            vol         INTEGER PRIMARY KEY,
            name        TEXT NOT NULL UNIQUE,
            size        INTEGER NOT NULL,
            created     TEXT NOT NULL,
            state       TEXT NOT NULL DEFAULT 'ready'
        );

        -- The live block map: a missing row is a hole (reads as zeros).
        CREATE TABLE blocks (
            vol   INTEGER NOT NULL,
            blk   INTEGER NOT NULL,
            blob  INTEGER NOT NULL,             -- blobs.row
            PRIMARY KEY (vol, blk)
        ) WITHOUT ROWID;

        -- Leaf pages to rebuild in full at the next snapshot (a resize, a clone, an import).
        CREATE TABLE dirty_leaves (
            vol   INTEGER NOT NULL,
            leaf  INTEGER NOT NULL,
            PRIMARY KEY (vol, leaf)
        ) WITHOUT ROWID;

        -- Blocks written since the volume's tree was last built: the next snapshot patches
        -- their ids into the cached leaf pages. A superset is harmless (the block map is read
        -- again); a block missing here while its map row changed would corrupt the tree.
        CREATE TABLE dirty_blocks (
            vol   INTEGER NOT NULL,
            blk   INTEGER NOT NULL,
            PRIMARY KEY (vol, blk)
        ) WITHOUT ROWID;

        -- Blobs that are complete tree nodes: a page at ``level`` (0 = a leaf page, listing
        -- blocks) or a root (-1 a volume root, -2 a group root) whose whole subtree is durable
        -- and whose pages are in this table too. See ``treeblobs``.
        CREATE TABLE tree_blobs (
            row   INTEGER NOT NULL,
            level INTEGER NOT NULL,
            PRIMARY KEY (row, level)
        ) WITHOUT ROWID;

        -- The volume's Merkle tree as last built: page (level, idx) -> blob; absent = hole.
        -- Level 0 pages list block ids; level k+1 pages list ids of level k pages.
        CREATE TABLE tree_pages (
            vol   INTEGER NOT NULL,
            level INTEGER NOT NULL,
            idx   INTEGER NOT NULL,
            blob  INTEGER NOT NULL,
            PRIMARY KEY (vol, level, idx)
        ) WITHOUT ROWID;

        -- Immutable snapshots: a root blob naming the volume's tree at one instant.
        -- origin is 'local' or the name of the site a replica came from.
        CREATE TABLE snapshots (
            snap          INTEGER PRIMARY KEY,
            volume        TEXT NOT NULL,
            name          TEXT NOT NULL,
            root          INTEGER NOT NULL,     -- blobs.row of the root blob
            size          INTEGER NOT NULL,
            mapped_blocks INTEGER NOT NULL,
            created       TEXT NOT NULL,
            origin        TEXT NOT NULL DEFAULT 'local',
            UNIQUE (volume, name)
        );

        -- Protection-group snapshots: one root blob over the roots of the member volumes'
        -- snapshots (all named <volume>@<name>), taken in one transaction: crash-consistent
        -- across the group. A replica group is named <source site>/<pg>.
        CREATE TABLE group_snapshots (
            gsnap    INTEGER PRIMARY KEY,
            pg       TEXT NOT NULL,
            name     TEXT NOT NULL,
            root     INTEGER NOT NULL,          -- blobs.row of the group root blob
            created  TEXT NOT NULL,
            origin   TEXT NOT NULL DEFAULT 'local',
            UNIQUE (pg, name)
        );

        -- Per protection group and target site: the newest group snapshot the target holds
        -- (the base of the next incremental, never pruned here while the target is configured).
        CREATE TABLE replication_state (
            pg            TEXT NOT NULL,
            target        TEXT NOT NULL,
            snapshot      TEXT NOT NULL,
            snapshot_time TEXT NOT NULL,        -- when that snapshot was taken (its data age)
            replicated_at TEXT NOT NULL,
            PRIMARY KEY (pg, target)
        );
        """
    )


def _add_dirty_blocks(db: sqlite3.Connection) -> None:
    """1 -> 2: blocks written since the last snapshot. Pending ``dirty_leaves`` rows stay, and
    the next snapshot rebuilds those leaves in full as before."""
    db.execute(
        """
        CREATE TABLE dirty_blocks (
            vol   INTEGER NOT NULL,
            blk   INTEGER NOT NULL,
            PRIMARY KEY (vol, blk)
        ) WITHOUT ROWID
        """
    )


def _add_tree_blobs(db: sqlite3.Connection) -> None:
    """2 -> 3: complete tree nodes. It starts empty (the trees cannot be read without the
    keys, and a store may be opened locked): the next snapshot of each volume marks its whole
    tree, and a peer resends the tree pages (not the blocks) of the first replica it sends
    here after the upgrade."""
    db.execute(
        """
        CREATE TABLE tree_blobs (
            row   INTEGER NOT NULL,
            level INTEGER NOT NULL,
            PRIMARY KEY (row, level)
        ) WITHOUT ROWID
        """
    )


#: Migration N takes a database from schema version N to N + 1.
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _add_dirty_blocks,
    2: _add_tree_blobs,
}


def connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA secure_delete=ON")
    db.execute("PRAGMA foreign_keys=OFF")
    return db


#: The database and the files SQLite keeps next to it (its write-ahead log and the log's
#: index), which SQLite creates with the database's mode and owner.
FILES = ("", "-wal", "-shm")
#: The mode of the database: it names volumes, snapshots, groups and sites, and the store is
#: its owner's alone (the store's other files are 0600, its directories 0700).
MODE = 0o600


def init_db(path: Path, meta: dict[str, str]) -> sqlite3.Connection:
    # Made here, empty (SQLite takes an empty file as a new database), with MODE whatever
    # the umask: SQLite would make it 0644 less the umask.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, MODE)
    try:
        os.fchmod(fd, MODE)
    finally:
        os.close(fd)
    db = connect(path)
    create_schema(db)  # executescript commits on its own
    rows = dict(meta, schema_version=str(SCHEMA_VERSION))
    db.execute("BEGIN")
    db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", rows.items())
    db.execute("COMMIT")
    return db


def _disk_full(path: Path) -> bool:
    """Whether the file system holding ``path`` has no space left for ordinary writers."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 1024 * 1024


def restrict_mode(path: Path) -> None:
    """Take from the database at ``path`` (and its log and index) any permission beyond
    MODE that an older dvx-dr left (it made the database 0644 less the umask): quietly, and
    never at the cost of the opening (a file this user may not change is left as it is)."""
    for suffix in FILES:
        name = f"{path}{suffix}"
        with contextlib.suppress(OSError):
            st = os.stat(name)
            if st.st_mode & 0o7777 & ~MODE:
                os.chmod(name, st.st_mode & MODE)


def open_db(path: Path) -> sqlite3.Connection:
    """Open the database of a store this process owns (to write it): its mode is restricted
    first (``restrict_mode``), so that the log and index SQLite creates get that mode too."""
    restrict_mode(path)
    try:
        db = connect(path)
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.DatabaseError as exc:  # not a database, damaged, or not a file at all
        if "readonly" in str(exc):
            raise  # not damage: this user may not write it (the store says so in one line)
        if _disk_full(path):  # SQLite reports a full disk as an I/O error when it opens
            raise StoreFullError(f"store database {path} cannot be opened: the disk holding "
                                 "it is full; free some space and run the command again"
                                 ) from None
        raise IntegrityError(f"store database {path} is unreadable ({exc}): it is damaged "
                             "or was replaced; restore the store from a backup") from None
    if row is None:
        raise FormatError(f"store database {path} has no schema version")
    version = int(row[0])
    if version > SCHEMA_VERSION:
        raise FormatError(f"store database {path} has schema version {version}; this dvx-dr "
                          f"knows up to {SCHEMA_VERSION}: upgrade dvx-dr")
    while version < SCHEMA_VERSION:
        db.execute("BEGIN")
        MIGRATIONS[version](db)
        version += 1
        db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
        db.execute("COMMIT")
    return db


#: Values bound per ``IN (...)`` list (SQLite allows 32766 variables; smaller keeps each
#: statement cheap to prepare).
IN_CHUNK = 500


def select_in(db: sqlite3.Connection, query: str, values: Iterable[Any],
              params: Sequence[Any] = ()) -> Iterator[Any]:
    """Rows of ``query`` for every value in ``values``: ``query`` holds ``IN (?*)``, which
    becomes a list of placeholders, run once per ``IN_CHUNK`` values; ``params`` are bound
    before each chunk's values. Each chunk's rows are fetched whole before any is yielded,
    so no statement stays open between them: a generator left unfinished (its caller
    interrupted by Ctrl-C or SIGTERM) has nothing to close in a database closed since
    (SQLite's "Cannot operate on a closed database" at exit)."""
    wanted = list(values)
    for start in range(0, len(wanted), IN_CHUNK):
        part = wanted[start:start + IN_CHUNK]
        yield from db.execute(query.replace("(?*)", "(" + ",".join("?" * len(part)) + ")"),
                              (*params, *part)).fetchall()


def get_meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return None if row is None else str(row[0])


def set_meta(db: sqlite3.Connection, key: str, value: str) -> None:
    db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
               "ON CONFLICT (key) DO UPDATE SET value=excluded.value", (key, value))


def delete_meta(db: sqlite3.Connection, key: str) -> None:
    db.execute("DELETE FROM meta WHERE key=?", (key,))


def meta_with_prefix(db: sqlite3.Connection, prefix: str) -> dict[str, str]:
    """Every metadata key that starts with ``prefix`` (the prefix removed) -> its value."""
    return {key[len(prefix):]: str(value) for key, value in db.execute(
        "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ?", (len(prefix), prefix))}
