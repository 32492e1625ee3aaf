"""QueuedStore: the PostgreSQL job store as every caller sees it in PostgreSQL mode, keeping
each ``pending`` row and its queue ticket together.

- ``create_job`` inserts the row and queues its ticket in ONE transaction: the store runs the
  queue's defer on its own connection before the commit (the store's ``in_transaction`` seam,
  ``/work/notes/store_seam.md``), so an upload never leaves a job without its ticket or a
  ticket without its job (an idempotent replay or a failed insert queues nothing).
- ``apply`` of an intent that leads back to ``pending`` (a client's retry, a requeue at drain,
  backoff or a lost replica) queues a ticket right after the row moved; should the process die
  in between, the periodic sweep (:mod:`.worker`) queues the missing ticket.

Everything else is passed through unchanged. The intake and web layers keep calling the
:class:`~..jobs.JobStore` protocol and never see the queue.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from ..job_events import EventWaiter, JobEvent
from ..jobs import EVENT_PAGE, TRANSITIONS, Intent, Job, JobStatus, JobStore
from .queue import JobQueue, OnPending

log = logging.getLogger("colmap_worker.queue")

#: intents whose target is ``pending`` (each needs a ticket)
TO_PENDING = frozenset(i for i, t in TRANSITIONS.items() if t.target == JobStatus.PENDING)


class TransactionalStore(JobStore, Protocol):
    """A job store whose ``create_job`` runs a callback in its insert's transaction
    (``stores.postgres.PostgresJobStore``)."""

    async def create_job(self, job: Mapping[str, Any], *,
                         in_transaction: Callable[[Any, Job], Awaitable[None]] | None = None,
                         ) -> Job:
        """Insert the job; ``await in_transaction(conn, job)`` before the commit."""


class QueuedStore:
    """A :class:`~..jobs.JobStore` (module docstring).

    Args:
        inner: the PostgreSQL store.
        queue: the opened job queue.
        defer_on: the queue's in-transaction defer (:func:`.queue.make_defer_on`).
    """

    def __init__(self, inner: TransactionalStore, queue: JobQueue, defer_on: OnPending) -> None:
        self.inner = inner
        self.queue = queue
        self._defer_on = defer_on

    async def create_job(self, job: Mapping[str, Any]) -> Job:
        """Insert the row and its ticket in one transaction (module docstring).

        Raises: as the store's ``create_job``; StoreError (from the store) when the ticket
        could not be queued, the row rolled back with it.
        """
        async def ticket(conn: Any, inserted: Job) -> None:
            await self._defer_on(conn, inserted.job_id)
        return await self.inner.create_job(job, in_transaction=ticket)

    async def apply(self, job_id: str, intent: Intent, *,
                    attempt_record: Mapping[str, Any] | None = None, **fields: Any) -> bool:
        """The store's compare-and-set; a job moved back to ``pending`` gets its ticket."""
        moved = await self.inner.apply(job_id, intent, attempt_record=attempt_record, **fields)
        if moved and Intent(intent) in TO_PENDING:
            await self._ticket(job_id)
        return moved

    async def requeue_processing(self) -> list[str]:
        """The store's boot requeue (not used by the queue runner), each with its ticket."""
        ids = await self.inner.requeue_processing()
        for job_id in ids:
            await self._ticket(job_id)
        return ids

    async def _ticket(self, job_id: str) -> None:
        try:
            await self.queue.defer(job_id)
        except Exception:  # the sweep queues it later
            log.exception("job %s: could not queue its ticket; the sweep will", job_id)

    # ---- passed through ---------------------------------------------------------------------
    async def close(self) -> None:
        """Close the store."""
        await self.inner.close()

    async def ping(self) -> bool:
        """The store's ping."""
        return await self.inner.ping()

    async def get_job(self, job_id: str) -> Job | None:
        """The store's job."""
        return await self.inner.get_job(job_id)

    async def list_jobs(self, *, project_id: str | None = None, status: str | None = None,
                        owner: str | None = None, limit: int = 50,
                        offset: int = 0) -> tuple[list[Job], int]:
        """The store's page of jobs."""
        return await self.inner.list_jobs(project_id=project_id, status=status, owner=owner,
                                          limit=limit, offset=offset)

    async def queue_position(self, job_id: str) -> int | None:
        """The store's queue position."""
        return await self.inner.queue_position(job_id)

    async def count_by_status(self) -> dict[str, int]:
        """The store's counts."""
        return await self.inner.count_by_status()

    async def claim_next_pending(self) -> Job | None:
        """The store's claim (not used by the queue runner: tickets name their job)."""
        return await self.inner.claim_next_pending()

    async def update_progress(self, job_id: str, progress: int, current_stage: str,
                              message: str) -> bool:
        """The store's progress write."""
        return await self.inner.update_progress(job_id, progress, current_stage, message)

    async def append_attempt(self, job_id: str, record: Mapping[str, Any]) -> bool:
        """The store's attempt record."""
        return await self.inner.append_attempt(job_id, record)

    async def set_pgid(self, job_id: str, pgid: int | None) -> None:
        """The store's process group record."""
        await self.inner.set_pgid(job_id, pgid)

    async def recorded_pgids(self) -> list[tuple[str, int]]:
        """The store's recorded process groups."""
        return await self.inner.recorded_pgids()

    async def find_by_idempotency_key(self, key: str, owner: str | None = None) -> Job | None:
        """The store's idempotency lookup (the key as ``owner`` sent it)."""
        return await self.inner.find_by_idempotency_key(key, owner)

    async def bump_attempt(self, job_id: str, *, auto_retry: bool) -> int:
        """The store's in-place attempt."""
        return await self.inner.bump_attempt(job_id, auto_retry=auto_retry)

    async def finished_before(self, cutoff_iso: str) -> list[str]:
        """The store's retention query."""
        return await self.inner.finished_before(cutoff_iso)

    async def job_ids_with_files(self) -> set[str]:
        """The store's jobs with files."""
        return await self.inner.job_ids_with_files()

    # --- events (issue 16) ---
    async def events_after(self, job_id: str, after_id: int,
                           limit: int = EVENT_PAGE) -> list[JobEvent]:
        """The store's events of the job after ``after_id``."""
        return await self.inner.events_after(job_id, after_id, limit)

    async def latest_event(self, job_id: str) -> JobEvent | None:
        """The store's newest event of the job."""
        return await self.inner.latest_event(job_id)

    def event_waiter(self, job_id: str) -> AbstractAsyncContextManager[EventWaiter]:
        """The store's waiter for the job's new events (``LISTEN``/``NOTIFY``)."""
        return self.inner.event_waiter(job_id)

    def __getattr__(self, name: str) -> Any:
        """Anything else the store offers (``transaction``, ``pool``, ``conninfo`` …)."""
        return getattr(self.inner, name)
