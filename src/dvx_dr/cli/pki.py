"""``dvx-dr pki ...``: a small CA for the sites' mutual TLS (operators may bring their own)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(groups: Any) -> None:
    p = groups.add_parser("pki", help="make a CA and site certificates for mutual TLS")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    c = sub.add_parser("init-ca", help="create a CA (ca.crt, ca.key) in DIR")
    c.add_argument("dir", type=Path)
    c.add_argument("--name", default="dvx-dr CA")
    c.set_defaults(func=cmd_init_ca)
    c = sub.add_parser("issue-site", help="issue DIR/NAME.crt and DIR/NAME.key for a site")
    c.add_argument("dir", type=Path)
    c.add_argument("name", help="site name")
    c.add_argument("--host", action="append", required=True,
                   help="host name or IP address peers use to reach the site (repeatable)")
    c.set_defaults(func=cmd_issue_site)


def cmd_init_ca(args: argparse.Namespace) -> int:
    from dvx_dr.replicator import pki

    path = pki.init_ca(args.dir, args.name)
    print(f"created CA {path}")
    return 0


def cmd_issue_site(args: argparse.Namespace) -> int:
    from dvx_dr.replicator import pki

    cert, key = pki.issue_site(args.dir, args.name, args.host)
    print(f"issued {cert} and {key} for site {args.name} ({', '.join(args.host)})")
    if warning := pki.exposed_ca_key(args.dir):
        print(f"dvx-dr: warning: {warning}", file=sys.stderr)
    return 0
