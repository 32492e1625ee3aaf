"""The one owner of a job's life: its statuses, the transitions between them, the job record
and the :class:`JobStore` protocol every store implements.

Callers name their intent (:class:`Intent`: ``cancel``, ``fail``, ``complete`` …); the store looks
up the allowed source statuses in :data:`TRANSITIONS` and applies the change as one
compare-and-set (``UPDATE … WHERE status IN (…)``, after procrastinate and NodeODM), so two
writers can never both move a job out of the same state. A light leaf: no web, database or
pycolmap import. A job's events are in :mod:`.job_events`, its webhook outbox in
:mod:`.webhook_outbox`.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the protocol's annotations only: both modules import this one
    from .job_events import EventWaiter, JobEvent
    from .webhook_outbox import WebhookDelivery


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


class Stamp(Enum):
    """A value a store computes at the write itself (see :attr:`Transition.sets`)."""

    NOW = "now"                    #: the store's clock (:func:`utcnow`)
    NOW_IF_UNSET = "now_if_unset"  #: keep a time already stored, else the store's clock
    INCREMENT = "increment"        #: the stored integer + 1


@dataclass(frozen=True)
class Transition:
    """Allowed source statuses of an intent, the status it leads to, and the fields it sets.

    ``sets`` are defaults: a caller's own ``fields`` override them (:func:`planned_changes`).
    Values are plain column values or a :class:`Stamp`.
    """

    sources: frozenset[JobStatus]
    target: JobStatus
    sets: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


def _sets(**values: Any) -> Mapping[str, Any]:
    return MappingProxyType(values)


#: The transition table: the only place that says which status may follow which, and what
#: else a transition changes (a retry clears the previous attempt's error and results, a claim
#: starts a new attempt, an expiry removes the e-mail address with the files, a delete removes
#: it too and frees the ``Idempotency-Key`` for a new upload).
TRANSITIONS: Mapping[Intent, Transition] = MappingProxyType({
    Intent.CLAIM: Transition(
        frozenset({JobStatus.PENDING}), JobStatus.PROCESSING,
        _sets(started_at=Stamp.NOW, attempt=Stamp.INCREMENT, progress=0,
              current_stage="Starting", message="Starting the pipeline")),
    Intent.CANCEL: Transition(
        frozenset({JobStatus.PENDING, JobStatus.PROCESSING}), JobStatus.CANCELLED,
        _sets(finished_at=Stamp.NOW, message="Cancelled by request")),
    Intent.RETRY: Transition(
        frozenset({JobStatus.FAILED, JobStatus.CANCELLED}), JobStatus.PENDING,
        _sets(error_code=None, error_message=None, error_hint=None, error_details=None,
              results=None, finished_at=None, progress=0, current_stage="Queued",
              message="Queued for retry")),
    Intent.REQUEUE: Transition(
        frozenset({JobStatus.PROCESSING}), JobStatus.PENDING,
        _sets(current_stage="Queued", message="Waiting for a free worker")),
    Intent.COMPLETE: Transition(
        frozenset({JobStatus.PROCESSING}), JobStatus.COMPLETED,
        _sets(finished_at=Stamp.NOW, progress=100, current_stage="Completed")),
    Intent.FAIL: Transition(
        frozenset({JobStatus.PROCESSING}), JobStatus.FAILED, _sets(finished_at=Stamp.NOW)),
    Intent.EXPIRE: Transition(
        frozenset(TERMINAL), JobStatus.EXPIRED,
        _sets(user_email=None, message="Files removed by retention")),
    Intent.DELETE: Transition(
        frozenset(set(JobStatus) - {JobStatus.DELETED}), JobStatus.DELETED,
        _sets(finished_at=Stamp.NOW_IF_UNSET, idempotency_key=None, user_email=None,
              message="Deleted by request")),
})


def allowed(intent: Intent, status: str) -> bool:
    """Whether ``intent`` may act on a job in ``status`` (per :data:`TRANSITIONS`)."""
    return status in TRANSITIONS[intent].sources


class StoreError(Exception):
    """The job store failed (database down, disk full, lock timeout). No backend exception
    (``sqlite3``, ``psycopg``) ever leaves a store: it becomes this or a subclass."""


class StoreUnavailable(StoreError):
    """The database cannot be reached or answered with an I/O error; the caller may retry."""


class DuplicateKey(StoreError):
    """An insert collided with a unique key (a job id, or a live ``Idempotency-Key`` of the same
    owner)."""


@dataclass
class Job:
    """One job row. JSON columns (``video_info``, ``results``, ``attempts``) are decoded.

    Times are ISO-8601 UTC strings. ``input_path`` is the absolute path of the input video or
    photo folder (:class:`..layout.JobDir`). ``owner`` is the name of the API key that created
    the job (``None`` when authentication is off); its ``idempotency_key`` is scoped to it.
    ``webhook_url`` is where its terminal events are posted (issue 16; ``None``: nowhere).
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
    owner: str | None = None
    webhook_url: str | None = None


