"""Protection-group policies: loading, error messages, member globs, schedules and retention."""

from __future__ import annotations

import random
import textwrap
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from hypothesis import given, settings
from hypothesis import strategies as st

from dvx_dr.errors import UserError
from dvx_dr.policies.loader import (
    PolicyError,
    load_policy_dir,
    load_policy_file,
    members_of,
)
from dvx_dr.policies.model import Policy, Retention, Schedule, format_duration
from dvx_dr.policies.retention import select_keep
from dvx_dr.units import parse_duration
from tests.conftest import run_cli

EXAMPLE = Path(__file__).resolve().parents[3] / "deploy" / "policies" / "example.yaml"
SITES = {"dr-east", "dr-west"}
MARK = "# <-"

GOOD = """\
name: {name}
members: [{members}]
snapshot:
  schedule: 15m
  retention: {{keep_last: 4}}
replication:
  - site: dr-east
    retention: {{daily: 7}}
    rpo: 1h
"""


def write(directory: Path, filename: str, text: str) -> Path:
    path = directory / filename
    path.write_text(textwrap.dedent(text))
    return path


def marked_line(text: str) -> int:
    """1-based number of the line carrying the ``# <-`` marker."""
    lines = textwrap.dedent(text).splitlines()
    return next(i for i, line in enumerate(lines, 1) if MARK in line)


# --- loading -------------------------------------------------------------------------------


def test_example_loads_with_every_field() -> None:
    policy = load_policy_file(EXAMPLE, {"dr-east", "dr-vault"})
    assert policy.name == "finance"
    assert policy.members == ["fin-*", "!fin-scratch*", "ledger-db"]
    assert policy.snapshot.schedule == Schedule.parse("15m")
    assert policy.snapshot.retention == Retention(
        keep_last=4, hourly=24, daily=7, weekly=4, monthly=6
    )
    east, vault = policy.replication
    assert east.site == "dr-east" and east.after_snapshot
    assert east.rpo == 3600
    assert east.in_flight_encryption is True
    assert east.bandwidth_limit == 50 * 1024**2
    assert east.retention == Retention(daily=30, monthly=12)
    assert vault.schedule == Schedule.parse("0 2 * * *") and not vault.after_snapshot
    assert vault.rpo == 36 * 3600
    assert vault.bandwidth_limit is None
    assert policy.hooks.pre_snapshot is not None and policy.hooks.post_snapshot is not None
    assert policy.hooks.pre_snapshot.argv() == ["/usr/local/bin/fin-quiesce", "--flush"]
    assert policy.hooks.pre_snapshot.timeout == 30
    assert policy.hooks.post_snapshot.argv() == ["/bin/sh", "-c", "/usr/local/bin/fin-resume"]


def test_example_dumps_and_loads_back(tmp_path: Path) -> None:
    policy = load_policy_file(EXAMPLE, {"dr-east", "dr-vault"})
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(policy.model_dump(mode="json")))
    assert load_policy_file(path, {"dr-east", "dr-vault"}) == policy


def test_defaults_and_shorthands(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "pg.yaml",
        """\
        name: pg
        members: [vol]
        snapshot: {schedule: "*/5 * * * *", retention: {daily: 1}}
        replication:
          - {site: dr-west, retention: {daily: 1}, rpo: 5m}
        hooks: {pre_snapshot: sync}
        """,
    )
    policy = load_policy_file(path, SITES)
    assert policy.replication[0].after_snapshot
    assert policy.replication[0].in_flight_encryption is True
    assert policy.hooks.pre_snapshot is not None
    assert policy.hooks.pre_snapshot.argv() == ["/bin/sh", "-c", "sync"]
    assert policy.hooks.pre_snapshot.timeout == 60
    assert policy.hooks.post_snapshot is None


# --- one error per case, located exactly ---------------------------------------------------

