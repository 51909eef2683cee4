"""``site.snapshots.list_snapshots``: a volume's snapshots, or a refusal of an unknown name."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dvx_dr.errors import NotFoundError
from dvx_dr.site import snapshots, volumes
from dvx_dr.site.store import Store


def test_an_unknown_volume_is_refused(new_store: Callable[..., Store]) -> None:
    """It was an empty list (an empty table, exit 0): a typo looked like 'no snapshots'."""
    store = new_store(encrypted=False)
    with pytest.raises(NotFoundError) as err:
        snapshots.list_snapshots(store, "nosuch")
    assert str(err.value) == "unknown volume 'nosuch'; 'dvx-dr volume list' shows the volumes"


def test_a_volume_without_snapshots_lists_none(new_store: Callable[..., Store]) -> None:
    store = new_store(encrypted=False)
    volumes.create(store, "v", 4096)
    assert snapshots.list_snapshots(store, "v") == []


def test_a_deleted_volume_s_snapshots_are_still_listed(new_store: Callable[..., Store]) -> None:
    store = new_store(encrypted=False)
    volumes.create(store, "v", 4096)
    snapshots.create(store, "v", "s1")
    volumes.delete(store, "v")
    assert [s.spec for s in snapshots.list_snapshots(store, "v")] == ["v@s1"]
    assert [s.spec for s in snapshots.list_snapshots(store)] == ["v@s1"]
