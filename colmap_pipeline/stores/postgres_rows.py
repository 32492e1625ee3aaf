"""The PostgreSQL store's SQL helpers (:class:`.postgres.PostgresJobStore`): row converters,
the compare-and-set of a transition with its events and webhook outbox row (all on the caller's
connection, inside its transaction), the ``NOTIFY`` of new events and the migrations.

Errors (:func:`translate`): a unique violation is :class:`~colmap_pipeline.jobs.DuplicateKey`;
``OperationalError`` (connection refused or lost, pool timeout, deadlock, serialization
failure) is :class:`~colmap_pipeline.jobs.StoreUnavailable`; any other ``psycopg.Error`` is
:class:`~colmap_pipeline.jobs.StoreError`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg
import psycopg.errors
from psycopg.types.json import Jsonb

from ..job_events import PRUNE_EVENTS_ON, EventKind, JobEvent, transition_events
from ..jobs import (
    COLUMNS,
    JSON_COLUMNS,
    TRANSITIONS,
    DuplicateKey,
    Intent,
    Job,
    JobStatus,
    Stamp,
    StoreError,
    StoreUnavailable,
    encode_json,
    utcnow,
)
from ..webhook_outbox import (
    DELIVERY_COLUMNS,
    WEBHOOK_EVENTS,
    DeliveryState,
    WebhookDelivery,
    new_delivery_id,
    webhook_delivery_row,
)
from .pg_notify import EVENT_CHANNEL
from .schema import POSTGRES_MIGRATIONS

#: a pooled (autocommit) connection of the store
Conn = psycopg.AsyncConnection[Any]

SELECT = f"SELECT {', '.join(COLUMNS)} FROM jobs"
RETURNING = f"RETURNING {', '.join(COLUMNS)}"
#: what a write returns to build its events (:func:`~colmap_pipeline.job_events.transition_events`)
EVENT_COLUMNS = ("status", "progress", "current_stage", "message", "attempt", "updated_at",
                 "error_code", "error_message", "error_hint", "results")
EVENT_RETURNING = f"RETURNING {', '.join(EVENT_COLUMNS)}"
#: advisory lock key held while migrating, so replicas starting together migrate once
#: (any constant; this one is "colmapjb" read as ASCII)
MIGRATION_LOCK_KEY = 0x636F6C6D61706A62


def to_job(row: tuple[Any, ...]) -> Job:
    """A :class:`Job` from a row in :data:`~colmap_pipeline.jobs.COLUMNS` order (psycopg has
    already decoded the JSONB columns)."""
    data = dict(zip(COLUMNS, row, strict=True))
    data["status"] = JobStatus(data["status"])
    if data["attempts"] is None:
        data["attempts"] = []
    return Job(**data)


def jsonb(value: Any) -> Jsonb | None:
    """A JSON column's value for psycopg, encoded by :func:`~colmap_pipeline.jobs.encode_json`
    (pydantic models dumped; TypeError for a value JSON cannot hold)."""
    return None if value is None else Jsonb(value, dumps=encode_json)


def translate(exc: psycopg.Error) -> StoreError:
    """The store's exception for a psycopg one (see the module docstring)."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, psycopg.errors.UniqueViolation):
        return DuplicateKey(text)
    if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError):
        return StoreUnavailable(text)
    return StoreError(text)


def assignments(changes: Mapping[str, Any], now: str) -> tuple[list[str], list[Any]]:
    """``SET`` clauses and values for :func:`~colmap_pipeline.jobs.planned_changes`' output.
    Column names come from :data:`~colmap_pipeline.jobs.SETTABLE` (validated there)."""
    sets: list[str] = []
    values: list[Any] = []
    for col, value in changes.items():
        if value is Stamp.INCREMENT:
            sets.append(f"{col} = {col} + 1")
            continue
        sets.append(f"{col} = COALESCE({col}, %s)" if value is Stamp.NOW_IF_UNSET
                    else f"{col} = %s")
        if value is Stamp.NOW or value is Stamp.NOW_IF_UNSET:
            values.append(now)
        else:
            values.append(jsonb(value) if col in JSON_COLUMNS else value)
    return sets, values


def event_row(row: tuple[Any, ...]) -> dict[str, Any]:
    """A row returned as :data:`EVENT_RETURNING` as a mapping (psycopg decoded ``results``)."""
    return dict(zip(EVENT_COLUMNS, row, strict=True))


async def insert_events(c: Conn, job_id: str,
                         events: list[tuple[EventKind, dict[str, Any]]]) -> None:
    """Insert ``events`` of ``job_id`` in order and ``NOTIFY`` :data:`EVENT_CHANNEL`, inside
    the caller's transaction (the notification is delivered at its commit, never before)."""
    now = utcnow()
    async with c.cursor() as cur:
        await cur.executemany(
            "INSERT INTO job_events (job_id, created_at, kind, data) VALUES (%s, %s, %s, %s)",
            [(job_id, now, str(kind), jsonb(data)) for kind, data in events])
    await c.execute("SELECT pg_notify(%s, %s)", [EVENT_CHANNEL, job_id])


