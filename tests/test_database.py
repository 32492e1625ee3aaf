"""The job-store contract, run against every store: SQLite (``database.SqliteJobStore``),
PostgreSQL (``colmap_pipeline.stores.postgres.PostgresJobStore``, a fresh database per test,
issue 12) and the in-memory fake (``tests/fakes.py``): each is one entry of :data:`BACKENDS`
and passes the same tests. Backend-only facts (schema, migrations, the translation of
``sqlite3``/``psycopg`` errors, a lost PostgreSQL) are at the end; ``open_store`` picks the
store from the settings."""
from __future__ import annotations

import asyncio
import random
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from fakes import InMemoryJobStore

import database
from colmap_pipeline.jobs import (
    COLUMNS,
    DuplicateKey,
    Intent,
    JobStatus,
    JobStore,
    StoreError,
    StoreUnavailable,
)
from colmap_pipeline.stores import sqlite as sqlite_store
from colmap_pipeline.stores.postgres import PostgresJobStore
from colmap_pipeline.stores.schema import list_filter
from database import SqliteJobStore

pytestmark = pytest.mark.asyncio


@dataclass
class Backend:
    """How to open one kind of store; ``open`` again gives the same data (a restart)."""

    name: str
    open: Callable[[], Awaitable[JobStore]]


def _sqlite(tmp_path: Path) -> Backend:
    async def open_() -> JobStore:
        return await SqliteJobStore.open(tmp_path / "jobs.db")
    return Backend("sqlite", open_)


def _postgres(tmp_path: Path, url: str) -> Backend:
    async def open_() -> JobStore:
        return await PostgresJobStore.open(url)
    return Backend("postgres", open_)


def _memory(tmp_path: Path) -> Backend:
    shared = InMemoryJobStore()

    async def open_() -> JobStore:
        shared.closed = False
        return shared
    return Backend("memory", open_)


#: every store the contract runs against; ``postgres`` gets a fresh database (``pg_url``)
BACKENDS: dict[str, Callable[..., Backend]] = {"sqlite": _sqlite, "memory": _memory,
                                               "postgres": _postgres}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "postgres":
        return _postgres(tmp_path, request.getfixturevalue("pg_url"))
    return BACKENDS[request.param](tmp_path)


@pytest_asyncio.fixture
async def store(backend: Backend):
    s = await backend.open()
    try:
        yield s
    finally:
        await s.close()


def _job(i: int, project: str = "p1", **extra) -> dict:
    return {"job_id": f"job-{i}", "scan_id": f"scan-{i}", "project_id": project,
            "scan_name": f"Scan {i}", "quality": "low", "input_path": f"/x/{i}.mp4",
            "input_bytes": 100 + i, "input_sha256": "ab" * 32, "video_info": {"width": 848},
            **extra}


# ---- creating and reading ---------------------------------------------------------------------
async def test_create_get_and_json_columns(store):
    row = await store.create_job(_job(1))
    assert row.status == JobStatus.PENDING and row.status == "pending" and row.progress == 0
    assert (row.current_stage, row.message) == ("Queued", "Waiting for a free worker")
    assert row.video_info == {"width": 848} and row.attempts == [] and row.attempt == 0
    assert row.created_at == row.updated_at and row.created_at.endswith("+00:00")
    assert (await store.get_job("job-1")).input_bytes == 101
    assert await store.get_job("nope") is None
    with pytest.raises(DuplicateKey):
        await store.create_job(_job(1))
    with pytest.raises(ValueError, match="input_sha256"):
        await store.create_job({k: v for k, v in _job(2).items() if k != "input_sha256"})
    with pytest.raises(ValueError, match="status"):
        await store.create_job(_job(3, status="completed"))


async def test_returned_jobs_are_copies(store):
    row = await store.create_job(_job(1))
    row.video_info["width"] = 1
    row.attempts.append({"x": 1})
    got = await store.get_job("job-1")
    assert got.video_info == {"width": 848} and got.attempts == []
    got.video_info["width"] = 2
    assert (await store.get_job("job-1")).video_info == {"width": 848}


