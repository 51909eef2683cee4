"""What the command modules share that loads nothing beyond ``json``: the environment
variables that name a store or a site, and JSON and table output.

It is kept apart from ``cli.context`` (argparse, pathlib, getpass) so that ``replicate`` and
``status``, the commands scripts run most, start without those (see ``cli.replicate``).
"""

from __future__ import annotations

import json

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing is not loaded at run time: see cli.replicate
    from typing import Any

STORE_ENV = "DVX_DR_STORE"
CONFIG_ENV = "DVX_DR_CONFIG"


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
