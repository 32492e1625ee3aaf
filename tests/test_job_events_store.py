"""Issue 16 item 1, the store side: every change of a job is an event in ``job_events``,
written in the change's own transaction, on every store (SQLite, PostgreSQL, the in-memory
fake: the backends of ``tests/test_database.py``); the waiters wake on a write (PostgreSQL:
``LISTEN/NOTIFY`` from another store on the same database, as another replica; after its
listening connection was killed too)."""
from __future__ import annotations

import asyncio
import time

import pg
import pytest
from test_database import _job, backend, store  # noqa: F401 - the contract's fixtures

from colmap_pipeline.job_events import EventKind
from colmap_pipeline.jobs import EVENT_PAGE, Intent, JobStore
from colmap_pipeline.stores import pg_notify as pg_store
from colmap_pipeline.stores.postgres import PostgresJobStore

pytestmark = pytest.mark.asyncio


async def kinds_since(s: JobStore, job_id: str, after: int) -> list[tuple[str, str]]:
    return [(str(e.kind), e.data["status"]) for e in await s.events_after(job_id, after)]


async def test_every_write_records_its_events_in_order(store):  # noqa: F811
    await store.create_job(_job(1))
    assert await store.claim_next_pending() is not None
    assert await store.update_progress("job-1", 30, "Feature Detection", "12 of 40 frames")
    assert await store.update_progress("job-1", 20, "Feature Matching", "late report")
    assert await store.append_attempt("job-1", {"attempt": 1, "outcome": "retrying"})
    assert await store.bump_attempt("job-1", auto_retry=True) == 2
    assert await store.apply("job-1", Intent.FAIL, attempt_record={"attempt": 2,
                                                                   "outcome": "failed"},
                             error_code="reconstruction_failed", error_message="No model.",
                             error_hint="Film more.", message="No model.")
    assert await store.apply("job-1", Intent.RETRY)
    evs = await store.events_after("job-1", 0)
    assert [(str(e.kind), e.data["status"]) for e in evs] == [
        ("status", "pending"), ("status", "processing"), ("progress", "processing"),
        ("progress", "processing"), ("attempt", "processing"), ("attempt", "processing"),
        ("attempt", "failed"), ("status", "failed"), ("status", "pending")]
    ids = [e.event_id for e in evs]
    assert ids == sorted(set(ids)) and all(e.job_id == "job-1" for e in evs)
    assert [e.data.get("intent") for e in evs if e.kind == EventKind.STATUS] == [
        "create", "claim", "fail", "retry"]
    assert [e.data["progress"] for e in evs] == [0, 0, 30, 30, 30, 30, 30, 30, 0]
    assert evs[3].data["current_stage"] == "Feature Matching"  # progress kept at its max
    assert evs[3].data["message"] == "late report"
    assert evs[4].data["record"] == {"attempt": 1, "outcome": "retrying"}
    assert evs[5].data["record"] is None and evs[5].data["attempt"] == 2
    assert evs[7].data["error"] == {"code": "reconstruction_failed", "message": "No model.",
                                    "hint": "Film more."}
    job = await store.get_job("job-1")
    assert job is not None and evs[-1].data["updated_at"] == job.updated_at
    latest = await store.latest_event("job-1")
    assert latest is not None and latest.event_id == ids[-1]
    assert await store.events_after("job-1", ids[-1]) == []


async def test_completed_writes_its_warnings_before_its_status(store):  # noqa: F811
    await store.create_job(_job(1))
    await store.claim_next_pending()
    warnings = [{"code": "video_truncated", "message": "decoded 0.40 s of 1.33 s"},
                {"code": "focal_metadata_ignored", "message": "m", "hint": "h"}]
    assert await store.apply("job-1", Intent.COMPLETE, attempt_record={"outcome": "completed"},
                             results={"registered_images": 3, "warnings": warnings})
    evs = await store.events_after("job-1", 2)
    assert [str(e.kind) for e in evs] == ["attempt", "warning", "warning", "status"]
    assert [e.data["warning"] for e in evs[1:3]] == warnings
    assert {e.data["status"] for e in evs} == {"completed"}
    assert {e.data["progress"] for e in evs} == {100}


async def test_a_refused_write_records_no_event(store):  # noqa: F811
    await store.create_job(_job(1))
    before = await store.latest_event("job-1")
    assert before is not None
    assert not await store.apply("job-1", Intent.COMPLETE)  # pending: not a source
    assert not await store.update_progress("job-1", 50, "x", "y")  # not processing
    assert not await store.append_attempt("nope", {"outcome": "x"})
    assert await store.bump_attempt("job-1", auto_retry=False) == 0
    assert await store.events_after("job-1", before.event_id) == []
    assert await store.latest_event("nope") is None


