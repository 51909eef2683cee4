"""The protection-group policy: what one YAML file in the site's policy directory says.

A policy names a protection group (PG), the volumes in it (name globs), when to snapshot them and
how long to keep the snapshots, and where to replicate them::

    name: finance
    members: ["fin-*", "!fin-scratch"]
    snapshot:
      schedule: 15m                    # an interval, or a 5-field cron expression in UTC
      retention: {keep_last: 4, hourly: 24, daily: 7}
    replication:
      - site: dr-east
        schedule: after-snapshot       # or its own interval / cron expression
        retention: {daily: 30, monthly: 12}
        rpo: 1h
        bandwidth_limit: 50MiB/s
    hooks:
      pre_snapshot: {command: ["/usr/local/bin/quiesce", "finance"], timeout: 30s}

``deploy/policies/example.yaml`` documents every field. The models check each field on its own;
rules that need more than one field or outside knowledge (peer sites, an RPO the schedule cannot
meet) are in :meth:`Policy.check`, and rules across files (one owner per volume, unique names) in
:mod:`dvx_dr.policies.loader`.

Validators raise ``ValueError`` with a message that reads after ``"<field>: "`` (``"expected a
duration like 15m, got 'soon'"``), as :mod:`dvx_dr.yamlerrors` reports it.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Set
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PlainSerializer,
    PlainValidator,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema

from dvx_dr.errors import UserError
from dvx_dr.units import parse_duration, parse_size

PG_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
AFTER_SNAPSHOT: Literal["after-snapshot"] = "after-snapshot"

Loc = tuple[str | int, ...]
"""A field's place in the policy, as pydantic spells it: ``("replication", 0, "rpo")``."""

#: Interval schedules run from once a second to once a year (APScheduler cannot add a job
#: whose next run lies past the year 9999; 10^12 s stopped the site from starting).
MIN_INTERVAL = 1.0
MAX_INTERVAL = 366 * 86400.0
#: How far ahead gaps() looks at a cron schedule's runs: over a year, so that monthly and
#: yearly patterns count.
_CRON_HORIZON = timedelta(days=400)
_DAY = timedelta(days=1)

_CRON_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def format_duration(seconds: float) -> str:
    """5400 -> ``"1h30m"``; the inverse of :func:`dvx_dr.units.parse_duration` for whole seconds."""
    rest = int(round(seconds))
    if rest == 0:
        return "0s"
    out = ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            out += f"{count}{unit}"
    return out


