"""A procrastinate worker that rides out a lost database instead of stopping.

procrastinate 3.10's :class:`procrastinate.worker.Worker` stops as soon as one of its side
tasks (heartbeat, LISTEN connection, periodic deferrer) or a job fetch raises, and then waits
for its running jobs without sending heartbeats. After a short PostgreSQL outage its jobs would
look stalled to the other replicas (``QUEUE_STALL_TIMEOUT_S``) although they still run here,
and would be run twice. This subclass keeps each of those loops alive: a failed heartbeat,
listen or fetch is logged and tried again (after :data:`RETRY_S`), so the replica resumes
heartbeating and claiming as soon as the database answers again.

It overrides private methods of procrastinate 3.10.0 (``worker.py``: ``_update_heartbeat``,
``_periodic_deferrer``, ``_start_side_tasks``, ``_fetch_and_process_jobs``); the version is
pinned in requirements.txt and ``tests/test_queue.py`` checks the behaviour.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg
from procrastinate.exceptions import ConnectorException
from procrastinate.worker import Worker

log = logging.getLogger("colmap_worker.queue")

#: seconds before a failed listen or periodic-defer loop starts again
RETRY_S = 1.0
#: what a lost database raises through procrastinate (wrapped or not; the pool's PoolTimeout
#: is a psycopg.OperationalError)
DB_ERRORS = (ConnectorException, psycopg.Error, OSError)


class ResilientWorker(Worker):
    """:class:`procrastinate.worker.Worker` whose loops survive database errors (module
    docstring). Same constructor."""

    async def _update_heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.update_heartbeat_interval)
            if self.worker_id is None:
                continue
            try:
                await self.app.job_manager.update_heartbeat(self.worker_id)
            except DB_ERRORS as exc:
                log.warning("worker %s: heartbeat failed (%s); trying again", self.worker_id,
                            exc)

    async def _periodic_deferrer(self) -> Any:
        while True:
            try:
                return await super()._periodic_deferrer()
            except DB_ERRORS as exc:
                log.warning("periodic deferrer: %s; trying again in %.0f s", exc, RETRY_S)
                await asyncio.sleep(RETRY_S)

    async def _listen_forever(self) -> None:
        while True:
            try:
                await self.app.job_manager.listen_for_jobs(
                    on_notification=self._handle_notification, queues=self.queues)
            except DB_ERRORS as exc:
                log.warning("LISTEN connection lost (%s); again in %.0f s", exc, RETRY_S)
            await asyncio.sleep(RETRY_S)

    def _start_side_tasks(self) -> list[asyncio.Task[Any]]:
        listen, self.listen_notify = self.listen_notify, False
        try:
            tasks = super()._start_side_tasks()
        finally:
            self.listen_notify = listen
        if listen:
            tasks.append(asyncio.create_task(self._listen_forever(), name="listener"))
        return tasks

    async def _fetch_and_process_jobs(self) -> None:
        try:
            await super()._fetch_and_process_jobs()
        except DB_ERRORS as exc:  # the slot was released; the next poll tries again
            log.warning("fetching a job failed (%s); trying at the next poll", exc)