async def test_error_details_and_request_fingerprint_round_trip(store):
    """Issue 10 items 6 and 10: the failed reconstruction's numbers and the request's
    fingerprint are stored and read back; a retry clears the details with the error."""
    await store.create_job(_job(1, idempotency_key="k1", request_fingerprint="sha256:abc"))
    assert (await store.find_by_idempotency_key("k1")).request_fingerprint == "sha256:abc"
    await store.claim_next_pending()
    details = {"frames_used": 30, "median_keypoints": 812.5, "verified_pairs": 4,
               "attempts": [{"rung": "default", "outcome": "no_initial_pair"}]}
    assert await store.apply("job-1", Intent.FAIL, error_code="reconstruction_failed",
                             error_message="m", error_hint="h", error_details=details)
    row = await store.get_job("job-1")
    assert (row.status, row.error_code, row.error_details) == (
        "failed", "reconstruction_failed", details)
    assert row.finished_at is not None and row.request_fingerprint == "sha256:abc"
    assert await store.apply("job-1", Intent.RETRY)
    row = await store.get_job("job-1")
    assert (row.error_code, row.error_message, row.error_hint, row.error_details) == (
        None, None, None, None)


# ---- transitions ------------------------------------------------------------------------------
async def test_claim_is_fifo_and_cas(store):
    for i in range(3):
        await store.create_job(_job(i))
    assert await store.queue_position("job-0") == 1
    assert await store.queue_position("job-2") == 3
    first = await store.claim_next_pending()
    assert first.job_id == "job-0" and first.status == "processing"
    assert first.attempt == 1 and first.started_at
    assert (first.current_stage, first.message) == ("Starting", "Starting the pipeline")
    assert await store.queue_position("job-0") is None
    assert await store.queue_position("job-2") == 2
    # CAS: a job can leave processing only once
    assert await store.apply("job-0", Intent.COMPLETE, results={"n": 3})
    assert not await store.apply("job-0", Intent.FAIL)
    done = await store.get_job("job-0")
    assert done.results == {"n": 3} and done.status == "completed"
    assert (done.progress, done.current_stage) == (100, "Completed") and done.finished_at
    with pytest.raises(ValueError):
        await store.apply("job-1", "bogus")  # not an Intent
    with pytest.raises(ValueError, match="status"):
        await store.apply("job-1", Intent.CANCEL, status="completed")
    with pytest.raises(ValueError, match="no_such_column"):
        await store.apply("job-1", Intent.CANCEL, no_such_column=1)
    assert not await store.apply("nope", Intent.CANCEL)


async def test_apply_follows_the_transition_table(store):
    """Each intent moves a job only from its sources; a refused intent writes nothing."""
    await store.create_job(_job(1))
    assert not await store.apply("job-1", Intent.COMPLETE, message="no")
    assert not await store.apply("job-1", Intent.RETRY, message="no")
    assert (await store.get_job("job-1")).message == "Waiting for a free worker"
    assert await store.apply("job-1", Intent.CANCEL)
    row = await store.get_job("job-1")
    assert (row.status, row.message) == ("cancelled", "Cancelled by request")
    assert row.finished_at is not None
    assert not await store.apply("job-1", Intent.CANCEL)
    assert await store.apply("job-1", Intent.RETRY, message="Queued for retry by test")
    row = await store.get_job("job-1")
    assert (row.status, row.message, row.finished_at, row.progress) == (
        "pending", "Queued for retry by test", None, 0)
    assert await store.apply("job-1", Intent.CLAIM)  # a named job (a queue's worker)
    assert (await store.get_job("job-1")).attempt == 1
    assert await store.apply("job-1", Intent.REQUEUE, message="Paused by a server shutdown")
    row = await store.get_job("job-1")
    assert (row.status, row.current_stage, row.message) == (
        "pending", "Queued", "Paused by a server shutdown")
    await store.claim_next_pending()
    assert await store.apply("job-1", Intent.COMPLETE)
    assert not await store.apply("job-1", Intent.RETRY)  # completed is not retried
    assert await store.apply("job-1", Intent.EXPIRE)
    assert (await store.get_job("job-1")).message == "Files removed by retention"
    finished = (await store.get_job("job-1")).finished_at
    assert await store.apply("job-1", Intent.DELETE)
    row = await store.get_job("job-1")
    assert (row.status, row.finished_at) == ("deleted", finished)  # keeps its finish time
    for intent in Intent:
        assert not await store.apply("job-1", intent)


async def test_concurrent_claims_never_share_a_job(store):
    for i in range(5):
        await store.create_job(_job(i))
    claims = await asyncio.gather(*(store.claim_next_pending() for _ in range(8)))
    ids = [c.job_id for c in claims if c]
    assert sorted(ids) == [f"job-{i}" for i in range(5)]
    assert claims.count(None) == 3


