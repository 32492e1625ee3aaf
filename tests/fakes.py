"""Test doubles shared by the tests: :class:`InMemoryJobStore`, a complete in-memory
:class:`colmap_pipeline.jobs.JobStore`.

Same semantics as ``database.SqliteJobStore`` (both pass ``tests/test_database.py``): every
status change is a compare-and-set along :data:`~colmap_pipeline.jobs.TRANSITIONS`, an attempt
record is appended in the same write as its transition, progress only grows while processing,
the oldest pending job is claimed first, an ``Idempotency-Key`` is unique among one owner's
jobs not deleted, lists are newest first. Jobs come back as deep copies, so a caller cannot
change the store by mutating one.

Knobs for tests: ``unavailable = True`` makes every call raise
:class:`~colmap_pipeline.jobs.StoreUnavailable` (and :meth:`ping` answer False), as a database
that went away would.
"""
from __future__ import annotations

import asyncio
import copy
import itertools
import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from colmap_pipeline.job_events import (
    PRUNE_EVENTS_ON,
    EventKind,
    JobEvent,
    attempt_event,
    event_state,
    transition_events,
)
from colmap_pipeline.jobs import (
    EVENT_PAGE,
    JSON_COLUMNS,
    MAX_PAGE_BOUND,
    TERMINAL,
    TRANSITIONS,
    WITH_FILES,
    DuplicateKey,
    Intent,
    Job,
    JobStatus,
    Stamp,
    StoreUnavailable,
    encode_json,
    new_job_record,
    planned_changes,
    utcnow,
)


def _json_copy(value: Any) -> Any:
    """``value`` after a trip through JSON text, as a database's JSON column returns it (and
    raising TypeError where a database store would)."""
    return json.loads(encode_json(value))


