"""The SQLite store's SQL helpers (:class:`.sqlite.SqliteJobStore`): row converters, the
compare-and-set of a transition with its events and webhook outbox row (all on the caller's
connection, inside its transaction), the schema version row and the translation of
``sqlite3`` errors into the store's own (:func:`translate`).
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

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

SELECT = f"SELECT {', '.join(COLUMNS)} FROM jobs"
#: what a write returns to build its events (:func:`~colmap_pipeline.job_events.transition_events`)
EVENT_COLUMNS = ("status", "progress", "current_stage", "message", "attempt", "updated_at",
                  "error_code", "error_message", "error_hint", "results")
EVENT_RETURNING = f"RETURNING {', '.join(EVENT_COLUMNS)}"


def marks(values: Iterable[Any]) -> str:
    return ", ".join("?" for _ in values)


def to_job(row: tuple[Any, ...]) -> Job:
    """A :class:`Job` from a row selected as :data:`SELECT` (columns in :data:`COLUMNS`)."""
    data = dict(zip(COLUMNS, row, strict=True))
    for col in JSON_COLUMNS:
        if data[col] is not None:
            data[col] = json.loads(data[col])
    data["status"] = JobStatus(data["status"])
    if data["attempts"] is None:
        data["attempts"] = []
    return Job(**data)


def translate(exc: BaseException) -> BaseException:
    """The store's exception for a backend one (see :mod:`.sqlite`'s docstring); others
    unchanged."""
    if isinstance(exc, sqlite3.IntegrityError):
        if "UNIQUE" in str(exc) or "PRIMARY KEY" in str(exc):
            return DuplicateKey(str(exc))
        return StoreError(f"integrity: {exc}")
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError | OSError):
        return StoreUnavailable(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, sqlite3.Error):
        return StoreError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OverflowError):
        return ValueError(f"a value does not fit SQLite's 64-bit integer: {exc}")
    return exc


def first_job(c: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> Job | None:
    """The first job matching ``where`` (SQL written here, never by a client), or None."""
    rows = c.execute(f"{SELECT} WHERE {where} LIMIT 1", args).fetchall()
    return to_job(rows[0]) if rows else None


def event_row(row: tuple[Any, ...]) -> dict[str, Any]:
    """A row returned as :data:`EVENT_RETURNING` as a mapping (``results`` decoded)."""
    out = dict(zip(EVENT_COLUMNS, row, strict=True))
    if out["results"] is not None:
        out["results"] = json.loads(out["results"])
    return out


def insert_events(c: sqlite3.Connection, job_id: str,
                   events: list[tuple[EventKind, dict[str, Any]]]) -> None:
    """Insert ``events`` of ``job_id`` in order (inside the caller's transaction)."""
    now = utcnow()
    c.executemany("INSERT INTO job_events (job_id, created_at, kind, data) VALUES (?, ?, ?, ?)",
                  [(job_id, now, str(kind), encode_json(data)) for kind, data in events])


def to_event(row: tuple[Any, ...]) -> JobEvent:
    """A :class:`~colmap_pipeline.job_events.JobEvent` from ``(event_id, job_id, created_at, kind,
    data)``."""
    return JobEvent(event_id=int(row[0]), job_id=row[1], created_at=row[2],
                    kind=EventKind(row[3]), data=json.loads(row[4]))


def version_row(c: sqlite3.Connection) -> int:
    """The applied schema version, creating its table (version 0) on a new file."""
    c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    rows = c.execute("SELECT version FROM schema_version").fetchall()
    if not rows:
        c.execute("INSERT INTO schema_version (version) VALUES (0)")
    return int(rows[0][0]) if rows else 0


def assignments(changes: Mapping[str, Any], now: str) -> tuple[list[str], list[Any]]:
    """``SET`` clauses and values for :func:`~colmap_pipeline.jobs.planned_changes`' output.
    Column names come from :data:`~colmap_pipeline.jobs.SETTABLE` (validated there)."""
    sets: list[str] = []
    values: list[Any] = []
    for col, value in changes.items():
        if value is Stamp.INCREMENT:
            sets.append(f"{col} = {col} + 1")
            continue
        sets.append(f"{col} = COALESCE({col}, ?)" if value is Stamp.NOW_IF_UNSET
                    else f"{col} = ?")
        if value is Stamp.NOW or value is Stamp.NOW_IF_UNSET:
            values.append(now)
        else:
            values.append(encode_json(value) if col in JSON_COLUMNS and value is not None
                          else value)
    return sets, values


def to_delivery(row: tuple[Any, ...]) -> WebhookDelivery:
    """A :class:`~colmap_pipeline.webhook_outbox.WebhookDelivery` from a row in ``DELIVERY_COLUMNS``
    order (webhooks, issue 16)."""
    data = dict(zip(DELIVERY_COLUMNS, row, strict=True))
    data["payload"], data["attempts"] = json.loads(data["payload"]), json.loads(data["attempts"])
    data["state"] = DeliveryState(data["state"])
    return WebhookDelivery(**data)


def apply_transition(c: sqlite3.Connection, job_id: str, intent: Intent,
              changes: Mapping[str, Any], record: str | None) -> bool:
    """The compare-and-set ``UPDATE`` of :meth:`.sqlite.SqliteJobStore.apply`, on ``c`` (inside
    its transaction), with the transition's events and webhook outbox row."""
    sets, values = assignments(changes, utcnow())
    if record is not None:
        sets.append("attempts = json_insert(attempts, '$[#]', json(?))")
        values.append(record)
    sources = sorted(s.value for s in TRANSITIONS[intent].sources)
    rows = c.execute(f"UPDATE jobs SET {', '.join(sets)} "
                     f"WHERE job_id = ? AND status IN ({marks(sources)}) {EVENT_RETURNING}",
                     [*values, job_id, *sources]).fetchall()
    if len(rows) != 1:
        return False
    insert_events(c, job_id, transition_events(
        event_row(rows[0]), intent=intent,
        record=json.loads(record) if record is not None else None))
    if intent in PRUNE_EVENTS_ON:
        c.execute("DELETE FROM job_events WHERE job_id = ? AND event_id < "
                  "(SELECT MAX(event_id) FROM job_events WHERE job_id = ?)", (job_id, job_id))
        # finished webhook deliveries go with the job's files (pending ones still try)
        c.execute("DELETE FROM webhook_deliveries WHERE job_id = ? AND state <> 'pending'",
                  (job_id,))
    queue_webhook_tx(c, job_id)  # issue 16: the outbox row, same commit
    return True


def queue_webhook_tx(c: sqlite3.Connection, job_id: str) -> None:
    """Inside a transition's transaction: the outbox row of the job's terminal event when
    it has a ``webhook_url`` (:func:`~colmap_pipeline.webhook_outbox.webhook_delivery_row`), so the
    delivery is committed with the status or not at all."""
    hit = c.execute("SELECT status FROM jobs WHERE job_id = ? AND webhook_url IS NOT NULL",
                    (job_id,)).fetchone()
    if hit is None or JobStatus(hit[0]) not in WEBHOOK_EVENTS:
        return
    job = first_job(c, "job_id = ?", (job_id,))
    row = webhook_delivery_row(vars(job), new_delivery_id(), utcnow()) if job else None
    if row is None:
        return
    row["payload"], row["attempts"] = encode_json(row["payload"]), encode_json([])
    c.execute(f"INSERT INTO webhook_deliveries ({', '.join(DELIVERY_COLUMNS)}) "
              f"VALUES ({marks(DELIVERY_COLUMNS)})", [row[k] for k in DELIVERY_COLUMNS])
