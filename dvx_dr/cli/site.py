"""``dvx-dr site ...``: create a site's store (and, with replication, serve it)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dvx_dr.cli.context import add_store_args, new_password, store_path
from dvx_dr.site.store import DEFAULT_BLOCK, Store
from dvx_dr.units import parse_size

LOST_PASSWORD_WARNING = (
    "WARNING: the password cannot be recovered. If it is lost, every encrypted block in this "
    "store is lost with it. Keep it, and a copy of keystore.json, somewhere safe."
)


def register(groups: Any) -> None:
    p = groups.add_parser("site", help="create and run a site")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    init = sub.add_parser("init", help="create a new store")
    add_store_args(init)
    init.add_argument("--name", required=True, help="site name (lowercase, digits, '-')")
    init.add_argument("--block-size", default="64KiB",
                      help="volume block size, a power of two from 4KiB to 1MiB (default 64KiB)")
    init.add_argument("--no-encryption", action="store_true",
                      help="store data unencrypted (encryption can be enabled later)")
    init.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    block_size = parse_size(args.block_size, "--block-size") if args.block_size else DEFAULT_BLOCK
    password = None
    if not args.no_encryption:
        if args.password_file is None:
            print(LOST_PASSWORD_WARNING, file=sys.stderr)
        password = new_password(args)
    path = store_path(args)
    store = Store.init(path, args.name, block_size, password)
    store.close()
    mode = "encrypted (AES-256-XTS)" if password else "unencrypted"
    print(f"created {mode} store for site {args.name} at {path} (block size {block_size})")
    return 0