class Schedule:
    """When a job runs: a fixed interval (``15m``, ``1h30m``) or a 5-field cron expression.

    Cron expressions are ``minute hour day-of-month month day-of-week`` in UTC, with the usual
    crontab meaning of day-of-week (0 and 7 are Sunday; APScheduler 3 alone would read 0 as
    Monday). Restricting both day-of-month and day-of-week is refused: crontab ORs them,
    APScheduler ANDs them, and a policy must mean one thing.
    """

    __slots__ = ("_cron", "_gaps", "_interval", "text")

    def __init__(self, text: str, interval: float | None, cron: dict[str, str] | None) -> None:
        self.text = text
        self._interval = interval
        self._cron = cron
        self._gaps: tuple[float, float] | None = (interval, interval) if interval else None

    @classmethod
    def parse(cls, value: object) -> Schedule:
        """``"15m"``, ``900`` (seconds) or ``"*/5 * * * *"``; raises :class:`UserError`."""
        expected = (
            f"expected an interval like 15m or a cron expression like '*/5 * * * *', got {value!r}"
        )
        if isinstance(value, Schedule):
            return value
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise UserError(expected)
        text = str(value).strip()
        if len(text.split()) > 1:
            return cls._parse_cron(text, expected)
        try:
            seconds = parse_duration(text)
        except UserError:
            raise UserError(expected) from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise UserError(f"expected an interval above zero like 15m, got {value!r}")
        if not MIN_INTERVAL <= seconds <= MAX_INTERVAL:
            raise UserError(f"expected an interval from 1s to 366d, got {value!r}")
        return cls(text, seconds, None)

    @classmethod
    def _parse_cron(cls, text: str, expected: str) -> Schedule:
        fields = text.split()
        if len(fields) != 5:
            raise UserError(
                "expected a cron expression with 5 fields (minute hour day month weekday), "
                f"got {len(fields)} fields in {text!r}"
            )
        minute, hour, day, month, weekday = fields
        if not day.startswith("*") and not weekday.startswith("*"):
            raise UserError(
                "expected a cron expression that restricts the day of the month or the day of "
                f"the week, not both, got {text!r}"
            )
        try:
            cron = {
                "minute": minute,
                "hour": hour,
                "day": day,
                "month": month,
                "day_of_week": _cron_weekdays(weekday),
            }
            trigger = CronTrigger(timezone=UTC, **cron)
        except ValueError as exc:
            raise UserError(f"{expected} ({exc})") from None
        if trigger.get_next_fire_time(None, datetime.now(UTC)) is None:
            raise UserError(f"expected a cron expression that fires, got {text!r} (it never does)")
        return cls(" ".join(fields), None, cron)

    @property
    def is_cron(self) -> bool:
        return self._cron is not None

    @property
    def interval_seconds(self) -> float | None:
        """The interval in seconds, or None for a cron schedule."""
        return self._interval

    def to_trigger(self) -> IntervalTrigger | CronTrigger:
        """A fresh APScheduler 3 trigger in UTC for this schedule."""
        if self._cron is not None:
            return CronTrigger(timezone=UTC, **self._cron)
        assert self._interval is not None
        return IntervalTrigger(seconds=self._interval, timezone=UTC)

    def min_interval_seconds(self, start: datetime | None = None) -> float:
        """The shortest time between two runs (see ``gaps``)."""
        return self.gaps(start)[0]

    def max_interval_seconds(self, start: datetime | None = None) -> float:
        """The longest time between two runs (see ``gaps``): what an RPO must cover."""
        return self.gaps(start)[1]

    def gaps(self, start: datetime | None = None) -> tuple[float, float]:
        """The shortest and longest time between two consecutive runs.

        For a cron expression, over the next 400 days from ``start`` (default: now): a cron
        schedule runs at the same times of day on every day it runs (its minute and hour
        fields do not depend on the date), so the gaps are those within one such day and
        those from one such day's last run to the next day's first. That is one pass over
        the times of one day and one over the days, however often it runs (``*/5 * * *
        mon-fri`` runs 1440 times a week; its longest gap is the weekend).
        """
        if self._gaps is not None and (start is None or self._interval is not None):
            return self._gaps
        assert self._cron is not None
        trigger = self.to_trigger()
        first = trigger.get_next_fire_time(None, start or datetime.now(UTC))
        assert first is not None  # parse() refuses a schedule that never runs
        day = first.replace(hour=0, minute=0, second=0, microsecond=0)
        times: list[timedelta] = []  # the runs of one day, from its midnight
        run = trigger.get_next_fire_time(None, day)
        while run is not None and run - day < _DAY:
            times.append(run - day)
            run = trigger.get_next_fire_time(run, run + timedelta(microseconds=1))
        within = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
        shortest, longest = min(within, default=math.inf), max(within, default=0.0)
        end = day + _CRON_HORIZON
        while day < end:
            following = trigger.get_next_fire_time(None, day + _DAY)
            if following is None:
                break
            next_day = following.replace(hour=0, minute=0, second=0, microsecond=0)
            gap = ((next_day + times[0]) - (day + times[-1])).total_seconds()
            shortest, longest = min(shortest, gap), max(longest, gap)
            day = next_day
        if start is None:
            self._gaps = (shortest, longest)
        return shortest, longest

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"Schedule({self.text!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return (self._interval, self._cron) == (other._interval, other._cron)

    def __hash__(self) -> int:
        return hash((self._interval, tuple(sorted((self._cron or {}).items()))))

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            _validate_schedule,
            serialization=core_schema.plain_serializer_function_ser_schema(str),
        )


