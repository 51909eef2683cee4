"""Datastore statistics: what the volumes hold, what is unique, what lies on disk."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from dvx_dr.site.store import Store


@dataclass
class KeyVersionBytes:
    key_version: int  # 0 = plain
    extents: int
    stored_bytes: int


@dataclass
class DatastoreStats:
    site: str
    block_size: int
    encryption: bool
    volumes: int
    snapshots: int
    #: Non-hole bytes referenced by live volumes and by snapshots (what readers see).
    logical_bytes: int
    live_logical_bytes: int
    #: Plaintext bytes of the distinct data blocks (after dedup, before compression).
    unique_bytes: int
    #: Bytes of live extents in segments (after compression and padding, with headers): data
    #: blocks and tree blobs.
    extent_bytes: int
    #: The same two for the snapshots' and volumes' Merkle trees (pages and roots): metadata
    #: that holds no volume data, kept out of the dedup and compression ratios.
    tree_unique_bytes: int
    tree_extent_bytes: int
    #: Bytes of segment files on disk (extents plus garbage not yet collected).
    stored_bytes: int
    #: Bytes of the metadata database and its write-ahead log.
    metadata_bytes: int
    by_key_version: list[KeyVersionBytes] = field(default_factory=list)

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        data = self.extent_bytes - self.tree_extent_bytes
        return self.unique_bytes / data if data else 1.0

    @property
    def reduction_ratio(self) -> float:
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else 1.0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["dedup_ratio"] = round(self.dedup_ratio, 4)
        out["compression_ratio"] = round(self.compression_ratio, 4)
        out["reduction_ratio"] = round(self.reduction_ratio, 4)
        out["encrypted_bytes"] = sum(k.stored_bytes for k in self.by_key_version
                                     if k.key_version)
        out["plain_bytes"] = sum(k.stored_bytes for k in self.by_key_version
                                 if not k.key_version)
        return out


def collect(store: Store) -> DatastoreStats:
    db = store.db
    bs = store.block_size
    live_blocks = db.execute("SELECT COUNT(*) FROM blocks b JOIN volumes v ON b.vol=v.vol "
                             "WHERE v.state='ready'").fetchone()[0]
    snap_blocks = db.execute("SELECT COALESCE(SUM(mapped_blocks), 0) FROM snapshots"
                             ).fetchone()[0]
    # Tree blobs: every page and root under a snapshot is marked complete (``treeblobs``),
    # and a volume's cached tree holds the pages built since.
    sums = {bool(tree): (plain, stored) for tree, plain, stored in db.execute(
        "SELECT row IN (SELECT row FROM tree_blobs UNION SELECT blob FROM tree_pages) AS tree, "
        "SUM(plain_len), SUM(length) FROM blobs GROUP BY tree")}
    unique, data_extents = sums.get(False, (0, 0))
    tree_unique, tree_extents = sums.get(True, (0, 0))
    by_kv = [KeyVersionBytes(kv, n, b) for kv, n, b in db.execute(
        "SELECT key_version, COUNT(*), SUM(length) FROM blobs GROUP BY key_version "
        "ORDER BY key_version")]
    segs = sum(p.stat().st_size for p in (store.path / "segments").glob("*.seg"))
    meta = sum(p.stat().st_size for p in store.path.glob("store.db*"))
    return DatastoreStats(
        site=store.site,
        block_size=bs,
        encryption=store.encrypted,
        volumes=db.execute("SELECT COUNT(*) FROM volumes WHERE state='ready'").fetchone()[0],
        snapshots=db.execute("SELECT COUNT(*) FROM snapshots").fetchone()[0],
        logical_bytes=(live_blocks + snap_blocks) * bs,
        live_logical_bytes=live_blocks * bs,
        unique_bytes=unique,
        extent_bytes=data_extents + tree_extents,
        tree_unique_bytes=tree_unique,
        tree_extent_bytes=tree_extents,
        stored_bytes=segs,
        metadata_bytes=meta,
        by_key_version=by_kv,
    )
