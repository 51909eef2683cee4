"""``dvx-dr replicate`` and ``dvx-dr status``: work done by the running site.

These are the commands that scripts and schedulers run most, and most of their time is the
command's own start-up: Python itself takes about 13 ms on this project's machine, and every
module imported on the way adds to it. So this module and what it imports load, beyond the
interpreter's own, only ``json``, ``socket`` and ``re``: ``quick_args`` reads these commands'
usual command lines without argparse (any other form, ``--help`` and every mistake go to the
full parser and its messages), paths are handled as text (no pathlib), and typing is imported
only for the type checker. That saves 15-20 ms of a ``dvx-dr status`` of about 45 ms.
"""

from __future__ import annotations

import os
import re
import sys
import types

from dvx_dr.cli import remote
from dvx_dr.cli.common import CONFIG_ENV, STORE_ENV, print_json, print_table
from dvx_dr.errors import UserError
from dvx_dr.site import lockfile
from dvx_dr.units import format_size

TYPE_CHECKING = False
if TYPE_CHECKING:  # not loaded at run time: see above
    import argparse
    from typing import Any


def add_site_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None,
                        help=f"the running site's site.yaml (default: ${CONFIG_ENV})")
    parser.add_argument("--store", default=None,
                        help=f"or its store directory (default: ${STORE_ENV})")


#: Per command: its options without a value, and those with one (as ``--opt V`` or
#: ``--opt=V``). ``replicate`` also takes one positional argument, the snapshot.
_QUICK = {
    "replicate": ({"--group", "--json"}, {"--to", "--volume", "--config", "--store"}),
    "status": ({"--json", "--metrics"}, {"--config", "--store"}),
}


def quick_args(argv: list[str]) -> Any:
    """The arguments the full parser would make of ``argv``, for a ``replicate`` or
    ``status`` command line in the usual form: every option spelled out and given once, no
    value empty or starting with ``-``, and ``replicate``'s ``--to`` given. None for any other
    command line, which the full parser then reads (abbreviations, ``--help``, mistakes and
    their messages)."""
    if not argv or argv[0] not in _QUICK:
        return None
    command, rest = argv[0], argv[1:]
    flags, valued = _QUICK[command]
    given: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(rest):
        option, eq, value = rest[i].partition("=")
        if option in valued and option not in given:
            if not eq:
                i += 1
                value = rest[i] if i < len(rest) else ""
            if not value or value.startswith("-"):
                return None
            given[option] = value
        elif rest[i] in flags and rest[i] not in given:
            given[rest[i]] = True
        elif (command == "replicate" and not positional and rest[i]
              and not rest[i].startswith("-")):
            positional.append(rest[i])
        else:
            return None
        i += 1
    common = {"config": given.get("--config"), "store": given.get("--store"),
              "json": given.get("--json", False), "leave_at_once": True}
    if command == "status":
        return types.SimpleNamespace(group="status", metrics=given.get("--metrics", False),
                                     func=cmd_status, **common)
    if "--to" not in given:
        return None
    return types.SimpleNamespace(snapshot=positional[0] if positional else None,
                                 group=given.get("--group", False), to=given["--to"],
                                 volume=given.get("--volume"), func=cmd_replicate, **common)


def admin_socket(args: argparse.Namespace) -> str:
    """The running site's admin socket: named by ``--config`` or ``--store``, else by the
    environment (an option given on the command line wins over both variables)."""
    for option, value in (("--config", args.config), ("--store", args.store)):
        if value == "":  # an unset shell variable, say: not the environment's site
            raise UserError(f"{option} is empty; give the path of the running site's "
                            f"{'site.yaml' if option == '--config' else 'store directory'}")
    if args.config is not None:
        return socket_from_config(args.config)
    if args.store is not None:
        return _socket_of_store(args.store)
    if config := os.environ.get(CONFIG_ENV):
        return socket_from_config(config)
    if store := os.environ.get(STORE_ENV):
        return _socket_of_store(store)
    raise UserError(f"name the site: --config site.yaml (or ${CONFIG_ENV}), or --store DIR")


def _socket_of_store(store: str) -> str:
    socket = lockfile.holder(store)[1]
    if socket is None:
        raise UserError(f"no site is running on store {store}; start it with "
                        "'dvx-dr site serve --config site.yaml'")
    return socket


