"""The one thread that touches a site's store while the site serves.

SQLite connections and the store's segment writer are not shared across threads, so every
store operation of the running site goes through ``StoreThread.run``: one worker thread, in
order. Heavy work inside those operations (hashing, zstd, XTS) fans out to the store's own
worker pool, so the event loop only ever awaits.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from dvx_dr.site.store import Store

T = TypeVar("T")


class StoreThread:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dvx-store")
        #: Calls waiting for the thread (submitted, not started): an operation that waits on
        #: its command can tell whether it is holding anything up.
        self.pending = 0
        self._count = threading.Lock()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        waiting = [True]
        with self._count:
            self.pending += 1

        def taken() -> None:  # once: when the thread takes the call, or it is dropped
            with self._count:
                if waiting[0]:
                    waiting[0] = False
                    self.pending -= 1

        def call() -> T:
            taken()
            return fn(*args, **kwargs)

        try:
            return await loop.run_in_executor(self._executor, call)
        finally:
            taken()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self.store.close()
