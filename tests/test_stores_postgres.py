"""colmap_pipeline.stores.postgres beyond the shared contract (``test_database.py``): schema and
migrations, two replicas' stores on one database, the queue's one-transaction seam, psycopg
errors never leaving the store, a lost PostgreSQL (``StoreUnavailable``, ``/readiness`` 503
naming ``database``, uploads 503 with ``Retry-After``, recovery), and ``database.open_store``.

Each test gets a fresh database (``pg_url``, ``tests/pg.py``)."""
from __future__ import annotations

import asyncio
import time
from typing import Any

import pg
import psycopg
import pytest
from conftest import SAMPLE_VIDEO
from test_database import assert_migrated_to_v4
from web_harness import async_client, files_under, make_app, settings_for

import database
from colmap_pipeline.jobs import COLUMNS, DuplicateKey, Intent, StoreError, StoreUnavailable
from colmap_pipeline.stores import postgres
from colmap_pipeline.stores.postgres import MIGRATIONS, PostgresJobStore
from colmap_pipeline.stores.schema import list_filter
from database import SqliteJobStore, open_store

pytestmark = pytest.mark.asyncio


def _job(i: int, **extra) -> dict:
    return {"job_id": f"job-{i}", "scan_id": f"scan-{i}", "project_id": "p", "scan_name": "S",
            "quality": "low", "input_path": f"/x/{i}.mp4", "input_bytes": 100 + i,
            "input_sha256": "ab" * 32, **extra}


def _dbname(url: str) -> str:
    return url.rsplit("/", 1)[1]


async def _columns(url: str) -> dict[str, str]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT column_name, data_type FROM information_schema.columns "
                                 "WHERE table_name = 'jobs'")
        return dict(await cur.fetchall())


# ---- schema and migrations ----------------------------------------------------------------
async def test_schema_version_columns_and_jsonb(pg_url):
    for _ in range(2):  # reopening applies nothing twice
        s = await PostgresJobStore.open(pg_url)
        assert await s.schema_version() == len(MIGRATIONS) == len(database.MIGRATIONS) == 6
        await s.close()
    cols = await _columns(pg_url)
    assert set(cols) == set(COLUMNS) | {"seq"}  # seq: SQLite's rowid (insertion order)
    json_cols = ("video_info", "results", "attempts", "error_details")
    assert {c: cols[c] for c in json_cols} == dict.fromkeys(json_cols, "jsonb")
    assert (cols["input_bytes"], cols["created_at"]) == ("bigint", "text")
    s = await PostgresJobStore.open(pg_url)
    try:
        async with s.transaction() as conn:  # a statement never waits forever (lock included)
            row = await (await conn.execute("SHOW statement_timeout")).fetchone()
        assert row == ("30s",)
    finally:
        await s.close()


@pytest.mark.parametrize("version", [2, 3])
async def test_migration_keeps_rows_and_scopes_their_keys(pg_url, version):
    """A database at version 2 or 3 migrates to 4 keeping its rows (no owner); the old key
    stays unique for jobs without an owner, and an owner may now use the same text."""
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        await conn.execute("INSERT INTO schema_version VALUES (%s)", [version])
        for script in MIGRATIONS[:version]:
            await conn.execute(script)
        await conn.execute(
            "INSERT INTO jobs (job_id, scan_id, project_id, scan_name, quality, status, "
            "created_at, updated_at, input_path, input_bytes, input_sha256, results, "
            "idempotency_key) VALUES ('old', 's', 'p', 'n', 'low', 'completed', 't', 't', "
            "'/x', 1, 'h', '{\"n\": 1}', 'K')")
    s = await PostgresJobStore.open(pg_url)
    try:
        await assert_migrated_to_v4(s)
    finally:
        await s.close()


async def test_owner_queries_can_use_their_indexes(pg_url):
    """With sequential scans priced out (an empty table would otherwise be scanned), the key
    lookup uses ``jobs_owner_idempotency_key`` and the per-owner pending count
    ``jobs_owner_status_created``: the indexes fit the queries the store sends."""
    s = await PostgresJobStore.open(pg_url)
    try:
        clause, args = list_filter("%s", project_id=None, status="pending", owner="alice")
        async with s.transaction() as conn:
            await conn.execute("SET LOCAL enable_seqscan = off")
            plans = {}
            for name, where, values in (
                    ("key", postgres.BY_IDEMPOTENCY_KEY, ["K", None]),
                    ("key+owner", postgres.BY_IDEMPOTENCY_KEY, ["K", "alice"]),
                    ("pending", clause.removeprefix("WHERE "), args)):
                cur = await conn.execute(
                    f"EXPLAIN SELECT job_id FROM jobs WHERE {where}", values)
                plans[name] = " ".join(r[0] for r in await cur.fetchall())
        assert "jobs_owner_idempotency_key" in plans["key"], plans
        assert "jobs_owner_idempotency_key" in plans["key+owner"], plans
        assert "jobs_owner_status_created" in plans["pending"], plans
    finally:
        await s.close()