async def test_progress_never_goes_backwards(store):
    await store.create_job(_job(1))
    assert not await store.update_progress("job-1", 10, "Frame Extraction", "x")  # not processing
    await store.claim_next_pending()
    assert await store.update_progress("job-1", 40, "Feature Detection", "a")
    assert await store.update_progress("job-1", 20, "Feature Matching", "b")
    row = await store.get_job("job-1")
    assert row.progress == 40 and row.current_stage == "Feature Matching" and row.message == "b"
    assert await store.update_progress("job-1", 250, "Exporting", "c")
    assert (await store.get_job("job-1")).progress == 100
    assert await store.apply("job-1", Intent.CANCEL)
    assert not await store.update_progress("job-1", 100, "Exporting", "late")
    assert (await store.get_job("job-1")).message == "Cancelled by request"


async def test_list_filters_newest_first_and_paginates(store):
    for i in range(4):
        await store.create_job(_job(i, project="a" if i % 2 == 0 else "b"))
    await store.claim_next_pending()  # job-0 -> processing
    rows, total = await store.list_jobs()
    assert total == 4 and [r.job_id for r in rows] == ["job-3", "job-2", "job-1", "job-0"]
    rows, total = await store.list_jobs(project_id="a")
    assert total == 2 and [r.job_id for r in rows] == ["job-2", "job-0"]
    rows, total = await store.list_jobs(status="processing")
    assert total == 1 and rows[0].job_id == "job-0"
    rows, total = await store.list_jobs(status=JobStatus.PENDING, limit=1)
    assert total == 3 and [r.job_id for r in rows] == ["job-3"]
    rows, total = await store.list_jobs(limit=2, offset=2)
    assert total == 4 and [r.job_id for r in rows] == ["job-1", "job-0"]
    assert await store.count_by_status() == {"pending": 3, "processing": 1}


async def test_deleted_jobs_are_listed_only_on_request(store):
    """Issue 10 (fresh-user trial): ``list_jobs()`` returned deleted jobs (and counted them)
    although ``GET /jobs/{id}`` answers 404 for them; tombstones only with status=deleted."""
    for i in range(3):
        await store.create_job(_job(i, project="a"))
    assert await store.apply("job-1", Intent.DELETE)
    rows, total = await store.list_jobs()
    assert total == 2 and [r.job_id for r in rows] == ["job-2", "job-0"]
    rows, total = await store.list_jobs(project_id="a", limit=1, offset=1)
    assert total == 2 and [r.job_id for r in rows] == ["job-0"]
    rows, total = await store.list_jobs(status="deleted")
    assert total == 1 and rows[0].job_id == "job-1" and rows[0].status == JobStatus.DELETED
    assert await store.count_by_status() == {"pending": 2, "deleted": 1}


async def test_huge_offset_and_limit_are_clamped(store):
    """Issue 10 item 4: ``offset=9223372036854775808`` (2**63) overflowed SQLite's integer
    (``OverflowError``, a 500); the store clamps it: an empty page with the true total."""
    for i in range(3):
        await store.create_job(_job(i))
    assert await store.list_jobs(offset=9223372036854775808) == ([], 3)
    rows, total = await store.list_jobs(limit=2**70)
    assert total == 3 and len(rows) == 3
    rows, total = await store.list_jobs(limit=-1, offset=-5)
    assert (rows, total) == ([], 3)


async def test_requeue_and_attempts_survive_reopen(backend):
    s = await backend.open()
    await s.create_job(_job(1))
    await s.create_job(_job(2))
    await s.claim_next_pending()
    assert await s.append_attempt("job-1", {"attempt": 1, "outcome": "interrupted"})
    assert not await s.append_attempt("nope", {"attempt": 1})
    await s.close()

    s = await backend.open()
    try:
        assert await s.requeue_processing() == ["job-1"]
        row = await s.get_job("job-1")
        assert row.status == "pending" and row.attempts == [
            {"attempt": 1, "outcome": "interrupted"}]
        assert (row.current_stage, row.message) == ("Queued", "Requeued after a server restart")
        assert await s.requeue_processing() == []
        again = await s.claim_next_pending()
        assert again.job_id == "job-1" and again.attempt == 2
    finally:
        await s.close()