async def test_events_after_pages_and_keeps_jobs_apart(store):  # noqa: F811
    for i in (1, 2):
        await store.create_job(_job(i))
    await store.claim_next_pending()  # job-1
    for pct in range(1, 8):
        assert await store.update_progress("job-1", pct, "s", f"m{pct}")
        await store.apply("job-2", Intent.CANCEL)  # only the first moves it
    page1 = await store.events_after("job-1", 0, limit=3)
    page2 = await store.events_after("job-1", page1[-1].event_id, limit=3)
    assert [e.data["progress"] for e in page1 + page2] == [0, 0, 1, 2, 3, 4]
    all1 = await store.events_after("job-1", 0, limit=10**9)  # clamped to EVENT_PAGE
    assert len(all1) == 9 and len(all1) <= EVENT_PAGE
    assert await kinds_since(store, "job-2", 0) == [("status", "pending"),
                                                   ("status", "cancelled")]


async def test_a_waiter_wakes_on_a_write_and_times_out_without_one(store):  # noqa: F811
    await store.create_job(_job(1))
    await store.claim_next_pending()
    latest = await store.latest_event("job-1")
    assert latest is not None
    async with store.event_waiter("job-1") as waiter:
        for _ in range(5):  # PostgreSQL: the listener's first connection wakes every waiter
            if not await waiter.wait(latest.event_id, 0.3):
                break
        else:
            pytest.fail("a waiter kept waking without a new event")

        async def later() -> None:
            await asyncio.sleep(0.1)
            await store.update_progress("job-1", 5, "s", "m")
        writer = asyncio.create_task(later())
        t0 = time.monotonic()
        assert await waiter.wait(latest.event_id, 5)
        assert time.monotonic() - t0 < 2
        await writer
    assert [e.data["progress"] for e in await store.events_after("job-1", latest.event_id)] \
        == [5]


async def test_postgres_a_write_on_one_replica_wakes_a_stream_on_another_by_notify(
        pg_url, monkeypatch):
    """Two stores on one database (two replicas): a waiter on B wakes from A's write through
    NOTIFY, not polling (the poll interval set to 30 s), also after B's listening connection
    was killed (``pg_terminate_backend``) and came back."""
    monkeypatch.setattr(pg_store, "EVENT_POLL_S", 30.0)
    monkeypatch.setattr(pg_store, "LISTEN_RETRY_MAX_S", 0.2)
    a = await PostgresJobStore.open(pg_url)
    b = await PostgresJobStore.open(pg_url)
    try:
        await a.create_job(_job(1))
        await a.claim_next_pending()
        async with b.event_waiter("job-1") as waiter:
            for round_ in range(2):
                after = (await b.latest_event("job-1")).event_id  # type: ignore[union-attr]
                deadline = time.monotonic() + 10
                while not b._listener.connected:  # (re)connected: its wake-up consumed
                    assert time.monotonic() < deadline, "the listener did not reconnect"
                    await asyncio.sleep(0.05)
                while await waiter.wait(after, 0.2):
                    pass
                asyncio.get_running_loop().call_later(
                    0.1, lambda p=10 * (round_ + 1): asyncio.ensure_future(
                        a.update_progress("job-1", p, "s", "m")))
                t0 = time.monotonic()
                assert await waiter.wait(after, 5)
                assert time.monotonic() - t0 < 2
                evs = await b.events_after("job-1", after)
                assert [e.data["progress"] for e in evs] == [10 * (round_ + 1)]
                if round_ == 0:
                    assert pg.terminate_sessions(pg_url.rsplit("/", 1)[1]) >= 1
                    await asyncio.sleep(0.1)
    finally:
        await a.close()
        await b.close()


async def test_an_expired_or_deleted_job_keeps_only_its_last_event(store):  # noqa: F811
    for i in (1, 2):
        await store.create_job(_job(i))
        await store.apply(f"job-{i}", Intent.CANCEL)
    assert await store.apply("job-1", Intent.EXPIRE)
    assert await store.apply("job-2", Intent.DELETE)
    for job_id, status in (("job-1", "expired"), ("job-2", "deleted")):
        assert await kinds_since(store, job_id, 0) == [("status", status)]
