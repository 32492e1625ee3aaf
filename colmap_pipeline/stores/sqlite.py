"""Job store on one SQLite file (WAL): :class:`SqliteJobStore`, the embedded
:class:`colmap_pipeline.jobs.JobStore` (opened by ``database.open_store`` when ``DATABASE_URL``
is not set).

Concurrency (issue 10 items 2 and 12):

- **One writer.** Every write is one whole transaction (``BEGIN IMMEDIATE`` … ``COMMIT``, a
  ``ROLLBACK`` on any error), run as one call on the store's single writer thread, which owns
  the writer connection: transactions are serialized and atomic, and no other statement can
  land between a write's statements and its commit (the old shared aiosqlite connection then
  answered "cannot commit transaction - SQL statements in progress"). A caller cancelled
  meanwhile leaves a committed or rolled-back transaction, never an open one.
- **Concurrent readers.** Reads run on a few reader threads, each with its own read-only
  connection (WAL: committed snapshots, never blocked by the writer). Each store call is one
  hop to a thread (query, fetch and decode together), not one per statement.

Rows come back as :class:`~colmap_pipeline.jobs.Job`. Status changes go through
:meth:`SqliteJobStore.apply`, a compare-and-set (``UPDATE … WHERE job_id = ? AND status IN
(…)``, after procrastinate and NodeODM) along :data:`~colmap_pipeline.jobs.TRANSITIONS`. No
``sqlite3`` exception leaves the store: a unique-key collision is ``DuplicateKey``;
``OperationalError``, ``DatabaseError`` and ``OSError`` are ``StoreUnavailable``; any other
``sqlite3.Error`` is ``StoreError``. The schema is versioned: :data:`MIGRATIONS` are applied in
order at :meth:`SqliteJobStore.open` and are append-only.

Events (issue 16): every write that changes a job also inserts its events into ``job_events``
(:func:`~colmap_pipeline.job_events.transition_events`) in the same transaction; a stream
waiting for new ones polls (:mod:`.sqlite_events`) on a reader thread (one indexed query).
"""
from __future__ import annotations

import asyncio
import functools
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..job_events import (
    EventKind,
    JobEvent,
    attempt_event,
    event_state,
    transition_events,
)
from ..jobs import (
    EVENT_PAGE,
    JSON_COLUMNS,
    MAX_PAGE_BOUND,
    TERMINAL,
    WITH_FILES,
    Intent,
    Job,
    StoreError,
    StoreUnavailable,
    encode_json,
    new_job_record,
    planned_changes,
    utcnow,
)
from ..webhook_outbox import (
    DELIVERY_COLUMNS,
    DeliveryState,
    WebhookDelivery,
)
from .schema import SQLITE_MIGRATIONS, list_filter
from .sqlite_events import PollingWaiter
from .sqlite_rows import (
    EVENT_RETURNING,
    SELECT,
    apply_transition,
    event_row,
    first_job,
    insert_events,
    marks,
    to_delivery,
    to_event,
    to_job,
    translate,
    version_row,
)

T = TypeVar("T")

#: this store's migrations (:mod:`.schema`, the SQLite list)
MIGRATIONS = SQLITE_MIGRATIONS
#: reader threads (and read connections) per store
DEFAULT_READERS = 4
#: seconds a connection waits for a lock before SQLITE_BUSY (``busy_timeout``)
BUSY_TIMEOUT_S = 30.0

#: ``find_by_idempotency_key``'s condition (served by the index ``jobs_owner_idempotency_key``)
BY_IDEMPOTENCY_KEY = "idempotency_key = ? AND owner IS ? AND status != 'deleted'"

_TERMINAL = tuple(sorted(s.value for s in TERMINAL))
_WITH_FILES = tuple(sorted(s.value for s in WITH_FILES))


