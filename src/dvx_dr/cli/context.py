"""What every command shares: finding the store, getting the password, showing progress."""

from __future__ import annotations

import argparse
import getpass
import os
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvx_dr.cli import remote
from dvx_dr.cli.common import CONFIG_ENV, STORE_ENV
from dvx_dr.errors import StoreBusyError, TransientError, UserError
from dvx_dr.nocore import forbid_core_dumps
from dvx_dr.site import lockfile

if TYPE_CHECKING:
    from dvx_dr.site.store import Store



def add_store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", type=path_option("--store", "the store directory"),
                        default=None, help=f"store directory (default: ${STORE_ENV})")
    parser.add_argument("--config", type=path_option("--config", "the site's site.yaml"),
                        default=None, help=f"or the site's site.yaml, which names the store "
                                           f"(default: ${CONFIG_ENV})")
    parser.add_argument("--password-file", type=Path, default=None,
                        help="read the store password from the first line of this file")


class StoreCommands:
    """A command group whose subcommands all take the store arguments."""

    def __init__(self, groups: Any, name: str, help: str, dest: str = "command") -> None:
        parser = groups.add_parser(name, help=help)
        self.sub = parser.add_subparsers(dest=dest, metavar="COMMAND", required=True)

    def add(self, name: str, func: Callable[[argparse.Namespace], int], help: str
            ) -> argparse.ArgumentParser:
        parser = self.sub.add_parser(name, help=help)
        add_store_args(parser)
        parser.set_defaults(func=func)
        return parser


def path_option(option: str, what: str) -> Callable[[str], Path]:
    """The ``type`` of a path option: an empty value (an unset shell variable, say) is
    refused by the option's name, in one line (``cli.main`` prints a ``UserError`` raised
    while parsing), rather than taken for the current directory or replaced by the
    environment's store."""
    def convert(value: str) -> Path:
        if not value:
            raise UserError(f"{option} is empty; give the path of {what}")
        return Path(value)
    return convert


def store_path(args: argparse.Namespace) -> Path:
    """The store a command works on. An option given on the command line wins over the
    environment, and a store named directly over one named by a site.yaml: ``--store``, then
    ``--config``, then ``$DVX_DR_STORE``, then ``$DVX_DR_CONFIG``."""
    if args.store is not None:
        return Path(args.store)
    config = getattr(args, "config", None)
    if config is None and not os.environ.get(STORE_ENV):
        config = os.environ.get(CONFIG_ENV) or None
    if config is not None:
        from dvx_dr.site.config import load_site_config  # pydantic, only with a site.yaml

        return load_site_config(Path(config)).store
    if path := os.environ.get(STORE_ENV):
        return Path(path)
    raise UserError(f"no store given: pass --store DIR or --config site.yaml, or set "
                    f"{STORE_ENV} or {CONFIG_ENV}")


#: Password files already warned about in this process (a command may read one twice).
_warned: set[Path] = set()


def _warn_if_others_may_read(path: Path, st: os.stat_result) -> None:
    """Warn, as ssh does for a private key, when a regular password file can be read or
    written by users other than its owner; a pipe or process substitution is left alone."""
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & 0o077 or path in _warned:
        return
    _warned.add(path)
    print(f"dvx-dr: warning: password file {path} can be read or changed by other users "
          f"(mode {stat.S_IMODE(st.st_mode):04o}); make it private with 'chmod 600 {path}'",
          file=sys.stderr)