async def test_replicas_starting_together_migrate_once(pg_url):
    """Two replicas opening a new database at once: the advisory lock serializes the
    migrations, so neither fails on a table the other just created."""
    stores = await asyncio.gather(*(PostgresJobStore.open(pg_url) for _ in range(3)))
    try:
        assert [await s.schema_version() for s in stores] == [len(MIGRATIONS)] * 3 == [6, 6, 6]
    finally:
        for s in stores:
            await s.close()


# ---- two replicas on one database ----------------------------------------------------------
async def test_two_replicas_never_claim_the_same_job(pg_url):
    """Claims from two stores (two replicas' pools) race on 12 jobs: each is claimed exactly
    once (``FOR UPDATE SKIP LOCKED`` + the compare-and-set), oldest first overall."""
    a = await PostgresJobStore.open(pg_url)
    b = await PostgresJobStore.open(pg_url)
    try:
        for i in range(12):
            await a.create_job(_job(i))
        claims = await asyncio.gather(*(s.claim_next_pending() for s in (a, b) * 10))
        ids = [c.job_id for c in claims if c is not None]
        assert sorted(ids) == sorted(f"job-{i}" for i in range(12))
        assert claims.count(None) == 8
        assert (await b.count_by_status()) == {"processing": 12}
        assert [(await a.get_job(i)).attempt for i in ids] == [1] * 12
    finally:
        await a.close()
        await b.close()


# ---- the queue's seam: one transaction ----------------------------------------------------
async def test_create_job_runs_the_callers_write_in_the_same_transaction(pg_url):
    s = await PostgresJobStore.open(pg_url)
    try:
        async with s.transaction() as conn:
            await conn.execute("CREATE TABLE queue_entries (job_id TEXT PRIMARY KEY)")

        async def defer(conn, job) -> None:
            assert job.status == "pending"
            await conn.execute("INSERT INTO queue_entries VALUES (%s)", [job.job_id])

        async def defer_then_fail(conn, job) -> None:
            await defer(conn, job)
            raise RuntimeError("queue refused")

        row = await s.create_job(_job(1), in_transaction=defer)
        assert row.job_id == "job-1"
        with pytest.raises(RuntimeError, match="queue refused"):
            await s.create_job(_job(2), in_transaction=defer_then_fail)
        with pytest.raises(DuplicateKey):  # the insert fails first: the callback never runs
            await s.create_job(_job(1), in_transaction=defer_then_fail)

        async def entries(conn) -> list[str]:
            cur = await conn.execute("SELECT job_id FROM queue_entries ORDER BY job_id")
            return [r[0] for r in await cur.fetchall()]
        assert await s._tx(entries) == ["job-1"]  # job-2: neither row nor queue entry
        assert await s.get_job("job-2") is None
        with pytest.raises(StoreError):  # a psycopg error inside the caller's block
            async with s.transaction() as conn:
                await conn.execute("INSERT INTO queue_entries VALUES ('job-1')")
        assert s.conninfo == pg_url and s.pool.name == "jobstore"
    finally:
        await s.close()


# ---- errors never leave the store -----------------------------------------------------------
async def test_psycopg_errors_never_leave_the_store(pg_url):
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):  # nothing listens on port 9 (discard)
        await PostgresJobStore.open("postgresql://postgres@127.0.0.1:9/x", timeout_s=1.0)
    assert time.monotonic() - t0 < 5
    s = await PostgresJobStore.open(pg_url)
    try:
        await s.create_job(_job(1))
        with pytest.raises(StoreError) as info:  # a value PostgreSQL refuses (bigint range)
            await s.create_job(_job(2, input_bytes=2**70))
        assert not isinstance(info.value, DuplicateKey | StoreUnavailable)
        with pytest.raises(DuplicateKey):
            await s.create_job(_job(1))
        assert await s.apply("job-1", Intent.CANCEL)  # the failed writes left no transaction
    finally:
        await s.close()
    assert not await s.ping()
    with pytest.raises(StoreUnavailable, match="closed"):
        await s.get_job("job-1")
    with pytest.raises(StoreUnavailable, match="closed"):
        await s.apply("job-1", Intent.RETRY)


