"""The job table's schema, as versioned append-only migrations for each store: SQLite
(:mod:`.sqlite`) and PostgreSQL (:mod:`.postgres`) take the same steps, so a database of either
kind at version N has the same columns (:data:`colmap_pipeline.jobs.COLUMNS`).

Migration i moves the schema from version i to i+1; each store records the applied version in a
one-row table ``schema_version`` and applies the missing steps when it opens. A new column is a
new entry in BOTH lists, never an edit of a shipped one. :func:`list_filter` is the one
``WHERE`` clause of both stores' ``list_jobs``.
"""
from __future__ import annotations

from typing import Any

#: SQLite: each migration moves the schema from version i to i+1. Append only; never edit a
#: shipped one.
SQLITE_MIGRATIONS: list[str] = [
    # 0 -> 1: jobs table
    """
    CREATE TABLE jobs (
        job_id TEXT PRIMARY KEY,
        scan_id TEXT NOT NULL,
        project_id TEXT NOT NULL,
        scan_name TEXT NOT NULL,
        user_email TEXT,
        quality TEXT NOT NULL,
        status TEXT NOT NULL,
        progress INTEGER NOT NULL DEFAULT 0,
        current_stage TEXT,
        message TEXT,
        error_code TEXT,
        error_message TEXT,
        error_hint TEXT,
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        updated_at TEXT NOT NULL,
        input_path TEXT NOT NULL,
        input_filename TEXT,
        input_bytes INTEGER NOT NULL,
        input_sha256 TEXT NOT NULL,
        video_info TEXT,
        results TEXT,
        attempt INTEGER NOT NULL DEFAULT 0,
        attempts TEXT NOT NULL DEFAULT '[]'
    );
    CREATE INDEX jobs_status_created ON jobs(status, created_at);
    CREATE INDEX jobs_project_created ON jobs(project_id, created_at);
    """,
    # 1 -> 2: job lifecycle (issue 5): the stage child's process group (killed at boot if it
    # survived its server), the upload's Idempotency-Key (unique while set), automatic retries
    """
    ALTER TABLE jobs ADD COLUMN pgid INTEGER;
    ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
    ALTER TABLE jobs ADD COLUMN auto_retries INTEGER NOT NULL DEFAULT 0;
    CREATE UNIQUE INDEX jobs_idempotency_key ON jobs(idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX jobs_status_finished ON jobs(status, finished_at);
    """,
    # 2 -> 3 (issue 10): a failed reconstruction's numbers (JSON, item 6), and the fingerprint
    # of the request stored with its Idempotency-Key (item 10)
    """
    ALTER TABLE jobs ADD COLUMN error_details TEXT;
    ALTER TABLE jobs ADD COLUMN request_fingerprint TEXT;
    """,
    # 3 -> 4 (issue 13): the API key that created the job; an Idempotency-Key is unique per
    # owner (NULL, authentication off, is one owner of its own): key first, so the lookup by key
    # uses it; the per-owner list and pending count
    """
    ALTER TABLE jobs ADD COLUMN owner TEXT;
    DROP INDEX jobs_idempotency_key;
    CREATE UNIQUE INDEX jobs_owner_idempotency_key
        ON jobs(idempotency_key, COALESCE(owner, '')) WHERE idempotency_key IS NOT NULL;
    CREATE INDEX jobs_owner_status_created ON jobs(owner, status, created_at);
    """,
    # 4 -> 5 (issue 16): every change of a job as an event (status, progress, stage, message,
    # ladder attempt, warning); ``event_id`` only grows (the SSE id, ``Last-Event-ID``)
    """
    CREATE TABLE job_events (
        event_id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        created_at TEXT NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL
    );
    CREATE INDEX job_events_job ON job_events(job_id, event_id);
    """,
    # 5 -> 6 (issue 16): webhooks: the per-job target, and one row per delivery (the outbox:
    # written with the terminal transition, retried until delivered or given up)
    """
    ALTER TABLE jobs ADD COLUMN webhook_url TEXT;
    CREATE TABLE webhook_deliveries (
        delivery_id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        url TEXT NOT NULL,
        payload TEXT NOT NULL,
        state TEXT NOT NULL,
        tries INTEGER NOT NULL DEFAULT 0,
        next_try_at TEXT,
        attempts TEXT NOT NULL DEFAULT '[]',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries(state, next_try_at);
    CREATE INDEX webhook_deliveries_job ON webhook_deliveries(job_id, created_at);
    """,
]

