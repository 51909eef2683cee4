"""Which snapshots a retention rule keeps: grandfather-father-son, as restic's ``forget --keep-*``.

Snapshots are walked newest first. ``keep_last: N`` keeps the N newest. ``hourly: N`` keeps the
newest snapshot of each of the N most recent hours that have a snapshot at all (hours without one
do not count), and ``daily``, ``weekly`` (ISO weeks, Monday first) and ``monthly`` do the same
with their periods. A snapshot is kept when any rule keeps it, so one snapshot may count for
several rules at once. Names in ``protected`` (the base of a replication in flight, a snapshot a
user pinned) are always kept on top of that.

Periods are cut in the time zone of ``now``: a site that keeps "daily" snapshots in local time
passes a local ``now``. Naive datetimes are taken as UTC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from dvx_dr.policies.model import Retention

_Bucket = Callable[[datetime], tuple[int, ...]]

_PERIODS: tuple[tuple[str, _Bucket], ...] = (
    ("hourly", lambda t: (t.year, t.month, t.day, t.hour)),
    ("daily", lambda t: (t.year, t.month, t.day)),
    ("weekly", lambda t: tuple(t.isocalendar()[:2])),
    ("monthly", lambda t: (t.year, t.month)),
)


def select_keep(
    snapshots: list[tuple[str, datetime]],
    rule: Retention,
    now: datetime,
    protected: Iterable[str] = (),
) -> set[str]:
    """Names of the ``(name, taken_at)`` snapshots that ``rule`` keeps, plus the ``protected``
    ones among them. Everything else may be deleted."""
    tz = now.tzinfo or UTC

    def local(t: datetime) -> datetime:
        return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(tz)

    # Newest first; equal times are ordered by name so that the answer does not depend on
    # the order the caller listed them in.
    ordered = sorted(((local(t), name) for name, t in snapshots), reverse=True)
    keep = {name for _, name in ordered[: rule.keep_last]}
    for period, bucket in _PERIODS:
        left = getattr(rule, period)
        last: tuple[int, ...] | None = None
        for taken_at, name in ordered:
            if left == 0:
                break
            key = bucket(taken_at)
            if key != last:
                keep.add(name)
                last = key
                left -= 1
    names = {name for name, _ in snapshots}
    keep.update(names.intersection(protected))
    return keep
