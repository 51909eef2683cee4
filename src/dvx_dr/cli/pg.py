"""``dvx-dr pg ...``: protection-group policies."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dvx_dr.cli import remote
from dvx_dr.cli.common import print_json, print_table
from dvx_dr.cli.context import add_store_args, path_option, run_op
from dvx_dr.cli.replicate import add_site_args, admin_socket
from dvx_dr.errors import DvxError, UserError


def register(groups: Any) -> None:
    p = groups.add_parser("pg", help="protection-group policies")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    c = sub.add_parser("validate", help="check policy files without a running site")
    c.add_argument("files", nargs="*", type=Path,
                   help="policy files (default with --config: its policy directory's files)")
    c.add_argument("--config", type=path_option("--config", "the site's site.yaml"),
                   default=None, help="check target sites against this site.yaml's peers")
    c.add_argument("--site", action="append", default=[], metavar="NAME",
                   help="a peer site name the policies may replicate to (repeatable; without "
                        "it or --config, target site names are not checked)")
    c.set_defaults(func=cmd_validate)

    c = sub.add_parser("apply", help="(re)load the policy directory into the running site")
    add_site_args(c)
    c.set_defaults(func=cmd_apply)

    c = sub.add_parser("list", help="protection groups of the running site")
    c.add_argument("--json", action="store_true")
    add_site_args(c)
    c.set_defaults(func=cmd_list)

    c = sub.add_parser("show", help="one protection group: members, snapshots, targets")
    c.add_argument("name")
    add_site_args(c)
    c.set_defaults(func=cmd_show)

    c = sub.add_parser("snapshots", help="group snapshots (and group replicas) in a store")
    c.add_argument("pg", nargs="?", help="only this group (a replica group: SITE/PG)")
    c.add_argument("--json", action="store_true")
    add_store_args(c)
    c.set_defaults(func=cmd_snapshots)

    c = sub.add_parser("snapshot-create",
                       help="snapshot volumes together at one instant, as a group snapshot")
    c.add_argument("pg", help="group name")
    c.add_argument("volumes", nargs="+", metavar="VOLUME")
    c.add_argument("--name", help="snapshot name (default: the UTC time)")
    add_store_args(c)
    c.set_defaults(func=cmd_snapshot_create)

    c = sub.add_parser("snapshot-delete", help="delete a group snapshot and its members")
    c.add_argument("snapshot", help="PG@NAME (a replica group: SITE/PG@NAME)")
    add_store_args(c)
    c.set_defaults(func=cmd_snapshot_delete)


def cmd_validate(args: argparse.Namespace) -> int:
    from dvx_dr.policies.loader import load_policy_file, named_sites, policy_files

    peers = set(args.site)
    files = list(args.files)
    if args.config is not None:
        from dvx_dr.site.config import load_site_config

        config = load_site_config(args.config)
        peers |= set(config.peers)
        if not files:
            if config.policy_dir is None or not config.policy_dir.is_dir():
                raise UserError(f"{args.config} names no policy directory that exists "
                                f"({config.policy_dir}); name the policy files to check")
            files = policy_files(config.policy_dir)
    elif not files:
        raise UserError("name the policy files to check, or pass --config site.yaml to check "
                        "its policy directory")
    checked = bool(peers) or args.config is not None
    failed = 0
    for path in files:
        try:
            sites = peers
            if not checked:
                # Without --site or --config, any target name is accepted: read the names
                # from the file. Anything odd is left to the loader below, which names it.
                sites = named_sites(path)
            policy = load_policy_file(path, sites)
        except DvxError as exc:
            print(f"dvx-dr: error: {exc}", file=sys.stderr)
            failed += 1
            continue
        unchecked = "" if checked else "; target site names not checked: pass --config"
        print(f"{path}: ok (group {policy.name}, {_count(len(policy.replication), 'target')}"
              f"{unchecked})")
    return 2 if failed else 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def cmd_apply(args: argparse.Namespace) -> int:
    result = remote.call(admin_socket(args), "reload")
    for error in result["errors"]:
        print(f"dvx-dr: error: {error}", file=sys.stderr)
    loaded = result["loaded"]
    print(f"loaded {_count(len(loaded), 'protection group')}"
          + (f": {', '.join(loaded)}" if loaded else ""))
    return 2 if result["errors"] else 0


def cmd_list(args: argparse.Namespace) -> int:
    status = remote.status(admin_socket(args))
    groups = status.get("groups", {})
    if args.json:
        print_json(groups)
        return 0
    rows = []
    for name, g in groups.items():
        worst = max((t["rpo_status"] for t in g["targets"].values()),
                    key=["OK", "WARNING", "VIOLATED"].index, default="-")
        rows.append([name, str(len(g["members"])), g["last_snapshot"] or "-",
                     ", ".join(g["targets"]) or "-", worst])
    print_table(["GROUP", "VOLUMES", "LAST SNAPSHOT", "TARGETS", "RPO"], rows)
    for error in status.get("policy_errors", []):
        print(f"policy error: {error}", file=sys.stderr)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    status = remote.status(admin_socket(args))
    group = status.get("groups", {}).get(args.name)
    if group is None:
        print(f"dvx-dr: error: unknown protection group {args.name!r}", file=sys.stderr)
        return 2
    print_json(group)
    return 0


def cmd_snapshots(args: argparse.Namespace) -> int:
    snaps = run_op(args, "group.list", {"pg": args.pg})
    if args.json:
        print_json(snaps)
        return 0
    print_table(["GROUP SNAPSHOT", "CREATED", "ORIGIN", "MEMBERS"],
                [[g["snapshot"], g["created"], g["origin"], ", ".join(g["members"])]
                 for g in snaps])
    return 0


def cmd_snapshot_create(args: argparse.Namespace) -> int:
    g = run_op(args, "group.create", {"pg": args.pg, "members": args.volumes,
                                      "name": args.name})
    print(f"created group snapshot {g['snapshot']} of {', '.join(g['members'])}")
    return 0


def cmd_snapshot_delete(args: argparse.Namespace) -> int:
    pg, sep, name = args.snapshot.rpartition("@")
    if not sep or not pg or not name:
        print(f"dvx-dr: error: group snapshot {args.snapshot!r}: expected PG@NAME",
              file=sys.stderr)
        return 2
    run_op(args, "group.delete", {"pg": pg, "name": name})
    print(f"deleted group snapshot {args.snapshot} and its member snapshots; "
          "'dvx-dr datastore gc' reclaims their space")
    return 0
