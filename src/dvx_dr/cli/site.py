"""``dvx-dr site ...``: create a site's store (and, with replication, serve it)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from dvx_dr.cli.context import (
    add_store_args,
    new_password,
    password_source,
    path_option,
    store_path,
)
from dvx_dr.errors import UserError
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
    init.add_argument("--name", help="site name (lowercase, digits, '-'; default with "
                                     "--config: site.yaml's name)")
    init.add_argument("--block-size", default="64KiB",
                      help="volume block size, a power of two from 4KiB to 1MiB (default 64KiB)")
    init.add_argument("--no-encryption", action="store_true",
                      help="store data unencrypted (encryption can be enabled later)")
    init.set_defaults(func=cmd_init)
    register_serve(sub)


def cmd_init(args: argparse.Namespace) -> int:
    block_size = parse_size(args.block_size, "--block-size") if args.block_size else DEFAULT_BLOCK
    _site_name(args)  # a mistake here is told before any password is asked
    password = None
    if not args.no_encryption:
        if args.password_file is None:
            print(LOST_PASSWORD_WARNING, file=sys.stderr)
        password = new_password(args)
    name = _site_name(args)
    path = store_path(args)
    store = Store.init(path, name, block_size, password)
    store.close()
    mode = "encrypted (AES-256-XTS)" if password else "unencrypted"
    print(f"created {mode} store for site {name} at {path} (block size {block_size})")
    return 0


def _site_name(args: argparse.Namespace) -> str:
    """``--name``, or site.yaml's name with ``--config``; the two must agree."""
    if args.config is None:
        if args.name is None:
            raise UserError("give the site's name: --name NAME (or --config site.yaml)")
        return str(args.name)
    from dvx_dr.site.config import load_site_config

    configured = load_site_config(Path(args.config)).name
    if args.name is not None and args.name != configured:
        raise UserError(f"--name {args.name} differs from the name in {args.config} "
                        f"({configured}); leave --name out to use {configured}")
    return configured


def register_serve(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the site: peer API over mutual TLS, admin socket")
    serve.add_argument("--config", type=path_option("--config", "the site's site.yaml"),
                       required=True, help="site.yaml")
    serve.add_argument("--password-file", type=Path, default=None,
                       help="store password (encrypted stores; without it the site opens with "
                            "its startup key, or starts locked until 'dvx-dr datastore "
                            "unlock')")
    serve.add_argument("--log-level", default="INFO")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from dvx_dr.nocore import forbid_core_dumps

    forbid_core_dumps()  # before it holds a password or a key
    from dvx_dr.replicator import server
    from dvx_dr.site.config import load_site_config

    config = load_site_config(args.config)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Without --password-file the site opens with its startup key (unlocked mode) or starts
    # locked; it never waits at a prompt, so it can run under a service manager.
    password = password_source(args) if args.password_file is not None else None
    asyncio.run(server.serve(config, args.config, password))
    return 0
