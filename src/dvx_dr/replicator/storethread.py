"""The one thread that touches a site's store while the site serves.

SQLite connections and the store's segment writer are not shared across threads, so every
store operation of the running site goes through ``StoreThread.run``: one worker thread, in
order. Heavy work inside those operations (hashing, zstd, XTS) fans out to the store's own
worker pool, so the event loop only ever awaits.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dvx_dr.site.store import Store

T = TypeVar("T")


class StoreThread:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dvx-store")

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()
