"""The ``dvx-dr`` command line: parse, call the library, print.

Every library error (``DvxError``) becomes one line on stderr and the error's exit code
(2 for user errors, 3 for integrity errors).

Commands import the heavy parts they need (aiohttp for reaching a running site, the server,
the pydantic policy and config models) when they run, not when the parser is built, so that
every command starts in about a tenth of a second; those imports are the only function-local
imports in the project.
"""

from __future__ import annotations

import argparse
import sys

from dvx_dr import __version__
from dvx_dr.cli import datastore, pg, pki, replicate, site, snapshot, volume
from dvx_dr.errors import DvxError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvx-dr", description="Replication and disaster recovery for encrypted volume stores")
    parser.add_argument("--version", action="version", version=f"dvx-dr {__version__}")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    for module in (site, volume, snapshot, datastore, pg, replicate, pki):
        module.register(groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except DvxError as exc:
        print(f"dvx-dr: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("dvx-dr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
