"""Parsing and printing of byte sizes and durations as users write them (``64KiB``, ``15m``)."""

from __future__ import annotations

import contextlib
import re

from dvx_dr.errors import UserError

#: Bytes per unit, by the unit's lower-case spelling. As in qemu-img, truncate, dd and GNU
#: ``--block-size``: a bare letter is binary (``64K`` = 65536, also ``64Ki``, ``64KiB``),
#: a letter with ``B`` is decimal (``64KB`` = 64000); a bare number (or ``B``) is bytes.
_SIZE_UNITS = {
    "": 1, "b": 1,
    **{f"{letter}{tail}": 1024**power for power, letter in enumerate("kmgtp", 1)
       for tail in ("", "i", "ib")},
    **{f"{letter}b": 1000**power for power, letter in enumerate("kmgtp", 1)},
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_size(text: str | int, what: str = "size") -> int:
    """``"10GiB"`` -> 10737418240. ``K``, ``Ki`` and ``KiB`` (any case; and M, G, T, P) are
    binary, ``KB`` is decimal, as GNU tools and qemu-img read them; a bare number is bytes."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.fullmatch(str(text))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise UserError(f"{what}: expected a size like 10GiB, 64K or 4096, got {text!r}")
    # Exact integer arithmetic (a float rounds large sizes and overflows on long ones).
    whole, _, fraction = m.group(1).partition(".")
    if len(whole) > 30:
        raise UserError(f"{what}: {text!r} is far too large")
    scaled = int(whole + fraction) * _SIZE_UNITS[m.group(2).lower()]
    value, rest = divmod(scaled, 10 ** len(fraction))
    if rest:
        raise UserError(f"{what}: {text!r} is not a whole number of bytes")
    return value


def parse_duration(text: str | int | float, what: str = "duration") -> float:
    """``"1h30m"`` -> 5400.0 seconds. A bare number is seconds."""
    if isinstance(text, int | float):
        return float(text)
    s = str(text).strip().lower()
    with contextlib.suppress(ValueError):
        return float(s)
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise UserError(f"{what}: expected a duration like 15m or 1h30m, got {text!r}")
    return total


def count(n: int, thing: str) -> str:
    """``count(1, "block")`` -> ``"1 block"``, ``count(2, "block")`` -> ``"2 blocks"``."""
    return f"{n} {thing}" if n == 1 else f"{n} {thing}s"


def format_size_exact(n: int) -> str:
    """A size as ``format_size`` shows it, with its bytes when that rounds them:
    65536 -> ``"64.0 KiB"``, 65537 -> ``"65537 bytes (64.0 KiB)"``."""
    shown, exact = _shown(n)
    return shown if exact else f"{count(n, 'byte')} ({shown})"


def format_size(n: float) -> str:
    """1536 -> ``"1.5 KiB"``."""
    return _shown(n)[0]


def _shown(n: float) -> tuple[str, bool]:
    """``n`` bytes in the largest unit under 1024 of it (TiB at most), and whether what is
    shown is exactly ``n``."""
    value = float(n)
    for power, unit in enumerate(("B", "KiB", "MiB", "GiB", "TiB")):
        if abs(value) < 1024 or unit == "TiB":
            shown = f"{value:.0f}" if unit == "B" else f"{value:.1f}"
            return f"{shown} {unit}", float(shown) * 1024 ** power == n
        value /= 1024
    raise AssertionError("unreachable")
