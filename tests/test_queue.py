"""The procrastinate queue of PostgreSQL mode, in process: ``runner/queue.py`` (tickets,
abort, stalled tickets), ``runner/queued_store.py`` (a row and its ticket together),
``runner/stalls.py`` (the lost-replica retry policy) and the periodic sweep of
``runner/worker.py``. Each PostgreSQL test gets a fresh database (``pg_url``, ``tests/pg.py``);
the two-replica tests with real servers are ``test_replicas.py``."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pg
import psycopg
import pytest
import pytest_asyncio
from fakes import InMemoryJobStore
from runner_harness import runner_settings, until

from colmap_pipeline.jobs import Intent, JobStatus, StoreError
from colmap_pipeline.runner import queue as q
from colmap_pipeline.runner.queued_store import TO_PENDING, QueuedStore
from colmap_pipeline.runner.resilient_worker import ResilientWorker
from colmap_pipeline.runner.stalls import LOST_DETAIL, StallAction, losses_in_run, requeue_stalled
from colmap_pipeline.runner.worker import QueueRunner, open_queue_mode
from colmap_pipeline.stores.postgres import PostgresJobStore


def _job(i: int) -> dict[str, Any]:
    return {"job_id": f"job-{i}", "scan_id": f"scan-{i}", "project_id": "p", "scan_name": "S",
            "quality": "low", "input_path": f"/x/{i}.mp4", "input_bytes": 1,
            "input_sha256": "ab" * 32}


class Mode:
    """PostgreSQL mode in process: the raw store, the store callers get, the runner (its
    workers not started)."""

    def __init__(self, raw: PostgresJobStore, store: QueuedStore, runner: QueueRunner,
                 url: str) -> None:
        self.raw, self.store, self.runner, self.url = raw, store, runner, url
        self.queue = runner.queue

    async def tickets(self, job_id: str) -> list[tuple[str, str | None, str | None]]:
        """Every ticket of the job: (status, lock, queueing_lock), oldest first."""
        found = await self.queue.app.job_manager.list_jobs_async(task=q.TASK_RUN, lock=job_id)
        return [(str(t.status), t.lock, t.queueing_lock) for t in sorted(found,
                                                                         key=lambda t: t.id or 0)]

    async def sql(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            cur = await conn.execute(query, args)  # type: ignore[arg-type]
            return await cur.fetchall() if cur.description else []


@pytest_asyncio.fixture
async def mode(pg_url: str, tmp_path: Path) -> AsyncIterator[Mode]:
    settings = runner_settings(tmp_path, database_url=pg_url)
    raw = await PostgresJobStore.open(pg_url)
    store, runner = await open_queue_mode(raw, settings, gpu_enabled=False)
    try:
        yield Mode(raw, store, runner, pg_url)
    finally:
        await runner.queue.close()
        await store.close()


# --- a row and its ticket together ----------------------------------------------------------

@pytest.mark.asyncio
async def test_an_upload_inserts_the_row_and_its_ticket_together(mode: Mode):
    job = await mode.store.create_job(_job(1))
    assert job.status == JobStatus.PENDING
    assert await mode.tickets("job-1") == [("todo", "job-1", "job-1")]
    [(args,)] = await mode.sql("SELECT args FROM procrastinate_jobs WHERE lock = %s", "job-1")
    assert args == {"job_id": "job-1"}


@pytest.mark.asyncio
async def test_a_ticket_that_cannot_be_queued_takes_the_row_with_it(mode: Mode):
    async def broken(conn: Any, job_id: str) -> None:
        await q.make_defer_on(mode.queue.app)(conn, job_id)  # queued, then the hook fails
        raise RuntimeError("queue refused")

    failing = QueuedStore(mode.raw, mode.queue, broken)
    with pytest.raises(RuntimeError, match="queue refused"):
        await failing.create_job(_job(2))
    assert await mode.store.get_job("job-2") is None  # no row ...
    assert await mode.tickets("job-2") == []          # ... and no ticket


@pytest.mark.asyncio
async def test_a_second_ticket_for_a_waiting_job_is_not_queued(mode: Mode):
    await mode.store.create_job(_job(3))
    assert await mode.queue.defer("job-3") is False  # queueing lock: one waiting ticket
    async with mode.raw.transaction() as conn:       # the in-transaction path keeps the tx
        await q.make_defer_on(mode.queue.app)(conn, "job-3")
        await conn.execute("SELECT 1")
    assert await mode.tickets("job-3") == [("todo", "job-3", "job-3")]


@pytest.mark.asyncio
async def test_cancel_withdraws_the_ticket_and_retry_queues_a_new_one(mode: Mode):
    await mode.store.create_job(_job(4))
    assert await mode.store.apply("job-4", Intent.CANCEL)
    assert await mode.queue.abort("job-4") == 1
    assert await mode.tickets("job-4") == [("cancelled", "job-4", "job-4")]
    assert await mode.store.apply("job-4", Intent.RETRY)  # back to pending: a new ticket
    assert [t[0] for t in await mode.tickets("job-4")] == ["cancelled", "todo"]
    assert TO_PENDING == {Intent.RETRY, Intent.REQUEUE}


# --- dead workers -----------------------------------------------------------------------------

async def _run_on_dead_worker(mode: Mode, job_id: str) -> int:
    """Make ``job_id``'s ticket ``doing`` on a worker whose heartbeat is an hour old, and its
    row ``processing`` (as a replica that then died leaves them); the worker id."""
    manager = mode.queue.app.job_manager
    worker_id = await manager.register_worker()
    ticket = await manager.fetch_job(queues=[q.QUEUE_JOBS], worker_id=worker_id)
    assert ticket is not None and ticket.lock == job_id
    assert await mode.store.apply(job_id, Intent.CLAIM, current_stage="Feature Matching")
    await mode.sql("UPDATE procrastinate_workers SET last_heartbeat = now() - interval '1 hour'"
                   " WHERE id = %s", worker_id)
    return worker_id


@pytest.mark.asyncio
async def test_the_sweep_requeues_a_dead_workers_job_once_then_fails_it(mode: Mode):
    await mode.store.create_job(_job(5))
    await _run_on_dead_worker(mode, "job-5")
    assert [s.job_id for s in await mode.queue.stalled(30)] == ["job-5"]

    await mode.runner._sweep(timestamp=0)
    job = await mode.store.get_job("job-5")
    assert job is not None and job.status == JobStatus.PENDING
    assert job.auto_retries == 1
    assert job.attempts[-1]["outcome"] == "retrying"
    assert job.attempts[-1]["retry"] == "outside_signal"
    assert job.attempts[-1]["detail"] == LOST_DETAIL
    assert [t[0] for t in await mode.tickets("job-5")] == ["failed", "todo"]  # retired, new
    assert await mode.queue.stalled(30) == []

    await _run_on_dead_worker(mode, "job-5")  # the same run loses its replica again
    await mode.runner._sweep(timestamp=0)
    job = await mode.store.get_job("job-5")
    assert job is not None and job.status == JobStatus.FAILED
    assert job.error_code == "pipeline_crashed"
    assert [t[0] for t in await mode.tickets("job-5")] == ["failed", "failed"]  # none waits


@pytest.mark.asyncio
async def test_a_live_worker_is_not_swept(mode: Mode):
    await mode.store.create_job(_job(6))
    manager = mode.queue.app.job_manager
    worker_id = await manager.register_worker()  # heartbeat: now
    assert await manager.fetch_job(queues=[q.QUEUE_JOBS], worker_id=worker_id) is not None
    assert await mode.store.apply("job-6", Intent.CLAIM)
    await mode.runner._sweep(timestamp=0)
    job = await mode.store.get_job("job-6")
    assert job is not None and job.status == JobStatus.PROCESSING
    assert [t[0] for t in await mode.tickets("job-6")] == ["doing"]


@pytest.mark.asyncio
async def test_the_sweep_gives_a_pending_row_without_ticket_one(mode: Mode):
    await mode.raw.create_job(_job(7))  # around the queue: a row without its ticket
    assert await mode.tickets("job-7") == []
    await mode.runner._sweep(timestamp=0)
    assert await mode.tickets("job-7") == [("todo", "job-7", "job-7")]


@pytest.mark.asyncio
async def test_schema_install_is_idempotent(mode: Mode):
    assert await q.ensure_schema(mode.url) is False  # open_queue_mode installed it already


# --- the lost-replica policy (no database) ----------------------------------------------------

def test_losses_count_only_within_the_current_run():
    lost = {"outcome": "retrying", "detail": LOST_DETAIL}
    assert losses_in_run([]) == 0
    assert losses_in_run([lost]) == 1
    assert losses_in_run([lost, {"outcome": "interrupted"}, lost]) == 2
    assert losses_in_run([lost, {"outcome": "failed"}]) == 0  # a client's retry starts a run
    assert losses_in_run([lost, {"outcome": "cancelled"}, lost]) == 1


@pytest.mark.asyncio
async def test_requeue_stalled_leaves_jobs_that_are_not_processing():
    store = InMemoryJobStore()
    await store.create_job(_job(8))
    assert await requeue_stalled(store, "job-8", 30) == StallAction.NONE
    assert await requeue_stalled(store, "missing", 30) == StallAction.NONE
    job = await store.get_job("job-8")
    assert job is not None and job.status == JobStatus.PENDING and job.attempts == []


@pytest.mark.asyncio
async def test_requeue_stalled_keeps_the_store_error():
    class Down(InMemoryJobStore):
        async def get_job(self, job_id: str):  # type: ignore[override]
            raise StoreError("down")

    with pytest.raises(StoreError):
        await requeue_stalled(Down(), "job-9", 30)


# --- a lost database ---------------------------------------------------------------------------

@pytest.mark.asyncio
async def test_a_worker_rides_out_a_lost_database_and_heartbeats_again(mode: Mode):
    worker = ResilientWorker(mode.queue.app, queues=[q.QUEUE_JOBS], name="t",
                             install_signal_handlers=False, update_heartbeat_interval=0.2,
                             fetch_job_polling_interval=0.2, abort_job_polling_interval=0.2)
    task = asyncio.create_task(worker.run())
    await until(lambda: worker.worker_id is not None, 5, "the worker to register")
    worker_id = worker.worker_id
    dbname = mode.url.rsplit("/", 1)[1]
    pg.allow_connections(dbname, False)
    try:
        pg.terminate_sessions(dbname)
        await asyncio.sleep(1.5)  # heartbeats, LISTEN and fetches fail meanwhile
        assert not task.done(), "the worker stopped when the database went away"
    finally:
        pg.allow_connections(dbname, True)

    async def beat() -> Any:
        rows = await mode.sql("SELECT now() - last_heartbeat FROM procrastinate_workers "
                              "WHERE id = %s", worker_id)
        return rows and rows[0][0].total_seconds() < 0.5
    await until(beat, 10, "a fresh heartbeat once the database is back")
    assert not task.done()
    worker.stop()
    await asyncio.wait_for(task, 10)
