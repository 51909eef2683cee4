"""The ``dvx-dr`` command line: parse, call the library, print.

Every library error (``DvxError``) becomes one line on stderr and the error's exit code
(2 for user errors, 3 for integrity errors).

Start-up time matters for commands that scripts run often (``replicate``, ``status``, a
``volume write`` sent to a running site), so only the module of the command group being run is
imported (all of them for ``--help``), and commands import the heavy parts they need (the
store's code, the server, the pydantic policy and config models, tqdm, PyYAML) when they run,
not when the parser is built. Those imports are the only function-local imports in the
project, with argparse: ``replicate`` and ``status`` in their usual form are read without it
(``cli.replicate.quick_args``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys

from dvx_dr import __version__
from dvx_dr.errors import DvxError

TYPE_CHECKING = False
if TYPE_CHECKING:  # not loaded at run time (see cli.replicate)
    import argparse
    from collections.abc import Sequence

# Command group -> the module under dvx_dr.cli that registers it, in --help order.
GROUPS = {
    "site": "site",
    "volume": "volume",
    "snapshot": "snapshot",
    "datastore": "datastore",
    "pg": "pg",
    "replicate": "replicate",
    "status": "replicate",
    "pki": "pki",
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser for ``argv``: only its command group's module is loaded when ``argv`` names
    one; every group otherwise (``--help``, a mistyped group)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="dvx-dr", description="Replication and disaster recovery for encrypted volume stores")
    parser.add_argument("--version", action="version", version=f"dvx-dr {__version__}")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    first = next((a for a in argv if not a.startswith("-")), None)
    modules = [GROUPS[first]] if first in GROUPS else list(dict.fromkeys(GROUPS.values()))
    for name in modules:
        importlib.import_module(f"dvx_dr.cli.{name}").register(groups)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, systemd stopping a job), raised where the command is,
    so that it unwinds as it does for Ctrl-C: an export or read removes its unfinished file,
    an import its volume, instead of leaving them behind as an outright kill does."""


def _terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None, *, leave: bool = False) -> int:
    """Run one command; its exit code. With ``leave`` (the console script), a command that
    only talked to a running site leaves the process at once (``leave_at_once``)."""
    argv = sys.argv[1:] if argv is None else argv
    args = None
    try:
        # An option's value may be refused while parsing (an empty --store, say).
        args = _quick_args(argv) or build_parser(argv).parse_args(argv)
        result = args.func(args)
    except DvxError as exc:
        print(f"dvx-dr: error: {exc}", file=sys.stderr)
        result = exc.exit_code
    except Terminated:
        print("dvx-dr: terminated", file=sys.stderr)
        result = 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print("dvx-dr: interrupted", file=sys.stderr)
        result = 130
    except BrokenPipeError:
        result = 0
    code = int(result or 0)
    if leave and getattr(args, "leave_at_once", False):
        leave_at_once(code)
    return code


def _quick_args(argv: list[str]) -> argparse.Namespace | None:
    """The arguments of a command line its group's module reads without argparse (its
    ``quick_args``), else None."""
    name = GROUPS.get(argv[0]) if argv else None
    module = importlib.import_module(f"dvx_dr.cli.{name}") if name else None
    quick = getattr(module, "quick_args", None)
    return quick(argv) if quick is not None else None


def leave_at_once(code: int) -> None:
    """Exit without the interpreter's teardown (freeing every object, about 5 ms of a
    ``dvx-dr status`` of 45 ms). For the commands whose work happens in a running site
    (``replicate``, ``status``): they hold no open file, thread or store, so once their
    output is flushed there is nothing left to finish."""
    with contextlib.suppress(BrokenPipeError):  # a closed pipe: nothing more to say
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def run() -> int:
    """The ``dvx-dr`` console script. (``site serve`` replaces the SIGTERM handler with its
    own, which stops the site cleanly.)"""
    signal.signal(signal.SIGTERM, _terminated)
    return main(leave=True)


if __name__ == "__main__":
    sys.exit(run())