def socket_from_config(path: str | os.PathLike[str]) -> str:
    """The admin socket that ``site.yaml`` at ``path`` names. The running site validated its
    file when it started, and the client needs only this one key, so it is read without
    pydantic (about 0.1 s of every command's start), resolved as the site resolves it (``~``
    expanded, relative to the file's directory): from the file's text when its ``store`` and
    ``admin_socket`` lines are simple and the store's lock file confirms them
    (``_socket_from_simple_lines``), else with PyYAML (about 19 ms to import). A file without
    a usable ``admin_socket`` goes through the full validation for its error message."""
    try:
        with open(path, encoding="utf-8") as f:
            text: str | None = f.read()
    except (OSError, UnicodeDecodeError):
        text = None
    if text is not None and (socket := _socket_from_simple_lines(path, text)):
        return socket
    import yaml

    try:
        data = yaml.load(text or "", Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        value = data.get("admin_socket") if isinstance(data, dict) else None
    except yaml.YAMLError:
        value = None
    if isinstance(value, str) and value.strip():
        return _config_relative(path, value)
    from pathlib import Path  # for the validation below, which loads pydantic

    from dvx_dr.site.config import load_site_config

    return str(load_site_config(Path(path)).admin_socket)


#: A top-level ``store:`` or ``admin_socket:`` line whose value is a path of plain characters
#: or a quoted string without escapes, then at most a comment: the form of every example.
_SIMPLE_LINE = (r"^(store|admin_socket):[ \t]+"
                r"""(?:"([^"\\\n]*)"|'([^'\n]*)'|([\w./~+@=-]+))"""
                r"(?:[ \t]+(?:#.*)?)?$")


def _socket_from_simple_lines(path: str | os.PathLike[str], text: str) -> str | None:
    """The admin socket, read from ``text`` without a YAML parser, when the file has exactly
    one simple top-level line each for ``store`` and ``admin_socket`` and the lock file of
    that store says that the site serving it listens on that socket; None otherwise (the
    caller parses the file). The lock file's confirmation is what makes reading two lines
    safe: whatever else the file holds, the socket is the one of the running site that owns
    the store the file names."""
    # A multi-line quoted string or flow collection could hold lines that look like keys at
    # the start of a line; a file with one is parsed (so is one with document markers).
    for line in text.splitlines():
        if ("\\" in line or line.count('"') % 2 or line.count("'") % 2
                or line.count("[") != line.count("]") or line.count("{") != line.count("}")
                or line.startswith(("---", "...", "%"))):
            return None
    found: dict[str, list[str]] = {}
    for m in re.finditer(_SIMPLE_LINE, text, re.MULTILINE):
        found.setdefault(m[1], []).append(next(v for v in m.groups()[1:] if v is not None))
    stores, sockets = found.get("store", []), found.get("admin_socket", [])
    if len(stores) != 1 or len(sockets) != 1 or not stores[0].strip() or not sockets[0].strip():
        return None
    socket = _config_relative(path, sockets[0])
    return socket if lockfile.holder(_config_relative(path, stores[0]))[1] == socket else None


def _config_relative(config: str | os.PathLike[str], value: str) -> str:
    """A path from site.yaml as the site resolves it (``~`` expanded, relative to the file's
    directory), in the form the site writes it: ``str()`` of the ``pathlib.Path`` the site
    makes, so that it can be compared with the site's lock file."""
    value = os.path.expanduser(_path_text(value))
    if not value.startswith("/"):
        directory = _path_text(os.path.join(os.getcwd(), config)).rpartition("/")[0]
        value = f"{directory}/{value}"
    return _path_text(value)


def _path_text(path: str) -> str:
    """``str(pathlib.PurePosixPath(path))``: empty and ``.`` parts dropped (``..`` kept), and
    two leading slashes kept as POSIX allows."""
    parts = path.lstrip("/")
    root = "//" if len(path) - len(parts) == 2 else "/" if parts != path else ""
    return root + "/".join(p for p in parts.split("/") if p not in ("", ".")) or "."


def register(groups: Any) -> None:
    c = groups.add_parser("replicate", help="replicate a snapshot to another site now")
    c.add_argument("snapshot", nargs="?", help="VOLUME@NAME (or PG@NAME with --group)")
    c.add_argument("--group", action="store_true",
                   help="the snapshot is a group snapshot: replicate all its members as one")
    c.add_argument("--to", required=True, metavar="SITE")
    c.add_argument("--volume", help="snapshot this volume first, then replicate that snapshot")
    c.add_argument("--json", action="store_true")
    add_site_args(c)
    c.set_defaults(func=cmd_replicate, leave_at_once=True)

    c = groups.add_parser("status", help="the running site's status")
    c.add_argument("--json", action="store_true")
    c.add_argument("--metrics", action="store_true",
                   help="print the Prometheus metrics instead (as served on metrics_listen)")
    add_site_args(c)
    c.set_defaults(func=cmd_status, leave_at_once=True)


def cmd_replicate(args: argparse.Namespace) -> int:
    if bool(args.snapshot) == bool(args.volume):
        raise UserError("give either a snapshot (VOLUME@NAME) or --volume VOLUME")
    socket = admin_socket(args)
    bar: Any = None

    def on_line(line: dict[str, Any]) -> None:
        nonlocal bar
        if "snapshot_created" in line and not args.json:
            print(f"created snapshot {line['snapshot_created']}", file=sys.stderr)
        if "retrying" in line:
            r = line["retrying"]
            message = (f"dvx-dr: attempt {r['attempt']} of {r['attempts']} failed: "
                       f"{r['error']}; retrying in {r['delay']:.1f} s")
            if bar is not None:
                bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr)
        if "progress" in line and sys.stderr.isatty():
            p = line["progress"]
            if bar is None:
                from tqdm import tqdm  # only on a terminal

                bar = tqdm(unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                           desc=f"replicate to {args.to} (on the wire)")
            bar.n = p["bytes_on_wire"]
            bar.refresh()

    try:
        stats = remote.replicate(socket, {"snapshot": args.snapshot, "volume": args.volume,
                                          "to": args.to, "group": args.group}, on_line)
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print_json(stats)
        return 0
    if stats["already_replicated"]:
        print(f"{stats['snapshot']} is already replicated to {args.to} as {stats['replica']}; "
              "nothing sent")
        return 0
    print(f"replicated {stats['snapshot']} to {args.to} as {stats['replica']}")
    print(f"  ids exchanged     {stats['ids_exchanged']} ({format_size(stats['id_bytes'])})")
    print(f"  blocks sent       {stats['blocks_sent']} (+{stats['pages_sent']} tree pages)")
    print(f"  bytes on wire     {format_size(stats['bytes_on_wire'])}")
    print(f"  skipped (target had them) {format_size(stats['bytes_skipped'])}")
    print(f"  duration          {stats['seconds']:.2f}s, "
          f"{format_size(stats['rate'])}/s of volume data")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.metrics:
        print(remote.call(admin_socket(args), "metrics"), end="")
        return 0
    status = remote.status(admin_socket(args))
    if args.json:
        print_json(status)
        return 0
    print(f"site {status['site']} (pid {status['pid']}); peers: "
          f"{', '.join(status['peers']) or 'none'}")
    if status.get("keys_destroyed"):
        print("dvx-dr: warning: the site's keys were crypto-erased: it sends and receives no "
              "replicas, and its encrypted data cannot be read", file=sys.stderr)
    elif status.get("locked"):
        print("dvx-dr: warning: the site's store is locked: it sends and receives no "
              "replicas until 'dvx-dr datastore unlock'", file=sys.stderr)
    if tls := status.get("tls"):
        print(f"TLS certificate ends {tls['certificate_ends'][:10]}, its CA "
              f"{tls['ca_ends'][:10]} ({tls['days_left']} days left)")
        if tls["days_left"] < tls["warning_days"]:
            print(f"dvx-dr: warning: the site's TLS certificate or its CA ends in "
                  f"{tls['days_left']} days; peers refuse the site from then on: issue a new "
                  "one and restart the site", file=sys.stderr)
    rows = []
    for name, g in status.get("groups", {}).items():
        for site, t in g["targets"].items():
            age = f"{t['age_seconds']:.0f}s / {t['rpo_seconds']:.0f}s"
            last = t["last_replica"] or "-"
            error = t["last_error"] or ""
            rows.append([name, site, t["rpo_status"], age, last,
                         format_size(t["bytes_sent"]), format_size(t["bytes_saved"]),
                         t["next_run"] or "-", error[:60]])
        if not g["targets"]:
            rows.append([name, "-", "-", "-", g["last_snapshot"] or "-", "-", "-",
                         g["next_snapshot"] or "-", g["last_snapshot_error"] or ""])
        elif g["last_snapshot_error"]:
            rows.append([name, "(snapshot)", "ERROR", "-", "-", "-", "-",
                         g["next_snapshot"] or "-", g["last_snapshot_error"][:60]])
    if rows:
        print_table(["GROUP", "TARGET", "RPO", "AGE/RPO", "LAST REPLICA", "SENT", "SAVED",
                     "NEXT RUN", "LAST ERROR"], rows)
    for t in status["transfers"]:
        print(f"transfer {t['snapshot']} -> {t['target']} attempt {t['attempt']}"
              + (f" last error: {t['last_error']}" if t["last_error"] else ""))
    for error in status.get("policy_errors", []):
        print(f"policy error: {error}", file=sys.stderr)
    return 0