ERROR_CASES = {
    "rpo not a duration": (
        """\
        name: finance
        members: ["fin-*"]
        snapshot:
          schedule: 15m
          retention: {keep_last: 3}
        replication:
          - site: dr-east
            retention: {daily: 3}
            rpo: soon  # <-
        """,
        "replication[0].rpo: expected a duration like 15m, got 'soon'",
    ),
    "unknown site": (
        """\
        name: finance
        members: ["fin-*"]
        snapshot: {schedule: 15m, retention: {keep_last: 3}}
        replication:
          - site: dr-east
            retention: {daily: 3}
            rpo: 1h
          - site: dr-north  # <-
            retention: {daily: 3}
            rpo: 1h
        """,
        "replication[1].site: expected one of the peer sites (dr-east, dr-west), got 'dr-north'",
    ),
    "same site twice": (
        """\
        name: finance
        members: ["fin-*"]
        snapshot: {schedule: 15m, retention: {keep_last: 3}}
        replication:
          - {site: dr-east, retention: {daily: 3}, rpo: 1h}
          - {site: dr-east, retention: {daily: 3}, rpo: 2h}  # <-
        """,
        "replication[1].site: expected each site once, got 'dr-east' again (also replication[0])",
    ),
    "rpo shorter than the snapshot interval": (
        """\
        name: finance
        members: ["fin-*"]
        snapshot: {schedule: 1h30m, retention: {keep_last: 3}}
        replication:
          - site: dr-west
            retention: {daily: 3}
            rpo: 1h  # <-
        """,
        "replication[0].rpo: expected at least 1h30m, as snapshot.schedule '1h30m' leaves up "
        "to 1h30m between runs, got 1h",
    ),
    "rpo shorter than the longest cron gap": (
        """\
        name: finance
        members: ["fin-*"]
        snapshot:
          schedule: "0 9,17 * * *"
          retention: {daily: 3}
        replication:
          - site: dr-west
            retention: {daily: 3}
            rpo: 7h59m  # <-
        """,
        "replication[0].rpo: expected at least 16h, as snapshot.schedule '0 9,17 * * *' leaves "
        "up to 16h between runs, got 7h59m",
    ),
    "rpo shorter than a snapshot gap plus the target's own schedule's gap": (
        """\
        name: finance
        members: ["fin-*"]
        snapshot: {schedule: 15m, retention: {keep_last: 3}}
        replication:
          - site: dr-west
            schedule: "30 1 * * *"
            retention: {daily: 3}
            rpo: 1d  # <-
        """,
        "replication[0].rpo: expected at least 1d15m, as snapshot.schedule '15m' leaves up to "
        "15m between runs and replication[0].schedule '30 1 * * *' up to 1d, and the newest "
        "replica's data can get as old as both together, got 1d",
    ),
    "snapshot retention keeps nothing": (
        """\
        name: finance
        members: ["fin-*"]
        snapshot:
          schedule: 15m
          retention:  # <-
            keep_last: 0
            daily: 0
        """,
        "snapshot.retention: expected at least one of keep_last, hourly, daily, weekly, monthly "
        "above 0, got none (this retention would keep nothing)",
    ),
    "target retention keeps nothing": (
        """\
        name: finance
        members: ["fin-*"]
        snapshot: {schedule: 15m, retention: {keep_last: 3}}
        replication:
          - site: dr-west
            retention: {}  # <-
            rpo: 1h
        """,
        "replication[0].retention: expected at least one of keep_last, hourly, daily, weekly, "
        "monthly above 0, got none (this retention would keep nothing)",
    ),
    "name with capitals": (
        """\
        name: Finance  # <-
        members: ["fin-*"]
        snapshot: {schedule: 15m, retention: {keep_last: 3}}
        """,
        "name: expected a name of lowercase letters, digits, '-' and '_' starting with a letter "
        "or digit, at most 63 long, got 'Finance'",
    ),
    "name too long": (
        f"""\
        name: {"a" * 64}  # <-
        members: ["fin-*"]
        snapshot: {{schedule: 15m, retention: {{keep_last: 3}}}}
        """,
        "name: expected a name of lowercase letters, digits, '-' and '_' starting with a letter "
        f"or digit, at most 63 long, got '{'a' * 64}'",
    ),
    "name starting with a dash": (
        """\
        members: ["fin-*"]
        name: "-fin"  # <-
        snapshot: {schedule: 15m, retention: {keep_last: 3}}
        """,
        "name: expected a name of lowercase letters, digits, '-' and '_' starting with a letter "
        "or digit, at most 63 long, got '-fin'",
    ),
    "garbage schedule": (
        """\
        name: finance
        members: ["fin-*"]
        snapshot:
          schedule: often  # <-
          retention: {keep_last: 3}
        """,
        "snapshot.schedule: expected an interval like 15m or a cron expression like "
        "'*/5 * * * *', got 'often'",
    ),
    "misspelt after-snapshot": (
        """\
        name: finance
        members: ["fin-*"]
        snapshot: {schedule: 15m, retention: {keep_last: 3}}
        replication:
          - site: dr-west
            schedule: after_snapshot  # <-
            retention: {daily: 3}
            rpo: 1h
        """,
        "replication[0].schedule: expected 'after-snapshot', got 'after_snapshot'",
    ),
    "bad bandwidth": (
        """\
        name: finance
        members: ["fin-*"]
        snapshot: {schedule: 15m, retention: {keep_last: 3}}
        replication:
          - site: dr-west
            retention: {daily: 3}
            rpo: 1h
            bandwidth_limit: fast  # <-
        """,
        "replication[0].bandwidth_limit: expected a rate like 50MiB/s, got 'fast'",
    ),
    "bad hook timeout": (
        """\
        name: finance
        members: ["fin-*"]
        snapshot: {schedule: 15m, retention: {keep_last: 3}}
        hooks:
          post_snapshot:
            command: [resume]
            timeout: 0s  # <-
        """,
        "hooks.post_snapshot.timeout: expected a duration above zero like 15m, got '0s'",
    ),
    "only exclusions": (
        """\
        name: finance
        members: ["!fin-*"]  # <-
        snapshot: {schedule: 15m, retention: {keep_last: 3}}
        """,
        "members: expected at least one volume glob without a leading '!', got only exclusions",
    ),
    "unknown field": (
        """\
        name: finance
        members: ["fin-*"]
        snapshot:
          schedule: 15m
          retention: {keep_last: 3}
          retain: 3  # <-
        """,
        "snapshot.retain: unknown field (expected one of: schedule, retention)",
    ),
    "missing field": (
        """\
        name: finance
        members: ["fin-*"]
        snapshot:  # <-
          schedule: 15m
        """,
        "snapshot.retention: required field is missing",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_error_names_file_line_and_field(tmp_path: Path, case: str) -> None:
    text, message = ERROR_CASES[case]
    path = write(tmp_path, "finance.yaml", text)
    with pytest.raises(PolicyError) as caught:
        load_policy_file(path, SITES)
    assert str(caught.value) == f"policy {path} line {marked_line(text)}: {message}"
    assert caught.value.path == path
    assert isinstance(caught.value, UserError)


def test_every_problem_of_a_file_is_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "pg.yaml",
        """\
        name: pg
        members: [vol]
        snapshot: {schedule: 1h, retention: {daily: 1}}
        replication:
          - {site: dr-south, retention: {daily: 1}, rpo: 30m}
        """,
    )
    with pytest.raises(PolicyError) as caught:
        load_policy_file(path, SITES)
    assert str(caught.value) == (
        f"policy {path} line 5: replication[0].site: expected one of the peer sites "
        "(dr-east, dr-west), got 'dr-south'; "
        f"policy {path} line 5: replication[0].rpo: expected at least 1h, as snapshot.schedule "
        "'1h' leaves up to 1h between runs, got 30m"
    )


def test_rpo_must_cover_a_cron_schedules_longest_gap(tmp_path: Path) -> None:
    """Snapshots at 00:00 and 01:00 are an hour apart once a day and 23 hours apart the rest
    of it: an RPO of 1h, compared with the shortest gap, was accepted and then violated for
    22 hours a day."""
    path = write(tmp_path, "g.yaml", GOOD.format(name="g", members="vm1").replace(
        "schedule: 15m", "schedule: '0 0,1 * * *'"))
    with pytest.raises(PolicyError, match="leaves up to 23h between runs, got 1h"):
        load_policy_file(path, SITES)
    path.write_text(path.read_text().replace("rpo: 1h", "rpo: 24h"))
    assert load_policy_file(path, SITES).name == "g"


@pytest.mark.parametrize(("snapshot", "target", "refused", "least", "accepted"), [
    ("5s", "6s", "7s", "11s", "11s"),
    ("15m", "1h", "1h", "1h15m", "1h15m"),
    ("'0 0,1 * * *'", "6h", "23h", "1d5h", "1d5h"),  # the longest snapshot gap is 23h
    ("1h", "'*/5 * * * mon-fri'", "2d1h", "2d1h5m", "2d2h"),  # the target's is the weekend
])
def test_rpo_must_cover_a_snapshot_gap_plus_the_targets_own_gap(
        tmp_path: Path, snapshot: str, target: str, refused: str, least: str,
        accepted: str) -> None:
    """A target on its own schedule sends the newest snapshot, which may be a snapshot gap old
    when it runs, and that data ages until its next run: the RPO was compared with the longer
    of the two gaps, and a site with snapshots every 5s, a target every 6s and an RPO of 7s
    showed VIOLATED a third of the time with nothing wrong."""
    text = GOOD.format(name="g", members="vm1").replace("schedule: 15m", f"schedule: {snapshot}")
    text = text.replace("    rpo: 1h\n", f"    schedule: {target}\n    rpo: {refused}\n")
    path = write(tmp_path, "g.yaml", text)
    with pytest.raises(PolicyError) as caught:
        load_policy_file(path, SITES)
    assert f"line 10: replication[0].rpo: expected at least {least}, as snapshot.schedule" \
        in str(caught.value)
    assert str(caught.value).endswith(
        "and the newest replica's data can get as old as both together, got "
        f"{format_duration(parse_duration(refused))}")
    path.write_text(path.read_text().replace(f"rpo: {refused}", f"rpo: {accepted}"))
    assert load_policy_file(path, SITES).replication[0].rpo == parse_duration(accepted)


def test_rpo_after_each_snapshot_needs_only_the_snapshot_gap(tmp_path: Path) -> None:
    path = write(tmp_path, "g.yaml", GOOD.format(name="g", members="vm1").replace(
        "rpo: 1h", "rpo: 15m"))
    assert load_policy_file(path, SITES).replication[0].rpo == 900


def test_unknown_site_when_no_peers_are_configured(tmp_path: Path) -> None:
    path = write(tmp_path, "pg.yaml", GOOD.format(name="pg", members="vol"))
    with pytest.raises(PolicyError, match=r"line 7: replication\[0\]\.site: expected a peer site"):
        load_policy_file(path, set())


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "pg.yaml", "name: pg\nsnapshot:\n  schedule: */5 * * * *\n")
    with pytest.raises(PolicyError, match=rf"^policy {path} line 3: not valid YAML"):
        load_policy_file(path, SITES)