#: PostgreSQL: the same steps as :data:`SQLITE_MIGRATIONS` in its own types (JSONB, BIGINT,
#: an identity ``seq`` for SQLite's ``rowid``). Append only, in step with the SQLite list.
POSTGRES_MIGRATIONS: list[str] = [
    # 0 -> 1: jobs table
    """
    CREATE TABLE jobs (
        seq BIGINT GENERATED ALWAYS AS IDENTITY UNIQUE,
        job_id TEXT PRIMARY KEY,
        scan_id TEXT NOT NULL,
        project_id TEXT NOT NULL,
        scan_name TEXT NOT NULL,
        user_email TEXT,
        quality TEXT NOT NULL,
        status TEXT NOT NULL,
        progress INTEGER NOT NULL DEFAULT 0,
        current_stage TEXT,
        message TEXT,
        error_code TEXT,
        error_message TEXT,
        error_hint TEXT,
        created_at TEXT NOT NULL,
        started_at TEXT,
        finished_at TEXT,
        updated_at TEXT NOT NULL,
        input_path TEXT NOT NULL,
        input_filename TEXT,
        input_bytes BIGINT NOT NULL,
        input_sha256 TEXT NOT NULL,
        video_info JSONB,
        results JSONB,
        attempt INTEGER NOT NULL DEFAULT 0,
        attempts JSONB NOT NULL DEFAULT '[]'::jsonb
    );
    CREATE INDEX jobs_status_created ON jobs(status, created_at, seq);
    CREATE INDEX jobs_project_created ON jobs(project_id, created_at, seq);
    """,
    # 1 -> 2: job lifecycle: the stage child's process group, the upload's Idempotency-Key
    # (unique while set), automatic retries
    """
    ALTER TABLE jobs ADD COLUMN pgid INTEGER;
    ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
    ALTER TABLE jobs ADD COLUMN auto_retries INTEGER NOT NULL DEFAULT 0;
    CREATE UNIQUE INDEX jobs_idempotency_key ON jobs(idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX jobs_status_finished ON jobs(status, finished_at);
    """,
    # 2 -> 3: a failed reconstruction's numbers, the request fingerprint of an Idempotency-Key
    """
    ALTER TABLE jobs ADD COLUMN error_details JSONB;
    ALTER TABLE jobs ADD COLUMN request_fingerprint TEXT;
    """,
    # 3 -> 4: the creating API key; the Idempotency-Key unique per owner; the per-owner index
    """
    ALTER TABLE jobs ADD COLUMN owner TEXT;
    DROP INDEX jobs_idempotency_key;
    CREATE UNIQUE INDEX jobs_owner_idempotency_key
        ON jobs(idempotency_key, (COALESCE(owner, ''))) WHERE idempotency_key IS NOT NULL;
    CREATE INDEX jobs_owner_status_created ON jobs(owner, status, created_at, seq);
    """,
    # 4 -> 5: job events (``event_id`` only grows: the SSE id)
    """
    CREATE TABLE job_events (
        event_id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        job_id TEXT NOT NULL,
        created_at TEXT NOT NULL,
        kind TEXT NOT NULL,
        data JSONB NOT NULL
    );
    CREATE INDEX job_events_job ON job_events(job_id, event_id);
    """,
    # 5 -> 6: webhooks: the per-job target and the delivery outbox
    """
    ALTER TABLE jobs ADD COLUMN webhook_url TEXT;
    CREATE TABLE webhook_deliveries (
        delivery_id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        url TEXT NOT NULL,
        payload JSONB NOT NULL,
        state TEXT NOT NULL,
        tries INTEGER NOT NULL DEFAULT 0,
        next_try_at TEXT,
        attempts JSONB NOT NULL DEFAULT '[]'::jsonb,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX webhook_deliveries_due ON webhook_deliveries(state, next_try_at);
    CREATE INDEX webhook_deliveries_job ON webhook_deliveries(job_id, created_at);
    """,
]


def list_filter(mark: str, *, project_id: str | None, status: str | None,
                owner: str | None) -> tuple[str, list[Any]]:
    """The ``WHERE`` clause of ``list_jobs`` and its arguments, in order.

    Args:
        mark: the driver's placeholder (``"?"`` for sqlite3, ``"%s"`` for psycopg).
        project_id, owner: exact matches when given (``None``: any).
        status: an exact match when given; ``None`` leaves out deleted jobs (tombstones are
            listed only on an explicit ``status="deleted"``, issue 10).
    Returns: ``("WHERE …", [values])``; column names are this function's, never a client's.
    """
    where: list[str] = []
    args: list[Any] = []
    for col, value in (("project_id", project_id), ("status", status), ("owner", owner)):
        if value is not None:
            where.append(f"{col} = {mark}")
            args.append(str(value))
    if status is None:
        where.append("status <> 'deleted'")
    return f"WHERE {' AND '.join(where)}", args
