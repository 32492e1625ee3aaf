"""The SQLite store's event subscription (issue 16): a stream waiting for a job's new events
polls every :data:`EVENT_POLL_S` s on a reader thread (one indexed query); SQLite has no
``LISTEN``/``NOTIFY``.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the waiter's annotation only: sqlite imports this module
    from .sqlite import SqliteJobStore


#: seconds between two looks for new events of a job a stream waits on (SQLite mode polls)
EVENT_POLL_S = 0.5


class PollingWaiter:
    """:class:`~colmap_pipeline.job_events.EventWaiter` of the SQLite store: polls."""

    def __init__(self, store: SqliteJobStore, job_id: str) -> None:
        self._store, self._job_id = store, job_id

    async def wait(self, after_id: int, timeout_s: float) -> bool:
        """Look every :data:`EVENT_POLL_S` s for an event newer than ``after_id``, at most
        ``timeout_s`` s (at least one look); whether one came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        while True:
            if await self._store.has_events_after(self._job_id, after_id):
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            await asyncio.sleep(min(EVENT_POLL_S, left))