async def test_completed_status_and_its_attempt_are_one_write(store):
    """A poller never sees ``completed`` without the attempt record (seen as a race in the
    resume test when mapping got faster)."""
    await store.create_job(_job(1))
    await store.claim_next_pending()
    rec = {"attempt": 1, "outcome": "completed"}
    assert await store.apply("job-1", Intent.COMPLETE, attempt_record=rec,
                             results={"points3d": 5}, progress=100)
    row = await store.get_job("job-1")
    assert (row.status, row.attempts, row.results) == ("completed", [rec], {"points3d": 5})
    # a transition that does not apply writes no attempt either
    assert not await store.apply("job-1", Intent.FAIL,
                                 attempt_record={"attempt": 1, "outcome": "failed"})
    assert (await store.get_job("job-1")).attempts == [rec]
    with pytest.raises(ValueError):
        await store.apply("job-1", Intent.EXPIRE, attempts=[], attempt_record=rec)


async def test_store_lifecycle_queries(store):
    """Moved from test_lifecycle_units.py (issue 5): idempotency keys, process groups,
    automatic retries, retention queries."""
    await store.create_job(_job(1, idempotency_key="k1"))
    with pytest.raises(DuplicateKey):
        await store.create_job(_job(2, idempotency_key="k1"))
    await store.create_job(_job(2))
    assert (await store.find_by_idempotency_key("k1")).job_id == "job-1"
    assert await store.find_by_idempotency_key("nope") is None
    claimed = await store.claim_next_pending()
    await store.set_pgid(claimed.job_id, 4242)
    assert await store.recorded_pgids() == [("job-1", 4242)]
    assert await store.bump_attempt("job-1", auto_retry=True) == 2
    assert await store.bump_attempt("job-1", auto_retry=False) == 3
    assert await store.bump_attempt("job-2", auto_retry=True) == 0  # not processing
    assert (await store.get_job("job-1")).auto_retries == 1
    assert await store.apply("job-1", Intent.FAIL, finished_at="2020-01-01T00:00:00.000000+00:00",
                             error_code="pipeline_error", pgid=None)
    assert await store.recorded_pgids() == []
    assert await store.finished_before("2021-01-01") == ["job-1"]
    assert await store.finished_before("2019-01-01") == []
    assert await store.apply("job-1", Intent.RETRY, message="again")
    row = await store.get_job("job-1")
    assert row.status == "pending" and row.error_code is None
    assert row.finished_at is None and row.message == "again"
    assert not await store.apply("job-1", Intent.RETRY, message="again")
    assert await store.job_ids_with_files() == {"job-1", "job-2"}
    assert await store.apply("job-1", Intent.DELETE)
    assert await store.find_by_idempotency_key("k1") is None
    assert await store.job_ids_with_files() == {"job-2"}
    # the key is free again once its job is deleted
    assert (await store.create_job(_job(3, idempotency_key="k1"))).idempotency_key == "k1"
    assert (await store.find_by_idempotency_key("k1")).job_id == "job-3"


async def test_owner_is_stored_and_filters_and_counts_the_list(store):
    """Issue 13: each job belongs to the API key that created it; ``list_jobs(owner=…)`` pages
    and counts only that owner's jobs (``owner=None``: everyone's), which also gives the
    per-key pending count."""
    await store.create_job(_job(1, owner="alice"))
    await store.create_job(_job(2, owner="bob"))
    await store.create_job(_job(3, project="p2", owner="alice"))
    await store.create_job(_job(4))  # authentication off: no owner
    assert [(await store.get_job(f"job-{i}")).owner for i in range(1, 5)] == [
        "alice", "bob", "alice", None]
    rows, total = await store.list_jobs(owner="alice")
    assert total == 2 and [(r.job_id, r.owner) for r in rows] == [
        ("job-3", "alice"), ("job-1", "alice")]
    rows, total = await store.list_jobs(owner="alice", limit=1, offset=1)
    assert total == 2 and [r.job_id for r in rows] == ["job-1"]
    rows, total = await store.list_jobs(owner="alice", project_id="p1")
    assert total == 1 and [r.job_id for r in rows] == ["job-1"]
    rows, total = await store.list_jobs()
    assert total == 4 and [r.job_id for r in rows] == ["job-4", "job-3", "job-2", "job-1"]
    assert await store.list_jobs(owner="carol") == ([], 0)
    assert (await store.claim_next_pending()).job_id == "job-1"
    assert await store.list_jobs(owner="alice", status="pending", limit=0) == ([], 1)
    assert await store.apply("job-3", Intent.DELETE)
    assert await store.list_jobs(owner="alice", status="pending", limit=0) == ([], 0)
    rows, total = await store.list_jobs(owner="alice")
    assert total == 1 and [r.job_id for r in rows] == ["job-1"]
    rows, total = await store.list_jobs(owner="alice", status="deleted")
    assert total == 1 and [r.job_id for r in rows] == ["job-3"]