# --- directories ---------------------------------------------------------------------------


def _alias_bomb(levels: int) -> str:
    """A policy whose members are ``9 ** levels`` names written in a few hundred bytes."""
    lines = ["name: g", "x0: &a0 [v, v, v, v, v, v, v, v, v]"]
    for k in range(1, levels + 1):
        lines.append(f"x{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * 9) + "]")
    return "\n".join([*lines, f"members: *a{levels}", ""])


@pytest.mark.parametrize(("text", "message"), [
    (_alias_bomb(7), "more than 100000 values once its aliases"),
    ("name: g\nmembers: " + "[" * 60 + "]" * 60 + "\n", "line 2: nested more than 50 levels"),
    ("name: g\nmembers: " + "[" * 5000 + "]" * 5000 + "\n", "line 2: nested more than 50 levels"),
])
def test_hostile_yaml_is_refused_quickly(tmp_path: Path, text: str, message: str) -> None:
    """A few hundred bytes of nested aliases took seconds per level (and gigabytes for an
    error message naming them all); deep nesting raised RecursionError. Both are one line
    now, and an anchor used a few times still works."""
    path = tmp_path / "g.yaml"
    path.write_text(text)
    started = time.monotonic()
    with pytest.raises(PolicyError, match=message) as caught:
        load_policy_file(path, SITES)
    assert time.monotonic() - started < 2
    assert len(str(caught.value)) < 500
    path.write_text(GOOD.format(name="g", members="vm1") + "x: &r {daily: 7}\n"
                    "\nextra: [*r, *r]\n")
    with pytest.raises(PolicyError, match="extra"):  # the anchors parse; the field is unknown
        load_policy_file(path, SITES)


