"""The distributed job queue of PostgreSQL mode: procrastinate 3.10 (PostgreSQL only, no broker).

A job row (the store's ``jobs`` table) stays the one truth about a job; a procrastinate job is
only its ticket in the queue. Each ticket runs task :data:`TASK_RUN` with ``job_id`` on queue
:data:`QUEUE_JOBS`, with ``lock = queueing_lock = job_id``: procrastinate never starts two
tickets with one lock at once (``procrastinate_fetch_job``: no ``doing`` job may hold the lock)
and keeps at most one waiting ticket per job (unique index on ``queueing_lock`` among ``todo``
jobs), so a job never runs on two replicas at once and is never queued twice.

- :func:`defer_on` puts the ticket in the queue on the caller's connection, inside the
  caller's transaction (the store calls it right after inserting a job row or moving one back
  to ``pending``): no row without its ticket, and no ticket without its row.
- :class:`JobQueue` aborts a job's ticket (cancel, delete: ``cancel_job_by_id(abort=True)``;
  the owning worker gets a NOTIFY and cancels the task), finds the tickets of dead workers
  (:meth:`JobQueue.stalled`, by worker heartbeat) and queues tickets again.

Sources: procrastinate 3.10.0 (``procrastinate/manager.py``, ``worker.py``,
``sql/queries.sql``: ``select_stalled_jobs_by_heartbeat``, ``cancel_job``; docs "Retry stalled
jobs", "Define a task that runs periodically"). The web/intake layers never import this module.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import procrastinate
import psycopg
from procrastinate import exceptions as pexc
from procrastinate import jobs as pjobs
from procrastinate.schema import SchemaManager

log = logging.getLogger("colmap_worker.queue")

#: the queue of the job tickets (one slot of ``MAX_CONCURRENT_JOBS`` each)
QUEUE_JOBS = "colmap_jobs"
#: the queue of the periodic stall sweep (its own one-slot worker per replica)
QUEUE_SWEEPS = "colmap_sweeps"
#: task name of a job ticket; its one argument is ``job_id``
TASK_RUN = "colmap.run_job"
#: task name of the periodic stall sweep
TASK_SWEEP = "colmap.sweep_stalled"
#: queueing lock of the sweep: at most one sweep waits in the queue, whatever the replicas
SWEEP_LOCK = "colmap.sweep_stalled"
#: task name of the periodic webhook pass (issue 16: deliveries run through the queue)
TASK_WEBHOOKS = "colmap.deliver_webhooks"
#: queueing lock of the webhook pass: at most one pass waits in the queue
WEBHOOKS_LOCK = "colmap.deliver_webhooks"
#: advisory lock key held while one replica installs procrastinate's schema (any constant)
SCHEMA_LOCK_KEY = 0x636F6C6D6170  # "colmap"
#: ticket statuses that mean the job is still in the queue or running
LIVE = frozenset({pjobs.Status.TODO.value, pjobs.Status.DOING.value})

#: what a store calls inside its transaction when a row becomes ``pending``
OnPending = Callable[[Any, str], Awaitable[None]]


def connector(dsn: str) -> procrastinate.PsycopgConnector:
    """A procrastinate connector with its own small pool on ``dsn`` (``postgresql://…``).

    The pool holds the worker's LISTEN connection plus fetches, heartbeats and aborts:
    ``min_size=1, max_size=4`` is enough for one replica's two workers.
    """
    return procrastinate.PsycopgConnector(conninfo=dsn, min_size=1, max_size=4)


def new_app(dsn: str) -> procrastinate.App:
    """The procrastinate app of this service (tasks are registered by the runner)."""
    return procrastinate.App(connector=connector(dsn))


async def ensure_schema(dsn: str) -> bool:
    """Install procrastinate's schema in the database once (idempotent, safe when several
    replicas start together: a session advisory lock serializes them). Returns True when this
    call installed it.

    Raises: psycopg.Error when the database cannot be reached.
    """
    schema = SchemaManager.get_schema()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK_KEY,))
        try:
            cur = await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
            row = await cur.fetchone()
            if row is not None and row[0]:
                return False
            async with conn.transaction():
                await conn.execute(schema)
            log.info("installed procrastinate's schema")
            return True
        finally:
            await conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK_KEY,))


def _ticket(app: procrastinate.App, job_id: str, connection: Any | None) -> pjobs.JobDeferrer:
    return app.configure_task(TASK_RUN, queue=QUEUE_JOBS, lock=job_id, queueing_lock=job_id,
                              connection=connection)


def make_defer_on(app: procrastinate.App) -> OnPending:
    """The store's ``on_pending`` hook: ``await hook(conn, job_id)`` queues ``job_id``'s ticket
    on ``conn`` (a ``psycopg.AsyncConnection`` inside the store's open transaction).

    The insert runs in a savepoint: when the job already has a waiting ticket
    (``AlreadyEnqueued``), only the savepoint rolls back and the caller's transaction goes on.
    Other errors propagate (the store rolls back and raises StoreError).
    """
    async def defer_on(conn: Any, job_id: str) -> None:
        try:
            async with conn.transaction():  # a SAVEPOINT inside the caller's transaction
                await _ticket(app, job_id, conn).defer_async(job_id=job_id)
        except pexc.AlreadyEnqueued:
            log.debug("job %s already has a waiting ticket", job_id)
    return defer_on


@dataclass(frozen=True)
class Stalled:
    """A ticket whose worker stopped heartbeating: procrastinate's ticket id and our job id
    (``None`` for a ticket of another task)."""

    ticket_id: int
    job_id: str | None


class JobQueue:
    """Queue operations on the procrastinate app (open it with :meth:`open`).

    Args:
        app: the procrastinate app (:func:`new_app`).
    """

    def __init__(self, app: procrastinate.App) -> None:
        self.app = app

    async def open(self) -> None:
        """Open the app's connection pool."""
        await self.app.open_async()

    async def close(self) -> None:
        """Close the app's connection pool."""
        await self.app.close_async()

    async def defer(self, job_id: str) -> bool:
        """Queue a ticket for ``job_id`` outside any transaction (the reconcile path); False
        when one is already waiting."""
        try:
            await _ticket(self.app, job_id, None).defer_async(job_id=job_id)
        except pexc.AlreadyEnqueued:
            return False
        return True

    async def tickets(self, job_id: str) -> list[pjobs.Job]:
        """The job's tickets still waiting or running (``todo``/``doing``)."""
        found = await self.app.job_manager.list_jobs_async(task=TASK_RUN, lock=job_id)
        return [t for t in found if t.status in LIVE]

    async def abort(self, job_id: str) -> int:
        """Withdraw the job's waiting ticket and ask the worker running it to abort it (a
        NOTIFY reaches it at once; it also polls ``procrastinate_jobs.abort_requested``).
        Returns the number of tickets concerned."""
        n = 0
        for ticket in await self.tickets(job_id):
            if ticket.id is not None and await self.app.job_manager.cancel_job_by_id_async(
                    ticket.id, abort=True):
                n += 1
        return n

    async def running_elsewhere(self, job_id: str) -> bool:
        """True while some worker still runs one of the job's tickets (``doing``)."""
        return any(t.status == pjobs.Status.DOING.value for t in await self.tickets(job_id))

    async def stalled(self, stall_timeout_s: float) -> list[Stalled]:
        """Tickets ``doing`` on a worker whose last heartbeat is older than
        ``stall_timeout_s`` (or whose worker row was pruned)."""
        found = await self.app.job_manager.get_stalled_jobs(
            seconds_since_heartbeat=stall_timeout_s)
        out = []
        for t in found:
            job_id = t.task_kwargs.get("job_id") if t.task_name == TASK_RUN else None
            if t.id is not None:
                out.append(Stalled(t.id, job_id if isinstance(job_id, str) else None))
        return out

    async def retire(self, ticket_id: int) -> None:
        """End a stalled ticket as ``failed`` (its job was queued again with a new ticket, or
        ended), which frees its lock."""
        try:
            await self.app.job_manager.finish_job_by_id_async(
                ticket_id, status=pjobs.Status.FAILED, delete_job=False)
        except pexc.ConnectorException as exc:  # another sweep retired it first
            log.debug("ticket %s already retired: %s", ticket_id, exc)
