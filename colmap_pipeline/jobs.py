"""The one owner of a job's life: its statuses, the transitions between them, the job record
and the :class:`JobStore` protocol every store implements.

Callers name their intent (:class:`Intent`: ``cancel``, ``fail``, ``complete`` …); the store looks
up the allowed source statuses in :data:`TRANSITIONS` and applies the change as one
compare-and-set (``UPDATE … WHERE status IN (…)``, after procrastinate and NodeODM), so two
writers can never both move a job out of the same state. A light leaf: no web, database or
pycolmap import.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class JobStatus(StrEnum):
    """Where a job is in its life. The first five are the deployment guide's."""

    #: waiting for a free worker
    PENDING = "pending"
    #: a worker runs its stages
    PROCESSING = "processing"
    #: results and artifacts are ready
    COMPLETED = "completed"
    #: stopped with an error code, message and hint; may be retried
    FAILED = "failed"
    #: stopped by a client; may be retried
    CANCELLED = "cancelled"
    #: retention removed its files; the row stays
    EXPIRED = "expired"
    #: removed by a client; the row stays as a tombstone
    DELETED = "deleted"


#: statuses after which nothing runs until a client acts
TERMINAL: frozenset[JobStatus] = frozenset(
    {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
#: every status whose files are kept on disk
WITH_FILES: frozenset[JobStatus] = frozenset(
    {JobStatus.PENDING, JobStatus.PROCESSING, *TERMINAL})


class Intent(StrEnum):
    """What a caller wants to do to a job; :data:`TRANSITIONS` says from where, and to what."""

    CLAIM = "claim"          #: a worker takes the oldest pending job
    CANCEL = "cancel"        #: a client stops it
    RETRY = "retry"          #: a client queues a stopped job again
    REQUEUE = "requeue"      #: the server gives a running job back (boot, drain, backoff)
    COMPLETE = "complete"    #: the last stage ended well
    FAIL = "fail"            #: an attempt ended with an error that is not retried
    EXPIRE = "expire"        #: retention removed the files
    DELETE = "delete"        #: a client removed the job


@dataclass(frozen=True)
class Transition:
    """Allowed source statuses of an intent, and the status it leads to."""

    sources: frozenset[JobStatus]
    target: JobStatus


#: The transition table: the only place that says which status may follow which.
TRANSITIONS: Mapping[Intent, Transition] = {
    Intent.CLAIM: Transition(frozenset({JobStatus.PENDING}), JobStatus.PROCESSING),
    Intent.CANCEL: Transition(frozenset({JobStatus.PENDING, JobStatus.PROCESSING}),
                              JobStatus.CANCELLED),
    Intent.RETRY: Transition(frozenset({JobStatus.FAILED, JobStatus.CANCELLED}),
                             JobStatus.PENDING),
    Intent.REQUEUE: Transition(frozenset({JobStatus.PROCESSING}), JobStatus.PENDING),
    Intent.COMPLETE: Transition(frozenset({JobStatus.PROCESSING}), JobStatus.COMPLETED),
    Intent.FAIL: Transition(frozenset({JobStatus.PROCESSING}), JobStatus.FAILED),
    Intent.EXPIRE: Transition(frozenset(TERMINAL), JobStatus.EXPIRED),
    Intent.DELETE: Transition(frozenset(set(JobStatus) - {JobStatus.DELETED}), JobStatus.DELETED),
}


def allowed(intent: Intent, status: str) -> bool:
    """Whether ``intent`` may act on a job in ``status`` (per :data:`TRANSITIONS`)."""
    return status in TRANSITIONS[intent].sources


class StoreError(Exception):
    """The job store failed (database down, disk full, lock timeout). No backend exception
    (``sqlite3``, ``psycopg``) ever leaves a store: it becomes this or a subclass."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or answered with an I/O error; the caller may retry."""


class DuplicateKey(StoreError):
    """An insert collided with a unique key (a job id, or a live ``Idempotency-Key``)."""


@dataclass
class Job:
    """One job row. JSON columns (``video_info``, ``results``, ``attempts``) are decoded.

    Times are ISO-8601 UTC strings. ``input_path`` is the absolute path of the input video or
    photo folder (:class:`..layout.JobDir`).
    """

    job_id: str
    scan_id: str
    project_id: str
    scan_name: str
    quality: str
    status: JobStatus
    progress: int = 0
    current_stage: str | None = None
    message: str | None = None
    user_email: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    error_hint: str | None = None
    error_details: dict[str, Any] | None = None
    created_at: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    updated_at: str = ""
    input_path: str = ""
    input_filename: str | None = None
    input_bytes: int = 0
    input_sha256: str = ""
    video_info: dict[str, Any] | None = None
    results: dict[str, Any] | None = None
    attempt: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)
    pgid: int | None = None
    idempotency_key: str | None = None
    request_fingerprint: str | None = None
    auto_retries: int = 0


class JobStore(Protocol):
    """What the web, intake and runner code may ask of a job store.

    Implemented by ``database.SqliteJobStore`` (embedded mode) and by the in-memory fake in
    ``tests/fakes.py``. Every method may raise :class:`StoreError`; none raises a backend's own
    exception. Status changes go through :meth:`apply` and are validated against
    :data:`TRANSITIONS`.
    """

    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> bool:
        """True when the store answers a trivial query (``/readiness``)."""

    async def create_job(self, job: dict[str, Any]) -> Job:
        """Insert a new ``pending`` job; raises :class:`DuplicateKey` on a taken id or key."""

    async def get_job(self, job_id: str) -> Job | None:
        """The job, or ``None``."""

    async def list_jobs(self, *, project_id: str | None = None, status: str | None = None,
                        limit: int = 50, offset: int = 0) -> tuple[list[Job], int]:
        """Jobs newest first, filtered; ``(page, total matching)``."""

    async def queue_position(self, job_id: str) -> int | None:
        """1-based position among pending jobs, or ``None`` when not pending."""

    async def count_by_status(self) -> dict[str, int]:
        """``{status: count}`` over all jobs."""

    async def apply(self, job_id: str, intent: Intent, *,
                    attempt_record: dict[str, Any] | None = None, **fields: Any) -> bool:
        """Compare-and-set ``job_id`` along ``intent``; set ``fields`` and append
        ``attempt_record`` in the same write. Returns whether the job moved."""

    async def claim_next_pending(self) -> Job | None:
        """Take the oldest pending job into ``processing`` (``attempt`` + 1, progress 0)."""

    async def update_progress(self, job_id: str, progress: int, current_stage: str,
                              message: str) -> bool:
        """Record progress of a processing job (stored as ``max(stored, progress)``)."""

    async def requeue_processing(self) -> list[str]:
        """At boot: every ``processing`` job back to ``pending``; returns their ids."""

    async def set_pgid(self, job_id: str, pgid: int | None) -> None:
        """Record or clear the running stage child's process group."""

    async def recorded_pgids(self) -> list[tuple[str, int]]:
        """``[(job_id, pgid)]`` still recorded."""

    async def find_by_idempotency_key(self, key: str) -> Job | None:
        """The live job created with ``Idempotency-Key: key``."""

    async def bump_attempt(self, job_id: str, *, auto_retry: bool) -> int:
        """Start another attempt of a processing job in place; the new number (0 if not
        processing)."""

    async def finished_before(self, cutoff_iso: str) -> list[str]:
        """Ids of terminal jobs finished before ``cutoff_iso``."""

    async def job_ids_with_files(self) -> set[str]:
        """Ids of every job whose files must stay on disk."""