def test_bad_file_beside_good_ones_does_not_unload_them(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD.format(name="alpha", members='"a-*"'))
    bad = write(tmp_path, "b.yaml", GOOD.format(name="beta", members='"b-*"').replace("1h", "x"))
    write(tmp_path, "c.yml", GOOD.format(name="gamma", members='"c-*"'))
    broken = write(tmp_path, "d.yaml", "name: [unclosed\n")
    write(tmp_path, "README.md", "not a policy")
    write(tmp_path, ".e.yaml.swp", "editor junk")
    write(tmp_path, ".hidden.yaml", "not: loaded")

    policies, errors = load_policy_dir(tmp_path, SITES, ["a-1", "b-1", "c-1"])

    assert sorted(policies) == ["alpha", "gamma"]
    assert [e.path for e in errors] == [bad, broken]
    assert str(errors[0]) == (
        f"policy {bad} line 9: replication[0].rpo: expected a duration like 15m, got 'x'"
    )
    assert str(errors[1]).startswith(f"policy {broken} line 2: not valid YAML")


def test_duplicate_pg_name_rejects_the_later_file(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD.format(name="finance", members='"a-*"'))
    later = write(tmp_path, "b.yaml", GOOD.format(name="finance", members='"b-*"'))
    policies, errors = load_policy_dir(tmp_path, SITES, ["a-1", "b-1"])
    assert policies["finance"].members == ["a-*"]
    assert [str(e) for e in errors] == [
        f"policy {later} line 1: name: expected a name no other policy uses, got 'finance' "
        "(already used by a.yaml)"
    ]