#: every column of the job table, in :class:`Job`'s field order (the schema matches it)
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Job))
#: columns stored as JSON text
JSON_COLUMNS: frozenset[str] = frozenset({"video_info", "results", "attempts", "error_details"})
#: columns a transition may set (the rest belong to the store: id, status, timestamps of record;
#: and the owner, fixed at creation: no write ever hands a job to another key)
SETTABLE: frozenset[str] = frozenset(COLUMNS) - {
    "job_id", "status", "created_at", "updated_at", "owner"}
#: what ``create_job`` needs from its caller
CREATE_REQUIRED: frozenset[str] = frozenset(
    {"job_id", "scan_id", "project_id", "scan_name", "quality", "input_path", "input_bytes",
     "input_sha256"})
#: what ``create_job`` may take from its caller (the rest starts at the defaults below)
CREATE_ALLOWED: frozenset[str] = CREATE_REQUIRED | {
    "user_email", "input_filename", "video_info", "idempotency_key", "request_fingerprint",
    "owner", "webhook_url"}


def encode_json(value: Any) -> str:
    """JSON text of a JSON column's value (:data:`JSON_COLUMNS`, attempt records); pydantic
    models are dumped with ``model_dump(mode="json")`` (duck-typed: no pydantic import here).

    Raises: TypeError for a value JSON cannot hold.
    """
    def default(obj: Any) -> Any:
        if hasattr(obj, "model_dump"):
            return obj.model_dump(mode="json")
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")
    return json.dumps(value, default=default, separators=(",", ":"))