async def test_idempotency_key_is_scoped_to_its_owner(store):
    """Issue 13: two API keys may send the same ``Idempotency-Key`` (two jobs); the same key
    from the same owner is a duplicate. No owner (authentication off) is an owner of its own."""
    await store.create_job(_job(1, owner="alice", idempotency_key="K"))
    await store.create_job(_job(2, owner="bob", idempotency_key="K"))
    await store.create_job(_job(3, idempotency_key="K"))
    for dup in (_job(4, owner="alice", idempotency_key="K"), _job(5, idempotency_key="K")):
        with pytest.raises(DuplicateKey):
            await store.create_job(dup)
    assert (await store.find_by_idempotency_key("K", "alice")).job_id == "job-1"
    assert (await store.find_by_idempotency_key("K", "bob")).job_id == "job-2"
    assert (await store.find_by_idempotency_key("K")).job_id == "job-3"
    assert (await store.find_by_idempotency_key("K", None)).job_id == "job-3"
    assert await store.find_by_idempotency_key("K", "carol") is None
    assert await store.get_job("job-4") is None and await store.get_job("job-5") is None
    assert await store.apply("job-1", Intent.DELETE)  # frees alice's key, not bob's
    assert await store.find_by_idempotency_key("K", "alice") is None
    assert (await store.find_by_idempotency_key("K", "bob")).job_id == "job-2"
    assert (await store.create_job(_job(6, owner="alice", idempotency_key="K"))).owner == "alice"
    assert (await store.find_by_idempotency_key("K", "alice")).job_id == "job-6"


async def test_expire_removes_the_email_with_the_files(store):
    """Issue 13: retention removes the owner's e-mail address together with the files; the
    rest of the row (owner included) stays."""
    await store.create_job(_job(1, user_email="a@b.co", owner="alice"))
    await store.claim_next_pending()
    assert await store.apply("job-1", Intent.COMPLETE)
    assert (await store.get_job("job-1")).user_email == "a@b.co"
    assert await store.apply("job-1", Intent.EXPIRE)
    row = await store.get_job("job-1")
    assert (row.status, row.user_email, row.owner, row.input_bytes) == (
        "expired", None, "alice", 101)


async def test_finished_before_is_terminal_only_oldest_first(store):
    for i in range(4):
        await store.create_job(_job(i))
    for _ in range(3):
        await store.claim_next_pending()
    await store.apply("job-0", Intent.COMPLETE, finished_at="2020-01-03T00:00:00.000000+00:00")
    await store.apply("job-1", Intent.FAIL, finished_at="2020-01-01T00:00:00.000000+00:00")
    await store.apply("job-2", Intent.CANCEL, finished_at="2020-01-02T00:00:00.000000+00:00")
    await store.apply("job-3", Intent.DELETE, finished_at="2019-01-01T00:00:00.000000+00:00")
    assert await store.finished_before("2021-01-01") == ["job-1", "job-2", "job-0"]
    await store.apply("job-1", Intent.EXPIRE)
    assert await store.finished_before("2021-01-01") == ["job-2", "job-0"]
    assert await store.job_ids_with_files() == {"job-0", "job-2"}
    assert await store.count_by_status() == {"completed": 1, "cancelled": 1, "expired": 1,
                                             "deleted": 1}


