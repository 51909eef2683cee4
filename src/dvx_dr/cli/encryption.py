"""``dvx-dr datastore encryption ...`` and ``dvx-dr datastore unlock``: the key manager."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dvx_dr.cli.common import print_json, print_table
from dvx_dr.cli.context import (
    StoreCommands,
    add_store_args,
    confirm,
    current_password,
    new_password,
    progress_bar,
    run_op,
)
from dvx_dr.errors import UserError
from dvx_dr.units import count, format_size

if TYPE_CHECKING:
    from dvx_dr.site.store import Store

WARNING = ("WARNING: the password cannot be recovered. Losing it loses every encrypted block "
           "in this store. Keep it, and a copy of keystore.json, somewhere safe.")


def register(sub: Any) -> None:
    unlock = sub.add_parser("unlock", help="unlock a locked store or running site")
    add_store_args(unlock)
    unlock.set_defaults(func=cmd_unlock)

    cmd = StoreCommands(sub, "encryption", "the encryption key manager",
                        dest="encryption_command").add

    c = cmd("enable", cmd_enable, "encrypt new data (asks for a new password)")
    c.add_argument("--new-password-file", type=Path)
    c.add_argument("--hide-password", action="store_true", help="hide the password as typed")
    c.add_argument("--yes", action="store_true")
    cmd("disable", cmd_disable, "write new data unencrypted (existing data stays encrypted)")
    c = cmd("status", cmd_status, "encryption state, key versions, bytes per key version")
    c.add_argument("--json", action="store_true")
    c = cmd("set", cmd_set, "set the startup mode or FIPS mode")
    c.add_argument("--startup-mode", choices=["locked", "unlocked"])
    c.add_argument("--startup-key", type=Path,
                   help="startup key file for unlocked mode (default: site.yaml's startup_key)")
    c.add_argument("--fips-mode", choices=["off", "approved", "validated"])
    c = cmd("change-password", cmd_change_password, "rewrap the keys under a new password")
    c.add_argument("--new-password-file", type=Path)
    c.add_argument("--hide-password", action="store_true")
    c = cmd("rotate-key", cmd_rotate_key, "a new key version for all new data")
    c.add_argument("--startup-key", type=Path)
    c = cmd("convert", cmd_convert, "rewrite existing data to the current setting and key")
    c.add_argument("--to", required=True, choices=["encrypted", "plain"])
    c.add_argument("--key", choices=["current"], default="current")
    c = cmd("crypto-erase", cmd_crypto_erase, "destroy every copy of the keys")
    c.add_argument("--confirm-name", metavar="SITE")
    c.add_argument("--yes", action="store_true")
    c.add_argument("--delete-plain", action="store_true",
                   help="also delete data that was stored unencrypted")
    c.add_argument("--startup-key", type=Path)


def cmd_unlock(args: argparse.Namespace) -> int:
    password = current_password(args)
    if password is None:
        raise UserError("no password: pass --password-file FILE or run on a terminal")
    def offline(store: Store) -> Any:
        from dvx_dr.site import ops

        ops.run(store, "datastore.unlock", {"password": password})  # checks the password
        raise UserError(_nothing_to_unlock(store))

    result = run_op(args, "datastore.unlock", {"password": password}, offline,
                    locked_ok=True)
    print("unlocked" if result["was_locked"] else "password accepted; the store was not locked")
    return 0


def _nothing_to_unlock(store: Store) -> str:
    """Why ``datastore unlock`` with no site running is refused (after its password was
    checked): a store is unlocked in the memory of the site that serves it, for as long as
    that site runs, so nothing stays unlocked when this command ends. Refused (exit 2)
    rather than reported done: a script that unlocks a site it means to use must not go on
    when there is no site."""
    if not store.keyed:
        return (f"store {store.path} is not encrypted, and no site is running on it: there "
                "is nothing to unlock")
    return (f"no site is running on store {store.path}, so there is nothing to unlock (the "
            "password is correct; a store stays unlocked only in the site that serves it): "
            "start it with 'dvx-dr site serve --config site.yaml', then unlock it, or give "
            "'site serve' --password-file")


def cmd_enable(args: argparse.Namespace) -> int:
    if run_op(args, "encryption.status", {}, locked_ok=True)["key_versions"]:
        # Encryption was on before and was disabled: the store kept its keys and password.
        if args.new_password_file is not None:
            raise UserError("this store has encryption keys from before, and enabling "
                            "encryption again uses them and their password; leave out "
                            "--new-password-file ('change-password' changes the password)")
        if not run_op(args, "encryption.enable", {"new_password": None})["changed"]:
            print("encryption is already enabled; nothing changed")
            return 0
        print("encryption enabled with the store's existing keys (the password is unchanged): "
              "new data will be encrypted; existing plain data stays so until converted "
              "('dvx-dr datastore encryption convert --to encrypted')")
        return 0
    source = args.new_password_file or args.password_file
    if source is None:
        print(WARNING, file=sys.stderr)
    ns = argparse.Namespace(new_password_file=source)
    password = new_password(ns, "new_password_file", hide=args.hide_password)
    if source is not None:
        print(WARNING, file=sys.stderr)
    if not confirm("Enable encryption?", args):
        print("encryption not enabled")
        return 1
    # A store that had encryption before and had it disabled keeps its keys: its current
    # password (--password-file) opens it, and the keys are used again. A store that never
    # had keys needs none to open, and the password given becomes its first.
    run_op(args, "encryption.enable", {"new_password": password})
    print("encryption enabled: new data will be encrypted; existing data may remain "
          "unencrypted until converted ('dvx-dr datastore encryption convert --to encrypted')")
    return 0


def cmd_disable(args: argparse.Namespace) -> int:
    if not run_op(args, "encryption.disable", {})["changed"]:
        print("encryption is already disabled; nothing changed")
        return 0
    print("encryption disabled: new data is written unencrypted; encrypted data stays "
          "encrypted and readable ('convert --to plain' rewrites it)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    s = run_op(args, "encryption.status", {}, locked_ok=True)
    if args.json:
        print_json(s)
        return 0
    print(f"encryption       {s['encryption']}" + (" (keys destroyed)"
                                                    if s["keys_destroyed"] else ""))
    if s["locked"] is not None:
        print(f"site locked      {'yes' if s['locked'] else 'no'}")
    print(f"startup mode     {s['startup_mode'] or '-'}")
    print(f"FIPS mode        {s['fips_mode']} (OpenSSL FIPS provider "
          f"{'active' if s['fips_provider_active'] else 'not active'})")
    print(f"password KDF     {s['kdf'] or '-'}")
    print(f"current key      {s['current_key_version'] or '-'}")
    rows = [[str(k["version"]), k["created"] or "-", str(k["extents"]), format_size(k["bytes"])]
            for k in s["key_versions"]]
    rows.append(["plain", "-", str(s["plain"]["extents"]), format_size(s["plain"]["bytes"])])
    print_table(["KEY VERSION", "CREATED", "EXTENTS", "STORED"], rows)
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    if not args.startup_mode and not args.fips_mode:
        raise UserError("nothing to set: give --startup-mode and/or --fips-mode")
    # One operation: both settings are checked before either is applied.
    r = run_op(args, "encryption.set", {
        "fips_mode": args.fips_mode,
        "password": current_password(args) if args.fips_mode else None,
        "startup_mode": args.startup_mode,
        "startup_key": str(args.startup_key.resolve()) if args.startup_key else None})
    if args.fips_mode:
        print(f"FIPS mode {r['fips_mode']}")
    if args.startup_mode:
        if r["startup_mode"] == "unlocked":
            print(f"startup mode unlocked: the site starts without a password using "
                  f"{r['startup_key']} (0600; keep it off backups of the store)")
        else:
            print("startup mode locked: the site starts locked until 'dvx-dr datastore unlock'")
    return 0


def cmd_change_password(args: argparse.Namespace) -> int:
    current = current_password(args)
    new = new_password(args, "new_password_file", hide=True)
    run_op(args, "encryption.change_password", {"password": current, "new_password": new})
    print("password changed; no data was rewritten")
    return 0


def cmd_rotate_key(args: argparse.Namespace) -> int:
    r = run_op(args, "encryption.rotate_key", {
        "password": current_password(args),
        "startup_key": str(args.startup_key.resolve()) if args.startup_key else None})
    print(f"new key version {r['key_version']}: new data is encrypted with it; older versions "
          "stay readable ('convert --to encrypted' moves old data to it)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    def local(store: Store) -> Any:
        from dvx_dr.site import keys

        with progress_bar(None, f"convert to {args.to}") as bar:
            return keys.convert(store, args.to, bar)

    r = run_op(args, "encryption.convert", {"to": args.to}, local)
    target = f"key version {r['key_version']}" if args.to == "encrypted" else "plain"
    print(f"converted {format_size(r['bytes_converted'])} to {target} "
          f"({count(r['segments_rewritten'], 'segment')} rewritten, "
          f"{count(r['extents_left'], 'extent')} left)")
    return 0


def cmd_crypto_erase(args: argparse.Namespace) -> int:
    name = args.confirm_name
    if name is None:
        if not sys.stdin.isatty():
            raise UserError("crypto erase needs --confirm-name SITE --yes without a terminal")
        print("Crypto erase destroys every copy of this store's keys. Encrypted data becomes "
              "unrecoverable at once, for everyone, for good.", file=sys.stderr)
        name = input("Type the site name to confirm: ").strip()
        again = input("Type it again: ").strip()
        if again != name:
            raise UserError("the two names differ; nothing was erased")
    elif not args.yes:
        raise UserError("crypto erase with --confirm-name also needs --yes")
    r = run_op(args, "encryption.crypto_erase", {
        "confirm_name": name, "delete_plain": args.delete_plain,
        "startup_key": str(args.startup_key.resolve()) if args.startup_key else None},
        locked_ok=True)
    print("keys destroyed: encrypted data in this store is unrecoverable")
    for problem in r.get("not_destroyed", []):
        print(f"dvx-dr: warning: {problem}", file=sys.stderr)
    if r["plain_bytes_left"]:
        print(f"{format_size(r['plain_bytes_left'])} ({r['plain_extents_left']} extents) were "
              "stored unencrypted: they are still on disk in the clear, though dvx-dr can no "
              "longer read them (its index was under the destroyed keys); rerun with "
              "--delete-plain to delete them")
    elif args.delete_plain:
        print(f"deleted all data ({format_size(r['deleted_bytes'])})")
    return 0
