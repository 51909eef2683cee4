"""What the scheduler reads from the store: when a group's newest scheduled snapshot was
taken comes from the store's own record, never from a name an operator chose."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest

from dvx_dr.replicator import groupstate
from dvx_dr.site import groups, volumes
from dvx_dr.site.store import Store


@pytest.mark.parametrize("name", ["2024-13-01T00:00:00.000000Z",   # no such month
                                  "2099-01-01T00:00:00.000000Z"])  # not yet
def test_a_time_stamp_name_does_not_set_the_schedule(new_store: Callable[..., Store],
                                                     name: str) -> None:
    store = new_store(encrypted=False, block_size=4096)
    volumes.create(store, "v1", 1 << 20)
    before = datetime.now(UTC).replace(microsecond=0)
    groups.create(store, "g", ["v1"], name=name)
    taken = groupstate.newest_scheduled(store, ["g"])["g"]
    assert before <= taken <= datetime.now(UTC)