def _cron_weekdays(field: str) -> str:
    """A crontab day-of-week field (0 or 7 = Sunday) as APScheduler 3 names: ``"1-5"`` ->
    ``"mon,tue,wed,thu,fri"``."""
    if field == "*":
        return "*"

    def day(token: str, end: bool = False) -> int:
        token = token.lower()
        if token in _CRON_WEEKDAYS:
            number = _CRON_WEEKDAYS.index(token)
            return 7 if end and number == 0 else number
        if token.isdigit() and int(token) <= 7:
            return int(token)
        raise ValueError(f"bad day of week {token!r}")

    days: set[int] = set()
    for part in field.split(","):
        base, slash, step_text = part.partition("/")
        if slash and not (step_text.isdigit() and int(step_text) > 0):
            raise ValueError(f"bad step in day of week {part!r}")
        step = int(step_text) if slash else 1
        if base == "*":
            low, high = 0, 6
        elif "-" in base:
            first, last = base.split("-", 1)
            low, high = day(first), day(last, end=True)
            if low > high:
                raise ValueError(f"bad range in day of week {part!r}")
        else:
            low = day(base)
            high = 6 if slash else low
        days.update(number % 7 for number in range(low, high + 1, step))
    if len(days) == 7:
        return "*"
    return ",".join(_CRON_WEEKDAYS[number] for number in sorted(days))


def _validate_schedule(value: object) -> Schedule:
    try:
        return Schedule.parse(value)
    except UserError as exc:
        raise ValueError(str(exc)) from None


def _validate_target_schedule(value: object) -> Schedule | Literal["after-snapshot"]:
    if value == AFTER_SNAPSHOT:
        return AFTER_SNAPSHOT
    if isinstance(value, str) and value.strip().lower().startswith("after"):
        raise ValueError(f"expected {AFTER_SNAPSHOT!r}, got {value!r}")
    return _validate_schedule(value)


def _validate_duration(value: object) -> float:
    expected = f"expected a duration like 15m, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(expected)
    try:
        seconds = parse_duration(value)
    except UserError:
        raise ValueError(expected) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"expected a duration above zero like 15m, got {value!r}")
    return seconds


def _validate_rate(value: object) -> int:
    """``"50MiB/s"`` -> bytes per second; the ``/s`` may be left out."""
    expected = f"expected a rate like 50MiB/s, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(expected)
    text = value.strip().removesuffix("/s") if isinstance(value, str) else value
    try:
        rate = parse_size(text)
    except UserError:
        raise ValueError(expected) from None
    if rate <= 0:
        raise ValueError(f"expected a rate above zero like 50MiB/s, got {value!r}")
    return rate


def _validate_pg_name(value: object) -> str:
    if not isinstance(value, str) or not PG_NAME_RE.fullmatch(value):
        raise ValueError(
            "expected a name of lowercase letters, digits, '-' and '_' starting with a letter or "
            f"digit, at most 63 long, got {value!r}"
        )
    return value


def _validate_command(value: object) -> str | list[str]:
    if isinstance(value, str) and value.strip():
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(arg, str) for arg in value)
        and value[0].strip()
    ):
        return list(value)
    raise ValueError(f"expected a command string or a non-empty list of arguments, got {value!r}")


Duration = Annotated[float, PlainValidator(_validate_duration)]
"""Seconds, written like ``15m`` or ``1h30m`` in the file."""

Rate = Annotated[int, PlainValidator(_validate_rate)]
"""Bytes per second, written like ``50MiB/s`` in the file."""

PGName = Annotated[str, PlainValidator(_validate_pg_name)]

Command = Annotated[str | list[str], PlainValidator(_validate_command)]