def test_volume_in_two_groups_rejects_the_later_file(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD.format(name="db", members='"db-*", "!db-test"'))
    text = """\
        name: web
        members:
          - "web-*"
          - "db-[12]"  # <-
          - "db-test"
        snapshot: {schedule: 15m, retention: {keep_last: 1}}
        """
    later = write(tmp_path, "b.yaml", text)
    volumes = ["db-1", "db-2", "db-3", "db-test", "web-1"]

    policies, errors = load_policy_dir(tmp_path, SITES, volumes)

    assert list(policies) == ["db"]
    assert members_of(policies["db"], volumes) == ["db-1", "db-2", "db-3"]
    assert [str(e) for e in errors] == [
        f"policy {later} line {marked_line(text)}: members[1]: expected volumes no other group "
        "has, got 'db-1', 'db-2' (already in 'db' from a.yaml)"
    ]


def test_volume_claims_only_count_existing_volumes(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", GOOD.format(name="one", members='"db-*"'))
    write(tmp_path, "b.yaml", GOOD.format(name="two", members='"db-*"'))
    policies, errors = load_policy_dir(tmp_path, SITES, ["web-1"])
    assert sorted(policies) == ["one", "two"] and errors == []


def test_missing_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_policy_dir(tmp_path / "nope", SITES, [])


# --- members -------------------------------------------------------------------------------


def policy_with(members: list[str]) -> Policy:
    return Policy.model_validate(
        {
            "name": "pg",
            "members": members,
            "snapshot": {"schedule": "15m", "retention": {"keep_last": 1}},
        }
    )


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        (["*"], ["db-1", "db-2", "db-test", "web-1", "Web-2"]),
        (["db-*", "!db-test"], ["db-1", "db-2"]),
        (["db-?"], ["db-1", "db-2"]),
        (["*", "!db-*", "db-test"], ["db-test", "web-1", "Web-2"]),  # re-included after '!'
        (["db-test", "!db-*"], []),  # a later exclusion wins
        (["web-*"], ["web-1"]),  # case-sensitive
        (["Web-2", "db-1"], ["db-1", "Web-2"]),  # in the order of the volumes given
        (["nothing-*"], []),
    ],
)
def test_members_of_applies_globs_in_order(members: list[str], expected: list[str]) -> None:
    volumes = ["db-1", "db-2", "db-test", "web-1", "Web-2"]
    assert members_of(policy_with(members), volumes) == expected


