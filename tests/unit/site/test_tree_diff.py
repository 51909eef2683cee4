"""``tree.changed_entries``: the entries of a tree page that differ from its base page."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dvx_dr.errors import IntegrityError
from dvx_dr.site import tree
from dvx_dr.site.tree import FANOUT, HOLE, ID


def entry(n: int) -> bytes:
    return HOLE if n == 0 else hashlib.sha256(n.to_bytes(4, "little")).digest()


@given(st.lists(st.integers(0, 40), min_size=1, max_size=FANOUT),
       st.lists(st.tuples(st.integers(0, FANOUT - 1), st.integers(0, 40)), max_size=60))
def test_changed_entries_are_exactly_the_differing_non_holes(
        base_entries: list[int], changes: list[tuple[int, int]]) -> None:
    new_entries = list(base_entries)
    for at, value in changes:
        new_entries[at % len(new_entries)] = value
    base = b"".join(entry(n) for n in base_entries)
    page = b"".join(entry(n) for n in new_entries)
    expected = [(entry(n), entry(b)) for n, b in zip(new_entries, base_entries, strict=True)
                if n != b and n != 0]
    assert tree.changed_entries(page, base) == expected


def test_without_a_usable_base_every_non_hole_entry_is_changed() -> None:
    page = b"".join(entry(n) for n in (1, 0, 2, 3))
    everything = [(entry(1), None), (entry(2), None), (entry(3), None)]
    assert tree.changed_entries(page, None) == everything
    assert tree.changed_entries(page, page[:ID]) == everything  # another length


def test_a_malformed_page_is_an_integrity_error() -> None:
    with pytest.raises(IntegrityError):
        tree.changed_entries(b"x" * (ID + 1), b"x" * (ID + 1))