TargetSchedule = Annotated[
    Schedule | Literal["after-snapshot"],
    PlainValidator(_validate_target_schedule),
    PlainSerializer(str, return_type=str),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Retention(_Model):
    """How many snapshots to keep; see :func:`dvx_dr.policies.retention.select_keep`."""

    keep_last: int = Field(default=0, ge=0)
    hourly: int = Field(default=0, ge=0)
    daily: int = Field(default=0, ge=0)
    weekly: int = Field(default=0, ge=0)
    monthly: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _keeps_something(self) -> Retention:
        if self.total() == 0:
            raise ValueError(
                "expected at least one of keep_last, hourly, daily, weekly, monthly above 0, "
                "got none (this retention would keep nothing)"
            )
        return self

    def total(self) -> int:
        """The most snapshots this rule keeps (not counting protected ones)."""
        return self.keep_last + self.hourly + self.daily + self.weekly + self.monthly


class Snapshot(_Model):
    schedule: Schedule
    retention: Retention


class ReplicationTarget(_Model):
    site: str = Field(min_length=1)
    schedule: TargetSchedule = AFTER_SNAPSHOT
    retention: Retention
    rpo: Duration
    in_flight_encryption: bool = True
    bandwidth_limit: Rate | None = None

    @property
    def after_snapshot(self) -> bool:
        """True when each new snapshot is replicated as soon as it is taken."""
        return self.schedule == AFTER_SNAPSHOT


class Hook(_Model):
    """A command run around a snapshot. A string runs through ``/bin/sh -c``; a list is argv."""

    command: Command
    timeout: Duration = 60.0

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # ``pre_snapshot: "sync"`` is short for ``pre_snapshot: {command: "sync"}``.
        return {"command": data} if isinstance(data, str | list) else data

    def argv(self) -> list[str]:
        if isinstance(self.command, str):
            return ["/bin/sh", "-c", self.command]
        return list(self.command)


class Hooks(_Model):
    pre_snapshot: Hook | None = None
    post_snapshot: Hook | None = None


class Policy(_Model):
    """One protection group's policy, as loaded from one YAML file."""

    name: PGName
    members: list[str]
    snapshot: Snapshot
    replication: list[ReplicationTarget] = []
    hooks: Hooks = Hooks()

    @field_validator("members")
    @classmethod
    def _members(cls, members: list[str]) -> list[str]:
        if not members:
            raise ValueError("expected a list of volume name globs like 'db-*', got []")
        for glob in members:
            if glob in ("", "!"):
                raise ValueError(f"expected a volume glob like 'db-*' or '!db-test', got {glob!r}")
        if all(glob.startswith("!") for glob in members):
            raise ValueError(
                "expected at least one volume glob without a leading '!', got only exclusions"
            )
        return members

    def check(self, known_sites: Set[str]) -> list[tuple[Loc, str]]:
        """The rules no single field can check: each target's site is a known peer, appears once,
        and has an RPO its schedules can meet. Returns ``(loc, message)`` pairs; [] when fine."""
        problems: list[tuple[Loc, str]] = []
        seen: dict[str, int] = {}
        snapshot_gap = self.snapshot.schedule.max_interval_seconds()
        for i, target in enumerate(self.replication):
            if target.site not in known_sites:
                if known_sites:
                    sites = ", ".join(sorted(known_sites))
                    message = f"expected one of the peer sites ({sites}), got {target.site!r}"
                else:
                    message = f"expected a peer site, got {target.site!r} (no peers are configured)"
                problems.append((("replication", i, "site"), message))
            elif target.site in seen:
                problems.append(
                    (
                        ("replication", i, "site"),
                        f"expected each site once, got {target.site!r} again "
                        f"(also replication[{seen[target.site]}])",
                    )
                )
            seen.setdefault(target.site, i)
            if not target.in_flight_encryption:
                problems.append((
                    ("replication", i, "in_flight_encryption"),
                    "expected true, got false: this dvx-dr replicates only over mutual TLS "
                    "(plaintext transfer has no peer authentication and is not offered)",
                ))

            rpo_problem = self._rpo_problem(i, target, snapshot_gap)
            if rpo_problem is not None:
                problems.append((("replication", i, "rpo"), rpo_problem))
        return problems

    def _rpo_problem(self, i: int, target: ReplicationTarget, snapshot_gap: float
                     ) -> str | None:
        """Why target ``i``'s RPO cannot be met, or None. After each snapshot, the data at
        the target can get as old as the longest gap between snapshots. On a schedule of its
        own, a transfer sends the newest snapshot, which may be up to a snapshot gap old when
        it runs, and the next transfer comes up to a target gap later: the worst case is the
        sum of the two longest gaps (intervals start when the policy loads, so any phase
        between the two schedules occurs; for two cron schedules it is an upper bound)."""
        rpo = format_duration(target.rpo)
        snapshot = f"snapshot.schedule {self.snapshot.schedule.text!r}"
        if not isinstance(target.schedule, Schedule):
            if target.rpo >= snapshot_gap:
                return None
            every = format_duration(snapshot_gap)
            return (f"expected at least {every}, as {snapshot} leaves up to {every} between "
                    f"runs, got {rpo}")
        target_gap = target.schedule.max_interval_seconds()
        if target.rpo >= snapshot_gap + target_gap:
            return None
        return (f"expected at least {format_duration(snapshot_gap + target_gap)}, as {snapshot} "
                f"leaves up to {format_duration(snapshot_gap)} between runs and "
                f"replication[{i}].schedule {target.schedule.text!r} up to "
                f"{format_duration(target_gap)}, and the newest replica's data can get as old as "
                f"both together, got {rpo}")