# --- schedules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"), [("15m", 900), ("1h30m", 5400), ("30s", 30), ("2d", 172800), (900, 900)]
)
def test_interval_schedule(text: str | int, seconds: float) -> None:
    schedule = Schedule.parse(text)
    assert not schedule.is_cron
    assert schedule.min_interval_seconds() == seconds
    trigger = schedule.to_trigger()
    assert isinstance(trigger, IntervalTrigger)
    assert trigger.interval == timedelta(seconds=seconds)
    assert trigger.timezone == UTC


def test_cron_schedule() -> None:
    schedule = Schedule.parse("*/5 * * * *")
    assert schedule.is_cron and str(schedule) == "*/5 * * * *"
    assert schedule.min_interval_seconds() == 300
    trigger = schedule.to_trigger()
    assert isinstance(trigger, CronTrigger)
    start = datetime(2024, 3, 1, 10, 2, tzinfo=UTC)
    assert trigger.get_next_fire_time(None, start) == datetime(2024, 3, 1, 10, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0 9,17 * * *", 8 * 3600),  # the shortest gap, not the longest (16h)
        ("0,59 0,1 * * *", 60),  # 00:59 -> 01:00
        ("0 0 * * 1,2", 86400),  # Monday -> Tuesday
        ("0 12 1 * *", 28 * 86400),  # February
    ],
)
def test_cron_shortest_gap(text: str, seconds: float) -> None:
    start = datetime(2024, 1, 1, tzinfo=UTC)
    assert Schedule.parse(text).min_interval_seconds(start) == seconds