class SqliteJobStore:
    """The :class:`~colmap_pipeline.jobs.JobStore` on one SQLite file.

    Open with :meth:`open`, close with :meth:`close`. Every public method runs its database
    work on the store's own threads (never on the event loop) and may raise
    :class:`~colmap_pipeline.jobs.StoreError`.
    """

    def __init__(self, path: Path, *, readers: int = DEFAULT_READERS) -> None:
        self.path = Path(path)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="jobstore-write")
        self._readers = ThreadPoolExecutor(max(1, readers), thread_name_prefix="jobstore-read")
        self._wconn: sqlite3.Connection | None = None
        self._local = threading.local()
        self._rconns: list[sqlite3.Connection] = []
        self._rconns_lock = threading.Lock()
        self._closed = False

    # ---- opening and closing ----------------------------------------------------------------
    @classmethod
    async def open(cls, path: Path, *, readers: int = DEFAULT_READERS) -> SqliteJobStore:
        """Open (creating parent folders and the file), enable WAL, apply pending migrations.

        Raises: StoreUnavailable when the file cannot be opened or migrated.
        """
        store = cls(path, readers=readers)
        try:
            await store._call(store._writer, store._open_writer)
        except BaseException:
            await store.close()
            raise
        return store

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _open_writer(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._wconn = self._connect()
        conn.execute("PRAGMA journal_mode=WAL")
        version = self._transaction(version_row)
        for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
            try:
                conn.executescript(f"BEGIN IMMEDIATE; {script}; "
                                   f"UPDATE schema_version SET version = {int(target)}; COMMIT;")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        """Wait for running calls, then close every connection. Later calls raise
        :class:`~colmap_pipeline.jobs.StoreUnavailable`."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        if self._wconn is not None:
            self._wconn.close()
        with self._rconns_lock:
            for conn in self._rconns:
                conn.close()
            self._rconns.clear()

    # ---- running calls on the store's threads -----------------------------------------------
    async def _call(self, pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(pool, functools.partial(fn, *args))
        except RuntimeError as exc:
            if self._closed:  # "cannot schedule new futures after shutdown"
                raise StoreUnavailable("the job store is closed") from exc
            raise
        except Exception as exc:
            translated = translate(exc)
            if translated is exc:
                raise
            raise translated from exc

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` as one transaction on the writer thread."""
        return await self._call(self._writer, self._transaction, fn, *args)

    def _transaction(self, fn: Callable[..., T], *args: Any) -> T:
        conn = self._wconn
        if conn is None:
            raise StoreUnavailable("the job store is not open")
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = fn(conn, *args)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return out

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` on a reader thread's own connection (each statement reads
        one committed snapshot; ``fn`` opens a transaction where it needs one across several)."""
        return await self._call(self._readers, self._snapshot, fn, *args)

    def _snapshot(self, fn: Callable[..., T], *args: Any) -> T:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            conn.execute("PRAGMA query_only=ON")
            self._local.conn = conn
            with self._rconns_lock:
                self._rconns.append(conn)
        return fn(conn, *args)

    # ---- reads -------------------------------------------------------------------------------
    async def schema_version(self) -> int:
        """Applied schema version (``len(MIGRATIONS)`` once open)."""
        return await self._read(
            lambda c: int(c.execute("SELECT version FROM schema_version").fetchone()[0]))

    async def ping(self) -> bool:
        """True when a trivial query answers; never raises."""
        try:
            return await self._read(lambda c: c.execute("SELECT 1").fetchone()[0] == 1)
        except (StoreError, RuntimeError):
            return False

    async def get_job(self, job_id: str) -> Job | None:
        """The job, or ``None``."""
        return await self._read(first_job, "job_id = ?", (job_id,))

    async def list_jobs(self, *, project_id: str | None = None, status: str | None = None,
                        owner: str | None = None, limit: int = 50,
                        offset: int = 0) -> tuple[list[Job], int]:
        """Jobs newest first, filtered (:func:`.schema.list_filter`; ``owner=None``: every
        owner); ``(page, total matching)``, read in one snapshot. Deleted jobs are left out
        (and not counted) unless ``status="deleted"`` asks for them.

        ``limit`` and ``offset`` are clamped to ``0 .. MAX_PAGE_BOUND`` (issue 10 item 4: an
        offset of 2**63 used to overflow SQLite's integer; now it is an empty page).
        """
        limit = max(0, min(int(limit), MAX_PAGE_BOUND))
        offset = max(0, min(int(offset), MAX_PAGE_BOUND))
        clause, args = list_filter("?", project_id=project_id, status=status, owner=owner)

        def q(c: sqlite3.Connection) -> tuple[list[Job], int]:
            c.execute("BEGIN")  # the count and the page from one snapshot
            try:
                total = int(c.execute(f"SELECT COUNT(*) FROM jobs {clause}", args).fetchone()[0])
                rows = c.execute(f"{SELECT} {clause} ORDER BY created_at DESC, rowid DESC "
                                 "LIMIT ? OFFSET ?", [*args, limit, offset]).fetchall()
            finally:
                c.execute("COMMIT")
            return [to_job(r) for r in rows], total
        return await self._read(q)

    async def queue_position(self, job_id: str) -> int | None:
        """1-based position among pending jobs (oldest first), or ``None`` if not pending."""
        def q(c: sqlite3.Connection) -> int | None:
            n = c.execute(
                """SELECT COUNT(*) FROM jobs p, jobs j
                   WHERE j.job_id = ? AND j.status = 'pending' AND p.status = 'pending'
                     AND (p.created_at < j.created_at
                          OR (p.created_at = j.created_at AND p.rowid <= j.rowid))""",
                (job_id,)).fetchone()[0]
            return int(n) or None
        return await self._read(q)

    async def count_by_status(self) -> dict[str, int]:
        """``{status: count}`` over all jobs."""
        return await self._read(lambda c: {s: int(n) for s, n in c.execute(
            "SELECT status, COUNT(*) FROM jobs GROUP BY status")})

    async def recorded_pgids(self) -> list[tuple[str, int]]:
        """``[(job_id, pgid)]`` of every row that still names a stage child's process group."""
        return await self._read(lambda c: [(r[0], int(r[1])) for r in c.execute(
            "SELECT job_id, pgid FROM jobs WHERE pgid IS NOT NULL ORDER BY rowid")])

    async def find_by_idempotency_key(self, key: str, owner: str | None = None) -> Job | None:
        """The job not deleted that ``owner`` created with ``Idempotency-Key: key`` (``owner IS
        ?``: NULL-safe), or None."""
        return await self._read(first_job, BY_IDEMPOTENCY_KEY, (key, owner))

    async def finished_before(self, cutoff_iso: str) -> list[str]:
        """Ids of terminal jobs whose ``finished_at`` is older than ``cutoff_iso`` (ISO-8601
        UTC, compared as text: every stored time has the same format), oldest first."""
        return await self._read(lambda c: [r[0] for r in c.execute(
            f"""SELECT job_id FROM jobs WHERE status IN ({marks(_TERMINAL)})
                AND finished_at IS NOT NULL AND finished_at < ?
                ORDER BY finished_at, rowid""", [*_TERMINAL, cutoff_iso])])

    async def job_ids_with_files(self) -> set[str]:
        """Ids of every job whose files must stay on disk (any status but expired/deleted)."""
        return await self._read(lambda c: {r[0] for r in c.execute(
            f"SELECT job_id FROM jobs WHERE status IN ({marks(_WITH_FILES)})", _WITH_FILES)})

    # ---- writes ------------------------------------------------------------------------------
    async def create_job(self, job: Mapping[str, Any]) -> Job:
        """Insert a new ``pending`` job (:func:`~colmap_pipeline.jobs.new_job_record`).

        Raises: DuplicateKey on a taken ``job_id``, or an ``idempotency_key`` the same ``owner``
        holds; ValueError on missing or unknown keys.
        """
        row = new_job_record(job, utcnow())
        for col in JSON_COLUMNS:
            if row[col] is not None:
                row[col] = encode_json(row[col])
        sql = (f"INSERT INTO jobs ({', '.join(row)}) "
               f"VALUES ({', '.join(f':{c}' for c in row)})")

        def tx(c: sqlite3.Connection) -> Job:
            c.execute(sql, row)
            job = to_job(c.execute(f"{SELECT} WHERE rowid = last_insert_rowid()").fetchall()[0])
            insert_events(c, job.job_id, transition_events(vars(job), intent=None))
            return job
        return await self._write(tx)

    async def apply(self, job_id: str, intent: Intent, *,
                    attempt_record: Mapping[str, Any] | None = None, **fields: Any) -> bool:
        """Compare-and-set ``job_id`` along ``intent`` (see the protocol): one ``UPDATE …
        WHERE job_id = ? AND status IN (sources)`` that also appends ``attempt_record``.

        Raises: ValueError for a column that cannot be set, or for ``attempts`` together with
        ``attempt_record``; TypeError for a value JSON cannot hold.
        """
        changes = planned_changes(intent, fields,
                                  with_attempt_record=attempt_record is not None)
        record = encode_json(dict(attempt_record)) if attempt_record is not None else None
        return await self._write(apply_transition, job_id, Intent(intent), changes, record)


    async def claim_next_pending(self) -> Job | None:
        """Apply ``claim`` to the oldest ``pending`` job in one transaction; it, or None."""
        changes = planned_changes(Intent.CLAIM, {})

        def tx(c: sqlite3.Connection) -> Job | None:
            rows = c.execute("SELECT job_id FROM jobs WHERE status = 'pending' "
                             "ORDER BY created_at, rowid LIMIT 1").fetchall()
            if not rows or not apply_transition(c, rows[0][0], Intent.CLAIM, changes, None):
                return None
            return first_job(c, "job_id = ?", (rows[0][0],))
        return await self._write(tx)

    async def update_progress(self, job_id: str, progress: int, current_stage: str,
                              message: str) -> bool:
        """Record progress of a ``processing`` job: ``progress`` (0-100, clamped) is stored as
        ``max(stored, progress)``, so it never goes backwards. Whether it was processing."""
        value = max(0, min(100, int(progress)))

        def tx(c: sqlite3.Connection) -> bool:
            rows = c.execute(
                f"""UPDATE jobs SET progress = MAX(progress, ?), current_stage = ?, message = ?,
                       updated_at = ?
                    WHERE job_id = ? AND status = 'processing' {EVENT_RETURNING}""",
                (value, current_stage, message, utcnow(), job_id)).fetchall()
            if rows:
                insert_events(c, job_id, [(EventKind.PROGRESS, event_state(event_row(rows[0])))])
            return len(rows) == 1
        return await self._write(tx)

    async def append_attempt(self, job_id: str, record: Mapping[str, Any]) -> bool:
        """Append one attempt record (a JSON object) to the job's ``attempts``; False for an
        unknown job."""
        text = encode_json(dict(record))

        def tx(c: sqlite3.Connection) -> bool:
            rows = c.execute(
                f"""UPDATE jobs SET attempts = json_insert(attempts, '$[#]', json(?)),
                       updated_at = ?
                    WHERE job_id = ? {EVENT_RETURNING}""", (text, utcnow(), job_id)).fetchall()
            if rows:
                insert_events(c, job_id, [attempt_event(event_row(rows[0]), json.loads(text))])
            return len(rows) == 1
        return await self._write(tx)

    async def requeue_processing(self) -> list[str]:
        """At boot: jobs left ``processing`` by a dead server go back to ``pending``
        (``requeue``); their ids, oldest row first."""
        changes = planned_changes(Intent.REQUEUE, {"message": "Requeued after a server restart"})

        def tx(c: sqlite3.Connection) -> list[str]:
            ids = [r[0] for r in c.execute(
                "SELECT job_id FROM jobs WHERE status = 'processing' ORDER BY rowid")]
            return [i for i in ids if apply_transition(c, i, Intent.REQUEUE, changes, None)]
        return await self._write(tx)

    async def set_pgid(self, job_id: str, pgid: int | None) -> None:
        """Record (or clear, with ``None``) the process group of the job's running stage child,
        so that a server restarted after a crash can kill a child that outlived it."""
        await self._write(lambda c: c.execute(
            "UPDATE jobs SET pgid = ? WHERE job_id = ?", (pgid, job_id)))

    async def bump_attempt(self, job_id: str, *, auto_retry: bool) -> int:
        """Start a new attempt of a ``processing`` job in place (automatic retry): increments
        ``attempt`` (and ``auto_retries`` when ``auto_retry``); returns the new attempt number
        (0 when the job is no longer processing)."""
        now = utcnow()

        def tx(c: sqlite3.Connection) -> int:
            rows = c.execute(  # fetchall: a RETURNING statement must finish before COMMIT
                f"""UPDATE jobs SET attempt = attempt + 1, auto_retries = auto_retries + ?,
                       started_at = ?, updated_at = ?
                    WHERE job_id = ? AND status = 'processing' {EVENT_RETURNING}""",
                (1 if auto_retry else 0, now, now, job_id)).fetchall()
            if not rows:
                return 0
            state = event_row(rows[0])
            insert_events(c, job_id, [attempt_event(state, None)])
            return int(state["attempt"])
        return await self._write(tx)

    # --- events (issue 16) ---
    async def events_after(self, job_id: str, after_id: int,
                           limit: int = EVENT_PAGE) -> list[JobEvent]:
        """The job's events with ``event_id > after_id``, oldest first, at most ``limit``
        (clamped to ``1 .. EVENT_PAGE``); one query on the index ``job_events_job``."""
        limit = max(1, min(int(limit), EVENT_PAGE))
        after = max(-1, min(int(after_id), MAX_PAGE_BOUND))
        rows = await self._read(lambda c: c.execute(
            "SELECT event_id, job_id, created_at, kind, data FROM job_events "
            "WHERE job_id = ? AND event_id > ? ORDER BY event_id LIMIT ?",
            (job_id, after, limit)).fetchall())
        return [to_event(r) for r in rows]

    async def latest_event(self, job_id: str) -> JobEvent | None:
        """The job's newest event, or ``None``."""
        rows = await self._read(lambda c: c.execute(
            "SELECT event_id, job_id, created_at, kind, data FROM job_events "
            "WHERE job_id = ? ORDER BY event_id DESC LIMIT 1", (job_id,)).fetchall())
        return to_event(rows[0]) if rows else None

    @asynccontextmanager
    async def event_waiter(self, job_id: str) -> AsyncIterator[PollingWaiter]:
        """A waiter that polls for the job's new events every
        :data:`.sqlite_events.EVENT_POLL_S` seconds (one indexed query on a reader thread;
        another process may have written them)."""
        yield PollingWaiter(self, job_id)

    async def has_events_after(self, job_id: str, after_id: int) -> bool:
        """Whether the job has an event newer than ``after_id`` (one indexed query)."""
        after = max(-1, min(int(after_id), MAX_PAGE_BOUND))
        return await self._read(lambda c: c.execute(
            "SELECT 1 FROM job_events WHERE job_id = ? AND event_id > ? LIMIT 1",
            (job_id, after)).fetchone() is not None)


    # --- webhooks (issue 16) ---

    async def webhook_deliveries(self, job_id: str) -> list[WebhookDelivery]:
        """The job's webhook deliveries, oldest first, each with its attempts."""
        return await self._read(lambda c: [to_delivery(r) for r in c.execute(
            f"SELECT {', '.join(DELIVERY_COLUMNS)} FROM webhook_deliveries WHERE job_id = ? "
            "ORDER BY created_at, rowid", (job_id,))])

    async def claim_webhook_delivery(self, now: str,
                                     lease_until: str) -> WebhookDelivery | None:
        """Claim the oldest due delivery (see the protocol): ``tries`` + 1, due again at
        ``lease_until``; it, or None. One transaction on the single writer."""
        def tx(c: sqlite3.Connection) -> WebhookDelivery | None:
            due = c.execute("SELECT delivery_id, tries FROM webhook_deliveries "
                            "WHERE state = 'pending' AND next_try_at <= ? "
                            "ORDER BY next_try_at, rowid LIMIT 1", (now,)).fetchone()
            if due is None:
                return None
            rows = c.execute(
                f"""UPDATE webhook_deliveries SET tries = tries + 1, next_try_at = ?,
                           updated_at = ?
                    WHERE delivery_id = ? AND tries = ? AND state = 'pending'
                    RETURNING {', '.join(DELIVERY_COLUMNS)}""",
                (lease_until, now, due[0], due[1])).fetchall()
            return to_delivery(rows[0]) if rows else None
        return await self._write(tx)

    async def record_webhook_try(self, delivery_id: str, tries: int,
                                 attempt: Mapping[str, Any], *, state: str,
                                 next_try_at: str | None) -> bool:
        """Append ``attempt`` and set ``state``/``next_try_at`` while the delivery is still
        ``pending`` at try ``tries``; whether it was."""
        text, value = encode_json(dict(attempt)), DeliveryState(state).value
        return await self._write(lambda c: c.execute(
            """UPDATE webhook_deliveries
                  SET attempts = json_insert(attempts, '$[#]', json(?)), state = ?,
                      next_try_at = ?, updated_at = ?
                WHERE delivery_id = ? AND tries = ? AND state = 'pending'""",
            (text, value, next_try_at, utcnow(), delivery_id, tries)).rowcount == 1)


