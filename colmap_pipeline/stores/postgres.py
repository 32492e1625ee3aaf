"""Job store on PostgreSQL: :class:`PostgresJobStore`, the
:class:`colmap_pipeline.jobs.JobStore` of the multi-replica mode (``DATABASE_URL``).

psycopg 3 (async) on a :class:`psycopg_pool.AsyncConnectionPool`. The schema, its versioned
append-only :data:`MIGRATIONS` and every write mirror the SQLite store
(:mod:`.sqlite`), so the same contract tests (``tests/test_database.py``) pass on both:

- **Compare-and-set.** :meth:`PostgresJobStore.apply` is one ``UPDATE … WHERE job_id = %s AND
  status = ANY(sources)`` along :data:`~colmap_pipeline.jobs.TRANSITIONS` (the fields from
  :func:`~colmap_pipeline.jobs.planned_changes`), appending the attempt record in the same
  statement (``attempts || jsonb_build_array(record)``).
- **Claim.** The oldest pending job, picked with ``FOR UPDATE SKIP LOCKED`` (two replicas never
  wait on, nor take, the same row), moved by the same compare-and-set.
- **Progress** is ``GREATEST(progress, new)``, written only while ``processing``.
- **Idempotency-Key** is unique among one owner's live jobs: a partial unique index on
  ``(key, COALESCE(owner, ''))`` for the non-null keys (a delete clears the key).
- **Events** (issue 16): every write that changes a job inserts its events and sends a
  ``NOTIFY`` in the same transaction (:mod:`.postgres_rows`); :mod:`.pg_notify` listens.

Types: JSON columns are ``JSONB`` (a :class:`~colmap_pipeline.jobs.Job` reads back equal: JSONB
keeps values, numbers and list order, not an object's key order); times stay ISO-8601 text as
in SQLite (sortable, compared as text); ``seq`` (an identity column) is SQLite's ``rowid``:
insertion order, the tie-break of equal ``created_at``.

Errors: no psycopg exception leaves the store (:func:`.postgres_rows.translate`). A pooled
connection is checked before each use (``AsyncConnectionPool.check_connection``), so after
PostgreSQL comes back (restart, failover, ``pg_terminate_backend``) the next call reconnects
instead of failing on a dead connection.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
import psycopg.errors
from psycopg_pool import AsyncConnectionPool

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
    StoreUnavailable,
    new_job_record,
    planned_changes,
    utcnow,
)
from ..webhook_outbox import (
    DELIVERY_COLUMNS,
    DeliveryState,
    WebhookDelivery,
)
from .pg_notify import EventListener, NotifiedWaiter
from .postgres_rows import (
    EVENT_RETURNING,
    RETURNING,
    SELECT,
    Conn,
    apply_transition,
    event_row,
    first_job,
    insert_events,
    jsonb,
    migrate,
    to_delivery,
    to_event,
    to_job,
    translate,
)
from .schema import POSTGRES_MIGRATIONS, list_filter

T = TypeVar("T")
log = logging.getLogger("colmap_worker.store")
#: what :meth:`PostgresJobStore.create_job` runs in the insert's transaction (the queue's defer)
InTransaction = Callable[[Conn, Job], Awaitable[None]]

#: this store's migrations (:mod:`.schema`, the PostgreSQL list)
MIGRATIONS = POSTGRES_MIGRATIONS
#: seconds a call waits for a pooled connection before StoreUnavailable
DEFAULT_TIMEOUT_S = 5.0
#: seconds :meth:`PostgresJobStore.ping` waits at most (``/readiness`` answers fast)
PING_TIMEOUT_S = 2.0
#: connections the pool keeps open at least / at most
POOL_MIN, POOL_MAX = 1, 10
#: libpq options of every pooled connection: TCP keepalives and ``tcp_user_timeout`` (ms) so a
#: silent network (a partition, a dead host: no reset) fails a call within ~15 s instead of
#: hanging; ``statement_timeout`` (ms) bounds a statement (a lock wait included) the same way
CONNECTION_OPTIONS: dict[str, Any] = {
    "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
    "tcp_user_timeout": 15_000, "options": "-c statement_timeout=30000"}
#: seconds the pool retries one lost connection (backoff 1, 2, 4 s …) before it gives up and
#: the next call starts a fresh attempt: bounds how long after PostgreSQL is back the store
#: still answers StoreUnavailable (psycopg_pool's backoff has no ceiling of its own)
RECONNECT_TIMEOUT_S = 5.0

#: ``find_by_idempotency_key``'s condition (served by the index ``jobs_owner_idempotency_key``)
BY_IDEMPOTENCY_KEY = ("idempotency_key = %s AND owner IS NOT DISTINCT FROM %s "
                      "AND status <> 'deleted'")

_TERMINAL = sorted(s.value for s in TERMINAL)
_WITH_FILES = sorted(s.value for s in WITH_FILES)


def _forget(tasks: set[asyncio.Future[bool]]) -> Callable[[asyncio.Future[bool]], None]:
    """A done-callback dropping an abandoned task from ``tasks`` and consuming its outcome."""
    def done(task: asyncio.Future[bool]) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" warning
    return done


class PostgresJobStore:
    """The :class:`~colmap_pipeline.jobs.JobStore` on PostgreSQL (``DATABASE_URL``).

    Open with :meth:`open` (applies migrations), close with :meth:`close`. Every method may
    raise :class:`~colmap_pipeline.jobs.StoreError` (:class:`StoreUnavailable` when PostgreSQL
    cannot be reached within ``timeout_s``).

    The queue's seam (issue 12 item 2: the job row and its queue entry in one transaction):

    - ``create_job(job, in_transaction=defer)``: ``await defer(conn, inserted_job)`` runs on
      the insert's connection inside its transaction, before the commit; anything it raises
      rolls the insert back and propagates (psycopg errors translated, others unchanged).
    - ``async with store.transaction() as conn:`` one transaction on a pooled connection
      (commit on normal exit, rollback on an exception; psycopg errors translated).
    - :attr:`conninfo` and :attr:`pool`: for a queue library sharing the database (e.g.
      procrastinate's ``PsycopgConnector(conninfo=store.conninfo)``).
    """

    def __init__(self, conninfo: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 min_size: int = POOL_MIN, max_size: int = POOL_MAX) -> None:
        #: the libpq connection string / URL (``postgresql://user@host:port/db``)
        self.conninfo = conninfo
        self.timeout_s = timeout_s
        #: the pool every call borrows from (autocommit connections; transactions explicit)
        self.pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            conninfo, min_size=min_size, max_size=max_size, open=False, timeout=timeout_s,
            kwargs={"autocommit": True, "connect_timeout": max(1, round(timeout_s)),
                    **CONNECTION_OPTIONS},
            check=AsyncConnectionPool.check_connection, reconnect_timeout=RECONNECT_TIMEOUT_S,
            name="jobstore")
        self._closed = False
        self._abandoned: set[asyncio.Future[bool]] = set()  # late pings still cleaning up
        # opens its connection on first use
        self._listener = EventListener(conninfo, CONNECTION_OPTIONS)

    # ---- opening and closing ----------------------------------------------------------------
    @classmethod
    async def open(cls, conninfo: str, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                   min_size: int = POOL_MIN, max_size: int = POOL_MAX) -> PostgresJobStore:
        """Open the pool (waiting up to ``timeout_s`` for a first connection) and apply the
        pending migrations.

        Raises: StoreUnavailable when PostgreSQL cannot be reached; StoreError when a
        migration fails.
        """
        store = cls(conninfo, timeout_s=timeout_s, min_size=min_size, max_size=max_size)
        try:
            try:
                await store.pool.open(wait=True, timeout=timeout_s)
            except psycopg.Error as exc:  # PoolTimeout: nothing answered
                raise translate(exc) from exc
            await store._tx(migrate)
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        """Close every pooled connection. Later calls raise ``StoreUnavailable``."""
        if not self._closed:
            self._closed = True
            await self._listener.close()
            await self.pool.close()

    # ---- running calls ----------------------------------------------------------------------
    @asynccontextmanager
    async def transaction(self, *, timeout_s: float | None = None) -> AsyncIterator[Conn]:
        """One transaction on a pooled connection (see the class docstring).

        Raises: StoreUnavailable when no connection comes within ``timeout_s`` (default: the
        store's) or the connection is lost; DuplicateKey / StoreError for other psycopg errors.
        """
        if self._closed:
            raise StoreUnavailable("the job store is closed")
        try:
            async with self.pool.connection(timeout=timeout_s or self.timeout_s) as conn, \
                    conn.transaction():
                yield conn
        except psycopg.Error as exc:
            raise translate(exc) from exc

    async def _tx(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """``await fn(conn)`` in one transaction (:meth:`transaction`)."""
        async with self.transaction() as conn:
            return await fn(conn)

    # ---- reads -------------------------------------------------------------------------------
    async def schema_version(self) -> int:
        """Applied schema version (``len(MIGRATIONS)`` once open)."""
        async def q(c: Conn) -> int:
            row = await (await c.execute("SELECT version FROM schema_version")).fetchone()
            return int(row[0]) if row else 0
        return await self._tx(q)

    async def ping(self) -> bool:
        """True when ``SELECT 1`` answers within :data:`PING_TIMEOUT_S`; never raises."""
        if self._closed:
            return False

        async def q() -> bool:
            async with self.pool.connection(timeout=PING_TIMEOUT_S) as conn:
                row = await (await conn.execute("SELECT 1")).fetchone()
                return row is not None and row[0] == 1
        # The outer bound also covers a query that hangs on a silent network; a late ping is
        # abandoned, not awaited (psycopg's cancellation of it can itself wait ~10 s).
        task = asyncio.ensure_future(q())
        done, _ = await asyncio.wait({task}, timeout=PING_TIMEOUT_S + 0.5)
        if not done:
            task.cancel()
            self._abandoned.add(task)
            task.add_done_callback(_forget(self._abandoned))
            return False
        try:
            return task.result()
        except (psycopg.Error, OSError, TimeoutError):
            return False

    async def get_job(self, job_id: str) -> Job | None:
        """The job, or ``None``."""
        return await self._tx(lambda c: first_job(c, "job_id = %s", [job_id]))

    async def list_jobs(self, *, project_id: str | None = None, status: str | None = None,
                        owner: str | None = None, limit: int = 50,
                        offset: int = 0) -> tuple[list[Job], int]:
        """Jobs newest first (``created_at``, then ``seq``), filtered
        (:func:`.schema.list_filter`; ``owner=None``: every owner); ``(page, total matching)``
        from one snapshot (``REPEATABLE READ``). Deleted jobs are left out (and not counted)
        unless ``status="deleted"`` asks for them. ``limit`` and ``offset`` are clamped to
        ``0 .. MAX_PAGE_BOUND``."""
        limit = max(0, min(int(limit), MAX_PAGE_BOUND))
        offset = max(0, min(int(offset), MAX_PAGE_BOUND))
        clause, args = list_filter("%s", project_id=project_id, status=status, owner=owner)

        async def q(c: Conn) -> tuple[list[Job], int]:
            await c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            row = await (await c.execute(f"SELECT COUNT(*) FROM jobs {clause}", args)).fetchone()
            cur = await c.execute(f"{SELECT} {clause} ORDER BY created_at DESC, seq DESC "
                                  "LIMIT %s OFFSET %s", [*args, limit, offset])
            return [to_job(r) for r in await cur.fetchall()], int(row[0]) if row else 0
        return await self._tx(q)

    async def queue_position(self, job_id: str) -> int | None:
        """1-based position among pending jobs (oldest first), or ``None`` if not pending."""
        async def q(c: Conn) -> int | None:
            cur = await c.execute(
                """SELECT COUNT(*) FROM jobs p, jobs j
                   WHERE j.job_id = %s AND j.status = 'pending' AND p.status = 'pending'
                     AND (p.created_at, p.seq) <= (j.created_at, j.seq)""", [job_id])
            row = await cur.fetchone()
            return (int(row[0]) or None) if row else None
        return await self._tx(q)

    async def count_by_status(self) -> dict[str, int]:
        """``{status: count}`` over all jobs."""
        async def q(c: Conn) -> dict[str, int]:
            cur = await c.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
            return {s: int(n) for s, n in await cur.fetchall()}
        return await self._tx(q)

    async def recorded_pgids(self) -> list[tuple[str, int]]:
        """``[(job_id, pgid)]`` of every row that still names a stage child's process group,
        in insertion order."""
        async def q(c: Conn) -> list[tuple[str, int]]:
            cur = await c.execute(
                "SELECT job_id, pgid FROM jobs WHERE pgid IS NOT NULL ORDER BY seq")
            return [(r[0], int(r[1])) for r in await cur.fetchall()]
        return await self._tx(q)

    async def find_by_idempotency_key(self, key: str, owner: str | None = None) -> Job | None:
        """The job not deleted that ``owner`` created with ``Idempotency-Key: key`` (owners
        compared NULL-safe: ``IS NOT DISTINCT FROM``), or None."""
        return await self._tx(lambda c: first_job(c, BY_IDEMPOTENCY_KEY, [key, owner]))

    async def finished_before(self, cutoff_iso: str) -> list[str]:
        """Ids of terminal jobs whose ``finished_at`` is older than ``cutoff_iso`` (ISO-8601
        UTC, compared as text), oldest first."""
        async def q(c: Conn) -> list[str]:
            cur = await c.execute(
                """SELECT job_id FROM jobs WHERE status = ANY(%s)
                   AND finished_at IS NOT NULL AND finished_at < %s
                   ORDER BY finished_at, seq""", [_TERMINAL, cutoff_iso])
            return [r[0] for r in await cur.fetchall()]
        return await self._tx(q)

    async def job_ids_with_files(self) -> set[str]:
        """Ids of every job whose files must be kept (any status but expired/deleted)."""
        async def q(c: Conn) -> set[str]:
            cur = await c.execute("SELECT job_id FROM jobs WHERE status = ANY(%s)",
                                  [_WITH_FILES])
            return {r[0] for r in await cur.fetchall()}
        return await self._tx(q)

    # ---- writes ------------------------------------------------------------------------------
    async def create_job(self, job: Mapping[str, Any], *,
                         in_transaction: InTransaction | None = None) -> Job:
        """Insert a new ``pending`` job (:func:`~colmap_pipeline.jobs.new_job_record`); with
        ``in_transaction``, ``await in_transaction(conn, inserted)`` runs in the same
        transaction before the commit (the queue's defer; see the class docstring).

        Raises: DuplicateKey on a taken ``job_id`` or an ``idempotency_key`` live for the same
        ``owner``; ValueError on missing or unknown keys; whatever ``in_transaction`` raises
        (the insert rolled back).
        """
        row = new_job_record(job, utcnow())
        values = [jsonb(v) if c in JSON_COLUMNS else v for c, v in row.items()]
        sql = (f"INSERT INTO jobs ({', '.join(row)}) "
               f"VALUES ({', '.join('%s' for _ in row)}) {RETURNING}")

        async def tx(c: Conn) -> Job:
            inserted = await (await c.execute(sql, values)).fetchone()
            assert inserted is not None  # INSERT … RETURNING gives the row
            out = to_job(inserted)
            await insert_events(c, out.job_id, transition_events(vars(out), intent=None))
            if in_transaction is not None:
                await in_transaction(c, out)
            return out
        return await self._tx(tx)

    async def apply(self, job_id: str, intent: Intent, *,
                    attempt_record: Mapping[str, Any] | None = None, **fields: Any) -> bool:
        """Compare-and-set ``job_id`` along ``intent`` (see the protocol): one ``UPDATE …
        WHERE job_id = %s AND status = ANY(sources)`` that also appends ``attempt_record``.

        Raises: ValueError for a column that cannot be set, or for ``attempts`` together with
        ``attempt_record``; TypeError for a value JSON cannot hold.
        """
        changes = planned_changes(intent, fields,
                                  with_attempt_record=attempt_record is not None)
        record = jsonb(dict(attempt_record)) if attempt_record is not None else None
        return await self._tx(
            lambda c: apply_transition(c, job_id, Intent(intent), changes, record))

    async def claim_next_pending(self) -> Job | None:
        """Apply ``claim`` to the oldest ``pending`` job not locked by another claimer
        (``FOR UPDATE SKIP LOCKED``); it, or None."""
        changes = planned_changes(Intent.CLAIM, {})

        async def tx(c: Conn) -> Job | None:
            cur = await c.execute("SELECT job_id FROM jobs WHERE status = 'pending' "
                                  "ORDER BY created_at, seq LIMIT 1 FOR UPDATE SKIP LOCKED")
            row = await cur.fetchone()
            if row is None or not await apply_transition(c, row[0], Intent.CLAIM, changes, None):
                return None
            return await first_job(c, "job_id = %s", [row[0]])
        return await self._tx(tx)

    async def update_progress(self, job_id: str, progress: int, current_stage: str,
                              message: str) -> bool:
        """Record progress of a ``processing`` job: ``progress`` (0-100, clamped) is stored as
        ``GREATEST(stored, progress)``. Whether it was processing."""
        value = max(0, min(100, int(progress)))

        async def tx(c: Conn) -> bool:
            cur = await c.execute(
                f"""UPDATE jobs SET progress = GREATEST(progress, %s), current_stage = %s,
                       message = %s, updated_at = %s
                    WHERE job_id = %s AND status = 'processing' {EVENT_RETURNING}""",
                [value, current_stage, message, utcnow(), job_id])
            row = await cur.fetchone()
            if row is None:
                return False
            await insert_events(c, job_id, [(EventKind.PROGRESS, event_state(event_row(row)))])
            return True
        return await self._tx(tx)

    async def append_attempt(self, job_id: str, record: Mapping[str, Any]) -> bool:
        """Append one attempt record (a JSON object) to the job's ``attempts``; False for an
        unknown job."""
        value = jsonb(dict(record))

        async def tx(c: Conn) -> bool:
            cur = await c.execute(
                f"""UPDATE jobs SET attempts = attempts || jsonb_build_array(%s::jsonb),
                       updated_at = %s WHERE job_id = %s {EVENT_RETURNING}""",
                [value, utcnow(), job_id])
            row = await cur.fetchone()
            if row is None:
                return False
            await insert_events(c, job_id, [attempt_event(event_row(row), dict(record))])
            return True
        return await self._tx(tx)

    async def requeue_processing(self) -> list[str]:
        """Every ``processing`` job goes back to ``pending`` (``requeue``, message "Requeued
        after a server restart"); their ids, oldest row first. (Embedded mode's boot step; with
        several replicas a job is requeued by the queue's stall detection instead.)"""
        changes = planned_changes(Intent.REQUEUE, {"message": "Requeued after a server restart"})

        async def tx(c: Conn) -> list[str]:
            cur = await c.execute("SELECT job_id FROM jobs WHERE status = 'processing' "
                                  "ORDER BY seq FOR UPDATE")
            ids = [r[0] for r in await cur.fetchall()]
            return [i for i in ids if await apply_transition(c, i, Intent.REQUEUE, changes, None)]
        return await self._tx(tx)

    async def set_pgid(self, job_id: str, pgid: int | None) -> None:
        """Record (or clear, with ``None``) the process group of the job's running stage
        child."""
        async def tx(c: Conn) -> None:
            await c.execute("UPDATE jobs SET pgid = %s WHERE job_id = %s", [pgid, job_id])
        await self._tx(tx)

    async def bump_attempt(self, job_id: str, *, auto_retry: bool) -> int:
        """Start a new attempt of a ``processing`` job in place (automatic retry): increments
        ``attempt`` (and ``auto_retries`` when ``auto_retry``); the new attempt number (0 when
        the job is no longer processing)."""
        now = utcnow()

        async def tx(c: Conn) -> int:
            cur = await c.execute(
                f"""UPDATE jobs SET attempt = attempt + 1, auto_retries = auto_retries + %s,
                       started_at = %s, updated_at = %s
                    WHERE job_id = %s AND status = 'processing' {EVENT_RETURNING}""",
                [1 if auto_retry else 0, now, now, job_id])
            row = await cur.fetchone()
            if row is None:
                return 0
            state = event_row(row)
            await insert_events(c, job_id, [attempt_event(state, None)])
            return int(state["attempt"])
        return await self._tx(tx)

    # --- events (issue 16) ---
    async def events_after(self, job_id: str, after_id: int,
                           limit: int = EVENT_PAGE) -> list[JobEvent]:
        """The job's events with ``event_id > after_id``, oldest first, at most ``limit``
        (clamped to ``1 .. EVENT_PAGE``); one query on the index ``job_events_job``."""
        limit = max(1, min(int(limit), EVENT_PAGE))
        after = max(-1, min(int(after_id), MAX_PAGE_BOUND))

        async def q(c: Conn) -> list[JobEvent]:
            cur = await c.execute(
                "SELECT event_id, job_id, created_at, kind, data FROM job_events "
                "WHERE job_id = %s AND event_id > %s ORDER BY event_id LIMIT %s",
                [job_id, after, limit])
            return [to_event(r) for r in await cur.fetchall()]
        return await self._tx(q)

    async def latest_event(self, job_id: str) -> JobEvent | None:
        """The job's newest event, or ``None``."""
        async def q(c: Conn) -> JobEvent | None:
            cur = await c.execute(
                "SELECT event_id, job_id, created_at, kind, data FROM job_events "
                "WHERE job_id = %s ORDER BY event_id DESC LIMIT 1", [job_id])
            row = await cur.fetchone()
            return to_event(row) if row else None
        return await self._tx(q)

    async def has_events_after(self, job_id: str, after_id: int) -> bool:
        """Whether the job has an event newer than ``after_id`` (one indexed query)."""
        after = max(-1, min(int(after_id), MAX_PAGE_BOUND))

        async def q(c: Conn) -> bool:
            cur = await c.execute("SELECT 1 FROM job_events WHERE job_id = %s AND event_id > %s "
                                  "LIMIT 1", [job_id, after])
            return await cur.fetchone() is not None
        return await self._tx(q)

    @asynccontextmanager
    async def event_waiter(self, job_id: str) -> AsyncIterator[NotifiedWaiter]:
        """A waiter woken by ``NOTIFY`` on :data:`.pg_notify.EVENT_CHANNEL` (this replica's one
        listening connection, opened at the first subscription); it polls every
        :data:`.pg_notify.EVENT_POLL_S` s while that connection is down. Raises:
        StoreUnavailable when the store is closed."""
        if self._closed:
            raise StoreUnavailable("the job store is closed")
        waiter = NotifiedWaiter(self, job_id)
        self._listener.subscribe(waiter)
        try:
            yield waiter
        finally:
            self._listener.unsubscribe(waiter)


    # --- webhooks (issue 16) ---

    async def webhook_deliveries(self, job_id: str) -> list[WebhookDelivery]:
        """The job's webhook deliveries, oldest first, each with its attempts."""
        async def q(c: Conn) -> list[WebhookDelivery]:
            cur = await c.execute(
                f"SELECT {', '.join(DELIVERY_COLUMNS)} FROM webhook_deliveries "
                "WHERE job_id = %s ORDER BY created_at, delivery_id", [job_id])
            return [to_delivery(r) for r in await cur.fetchall()]
        return await self._tx(q)

    async def claim_webhook_delivery(self, now: str,
                                     lease_until: str) -> WebhookDelivery | None:
        """Claim the oldest due delivery (see the protocol): ``tries`` + 1, due again at
        ``lease_until``; it, or None. ``FOR UPDATE SKIP LOCKED``: replicas claiming at once
        take different rows, never the same try."""
        async def tx(c: Conn) -> WebhookDelivery | None:
            cur = await c.execute(
                f"""UPDATE webhook_deliveries SET tries = tries + 1, next_try_at = %s,
                           updated_at = %s
                    WHERE delivery_id = (
                        SELECT delivery_id FROM webhook_deliveries
                        WHERE state = 'pending' AND next_try_at <= %s
                        ORDER BY next_try_at, delivery_id LIMIT 1 FOR UPDATE SKIP LOCKED)
                    RETURNING {', '.join(DELIVERY_COLUMNS)}""", [lease_until, now, now])
            row = await cur.fetchone()
            return to_delivery(row) if row else None
        return await self._tx(tx)

    async def record_webhook_try(self, delivery_id: str, tries: int,
                                 attempt: Mapping[str, Any], *, state: str,
                                 next_try_at: str | None) -> bool:
        """Append ``attempt`` and set ``state``/``next_try_at`` while the delivery is still
        ``pending`` at try ``tries``; whether it was."""
        value = DeliveryState(state).value

        async def tx(c: Conn) -> bool:
            cur = await c.execute(
                """UPDATE webhook_deliveries
                      SET attempts = attempts || jsonb_build_array(%s::jsonb), state = %s,
                          next_try_at = %s, updated_at = %s
                    WHERE delivery_id = %s AND tries = %s AND state = 'pending'""",
                [jsonb(dict(attempt)), value, next_try_at, utcnow(), delivery_id, tries])
            return cur.rowcount == 1
        return await self._tx(tx)