@pytest.mark.parametrize(
    ("weekday", "fires_on"),
    [
        ("0", {"Sunday"}),
        ("7", {"Sunday"}),
        ("sun", {"Sunday"}),
        ("1-5", {"Monday", "Tuesday", "Wednesday", "Thursday", "Friday"}),
        ("fri-sun", {"Friday", "Saturday", "Sunday"}),
        ("0,6", {"Saturday", "Sunday"}),
        ("*/3", {"Sunday", "Wednesday", "Saturday"}),
    ],
)
def test_cron_weekdays_mean_what_crontab_means(weekday: str, fires_on: set[str]) -> None:
    trigger = Schedule.parse(f"0 3 * * {weekday}").to_trigger()
    fire = datetime(2024, 1, 1, tzinfo=UTC)  # a Monday
    days = set()
    for _ in range(14):
        fire = trigger.get_next_fire_time(fire, fire + timedelta(microseconds=1))
        days.add(fire.strftime("%A"))
    assert days == fires_on


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("garbage", "expected an interval like 15m or a cron expression"),
        ("15 minutes", "expected a cron expression with 5 fields"),
        ("* * * *", "expected a cron expression with 5 fields"),
        ("61 * * * *", "expected an interval like 15m or a cron expression"),
        ("0 0 1 * 1", "not both"),
        ("0 0 30 2 *", "it never does"),
        ("0 0 * * 8", "expected an interval like 15m or a cron expression"),
        ("0s", "above zero"),
        ("", "expected an interval"),
        # APScheduler cannot place a run past the year 9999: 10^12 s stopped the site.
        ("1000000000000", "from 1s to 366d"),
        ("9999999d", "from 1s to 366d"),
        ("0.0001", "from 1s to 366d"),
    ],
)
def test_bad_schedules(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        Schedule.parse(text)


def test_schedule_rejects_non_text() -> None:
    for value in (True, None, ["15m"]):
        with pytest.raises(UserError):
            Schedule.parse(value)


# --- retention: known answers --------------------------------------------------------------

NOW = datetime(2024, 6, 30, 12, 0, tzinfo=UTC)


def snaps(*times: str) -> list[tuple[str, datetime]]:
    """Snapshots named by their time: ``"2024-06-30T10:30"``."""
    return [(t, datetime.fromisoformat(t).replace(tzinfo=UTC)) for t in times]


def test_keep_last() -> None:
    s = snaps("2024-06-30T09:00", "2024-06-30T11:00", "2024-06-30T10:00")
    assert select_keep(s, Retention(keep_last=2), NOW) == {"2024-06-30T11:00", "2024-06-30T10:00"}
    assert select_keep(s, Retention(keep_last=9), NOW) == {name for name, _ in s}


def test_hourly_keeps_the_newest_of_each_hour() -> None:
    s = snaps(
        "2024-06-30T11:45",
        "2024-06-30T11:15",
        "2024-06-30T10:30",
        "2024-06-30T10:00",
        "2024-06-30T07:59",
        "2024-06-30T07:01",
    )
    assert select_keep(s, Retention(hourly=3), NOW) == {
        "2024-06-30T11:45",
        "2024-06-30T10:30",
        "2024-06-30T07:59",  # hours 8 and 9 have no snapshots and do not count
    }


def test_daily_weekly_monthly() -> None:
    s = snaps(
        "2024-06-30T08:00",  # Sunday, ISO week 26
        "2024-06-30T01:00",
        "2024-06-24T09:00",  # Monday, week 26
        "2024-06-23T22:00",  # Sunday, week 25
        "2024-05-31T23:00",
        "2024-05-02T00:00",
        "2024-04-15T00:00",
    )
    assert select_keep(s, Retention(daily=3), NOW) == {
        "2024-06-30T08:00",
        "2024-06-24T09:00",
        "2024-06-23T22:00",
    }
    assert select_keep(s, Retention(weekly=3), NOW) == {
        "2024-06-30T08:00",
        "2024-06-23T22:00",
        "2024-05-31T23:00",
    }
    assert select_keep(s, Retention(monthly=2), NOW) == {"2024-06-30T08:00", "2024-05-31T23:00"}
    # Rules overlap: the newest counts for all of them.
    assert select_keep(s, Retention(keep_last=2, daily=1, monthly=3), NOW) == {
        "2024-06-30T08:00",
        "2024-06-30T01:00",
        "2024-05-31T23:00",
        "2024-04-15T00:00",
    }


def test_periods_are_cut_in_the_time_zone_of_now() -> None:
    s = snaps("2024-06-29T23:00", "2024-06-30T00:30")
    assert select_keep(s, Retention(daily=2), NOW) == {name for name, _ in s}
    in_berlin = NOW.astimezone(timezone(timedelta(hours=2)))  # both on June 30th there
    assert select_keep(s, Retention(daily=1), in_berlin) == {"2024-06-30T00:30"}


def test_protected_are_kept_and_unknown_names_ignored() -> None:
    s = snaps("2024-06-30T11:00", "2024-06-30T10:00", "2024-01-01T00:00")
    keep = select_keep(s, Retention(keep_last=1), NOW, protected={"2024-01-01T00:00", "other"})
    assert keep == {"2024-06-30T11:00", "2024-01-01T00:00"}


def test_no_snapshots_keeps_nothing() -> None:
    assert select_keep([], Retention(keep_last=3), NOW, protected={"x"}) == set()


# --- retention: properties -----------------------------------------------------------------

retentions = (
    st.tuples(*[st.integers(0, 6)] * 5)
    .filter(any)
    .map(lambda c: Retention(keep_last=c[0], hourly=c[1], daily=c[2], weekly=c[3], monthly=c[4]))
)

snapshot_lists = st.lists(
    st.datetimes(
        min_value=datetime(2022, 1, 1), max_value=datetime(2024, 6, 30), timezones=st.just(UTC)
    ),
    max_size=60,
    unique=True,
).map(lambda times: [(f"s{i}", t) for i, t in enumerate(times)])


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[tuple[str, datetime]], Retention, set[str]]:
    snapshots = draw(snapshot_lists)
    names = [name for name, _ in snapshots]
    protected = set(draw(st.lists(st.sampled_from(names), unique=True))) if names else set()
    return snapshots, draw(retentions), protected