# ---- concurrency (issue 10 item 2) -------------------------------------------------------------
class _Ledger:
    """Random writes on a few jobs, counting what each call reported as done."""

    def __init__(self, store: JobStore, n_jobs: int) -> None:
        self.store, self.n_jobs, self.rnd = store, n_jobs, random.Random(7)
        self.starts: Counter[str] = Counter()   # claims and bumps reported
        self.records: Counter[str] = Counter()  # attempt records reported appended

    async def claim(self, job_id: str, k: int) -> None:
        job = await self.store.claim_next_pending()
        if job is not None:
            self.starts[job.job_id] += 1

    async def progress(self, job_id: str, k: int) -> None:
        p = self.rnd.randrange(101)
        await self.store.update_progress(job_id, p, "Feature Matching", f"p{p}")

    async def cancel(self, job_id: str, k: int) -> None:
        if await self.store.apply(job_id, Intent.CANCEL, attempt_record={"k": k}):
            self.records[job_id] += 1

    async def retry(self, job_id: str, k: int) -> None:
        await self.store.apply(job_id, Intent.RETRY)

    async def requeue(self, job_id: str, k: int) -> None:
        await self.store.apply(job_id, Intent.REQUEUE)

    async def bump(self, job_id: str, k: int) -> None:
        if await self.store.bump_attempt(job_id, auto_retry=True):
            self.starts[job_id] += 1

    async def append(self, job_id: str, k: int) -> None:
        if await self.store.append_attempt(job_id, {"k": k}):
            self.records[job_id] += 1
        assert (await self.store.get_job(job_id)) is not None

    async def one(self, k: int) -> None:
        ops = (self.claim, self.progress, self.progress, self.cancel, self.retry, self.requeue,
               self.bump, self.append)
        await ops[k % len(ops)](f"job-{self.rnd.randrange(self.n_jobs)}", k)


async def test_200_concurrent_writes_never_raise_and_stay_consistent(store):
    """Issue 10 item 2: with one shared aiosqlite connection a write could land between another
    coroutine's ``execute`` and ``commit`` ("cannot commit transaction - SQL statements in
    progress"), answered 500 although applied. 200 mixed concurrent writes on 4 jobs must all
    succeed, and every change a call reported must be in the final rows (nothing applied
    without being reported, nothing reported without being applied)."""
    for i in range(4):
        await store.create_job(_job(i))
    ledger = _Ledger(store, 4)
    await asyncio.gather(*(ledger.one(k) for k in range(200)))
    for i in range(4):
        row = await store.get_job(f"job-{i}")
        assert row.status in (JobStatus.PENDING, JobStatus.PROCESSING, JobStatus.CANCELLED)
        assert row.attempt == ledger.starts[row.job_id]
        assert len(row.attempts) == ledger.records[row.job_id]
        assert 0 <= row.progress <= 100
    assert sum(ledger.starts.values()) > 0 and sum(ledger.records.values()) > 0


# ---- SQLite only --------------------------------------------------------------------------------
async def test_schema_version_wal_and_columns(tmp_path):
    path = tmp_path / "jobs.db"
    for _ in range(2):  # reopening applies nothing twice
        s = await SqliteJobStore.open(path)
        assert await s.schema_version() == len(database.MIGRATIONS) == 6
        await s.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        cols = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
    for col in ("status", "progress", "current_stage", "message", "created_at", "started_at",
                "finished_at", "error_code", "error_message", "error_hint", "quality",
                "input_bytes", "input_sha256", "results", "error_details",
                "request_fingerprint", "owner", "webhook_url"):
        assert col in cols
    assert cols == set(COLUMNS)  # the Job record and the table name the same columns


async def assert_migrated_to_v4(s) -> None:
    """The row ``old`` (completed, ``Idempotency-Key: K``, written at version 2 or 3) after
    the migrations to the current version (4: owners; 5: events; 6: webhooks; also used by the
    PostgreSQL test): no owner, no webhook, its key still held by no-owner and free for
    another owner; the row has no events (it was written before they were recorded)."""
    assert await s.schema_version() == len(database.MIGRATIONS) == 6
    row = await s.get_job("old")
    assert row is not None
    assert (row.status, row.results, row.error_details, row.request_fingerprint,
            row.owner, row.webhook_url) == ("completed", {"n": 1}, None, None, None, None)
    assert await s.events_after("old", 0) == []
    assert (await s.find_by_idempotency_key("K")).job_id == "old"
    assert await s.find_by_idempotency_key("K", "alice") is None
    with pytest.raises(DuplicateKey):
        await s.create_job(_job(1, idempotency_key="K"))
    assert (await s.create_job(_job(2, owner="alice", idempotency_key="K"))).owner == "alice"