async def first_job(c: Conn, where: str, args: list[Any]) -> Job | None:
    """The first job matching ``where`` (SQL written here, never by a client), or None."""
    cur = await c.execute(f"{SELECT} WHERE {where} LIMIT 1", args)
    row = await cur.fetchone()
    return to_job(row) if row else None


async def migrate(c: Conn) -> None:
    """Apply the pending migrations (:data:`.schema.POSTGRES_MIGRATIONS`) in this transaction,
    under an advisory lock."""
    await c.execute("SELECT pg_advisory_xact_lock(%s)", [MIGRATION_LOCK_KEY])
    await c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    row = await (await c.execute("SELECT version FROM schema_version")).fetchone()
    if row is None:
        await c.execute("INSERT INTO schema_version (version) VALUES (0)")
    version = int(row[0]) if row else 0
    for target, script in enumerate(POSTGRES_MIGRATIONS[version:], start=version + 1):
        await c.execute(script)  # our own constant: several statements, no parameters
        await c.execute("UPDATE schema_version SET version = %s", [target])


async def apply_transition(c: Conn, job_id: str, intent: Intent, changes: Mapping[str, Any],
                 record: Jsonb | None) -> bool:
    """The compare-and-set ``UPDATE`` of :meth:`PostgresJobStore.apply`, on ``c``."""
    sets, values = assignments(changes, utcnow())
    if record is not None:
        sets.append("attempts = attempts || jsonb_build_array(%s::jsonb)")
        values.append(record)
    sources = sorted(s.value for s in TRANSITIONS[intent].sources)
    cur = await c.execute(f"UPDATE jobs SET {', '.join(sets)} "  # columns: SETTABLE only
                          f"WHERE job_id = %s AND status = ANY(%s) {EVENT_RETURNING}",
                          [*values, job_id, sources])
    row = await cur.fetchone()
    if row is None:
        return False
    await insert_events(c, job_id, transition_events(
        event_row(row), intent=intent, record=record.obj if record is not None else None))
    if intent in PRUNE_EVENTS_ON:
        await c.execute("DELETE FROM job_events WHERE job_id = %s AND event_id < "
                        "(SELECT MAX(event_id) FROM job_events WHERE job_id = %s)",
                        [job_id, job_id])
        # finished webhook deliveries go with the job's files (pending ones still try)
        await c.execute("DELETE FROM webhook_deliveries WHERE job_id = %s AND state <> 'pending'",
                        [job_id])
    await queue_webhook_tx(c, job_id)  # issue 16: the outbox row, same commit
    return True


async def queue_webhook_tx(c: Conn, job_id: str) -> None:
    """Inside a transition's transaction: the outbox row of the job's terminal event when
    it has a ``webhook_url`` (:func:`~colmap_pipeline.webhook_outbox.webhook_delivery_row`), so the
    delivery is committed with the status or not at all."""
    cur = await c.execute("SELECT status FROM jobs WHERE job_id = %s "
                          "AND webhook_url IS NOT NULL", [job_id])
    hit = await cur.fetchone()
    if hit is None or JobStatus(hit[0]) not in WEBHOOK_EVENTS:
        return
    job = await first_job(c, "job_id = %s", [job_id])
    row = webhook_delivery_row(vars(job), new_delivery_id(), utcnow()) if job else None
    if row is None:
        return
    row["payload"], row["attempts"] = jsonb(row["payload"]), jsonb([])
    await c.execute(f"INSERT INTO webhook_deliveries ({', '.join(DELIVERY_COLUMNS)}) "
                    f"VALUES ({', '.join('%s' for _ in DELIVERY_COLUMNS)})",
                    [row[k] for k in DELIVERY_COLUMNS])


def to_event(row: tuple[Any, ...]) -> JobEvent:
    """A :class:`~colmap_pipeline.job_events.JobEvent` from ``(event_id, job_id, created_at, kind,
    data)`` (psycopg decoded the JSONB)."""
    return JobEvent(event_id=int(row[0]), job_id=row[1], created_at=row[2],
                    kind=EventKind(row[3]), data=row[4])


def to_delivery(row: tuple[Any, ...]) -> WebhookDelivery:
    """A :class:`~colmap_pipeline.webhook_outbox.WebhookDelivery` from a row in ``DELIVERY_COLUMNS``
    order (psycopg has decoded the JSONB columns; webhooks, issue 16)."""
    data = dict(zip(DELIVERY_COLUMNS, row, strict=True))
    data["state"] = DeliveryState(data["state"])
    return WebhookDelivery(**data)
