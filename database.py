"""Job store: SQLite through aiosqlite (WAL), with a versioned schema and migrations.

Every status change is a compare-and-set in SQL (``UPDATE … WHERE status IN (…)``), after
procrastinate / NodeODM: two writers can never both move a job out of the same state, and a
caller learns whether its transition happened from the returned bool.

Rows are returned as plain ``dict``s; JSON columns (``results``, ``video_info``, ``attempts``)
are decoded. Times are ISO-8601 UTC strings.
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

JOB_STATUSES = ("pending", "processing", "completed", "failed", "cancelled", "expired", "deleted")
JSON_COLUMNS = ("results", "video_info", "attempts")

# Each migration moves the schema from version i to i+1. Append only; never edit a shipped one.
MIGRATIONS: list[str] = [
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
]


def utcnow() -> str:
    """Current UTC time as ISO-8601 with microseconds (sortable as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


class JobStore:
    """Async job store on one SQLite file.

    Open with :meth:`open`; close with :meth:`close`. One connection is shared (aiosqlite runs
    it on its own thread), so calls never block the event loop.

    Raises:
        sqlite3.Error: (``aiosqlite`` re-raises it) when the database is unusable.
    """

    def __init__(self, conn: aiosqlite.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    async def open(cls, path: Path) -> JobStore:
        """Open (creating parent folders and the file), enable WAL, apply pending migrations."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, timeout=30)
        conn.row_factory = aiosqlite.Row
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")
        await conn.execute("PRAGMA busy_timeout=30000")
        store = cls(conn, path)
        await store._migrate()
        return store

    async def close(self) -> None:
        """Close the connection."""
        await self._conn.close()

    async def _migrate(self) -> None:
        await self._conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        cur = await self._conn.execute("SELECT version FROM schema_version")
        row = await cur.fetchone()
        version = row[0] if row else 0
        if row is None:
            await self._conn.execute("INSERT INTO schema_version (version) VALUES (0)")
        for target, script in enumerate(MIGRATIONS[version:], start=version + 1):
            await self._conn.executescript(
                f"BEGIN; {script}; UPDATE schema_version SET version = {int(target)}; COMMIT;")
        await self._conn.commit()

    async def schema_version(self) -> int:
        """Applied schema version (``len(MIGRATIONS)`` once open)."""
        cur = await self._conn.execute("SELECT version FROM schema_version")
        return (await cur.fetchone())[0]

    async def ping(self) -> bool:
        """True when a trivial query answers."""
        try:
            cur = await self._conn.execute("SELECT 1")
            return (await cur.fetchone())[0] == 1
        except sqlite3.Error:
            return False

    # ---- rows -------------------------------------------------------------------------------
    @staticmethod
    def _row(row: aiosqlite.Row | None) -> dict | None:
        if row is None:
            return None
        out = dict(row)
        for col in JSON_COLUMNS:
            if out.get(col) is not None:
                out[col] = json.loads(out[col])
        return out

    async def create_job(self, job: dict[str, Any]) -> dict:
        """Insert a new ``pending`` job.

        Args:
            job: at least job_id, scan_id, project_id, scan_name, quality, input_path,
                input_bytes, input_sha256; optional user_email, input_filename, video_info.
        Returns: the stored row.
        Raises: sqlite3.IntegrityError on a duplicate job_id.
        """
        now = utcnow()
        row = {
            "user_email": None, "input_filename": None, "video_info": None,
            **job, "status": "pending", "progress": 0, "current_stage": "Queued",
            "message": "Waiting for a free worker", "created_at": now, "updated_at": now,
        }
        if row["video_info"] is not None:
            row["video_info"] = json.dumps(row["video_info"])
        cols = ", ".join(row)
        marks = ", ".join(f":{c}" for c in row)
        await self._conn.execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})", row)
        await self._conn.commit()
        return await self.get_job(row["job_id"])

    async def get_job(self, job_id: str) -> dict | None:
        """The job row, or ``None``."""
        cur = await self._conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,))
        return self._row(await cur.fetchone())

    async def list_jobs(self, *, project_id: str | None = None, status: str | None = None,
                        limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
        """Jobs newest first, filtered; returns ``(page, total matching)``."""
        where, args = [], []
        if project_id is not None:
            where.append("project_id = ?")
            args.append(project_id)
        if status is not None:
            where.append("status = ?")
            args.append(status)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        cur = await self._conn.execute(f"SELECT COUNT(*) FROM jobs {clause}", args)
        total = (await cur.fetchone())[0]
        cur = await self._conn.execute(
            f"SELECT * FROM jobs {clause} ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
            [*args, limit, offset])
        return [self._row(r) for r in await cur.fetchall()], total

    async def queue_position(self, job_id: str) -> int | None:
        """1-based position among pending jobs (oldest first), or ``None`` if not pending."""
        cur = await self._conn.execute(
            """SELECT COUNT(*) FROM jobs p, jobs j
               WHERE j.job_id = ? AND j.status = 'pending' AND p.status = 'pending'
                 AND (p.created_at < j.created_at
                      OR (p.created_at = j.created_at AND p.rowid <= j.rowid))""",
            (job_id,))
        n = (await cur.fetchone())[0]
        return n or None

    async def count_by_status(self) -> dict[str, int]:
        """``{status: count}`` over all jobs."""
        cur = await self._conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        return {s: n for s, n in await cur.fetchall()}

    # ---- transitions (compare-and-set) ------------------------------------------------------
    async def transition(self, job_id: str, from_statuses: Iterable[str], to_status: str,
                         attempt_record: dict | None = None, **fields: Any) -> bool:
        """Move ``job_id`` to ``to_status`` only if its status is one of ``from_statuses``.

        Extra ``fields`` (column=value; JSON columns take Python objects) are set in the same
        statement, and ``attempt_record`` (a JSON object) is appended to ``attempts`` in it too,
        so no reader sees the new status without the attempt that led to it. Returns whether
        the row changed.
        Raises: ValueError for an unknown status.
        """
        if to_status not in JOB_STATUSES:
            raise ValueError(f"unknown status {to_status!r}")
        froms = list(from_statuses)
        sets = {"status": to_status, "updated_at": utcnow(), **fields}
        for col in JSON_COLUMNS:
            if col in sets and sets[col] is not None:
                sets[col] = json.dumps(sets[col])
        assignments = ", ".join(f"{c} = ?" for c in sets)
        values = list(sets.values())
        if attempt_record is not None:
            assignments += ", attempts = json_insert(attempts, '$[#]', json(?))"
            values.append(json.dumps(attempt_record))
        marks = ", ".join("?" for _ in froms)
        cur = await self._conn.execute(
            f"UPDATE jobs SET {assignments} WHERE job_id = ? AND status IN ({marks})",
            [*values, job_id, *froms])
        await self._conn.commit()
        return cur.rowcount == 1

    async def claim_next_pending(self) -> dict | None:
        """Atomically take the oldest ``pending`` job into ``processing``.

        Sets started_at, increments ``attempt`` and resets progress for the new attempt.
        Returns the claimed row or ``None`` when nothing is pending.
        """
        now = utcnow()
        cur = await self._conn.execute(
            """UPDATE jobs SET status = 'processing', started_at = ?, updated_at = ?,
                      attempt = attempt + 1, progress = 0, current_stage = 'Starting',
                      message = 'Starting the pipeline'
               WHERE job_id = (SELECT job_id FROM jobs WHERE status = 'pending'
                               ORDER BY created_at, rowid LIMIT 1)
                 AND status = 'pending'
               RETURNING job_id""", (now, now))
        row = await cur.fetchone()
        await self._conn.commit()
        return await self.get_job(row[0]) if row else None

    async def update_progress(self, job_id: str, progress: int, current_stage: str,
                              message: str) -> bool:
        """Record progress of a ``processing`` job; progress never goes backwards.

        Args:
            progress: 0-100; stored as ``max(stored, progress)``.
        Returns: whether the job was still processing.
        """
        cur = await self._conn.execute(
            """UPDATE jobs SET progress = MAX(progress, ?), current_stage = ?, message = ?,
                      updated_at = ?
               WHERE job_id = ? AND status = 'processing'""",
            (max(0, min(100, int(progress))), current_stage, message, utcnow(), job_id))
        await self._conn.commit()
        return cur.rowcount == 1

    async def append_attempt(self, job_id: str, attempt: dict) -> None:
        """Append one attempt record (JSON object) to the job's ``attempts`` list."""
        await self._conn.execute(
            """UPDATE jobs SET attempts = json_insert(attempts, '$[#]', json(?)), updated_at = ?
               WHERE job_id = ?""", (json.dumps(attempt), utcnow(), job_id))
        await self._conn.commit()

    async def requeue_processing(self) -> list[str]:
        """At boot: jobs left ``processing`` by a dead server go back to ``pending``.

        Returns their ids.
        """
        cur = await self._conn.execute(
            """UPDATE jobs SET status = 'pending', current_stage = 'Queued', updated_at = ?,
                      message = 'Requeued after a server restart'
               WHERE status = 'processing' RETURNING job_id""", (utcnow(),))
        ids = [r[0] for r in await cur.fetchall()]
        await self._conn.commit()
        return ids

    # ---- lifecycle (issue 5) ----------------------------------------------------------------
    async def set_pgid(self, job_id: str, pgid: int | None) -> None:
        """Record (or clear, with ``None``) the process group of the job's running stage child.

        Persisted so that a server restarted after a crash can kill a child that outlived it
        (:meth:`recorded_pgids`).
        """
        await self._conn.execute("UPDATE jobs SET pgid = ? WHERE job_id = ?", (pgid, job_id))
        await self._conn.commit()

    async def recorded_pgids(self) -> list[tuple[str, int]]:
        """``[(job_id, pgid)]`` of every row that still names a stage child's process group."""
        cur = await self._conn.execute(
            "SELECT job_id, pgid FROM jobs WHERE pgid IS NOT NULL ORDER BY rowid")
        return [(r[0], int(r[1])) for r in await cur.fetchall()]

    async def find_by_idempotency_key(self, key: str) -> dict | None:
        """The job created by an upload that carried ``Idempotency-Key: key``, or ``None``."""
        cur = await self._conn.execute(
            "SELECT * FROM jobs WHERE idempotency_key = ? AND status != 'deleted'", (key,))
        return self._row(await cur.fetchone())

    async def requeue_for_retry(self, job_id: str, from_statuses: Iterable[str],
                                message: str) -> bool:
        """Move a job back to ``pending`` for another attempt (compare-and-set), clearing the
        error and results of the previous one. Returns whether the row changed."""
        return await self.transition(
            job_id, from_statuses, "pending", error_code=None, error_message=None,
            error_hint=None, results=None, finished_at=None, progress=0,
            current_stage="Queued", message=message)

    async def bump_attempt(self, job_id: str, *, auto_retry: bool) -> int:
        """Start a new attempt of a ``processing`` job in place (automatic retry): increments
        ``attempt`` (and ``auto_retries`` when ``auto_retry``); returns the new attempt number
        (0 when the job is no longer processing)."""
        cur = await self._conn.execute(
            """UPDATE jobs SET attempt = attempt + 1, auto_retries = auto_retries + ?,
                      started_at = ?, updated_at = ?
               WHERE job_id = ? AND status = 'processing' RETURNING attempt""",
            (1 if auto_retry else 0, utcnow(), utcnow(), job_id))
        row = await cur.fetchone()
        await self._conn.commit()
        return int(row[0]) if row else 0

    async def finished_before(self, cutoff_iso: str,
                              statuses: Iterable[str] = ("completed", "failed", "cancelled"),
                              ) -> list[str]:
        """Ids of jobs in ``statuses`` whose ``finished_at`` is older than ``cutoff_iso``
        (ISO-8601 UTC, compared as text: every time here has the same format)."""
        sts = list(statuses)
        marks = ", ".join("?" for _ in sts)
        cur = await self._conn.execute(
            f"""SELECT job_id FROM jobs WHERE status IN ({marks}) AND finished_at IS NOT NULL
                AND finished_at < ? ORDER BY finished_at""", [*sts, cutoff_iso])
        return [r[0] for r in await cur.fetchall()]

    async def job_ids_with_files(self) -> set[str]:
        """Ids of every job whose files must stay on disk (any status but expired/deleted)."""
        cur = await self._conn.execute(
            "SELECT job_id FROM jobs WHERE status NOT IN ('expired', 'deleted')")
        return {r[0] for r in await cur.fetchall()}