@settings(max_examples=300, deadline=None)
@given(cases())
def test_retention_properties(case: tuple[list[tuple[str, datetime]], Retention, set[str]]) -> None:
    snapshots, rule, protected = case
    keep = select_keep(snapshots, rule, NOW, protected)
    newest_first = [name for name, _ in sorted(snapshots, key=lambda s: s[1], reverse=True)]

    assert keep <= {name for name, _ in snapshots}
    assert set(newest_first[: rule.keep_last]) <= keep
    assert protected <= keep
    assert len(keep) <= rule.total() + len(protected)
    if snapshots:
        assert newest_first[0] in keep  # every rule keeps the newest
    shuffled = list(snapshots)
    random.Random(0).shuffle(shuffled)
    assert select_keep(shuffled, rule, NOW, protected) == keep
    assert select_keep(snapshots, rule, NOW) | protected == keep


def test_plaintext_replication_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "pg.yaml",
        """\
        name: pg
        members: [vol]
        snapshot: {schedule: 5m, retention: {daily: 1}}
        replication:
          - site: dr-west
            retention: {daily: 1}
            rpo: 15m
            in_flight_encryption: false
        """,
    )
    with pytest.raises(PolicyError) as err:
        load_policy_file(path, SITES)
    message = str(err.value)
    assert "line 8" in message
    assert "replication[0].in_flight_encryption" in message
    assert "mutual TLS" in message


def test_pg_validate_names_each_bad_file_in_one_line_and_goes_on(tmp_path: Path) -> None:
    """Files that made ``pg validate`` print a traceback (and skip the files after them): not
    UTF-8, a ``replication`` that is not a list, nesting too deep. Each is one line now, and
    the good file after them is still validated."""
    bad = {"latin1.yaml": b"name: caf\xe9\nmembers: [a]\n",
           "number.yaml": b"name: x\nmembers: [a]\nreplication: 5\n",
           "deep.yaml": b"name: x\nmembers: " + b"[" * 5000 + b"]" * 5000 + b"\n"}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    good = write(tmp_path, "good.yaml", GOOD.format(name="good", members="vm1"))
    proc = run_cli("pg", "validate", *sorted(tmp_path / n for n in bad), good, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 3, err
    for name, line in zip(sorted(bad), lines, strict=True):
        assert line.startswith(f"dvx-dr: error: policy {tmp_path / name}"), line
    assert f"{good}: ok" in proc.stdout.decode()


@pytest.mark.parametrize(("text", "shortest", "longest"), [
    ("*/5 * * * mon-fri", 300, 2 * 86400 + 300),  # the weekend
    ("* * 1 * *", 60, 30 * 86400 + 60),  # from 1 December 23:59 to 1 January
    ("0 9,17 * * *", 8 * 3600, 16 * 3600),
])
def test_cron_gaps_do_not_depend_on_the_day_they_are_measured(
        text: str, shortest: int, longest: int) -> None:
    """The gaps were measured over the first 1000 runs: a schedule running every 5 minutes on
    weekdays had a longest gap of 5 minutes measured on a Monday, and of the weekend on a
    Thursday, so whether a policy loaded depended on the day."""
    schedule = Schedule.parse(text)
    for day in range(7):
        start = datetime(2026, 11, 30, 12, tzinfo=UTC) + timedelta(days=day)  # a Monday on
        assert schedule.gaps(start) == (shortest, longest), start