@pytest.mark.parametrize("version", [2, 3])
async def test_migration_keeps_rows_and_scopes_their_keys(tmp_path, version):
    """A database at version 2 or 3 migrates to 4 keeping its rows (no owner); the old key
    stays unique for jobs without an owner, and an owner may now use the same text."""
    path = tmp_path / "jobs.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        for script in database.MIGRATIONS[:version]:
            conn.executescript(script)
        conn.execute(
            "INSERT INTO jobs (job_id, scan_id, project_id, scan_name, quality, status, "
            "created_at, updated_at, input_path, input_bytes, input_sha256, results, "
            "idempotency_key) VALUES ('old', 's', 'p', 'n', 'low', 'completed', 't', 't', "
            "'/x', 1, 'h', '{\"n\": 1}', 'K')")
    s = await SqliteJobStore.open(path)
    try:
        await assert_migrated_to_v4(s)
    finally:
        await s.close()
    with sqlite3.connect(path) as conn:
        indexes = {r[1] for r in conn.execute("PRAGMA index_list(jobs)")}
    assert {"jobs_owner_idempotency_key", "jobs_owner_status_created"} <= indexes
    assert "jobs_idempotency_key" not in indexes


async def test_per_owner_queries_use_their_indexes(tmp_path):
    """The per-owner pending count and list (``list_jobs``' own ``WHERE``) are served by the
    index ``jobs_owner_status_created``, the key lookup by ``jobs_owner_idempotency_key``
    (with or without an owner), not by a scan of every job."""
    path = tmp_path / "jobs.db"
    await (await SqliteJobStore.open(path)).close()

    def plan(conn: sqlite3.Connection, where: str, args: list) -> str:
        return " ".join(r[3] for r in conn.execute(
            f"EXPLAIN QUERY PLAN SELECT COUNT(*) FROM jobs WHERE {where}", args))
    with sqlite3.connect(path) as conn:
        for status in ("pending", None):
            clause, args = list_filter("?", project_id=None, status=status, owner="alice")
            found = plan(conn, clause.removeprefix("WHERE "), args)
            assert "INDEX jobs_owner_status_created" in found, found
        for owner in ("alice", None):
            found = plan(conn, sqlite_store.BY_IDEMPOTENCY_KEY, ["K", owner])
            assert "INDEX jobs_owner_idempotency_key (idempotency_key=?)" in found, found


async def test_sqlite_errors_never_leave_the_store(tmp_path, monkeypatch):
    bad = tmp_path / "not-a-db.db"
    bad.write_bytes(b"this is not a database file" * 100)
    with pytest.raises(StoreUnavailable):
        await SqliteJobStore.open(bad)

    monkeypatch.setattr(sqlite_store, "BUSY_TIMEOUT_S", 0.05)
    path = tmp_path / "jobs.db"
    s = await SqliteJobStore.open(path)
    try:
        await s.create_job(_job(1))
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another process holding the write lock
        try:
            with pytest.raises(StoreUnavailable, match="locked"):
                await s.apply("job-1", Intent.CANCEL)
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert await s.apply("job-1", Intent.CANCEL)  # the failed write left no transaction
        assert await s.ping()
    finally:
        await s.close()
    assert not await s.ping()
    with pytest.raises(StoreUnavailable, match="closed"):
        await s.get_job("job-1")
    with pytest.raises(StoreUnavailable, match="closed"):
        await s.apply("job-1", Intent.RETRY)


async def test_cancelled_writer_leaves_no_open_transaction(tmp_path):
    s = await SqliteJobStore.open(tmp_path / "jobs.db")
    try:
        for i in range(20):
            await s.create_job(_job(i))
        tasks = [asyncio.create_task(s.apply(f"job-{i}", Intent.CANCEL)) for i in range(20)]
        await asyncio.sleep(0)
        for t in tasks[::2]:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert await s.apply("job-0", Intent.RETRY) in (True, False)
        counts = await s.count_by_status()
        assert sum(counts.values()) == 20
    finally:
        await s.close()


async def test_memory_store_unavailable_knob():
    s = InMemoryJobStore()
    await s.create_job(_job(1))
    s.unavailable = True
    assert not await s.ping()
    with pytest.raises(StoreUnavailable):
        await s.get_job("job-1")
    with pytest.raises(StoreError):
        await s.apply("job-1", Intent.CANCEL)
    s.unavailable = False
    row = await s.get_job("job-1")
    assert row is not None and row.status == "pending"
