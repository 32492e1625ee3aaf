"""The PostgreSQL store's event subscriptions (issue 16). Every write that changes a job inserts
its events into ``job_events`` and sends ``NOTIFY job_events, 'JOB_ID'`` in the same
transaction; each store keeps one ``LISTEN`` connection (:class:`EventListener`, opened at the
first stream) that wakes the streams (:class:`NotifiedWaiter`) of this replica, whichever
replica wrote. While that connection is down the waiters poll.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import psycopg

if TYPE_CHECKING:  # the waiter's annotation only: postgres imports this module
    from .postgres import PostgresJobStore

log = logging.getLogger("colmap_worker.store")

#: the ``LISTEN``/``NOTIFY`` channel of new job events; the payload is the job id
EVENT_CHANNEL = "job_events"
#: seconds between two looks for new events while the listening connection is down
EVENT_POLL_S = 0.5
#: first and longest wait (s) before the listening connection is opened again after it was
#: lost (doubling in between)
LISTEN_RETRY_MIN_S, LISTEN_RETRY_MAX_S = 0.25, 5.0


class NotifiedWaiter:
    """:class:`~colmap_pipeline.job_events.EventWaiter` of the PostgreSQL store: ``flag`` is set by
    the listener on a notification for ``job_id`` (and on every (re)connection)."""

    def __init__(self, store: PostgresJobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.flag = asyncio.Event()

    async def wait(self, after_id: int, timeout_s: float) -> bool:
        """True at once when notified since the last call; else wait up to ``timeout_s`` s
        for a notification (polling while the listener is down); whether one came."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        while True:
            if self.flag.is_set():
                self.flag.clear()
                return True
            left = deadline - loop.time()
            if not self.store._listener.connected:
                if await self.store.has_events_after(self.job_id, after_id):
                    return True
                if left <= 0:
                    return False
                try:  # a notification (the listener is back) or the next poll
                    await asyncio.wait_for(self.flag.wait(), min(EVENT_POLL_S, left))
                except TimeoutError:
                    pass
                continue
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.flag.wait(), left)
            except TimeoutError:
                return False


class EventListener:
    """One ``LISTEN`` connection per store (not pooled), opened at the first subscription and
    kept until the store closes. Each notification on :data:`EVENT_CHANNEL` sets the flags of
    the waiters of its job; a lost connection is opened again (backoff up to
    :data:`LISTEN_RETRY_MAX_S`), and every waiter is woken when it is (back), since
    notifications sent meanwhile are lost."""

    def __init__(self, conninfo: str, options: dict[str, Any]) -> None:
        self._conninfo, self._options = conninfo, options
        self._subs: dict[str, set[NotifiedWaiter]] = {}
        self._task: asyncio.Task[None] | None = None
        #: the connection is open and listening
        self.connected = False

    def subscribe(self, waiter: NotifiedWaiter) -> None:
        """Wake ``waiter`` on its job's notifications (starts the listener if needed)."""
        self._subs.setdefault(waiter.job_id, set()).add(waiter)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="job-events-listener")

    def unsubscribe(self, waiter: NotifiedWaiter) -> None:
        """Stop waking ``waiter``."""
        subs = self._subs.get(waiter.job_id)
        if subs is not None:
            subs.discard(waiter)
            if not subs:
                del self._subs[waiter.job_id]

    def _wake_all(self) -> None:
        for subs in self._subs.values():
            for waiter in subs:
                waiter.flag.set()

    async def _run(self) -> None:
        delay = LISTEN_RETRY_MIN_S
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self._conninfo, autocommit=True, connect_timeout=5, **self._options)
                async with conn:
                    await conn.execute(f"LISTEN {EVENT_CHANNEL}")  # a constant of this module
                    self.connected, delay = True, LISTEN_RETRY_MIN_S
                    self._wake_all()  # what was committed before we listened
                    async for note in conn.notifies():
                        for waiter in self._subs.get(note.payload, ()):
                            waiter.flag.set()
            except (psycopg.Error, OSError) as exc:
                log.warning("job events: the LISTEN connection failed (%s); again in %.1f s",
                            exc, delay)
            finally:
                self.connected = False
            self._wake_all()  # the waiters poll until the connection is back
            await asyncio.sleep(delay)
            delay = min(delay * 2, LISTEN_RETRY_MAX_S)

    async def close(self) -> None:
        """Stop listening and close the connection."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
