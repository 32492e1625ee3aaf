"""JobStore on a real SQLite file: migrations, compare-and-set transitions, queue order."""
from __future__ import annotations

import asyncio
import sqlite3

import pytest

import database
from database import JobStore


def _job(i: int, project: str = "p1") -> dict:
    return {"job_id": f"job-{i}", "scan_id": f"scan-{i}", "project_id": project,
            "scan_name": f"Scan {i}", "quality": "low", "input_path": f"/x/{i}.mp4",
            "input_bytes": 100 + i, "input_sha256": "ab" * 32, "video_info": {"width": 848}}


def run(coro):
    return asyncio.run(coro)


async def _open_and(path, fn):
    s = await JobStore.open(path)
    try:
        return await fn(s)
    finally:
        await s.close()


def test_schema_version_and_wal(tmp_path):
    path = tmp_path / "jobs.db"

    async def check(s):
        return await s.schema_version()

    assert run(_open_and(path, check)) == len(database.MIGRATIONS)
    # reopening applies nothing twice
    assert run(_open_and(path, check)) == len(database.MIGRATIONS)
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        cols = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
    for col in ("status", "progress", "current_stage", "message", "created_at", "started_at",
                "finished_at", "error_code", "error_message", "error_hint", "quality",
                "input_bytes", "input_sha256", "results"):
        assert col in cols


def test_create_get_and_json_columns(tmp_path):
    async def go(s):
        row = await s.create_job(_job(1))
        assert row["status"] == "pending" and row["progress"] == 0
        assert row["video_info"] == {"width": 848}
        assert (await s.get_job("job-1"))["input_bytes"] == 101
        assert await s.get_job("nope") is None
        with pytest.raises(sqlite3.IntegrityError):
            await s.create_job(_job(1))
    run(_open_and(tmp_path / "j.db", go))


def test_claim_is_fifo_and_cas(tmp_path):
    async def go(s):
        for i in range(3):
            await s.create_job(_job(i))
        assert await s.queue_position("job-0") == 1
        assert await s.queue_position("job-2") == 3
        first = await s.claim_next_pending()
        assert first["job_id"] == "job-0" and first["status"] == "processing"
        assert first["attempt"] == 1 and first["started_at"]
        assert await s.queue_position("job-0") is None
        assert await s.queue_position("job-2") == 2
        # CAS: a job can leave processing only once
        assert await s.transition("job-0", ["processing"], "completed", results={"n": 3})
        assert not await s.transition("job-0", ["processing"], "failed")
        assert (await s.get_job("job-0"))["results"] == {"n": 3}
        with pytest.raises(ValueError):
            await s.transition("job-1", ["pending"], "bogus")
    run(_open_and(tmp_path / "j.db", go))


def test_concurrent_claims_never_share_a_job(tmp_path):
    async def go(s):
        for i in range(5):
            await s.create_job(_job(i))
        claims = await asyncio.gather(*(s.claim_next_pending() for _ in range(8)))
        ids = [c["job_id"] for c in claims if c]
        assert sorted(ids) == [f"job-{i}" for i in range(5)]
        assert claims.count(None) == 3
    run(_open_and(tmp_path / "j.db", go))


def test_progress_never_goes_backwards(tmp_path):
    async def go(s):
        await s.create_job(_job(1))
        assert not await s.update_progress("job-1", 10, "Frame Extraction", "x")  # not processing
        await s.claim_next_pending()
        assert await s.update_progress("job-1", 40, "Feature Detection", "a")
        assert await s.update_progress("job-1", 20, "Feature Matching", "b")
        row = await s.get_job("job-1")
        assert row["progress"] == 40 and row["current_stage"] == "Feature Matching"
        assert await s.update_progress("job-1", 250, "Exporting", "c")
        assert (await s.get_job("job-1"))["progress"] == 100
    run(_open_and(tmp_path / "j.db", go))


def test_list_filters_newest_first_and_paginates(tmp_path):
    async def go(s):
        for i in range(4):
            await s.create_job(_job(i, project="a" if i % 2 == 0 else "b"))
        await s.claim_next_pending()  # job-0 -> processing
        rows, total = await s.list_jobs()
        assert total == 4 and [r["job_id"] for r in rows] == ["job-3", "job-2", "job-1", "job-0"]
        rows, total = await s.list_jobs(project_id="a")
        assert total == 2 and [r["job_id"] for r in rows] == ["job-2", "job-0"]
        rows, total = await s.list_jobs(status="processing")
        assert total == 1 and rows[0]["job_id"] == "job-0"
        rows, total = await s.list_jobs(limit=2, offset=2)
        assert total == 4 and [r["job_id"] for r in rows] == ["job-1", "job-0"]
        assert await s.count_by_status() == {"pending": 3, "processing": 1}
    run(_open_and(tmp_path / "j.db", go))


def test_requeue_and_attempts_survive_reopen(tmp_path):
    path = tmp_path / "j.db"

    async def first(s):
        await s.create_job(_job(1))
        await s.claim_next_pending()
        await s.append_attempt("job-1", {"attempt": 1, "outcome": "interrupted"})

    async def second(s):
        assert await s.requeue_processing() == ["job-1"]
        row = await s.get_job("job-1")
        assert row["status"] == "pending" and row["attempts"] == [
            {"attempt": 1, "outcome": "interrupted"}]
        again = await s.claim_next_pending()
        assert again["attempt"] == 2
    run(_open_and(path, first))
    run(_open_and(path, second))


def test_completed_status_and_its_attempt_are_one_write(tmp_path):
    """A poller never sees ``completed`` without the attempt record (seen as a race in the
    resume test when mapping got faster)."""
    async def go(s):
        await s.create_job(_job(1))
        await s.claim_next_pending()
        rec = {"attempt": 1, "outcome": "completed"}
        assert await s.transition("job-1", ["processing"], "completed", attempt_record=rec,
                                  results={"points3d": 5}, progress=100)
        row = await s.get_job("job-1")
        assert (row["status"], row["attempts"], row["results"]) == (
            "completed", [rec], {"points3d": 5})
        # a transition that does not apply writes no attempt either
        assert not await s.transition("job-1", ["processing"], "failed",
                                      attempt_record={"attempt": 1, "outcome": "failed"})
        assert (await s.get_job("job-1"))["attempts"] == [rec]
    run(_open_and(tmp_path / "j.db", go))