class InMemoryJobStore:
    """A :class:`~colmap_pipeline.jobs.JobStore` held in a dict; no I/O.

    Each method yields to the event loop once before it acts (as a real store would while it
    waits for its database), then acts without another await, so every operation is atomic.
    """

    def __init__(self, clock: Callable[[], str] = utcnow) -> None:
        self._jobs: dict[str, Job] = {}
        self._seq: dict[str, int] = {}
        self._counter = itertools.count()
        self._clock = clock
        self.unavailable = False
        self.closed = False
        self.events: list[JobEvent] = []  # every job's, in event_id order
        self._event_ids = itertools.count(1)
        self._event_flags: dict[str, set[asyncio.Event]] = {}

    async def _enter(self) -> None:
        await asyncio.sleep(0)
        if self.unavailable:
            raise StoreUnavailable("in-memory store marked unavailable")

    @staticmethod
    def _copy(job: Job | None) -> Job | None:
        return copy.deepcopy(job)

    def _sorted(self, jobs: list[Job], *, newest_first: bool) -> list[Job]:
        return sorted(jobs, key=lambda j: (j.created_at, self._seq[j.job_id]),
                      reverse=newest_first)

    # ---- protocol ---------------------------------------------------------------------------
    async def close(self) -> None:
        """Mark closed (the data stays, for assertions)."""
        self.closed = True

    async def ping(self) -> bool:
        """False when marked unavailable; never raises."""
        await asyncio.sleep(0)
        return not self.unavailable

    async def create_job(self, job: Mapping[str, Any]) -> Job:
        """Insert a new ``pending`` job; :class:`DuplicateKey` on a taken id, or a key the same
        owner holds (a delete clears the key, as in the databases' unique index)."""
        await self._enter()
        row = new_job_record(job, self._clock())
        if row["job_id"] in self._jobs:
            raise DuplicateKey(f"job_id {row['job_id']!r} exists")
        key, owner = row["idempotency_key"], row["owner"]
        if key is not None and any(j.idempotency_key == key and (j.owner or "") == (owner or "")
                                   for j in self._jobs.values()):  # COALESCE(owner, '')
            raise DuplicateKey(f"idempotency_key {key!r} is held by another job")
        row["status"] = JobStatus(row["status"])
        for col in JSON_COLUMNS:
            if row[col] is not None:
                row[col] = _json_copy(row[col])
        stored = Job(**copy.deepcopy(row))
        self._jobs[stored.job_id] = stored
        self._seq[stored.job_id] = next(self._counter)
        self._add_events(stored, transition_events(vars(stored), intent=None))
        return copy.deepcopy(stored)

    async def get_job(self, job_id: str) -> Job | None:
        """The job (a copy), or ``None``."""
        await self._enter()
        return self._copy(self._jobs.get(job_id))

    async def list_jobs(self, *, project_id: str | None = None, status: str | None = None,
                        owner: str | None = None, limit: int = 50,
                        offset: int = 0) -> tuple[list[Job], int]:
        """Jobs newest first, filtered (``owner=None``: every owner); ``(page, total)``; bounds
        clamped like SQLite's. Deleted jobs only when ``status="deleted"`` asks for them."""
        await self._enter()
        limit = max(0, min(int(limit), MAX_PAGE_BOUND))
        offset = max(0, min(int(offset), MAX_PAGE_BOUND))
        rows = [j for j in self._jobs.values()
                if (project_id is None or j.project_id == project_id)
                and (owner is None or j.owner == owner)
                and (j.status == status if status is not None
                     else j.status != JobStatus.DELETED)]
        rows = self._sorted(rows, newest_first=True)
        return [copy.deepcopy(j) for j in rows[offset:offset + limit]], len(rows)

    async def queue_position(self, job_id: str) -> int | None:
        """1-based position among pending jobs, oldest first; ``None`` when not pending."""
        await self._enter()
        job = self._jobs.get(job_id)
        if job is None or job.status != JobStatus.PENDING:
            return None
        pending = self._sorted([j for j in self._jobs.values() if j.status == JobStatus.PENDING],
                               newest_first=False)
        return [j.job_id for j in pending].index(job_id) + 1

    async def count_by_status(self) -> dict[str, int]:
        """``{status: count}``; statuses without a job are absent."""
        await self._enter()
        counts: dict[str, int] = {}
        for j in self._jobs.values():
            counts[j.status.value] = counts.get(j.status.value, 0) + 1
        return counts

    async def apply(self, job_id: str, intent: Intent, *,
                    attempt_record: Mapping[str, Any] | None = None, **fields: Any) -> bool:
        """Compare-and-set along ``intent`` (see the protocol)."""
        await self._enter()
        return self._apply_now(job_id, intent, attempt_record, fields)

    def _apply_now(self, job_id: str, intent: Intent,
                   attempt_record: Mapping[str, Any] | None, fields: Mapping[str, Any]) -> bool:
        changes = planned_changes(intent, fields, with_attempt_record=attempt_record is not None)
        record = _json_copy(dict(attempt_record)) if attempt_record is not None else None
        job = self._jobs.get(job_id)
        if job is None or job.status not in TRANSITIONS[Intent(intent)].sources:
            return False
        now = self._clock()
        for col, value in changes.items():
            setattr(job, col, self._resolve(col, getattr(job, col), value, now))
        job.status = JobStatus(job.status)
        if record is not None:
            job.attempts.append(record)
        self._add_events(job, transition_events(vars(job), intent=Intent(intent), record=record))
        if Intent(intent) in PRUNE_EVENTS_ON:
            newest = max(e.event_id for e in self.events if e.job_id == job_id)
            self.events = [e for e in self.events
                           if e.job_id != job_id or e.event_id == newest]
        return True

    @staticmethod
    def _resolve(col: str, current: Any, value: Any, now: str) -> Any:
        if value is Stamp.NOW:
            return now
        if value is Stamp.NOW_IF_UNSET:
            return current or now
        if value is Stamp.INCREMENT:
            return int(current) + 1
        if col in JSON_COLUMNS and value is not None:
            return _json_copy(value)  # what a database would store and give back
        return copy.deepcopy(value)

    async def claim_next_pending(self) -> Job | None:
        """Claim the oldest pending job (``attempt`` + 1, progress 0)."""
        await self._enter()
        pending = self._sorted([j for j in self._jobs.values() if j.status == JobStatus.PENDING],
                               newest_first=False)
        if not pending:
            return None
        job_id = pending[0].job_id
        self._apply_now(job_id, Intent.CLAIM, None, {})
        return self._copy(self._jobs[job_id])

    async def update_progress(self, job_id: str, progress: int, current_stage: str,
                              message: str) -> bool:
        """``progress = max(stored, clamp(progress))`` while processing."""
        await self._enter()
        job = self._jobs.get(job_id)
        if job is None or job.status != JobStatus.PROCESSING:
            return False
        job.progress = max(job.progress, max(0, min(100, int(progress))))
        job.current_stage, job.message, job.updated_at = current_stage, message, self._clock()
        self._add_events(job, [(EventKind.PROGRESS, event_state(vars(job)))])
        return True

    async def append_attempt(self, job_id: str, record: Mapping[str, Any]) -> bool:
        """Append one attempt record; False for an unknown job."""
        await self._enter()
        job = self._jobs.get(job_id)
        if job is None:
            return False
        job.attempts.append(_json_copy(dict(record)))
        job.updated_at = self._clock()
        self._add_events(job, [attempt_event(vars(job), job.attempts[-1])])
        return True

    async def requeue_processing(self) -> list[str]:
        """Every processing job back to pending; their ids, in insertion order."""
        await self._enter()
        ids = [j.job_id for j in self._sorted(list(self._jobs.values()), newest_first=False)
               if j.status == JobStatus.PROCESSING]
        for job_id in ids:
            self._apply_now(job_id, Intent.REQUEUE, None,
                            {"message": "Requeued after a server restart"})
        return ids

    async def set_pgid(self, job_id: str, pgid: int | None) -> None:
        """Record or clear the stage child's process group."""
        await self._enter()
        if job_id in self._jobs:
            self._jobs[job_id].pgid = pgid

    async def recorded_pgids(self) -> list[tuple[str, int]]:
        """``[(job_id, pgid)]`` still recorded, in insertion order."""
        await self._enter()
        return [(j.job_id, j.pgid) for j in
                self._sorted(list(self._jobs.values()), newest_first=False)
                if j.pgid is not None]

    def _live_by_key(self, key: str, owner: str | None) -> Job | None:
        for j in self._jobs.values():
            if j.idempotency_key == key and j.owner == owner and j.status != JobStatus.DELETED:
                return j
        return None

    async def find_by_idempotency_key(self, key: str, owner: str | None = None) -> Job | None:
        """The job not deleted that ``owner`` created with this key (``None`` is an owner of
        its own), or ``None``."""
        await self._enter()
        return self._copy(self._live_by_key(key, owner))

    async def bump_attempt(self, job_id: str, *, auto_retry: bool) -> int:
        """Another attempt of a processing job in place; the new number, 0 if not processing."""
        await self._enter()
        job = self._jobs.get(job_id)
        if job is None or job.status != JobStatus.PROCESSING:
            return 0
        now = self._clock()
        job.attempt += 1
        job.auto_retries += 1 if auto_retry else 0
        job.started_at = job.updated_at = now
        self._add_events(job, [attempt_event(vars(job), None)])
        return job.attempt

    async def finished_before(self, cutoff_iso: str) -> list[str]:
        """Terminal jobs finished before ``cutoff_iso``, oldest first."""
        await self._enter()
        done = [j for j in self._jobs.values() if j.status in TERMINAL
                and j.finished_at is not None and j.finished_at < cutoff_iso]
        return [j.job_id for j in sorted(done, key=lambda j: (j.finished_at or "",
                                                               self._seq[j.job_id]))]

    async def job_ids_with_files(self) -> set[str]:
        """Every job whose files stay on disk."""
        await self._enter()
        return {j.job_id for j in self._jobs.values() if j.status in WITH_FILES}

    # --- events (issue 16) ---
    def _add_events(self, job: Job, events: list[tuple[EventKind, dict[str, Any]]]) -> None:
        """Append ``events`` of ``job`` (ids one past the last) and wake its waiters."""
        now = self._clock()
        for kind, data in events:
            self.events.append(JobEvent(event_id=next(self._event_ids), job_id=job.job_id,
                                        created_at=now, kind=kind, data=_json_copy(data)))
        for flag in self._event_flags.get(job.job_id, ()):
            flag.set()

    async def events_after(self, job_id: str, after_id: int,
                           limit: int = EVENT_PAGE) -> list[JobEvent]:
        """The job's events newer than ``after_id``, oldest first, at most ``limit``."""
        await self._enter()
        limit = max(1, min(int(limit), EVENT_PAGE))
        return copy.deepcopy([e for e in self.events
                              if e.job_id == job_id and e.event_id > after_id][:limit])

    async def latest_event(self, job_id: str) -> JobEvent | None:
        """The job's newest event, or ``None``."""
        await self._enter()
        mine = [e for e in self.events if e.job_id == job_id]
        return copy.deepcopy(mine[-1]) if mine else None

    @asynccontextmanager
    async def event_waiter(self, job_id: str) -> AsyncIterator[_FlagWaiter]:
        """A waiter woken by every new event of the job (as a ``NOTIFY`` would)."""
        waiter = _FlagWaiter(self, job_id)
        self._event_flags.setdefault(job_id, set()).add(waiter.flag)
        try:
            yield waiter
        finally:
            self._event_flags[job_id].discard(waiter.flag)


class _FlagWaiter:
    """The in-memory store's event waiter."""

    def __init__(self, store: InMemoryJobStore, job_id: str) -> None:
        self.store, self.job_id = store, job_id
        self.flag = asyncio.Event()

    async def wait(self, after_id: int, timeout_s: float) -> bool:
        """True as soon as the job has an event newer than ``after_id``; False after
        ``timeout_s`` s without one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        while True:
            self.flag.clear()
            if any(e.job_id == self.job_id and e.event_id > after_id for e in self.store.events):
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self.flag.wait(), left)
            except TimeoutError:
                return False
