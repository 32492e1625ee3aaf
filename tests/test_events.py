"""Issue 16 item 1, in process on the in-memory store: the job's events as Server-Sent Events
(``web/events.py``: snapshot, resume after ``Last-Event-ID``, heartbeat, the end after the
terminal event, a draining server), the ``/events`` route (ownership, a signed link, 204 after
the end, a bad ``Last-Event-ID``) and ``/jobs/{id}/log`` (``since``, the cap, bucket mode)."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from fakes import InMemoryJobStore
from web_harness import add_job

from colmap_pipeline.errors import PipelineError
from colmap_pipeline.jobs import Intent, JobStatus
from colmap_pipeline.layout import DataDir
from colmap_pipeline.web import events, routes_events
from colmap_pipeline.web.events import parse_last_event_id, stream

pytestmark = pytest.mark.asyncio

KEYS = "alice:alice-key-0123456789,bob:bob-key-9876543210"


def parse_sse(raw: bytes) -> list[dict[str, Any]]:
    """SSE wire bytes -> ``[{"id": str|None, "data": obj|None, "retry": int|None,
    "comment": str|None}]``, one per message (a plain reader of the format, for the tests)."""
    out: list[dict[str, Any]] = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        msg: dict[str, Any] = {"id": None, "data": None, "retry": None, "comment": None}
        data: list[str] = []
        for line in block.split("\n"):
            field, _, value = line.partition(": ")
            if line.startswith(":"):
                msg["comment"] = line[1:].strip()
            elif field == "data":
                data.append(value)
            elif field == "id":
                msg["id"] = value
            elif field == "retry":
                msg["retry"] = int(value)
        if data:
            msg["data"] = json.loads("\n".join(data))
        out.append(msg)
    return out


async def collect(store: InMemoryJobStore, job_id: str, after: int | None, *,
                  draining: Any = lambda: False, timeout_s: float = 5) -> list[dict[str, Any]]:
    job = await store.get_job(job_id)
    assert job is not None
    chunks = []

    async def run() -> None:
        async for chunk in stream(store, job, after, draining=draining):
            chunks.append(chunk)
    await asyncio.wait_for(run(), timeout_s)
    return parse_sse(b"".join(chunks))


async def run_job(store: InMemoryJobStore, job_id: str) -> None:
    """A job's life as the runner writes it: claim, three stages' progress, an attempt in
    place, completed with a warning."""
    await asyncio.sleep(0.01)
    assert await store.apply(job_id, Intent.CLAIM)
    for pct, stage in ((10, "Frame Extraction"), (40, "Feature Detection"),
                       (30, "Feature Detection"), (70, "Sparse Reconstruction")):
        await store.update_progress(job_id, pct, stage, f"{stage} at {pct}")
        await asyncio.sleep(0.005)
    assert await store.bump_attempt(job_id, auto_retry=True) == 2
    assert await store.apply(job_id, Intent.COMPLETE, attempt_record={"outcome": "completed"},
                             results={"warnings": [{"code": "video_truncated", "message": "m"}]})


async def test_a_stream_from_the_start_snapshot_then_every_event_then_the_end():
    store = InMemoryJobStore()
    job = await add_job(store, JobStatus.PENDING)
    writer = asyncio.create_task(run_job(store, job.job_id))
    msgs = await collect(store, job.job_id, None)
    await writer
    first, rest = msgs[0], msgs[1:]
    assert first["data"]["kind"] == "snapshot" and first["data"]["status"] == "pending"
    assert first["retry"] == events.RETRY_MS and first["id"] == "1"
    ids = [int(m["id"]) for m in rest]
    assert ids == sorted(set(ids)) and ids[0] == 2  # only grows, nothing twice or missed
    assert [m["data"]["kind"] for m in rest] == [
        "status", "progress", "progress", "progress", "progress", "attempt", "attempt",
        "warning", "status"]
    progress = [m["data"]["progress"] for m in rest]
    assert progress == [0, 10, 40, 40, 70, 70, 100, 100, 100]  # stored as max: never back
    assert rest[3]["data"]["current_stage"] == "Feature Detection"
    assert rest[3]["data"]["message"] == "Feature Detection at 30"
    assert rest[-2]["data"]["warning"]["code"] == "video_truncated"
    last = rest[-1]["data"]
    assert (last["status"], last["intent"], last["job_id"]) == (
        "completed", "complete", job.job_id)
    assert last["event_id"] == ids[-1] == store.events[-1].event_id


async def test_resuming_gets_only_later_events_and_a_done_job_ends_at_once():
    store = InMemoryJobStore()
    job = await add_job(store, JobStatus.PENDING)
    await run_job(store, job.job_id)
    all_ids = [e.event_id for e in store.events]
    msgs = await collect(store, job.job_id, all_ids[3])
    assert [int(m["id"]) for m in msgs] == all_ids[4:]
    assert msgs[0]["retry"] == events.RETRY_MS and msgs[-1]["data"]["status"] == "completed"
    # a late client without an id: only the snapshot, which is completed, then the end
    late = await collect(store, job.job_id, None)
    assert len(late) == 1 and late[0]["data"]["kind"] == "snapshot"
    assert late[0]["data"]["status"] == "completed" and late[0]["id"] == str(all_ids[-1])
    assert "warning" not in late[0]["data"]  # the state, not the newest event's own fields


async def test_heartbeat_while_idle_and_a_draining_server_ends_the_stream(monkeypatch):
    monkeypatch.setattr(events, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(events, "DRAIN_CHECK_S", 0.02)
    store = InMemoryJobStore()
    job = await add_job(store, JobStatus.PENDING)
    draining = asyncio.Event()
    asyncio.get_running_loop().call_later(0.3, draining.set)
    msgs = await collect(store, job.job_id, None, draining=draining.is_set)
    assert msgs[0]["data"]["kind"] == "snapshot"
    beats = [m for m in msgs[1:] if m["comment"] == "heartbeat"]
    assert len(beats) == len(msgs) - 1 and 3 <= len(beats) <= 7  # ~0.3 s / 0.05 s


async def test_last_event_id_parsing():
    assert parse_last_event_id(None, None) is None
    assert parse_last_event_id("", 7) == 7  # an EventSource without an id sends it empty
    assert parse_last_event_id(" 12 ", 7) == 12  # the header wins
    for bad in ("-1", "1.5", "abc", "１２", str(2**63)):
        with pytest.raises(PipelineError) as err:
            parse_last_event_id(bad, None)
        assert err.value.code == "invalid_request"


async def test_events_route_streams_a_done_job_and_answers_204_after_its_end(api):
    job = await add_job(api.store, JobStatus.PENDING)
    await run_job(api.store, job.job_id)
    r = await api.client.get(f"/jobs/{job.job_id}/events")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache"
    msgs = parse_sse(r.content)
    assert [m["data"]["kind"] for m in msgs] == ["snapshot"]
    last_id = msgs[0]["id"]
    r = await api.client.get(f"/jobs/{job.job_id}/events", headers={"Last-Event-ID": "3"})
    ids = [int(m["id"]) for m in parse_sse(r.content)]
    assert ids == [e.event_id for e in api.store.events if e.event_id > 3]
    r = await api.client.get(f"/jobs/{job.job_id}/events?last_event_id=4")
    assert [int(m["id"]) for m in parse_sse(r.content)] == ids[1:]
    r = await api.client.get(f"/jobs/{job.job_id}/events", headers={"Last-Event-ID": last_id})
    assert r.status_code == 204 and r.content == b""
    r = await api.client.get(f"/jobs/{job.job_id}/events", headers={"Last-Event-ID": "x"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert (await api.client.get("/jobs/nope/events")).status_code == 404
    running = await add_job(api.store, JobStatus.PROCESSING)
    r = await asyncio.wait_for(api.client.head(f"/jobs/{running.job_id}/events"), 5)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert (await api.client.head("/jobs/nope/events")).status_code == 404
    view = (await api.client.get(f"/jobs/{job.job_id}")).json()
    assert view["events_url"] == f"/jobs/{job.job_id}/events"  # keys off: the plain path


async def test_events_of_another_key_are_not_found_and_a_signed_link_needs_no_key(make_api):
    api = await make_api(api_keys=KEYS)
    alice = {"X-API-Key": "alice-key-0123456789"}
    bob = {"X-API-Key": "bob-key-9876543210"}
    job = await add_job(api.store, JobStatus.CANCELLED, owner="alice")
    r = await api.client.get(f"/jobs/{job.job_id}/events", headers=bob)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert (await api.client.get(f"/jobs/{job.job_id}/events")).status_code == 401
    url = (await api.client.get(f"/jobs/{job.job_id}", headers=alice)).json()["events_url"]
    assert url.startswith(f"/jobs/{job.job_id}/events?token=")
    r = await api.client.get(url)  # no header, as an EventSource
    assert r.status_code == 200
    assert parse_sse(r.content)[0]["data"]["status"] == "cancelled"
    other = url.replace(job.job_id, "job-9999")
    assert (await api.client.get(other)).status_code == 401  # bound to its job's path


async def test_log_lines_in_stage_order_from_since_capped(api):
    job = await add_job(api.store, JobStatus.PROCESSING)
    ws = DataDir(api.settings.data_dir).job(job.job_id).work
    r = await api.client.get(f"/jobs/{job.job_id}/log")  # no stage ran yet
    assert r.status_code == 200 and r.text == "" and r.headers["x-next-line"] == "0"
    ws.logs_dir.mkdir(parents=True)
    ws.log("features").write_text(f"f1\nf2 in {ws.root}/frames\n")
    ws.log("frames").write_bytes(b"a1\na2 \xff\n" + b"x" * 3000 + b"\n")
    r = await api.client.get(f"/jobs/{job.job_id}/log")
    assert r.headers["content-type"].startswith("text/plain")
    lines = r.text.splitlines()
    assert lines[:2] == ["[frames] a1", "[frames] a2 \ufffd"]  # frames runs before features
    assert lines[2] == "[frames] " + "x" * routes_events.MAX_LOG_LINE_CHARS + "…"
    # the workspace's path on the server is not shown
    assert lines[3:] == ["[features] f1", "[features] f2 in WORKSPACE/frames"]
    assert r.headers["x-next-line"] == "5"
    r = await api.client.get(f"/jobs/{job.job_id}/log?since=3&limit=1")
    assert r.text == "[features] f1\n" and r.headers["x-next-line"] == "4"
    r = await api.client.get(f"/jobs/{job.job_id}/log?since=5")
    assert r.text == "" and r.headers["x-next-line"] == "5"
    assert (await api.client.get(f"/jobs/{job.job_id}/log?limit=1001")).status_code == 422
    assert (await api.client.get("/jobs/nope/log")).status_code == 404


async def test_log_in_bucket_mode_without_local_logs_says_so(make_api):
    api = await make_api(storage_bucket="some-bucket")
    job = await add_job(api.store, JobStatus.COMPLETED)
    r = await api.client.get(f"/jobs/{job.job_id}/log")
    assert r.status_code == 404 and r.json()["error"]["code"] == "log_not_available"
    pending = await add_job(api.store, JobStatus.PENDING)
    assert (await api.client.get(f"/jobs/{pending.job_id}/log")).text == ""


async def test_a_job_stored_before_events_existed_gets_a_snapshot_from_its_row(api):
    job = await add_job(api.store, JobStatus.FAILED, error_code="too_blurry")
    api.store.events.clear()  # as a row migrated from schema version 4
    r = await api.client.get(f"/jobs/{job.job_id}/events")
    [snap] = parse_sse(r.content)
    assert snap["id"] == "0" and snap["data"]["kind"] == "snapshot"
    assert (snap["data"]["status"], snap["data"]["updated_at"]) == ("failed", job.updated_at)
    r = await api.client.get(f"/jobs/{job.job_id}/events", headers={"Last-Event-ID": "0"})
    assert r.status_code == 204