def utc_iso(moment: datetime) -> str:
    """``moment`` (timezone-aware) as the one stored time format: ISO-8601 UTC with
    microseconds, so stored times compare correctly as text."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def utcnow() -> str:
    """Current UTC time in the stored format (:func:`utc_iso`)."""
    return utc_iso(datetime.now(UTC))


def new_job_record(job: Mapping[str, Any], now: str) -> dict[str, Any]:
    """The full column values of a new ``pending`` job (every store inserts exactly this).

    Args:
        job: :data:`CREATE_REQUIRED` keys, optionally :data:`CREATE_ALLOWED` ones.
        now: the creation time (:func:`utcnow`).
    Returns: ``{column: value}`` for every column of :data:`COLUMNS` (JSON ones not encoded).
    Raises: ValueError naming missing or unknown keys.
    """
    missing = CREATE_REQUIRED - set(job)
    unknown = set(job) - CREATE_ALLOWED
    if missing or unknown:
        raise ValueError(f"create_job: missing {sorted(missing)}, unknown {sorted(unknown)}")
    defaults = Job(job_id="", scan_id="", project_id="", scan_name="", quality="",
                   status=JobStatus.PENDING)
    row = {c: getattr(defaults, c) for c in COLUMNS}
    row.update(job)
    row.update(status=JobStatus.PENDING.value, progress=0, current_stage="Queued",
               message="Waiting for a free worker", created_at=now, updated_at=now,
               attempts=[])
    return row


def planned_changes(intent: Intent, changes: Mapping[str, Any], *,
                    with_attempt_record: bool = False) -> dict[str, Any]:
    """What ``apply(job_id, intent, **changes)`` writes: the intent's defaults
    (:attr:`Transition.sets`), overridden by ``changes``, plus the new ``status`` and
    ``updated_at`` (:attr:`Stamp.NOW`).

    Raises: ValueError for an unknown intent, a column outside :data:`SETTABLE`, or
    ``attempts`` given together with an attempt record (``with_attempt_record``).
    """
    transition = TRANSITIONS[Intent(intent)]
    bad = set(changes) - SETTABLE
    if bad:
        raise ValueError(f"apply({intent}): cannot set {sorted(bad)}")
    if with_attempt_record and "attempts" in changes:
        raise ValueError(f"apply({intent}): pass attempts or attempt_record, not both")
    return {**transition.sets, **changes, "status": transition.target.value,
            "updated_at": Stamp.NOW}


#: the most events one :meth:`JobStore.events_after` call returns (issue 16)
EVENT_PAGE = 500


class JobStore(Protocol):
    """What the web, intake and runner code may ask of a job store.

    Implemented by ``database.SqliteJobStore`` (embedded mode) and by the in-memory fake in
    ``tests/fakes.py``; ``tests/test_database.py`` is the contract every store passes. Every
    method may raise :class:`StoreError` (:class:`StoreUnavailable` when the database cannot be
    reached); none raises a backend's own exception. Status changes go through :meth:`apply`
    and are validated against :data:`TRANSITIONS`. Jobs come back as :class:`Job` copies:
    changing one never changes the store.
    """

    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> bool:
        """True when the store answers a trivial query (``/readiness``); never raises."""

    async def create_job(self, job: Mapping[str, Any]) -> Job:
        """Insert a new ``pending`` job (:func:`new_job_record`).

        Raises: :class:`DuplicateKey` on a taken ``job_id``, or an ``idempotency_key`` held by
        a job not deleted of the same ``owner`` (``None`` counts as one owner); ValueError on
        missing/unknown keys.
        """

    async def get_job(self, job_id: str) -> Job | None:
        """The job, or ``None``."""

    async def list_jobs(self, *, project_id: str | None = None, status: str | None = None,
                        owner: str | None = None, limit: int = 50,
                        offset: int = 0) -> tuple[list[Job], int]:
        """Jobs newest first (``created_at``, then insertion order), filtered (``owner=None``:
        every owner; a name: only that owner's jobs); ``(page, total matching)``. Deleted jobs
        (tombstones) are left out and not counted unless ``status="deleted"`` asks for them.
        ``limit`` and ``offset`` are clamped to ``0 .. MAX_PAGE_BOUND`` (an offset past the end
        gives an empty page, never an error)."""

    async def queue_position(self, job_id: str) -> int | None:
        """1-based position among pending jobs (oldest first), or ``None`` when not pending."""

    async def count_by_status(self) -> dict[str, int]:
        """``{status: count}`` over all jobs (statuses with no job are absent)."""

    async def apply(self, job_id: str, intent: Intent, *,
                    attempt_record: Mapping[str, Any] | None = None, **fields: Any) -> bool:
        """Compare-and-set ``job_id`` along ``intent``: only when its status is one of the
        intent's sources, move it to the target and write :func:`planned_changes` (the
        intent's defaults overridden by ``fields``), appending ``attempt_record`` to
        ``attempts`` in the same write. Returns whether the job moved (False: unknown job or
        another status; nothing written).

        Raises: ValueError for a field outside :data:`SETTABLE`.
        """

    async def claim_next_pending(self) -> Job | None:
        """Apply :attr:`Intent.CLAIM` to the oldest pending job (``attempt`` + 1, progress 0,
        ``started_at`` now); the claimed job, or ``None`` when nothing is pending."""

    async def update_progress(self, job_id: str, progress: int, current_stage: str,
                              message: str) -> bool:
        """Record progress of a processing job: progress (clamped to 0-100) is stored as
        ``max(stored, progress)``. Returns False (nothing written) when not processing."""

    async def append_attempt(self, job_id: str, record: Mapping[str, Any]) -> bool:
        """Append one attempt record to ``attempts`` without a status change (an attempt
        stopped by a cancel or delete). Returns False for an unknown job."""

    async def requeue_processing(self) -> list[str]:
        """At boot: apply :attr:`Intent.REQUEUE` to every ``processing`` job (message
        "Requeued after a server restart"); returns their ids."""

    async def set_pgid(self, job_id: str, pgid: int | None) -> None:
        """Record or clear the running stage child's process group."""

    async def recorded_pgids(self) -> list[tuple[str, int]]:
        """``[(job_id, pgid)]`` still recorded, in insertion order."""

    async def find_by_idempotency_key(self, key: str, owner: str | None = None) -> Job | None:
        """The job not deleted that ``owner`` created with ``Idempotency-Key: key`` (owners
        compared NULL-safe: ``None`` finds only jobs without an owner), or ``None``."""

    async def bump_attempt(self, job_id: str, *, auto_retry: bool) -> int:
        """Start another attempt of a processing job in place (``attempt`` + 1, and
        ``auto_retries`` + 1 when ``auto_retry``; ``started_at`` now); the new number (0 if
        not processing)."""

    async def finished_before(self, cutoff_iso: str) -> list[str]:
        """Ids of terminal jobs (:data:`TERMINAL`) finished before ``cutoff_iso`` (ISO-8601
        UTC), oldest first."""

    async def job_ids_with_files(self) -> set[str]:
        """Ids of every job whose files must stay on disk (:data:`WITH_FILES`)."""

    # --- events (issue 16) ---
    async def events_after(self, job_id: str, after_id: int,
                           limit: int = EVENT_PAGE) -> list[JobEvent]:
        """The job's events with ``event_id > after_id``, oldest first, at most ``limit``
        (clamped to ``1 .. EVENT_PAGE``)."""

    async def latest_event(self, job_id: str) -> JobEvent | None:
        """The job's newest event, or ``None`` (a job stored before events existed)."""

    def event_waiter(self, job_id: str) -> AbstractAsyncContextManager[EventWaiter]:
        """``async with store.event_waiter(job_id) as waiter``: a subscription to the job's
        new events, open before the caller's first :meth:`events_after` so none is missed
        (PostgreSQL: ``LISTEN``; SQLite: polling on the reader threads)."""

    # --- webhooks (issue 16) ---
    async def webhook_deliveries(self, job_id: str) -> list[WebhookDelivery]:
        """The job's webhook deliveries (one per terminal event with a target), oldest
        first, each with its attempts."""

    async def claim_webhook_delivery(self, now: str,
                                     lease_until: str) -> WebhookDelivery | None:
        """Compare-and-set the oldest due delivery (``pending``, ``next_try_at <= now``):
        ``tries`` + 1 and ``next_try_at = lease_until`` (due again if this try is never
        recorded: its process died). The claimed delivery, or ``None``. Two callers (threads,
        replicas) never claim the same try."""

    async def record_webhook_try(self, delivery_id: str, tries: int,
                                 attempt: Mapping[str, Any], *, state: str,
                                 next_try_at: str | None) -> bool:
        """Append ``attempt`` (:func:`.webhook_outbox.webhook_attempt`) and set ``state`` and
        ``next_try_at``, only while the delivery is ``pending`` at try ``tries`` (the claim's);
        False when another claim took it over meanwhile (nothing written)."""


#: largest ``limit``/``offset`` a store passes on to its database (SQLite and PostgreSQL take
#: a signed 64-bit integer; anything larger is clamped here)
MAX_PAGE_BOUND = 2**62
