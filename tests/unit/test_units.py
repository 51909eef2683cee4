"""``dvx_dr.units``: sizes as qemu-img, truncate and dd read them."""

from __future__ import annotations

import pytest

from dvx_dr.errors import UserError
from dvx_dr.units import count, format_size_exact, parse_size

KiB, MiB, GiB, TiB = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(("text", "size"), [
    # A bare letter is binary, in any case, with or without 'i' or 'iB' ("64K" was 64000,
    # where qemu-img, truncate and dd make it 65536).
    ("64K", 64 * KiB), ("64k", 64 * KiB), ("64Ki", 64 * KiB), ("64KiB", 64 * KiB),
    ("64kib", 64 * KiB), ("64KIB", 64 * KiB),
    ("10M", 10 * MiB), ("10m", 10 * MiB), ("10Mi", 10 * MiB), ("10MiB", 10 * MiB),
    ("10G", 10 * GiB), ("10g", 10 * GiB), ("10GiB", 10 * GiB),
    ("2T", 2 * TiB), ("2t", 2 * TiB), ("2TiB", 2 * TiB),
    ("1P", 1 << 50), ("1PiB", 1 << 50),
    # With 'B', decimal, as GNU tools read KB, MB, GB, TB.
    ("64KB", 64_000), ("64kB", 64_000), ("10MB", 10_000_000), ("10GB", 10 * 10**9),
    ("2TB", 2 * 10**12), ("1PB", 10**15),
    # Plain numbers and B are bytes.
    ("4096", 4096), ("0", 0), ("4096B", 4096), ("4096b", 4096), (" 1 K ", KiB),
    # Fractions that come to whole bytes.
    ("1.5K", 1536), ("0.5GB", 500_000_000), ("1.5KiB", 1536),
])
def test_suffixes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_an_int_is_bytes() -> None:
    assert parse_size(4096) == 4096


@pytest.mark.parametrize("text", ["64Kx", "x", "", "K", "-1", "1 KiBB", "10 GiB/s", "1e3"])
def test_what_is_no_size_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(UserError) as err:
        parse_size(text, "--size")
    assert str(err.value) == f"--size: expected a size like 10GiB, 64K or 4096, got {text!r}"


def test_fractions_of_a_byte_and_huge_numbers_are_refused() -> None:
    with pytest.raises(UserError, match="not a whole number of bytes"):
        parse_size("1.1", "--size")
    with pytest.raises(UserError, match="far too large"):
        parse_size("9" * 40, "--size")


@pytest.mark.parametrize(("n", "shown"), [
    (0, "0 B"), (1000, "1000 B"), (65536, "64.0 KiB"), (65537, "65537 bytes (64.0 KiB)"),
    (65540, "65540 bytes (64.0 KiB)"), (1 << 30, "1.0 GiB"), (1, "1 B"),
    ((1 << 20) + (1 << 19), "1.5 MiB"), ((1 << 20) + 1, "1048577 bytes (1.0 MiB)"),
])
def test_a_size_shown_rounded_also_gives_its_bytes(n: int, shown: str) -> None:
    """'imported ... (64.0 KiB, ...)' for 65,537 bytes hid the odd byte."""
    assert format_size_exact(n) == shown


def test_counts_are_singular_for_one() -> None:
    assert [count(n, "blob") for n in (0, 1, 2)] == ["0 blobs", "1 blob", "2 blobs"]