# ---- a lost PostgreSQL (issue 12 item 4) ---------------------------------------------------
async def test_lost_database_is_unavailable_then_recovers(pg_url):
    """Every session of the database is terminated and new ones refused: store calls raise
    StoreUnavailable (within the pool timeout), ping answers False within its 2 s; once
    connections are allowed again the pool reconnects by itself and the job kept its state."""
    name = _dbname(pg_url)
    s = await PostgresJobStore.open(pg_url, timeout_s=1.0)
    try:
        await s.create_job(_job(1))
        assert await s.claim_next_pending()
        assert await s.update_progress("job-1", 40, "Feature Matching", "m")
        pg.allow_connections(name, False)
        try:
            assert pg.terminate_sessions(name) >= 1
            t0 = time.monotonic()
            assert not await s.ping()
            assert time.monotonic() - t0 < postgres.PING_TIMEOUT_S + 1
            with pytest.raises(StoreUnavailable):
                await s.get_job("job-1")
            with pytest.raises(StoreUnavailable):
                await s.update_progress("job-1", 60, "Feature Matching", "lost")
        finally:
            pg.allow_connections(name, True)
        deadline = time.monotonic() + 15
        while not await s.ping():
            assert time.monotonic() < deadline, "the pool did not reconnect"
            await asyncio.sleep(0.2)
        row = await s.get_job("job-1")
        assert (row.status, row.progress, row.message) == ("processing", 40, "m")
        assert await s.update_progress("job-1", 60, "Feature Matching", "back")
    finally:
        await s.close()


async def test_unreachable_server_then_back_on_the_same_address(pg_url):
    """The network to PostgreSQL is cut (a proxy in between resets every connection and stops
    listening: connection refused, as a stopped server): StoreUnavailable and ping False; when
    the address answers again the pool reconnects by itself within a second or so."""
    proxy = await pg.PgProxy().start()
    s = await PostgresJobStore.open(proxy.url_for(_dbname(pg_url)), timeout_s=1.0)
    try:
        await s.create_job(_job(1))
        await proxy.cut()
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await s.create_job(_job(2))
        assert time.monotonic() - t0 < 3
        assert not await s.ping()
        await proxy.restore()
        t0 = time.monotonic()
        while not await s.ping():
            assert time.monotonic() - t0 < 10, "the pool did not reconnect"
            await asyncio.sleep(0.1)
        assert [j.job_id for j in (await s.list_jobs())[0]] == ["job-1"]
    finally:
        await s.close()
        await proxy.cut()


async def test_ping_answers_within_its_bound_on_a_silent_network(pg_url):
    """A partition without resets (every byte dropped, connections left open): readiness's ping
    still answers False within PING_TIMEOUT_S + 0.5 s instead of hanging."""
    proxy = await pg.PgProxy().start()
    s = await PostgresJobStore.open(proxy.url_for(_dbname(pg_url)), timeout_s=1.0)
    try:
        assert await s.ping()
        proxy.silence()
        t0 = time.monotonic()
        assert not await s.ping()
        assert time.monotonic() - t0 < postgres.PING_TIMEOUT_S + 1
    finally:
        await proxy.cut()
        await s.close()


async def test_lost_database_readiness_503_and_uploads_503_with_retry_after(pg_url, tmp_path):
    name = _dbname(pg_url)
    s = await PostgresJobStore.open(pg_url, timeout_s=1.0)
    app = make_app(settings_for(tmp_path), store=s)
    client = async_client(app)
    video = SAMPLE_VIDEO.read_bytes()

    async def upload(key: str | None = "k") -> Any:
        return await client.post(
            "/upload-video", data={"project_id": "p", "quality": "low"},
            files={"video": ("clip.mp4", video, "video/mp4")},
            headers={"Idempotency-Key": key} if key else {})
    try:
        assert (await client.get("/readiness")).status_code == 200
        pg.allow_connections(name, False)
        try:
            pg.terminate_sessions(name)
            r = await client.get("/readiness")
            assert r.status_code == 503 and r.json()["failing"] == ["database"]
            r = await upload()
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            assert r.json()["error"]["code"] == "not_ready"
            r = await upload(None)  # no key: the insert itself fails, its folder is removed
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
            assert files_under(tmp_path / "data" / "jobs") == []
            r = await client.get("/jobs")
            assert r.status_code == 503 and r.headers["retry-after"] == "5"
        finally:
            pg.allow_connections(name, True)
        deadline = time.monotonic() + 15
        while (await client.get("/readiness")).status_code != 200:
            assert time.monotonic() < deadline, "readiness did not recover"
            await asyncio.sleep(0.2)
        r = await upload()
        assert r.status_code == 202, r.text
        assert (await s.get_job(r.json()["job_id"])).idempotency_key == "k"
    finally:
        await client.aclose()
        await s.close()


# ---- open_store picks the store ------------------------------------------------------------
async def test_open_store_postgres_wins_over_the_sqlite_path(pg_url, tmp_path):
    s = await open_store(settings_for(tmp_path, database_url=pg_url,
                                      database_path=tmp_path / "unused.db"))
    try:
        assert isinstance(s, PostgresJobStore) and await s.ping()
    finally:
        await s.close()
    assert not (tmp_path / "unused.db").exists()
    s = await open_store(settings_for(tmp_path))
    try:
        assert isinstance(s, SqliteJobStore)
        assert s.path == tmp_path / "data" / "colmap_app.db"
    finally:
        await s.close()
    with pytest.raises(ValueError, match="postgresql://"):
        await open_store(settings_for(tmp_path, database_url="mysql://x/y"))