def read_password_file(path: Path) -> str:
    forbid_core_dumps()
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            text = f.read().decode("utf-8")
    except OSError as exc:
        raise UserError(f"cannot read password file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"password file {path} is not UTF-8 text") from None
    # The first line, ended by a line feed, CR LF or a lone CR (as a text file is read, and
    # as a terminal ends what getpass reads): str.splitlines would also end it at a form
    # feed, U+0085 or U+2028, and cut a password there without a word.
    password = text.replace("\r\n", "\n").replace("\r", "\n").split("\n", 1)[0]
    if not password:
        raise UserError(f"password file {path} is empty")
    _warn_if_others_may_read(path, st)
    return password


def password_source(args: argparse.Namespace, prompt: str = "Store password: "
                    ) -> Callable[[], str]:
    def get() -> str:
        if args.password_file is not None:
            return read_password_file(args.password_file)
        if not sys.stdin.isatty():
            raise UserError("the store is encrypted and no terminal is attached to ask for its "
                            "password: pass --password-file FILE")
        forbid_core_dumps()
        return getpass.getpass(prompt)
    return get


def new_password(args: argparse.Namespace, file_attr: str = "password_file",
                 hide: bool = True) -> str:
    """A new password: from a file, or typed twice at the prompt."""
    path = getattr(args, file_attr, None)
    if path is not None:
        return read_password_file(path)
    if not sys.stdin.isatty():
        flag = "--" + file_attr.replace("_", "-")
        raise UserError(f"no terminal to ask for a new password: pass {flag} FILE")
    forbid_core_dumps()
    ask = getpass.getpass if hide else input
    first = ask("New password (at least 8 characters): ")
    second = ask("Repeat it: ")
    if first != second:
        raise UserError("the two passwords differ; nothing was changed")
    return first


def run_op(args: argparse.Namespace, name: str, params: dict[str, Any],
           local: Callable[[Store], Any] | None = None, locked_ok: bool = False,
           remote_call: Callable[[str], Any] | None = None) -> Any:
    """Run a named store operation: in the running site that owns the store, through its
    admin socket, or else with the store opened here. ``local`` replaces the in-process
    implementation when it can do more here (stream to a file, draw a progress bar), and
    ``remote_call`` (given the admin socket) the call to the running site.
    ``locked_ok`` opens an encrypted store without asking for its password."""
    path = store_path(args)
    derivation = None
    if not locked_ok and args.password_file is not None:
        from dvx_dr.site.kdf import KekDerivation

        # The password's KDF runs while the store's code loads, instead of after it. A store
        # that turns out not to need the password (plain, startup key, served by a site)
        # wastes it; an unreadable file is reported only if the password is needed.
        with suppress(UserError):
            derivation = KekDerivation.start(path, read_password_file(args.password_file))
    from dvx_dr.site import ops  # the store's code, only for a command that opens a store
    from dvx_dr.site.store import Store

    try:
        store = Store.open(path, None if locked_ok else password_source(args),
                           allow_locked=locked_ok, derivation=derivation)
    except StoreBusyError as exc:
        if not exc.admin_socket:
            raise
        socket = exc.admin_socket
    else:
        try:
            return local(store) if local is not None else ops.run(store, name, params)
        finally:
            store.close()
    try:
        if remote_call is not None:
            return remote_call(socket)
        materialise = getattr(params, "materialise", None)
        return remote.call_op(socket, name, materialise() if materialise else params)
    except remote.SiteNotRunningError:
        # The site holds the store's lock, so it runs: it has not opened its admin socket
        # yet, or is closing it.
        raise TransientError(f"the site that owns store {path} (pid "
                             f"{lockfile.holder(path)[0]}) does not answer on its admin socket "
                             f"{socket}: it is starting or stopping; retry in a moment"
                             ) from None


def current_password(args: argparse.Namespace) -> str | None:
    """The current password from --password-file or the prompt; None without either."""
    if args.password_file is not None:
        return read_password_file(args.password_file)
    if sys.stdin.isatty():
        forbid_core_dumps()
        return getpass.getpass("Current password: ")
    return None


def confirm(question: str, args: argparse.Namespace) -> bool:
    """A yes/no question (default no); --yes answers it."""
    if getattr(args, "yes", False):
        return True
    if not sys.stdin.isatty():
        raise UserError(f"{question} needs an answer: pass --yes to confirm")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


@contextmanager
def progress_bar(total: int | None, desc: str) -> Iterator[Callable[[int], None] | None]:
    """A byte progress bar on stderr when it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
               file=sys.stderr, leave=False)
    try:
        yield bar.update
    finally:
        bar.close()


