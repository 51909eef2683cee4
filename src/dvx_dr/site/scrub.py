"""Scrub: read back and verify every live extent; report damage by volume and offset."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from dvx_dr.errors import IntegrityError
from dvx_dr.site import refs, snapshots
from dvx_dr.site.store import Store

_BATCH = 256


@dataclass
class ScrubReport:
    checked_blobs: int = 0
    checked_bytes: int = 0
    #: One line per damaged place, e.g. "volume vm1 offset 65536: segment 3 offset 12".
    damaged: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.damaged


def scrub(store: Store, progress: Callable[[int], None] | None = None) -> ScrubReport:
    report = ScrubReport()
    state: dict[int, bool] = {}  # row -> verified good
    with store.mutex:
        _check(store, refs.live_refs(store), state, report, progress)
        _check(store, refs.group_refs(store), state, report, progress)
        seen: set[tuple[bytes, int]] = set()
        for snap in snapshots.list_snapshots(store):
            try:
                _check(store, refs.snapshot_refs(store, snap, seen), state, report, progress)
            except IntegrityError as exc:
                report.damaged.append(f"snapshot {snap.spec}: {exc}")
    return report


def _check(store: Store, source: Iterator[refs.Ref], state: dict[int, bool],
           report: ScrubReport, progress: Callable[[int], None] | None) -> None:
    batch: list[refs.Ref] = []
    for ref in source:
        batch.append(ref)
        if len(batch) >= _BATCH:
            _verify(store, batch, state, report, progress)
            batch = []
    _verify(store, batch, state, report, progress)


def _verify(store: Store, batch: list[refs.Ref], state: dict[int, bool], report: ScrubReport,
            progress: Callable[[int], None] | None) -> None:
    todo = list({r.row for r in batch if r.row not in state})
    if todo:
        for row, ok, size in store.blobs.verify_rows(todo):
            state[row] = ok
            report.checked_blobs += 1
            report.checked_bytes += size
            if progress:
                progress(size)
    for ref in batch:
        if not state[ref.row]:
            where = f"offset {ref.offset}" if ref.offset >= 0 else "metadata"
            try:
                info = store.blobs.row_info(ref.row)
            except IntegrityError:
                report.damaged.append(f"{ref.what} {where}: names blob row {ref.row}, which is "
                                      "missing from the index")
                continue
            report.damaged.append(f"{ref.what} {where}: extent at segment {info.seg:08d} offset "
                                  f"{info.off} fails its integrity check")
