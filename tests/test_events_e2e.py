"""Issue 16 item 1, "Must show: Events", on real servers: a stream follows a whole job on the
sample (progress never goes backwards, every stage appears, the last event is ``completed``),
a reconnect with ``Last-Event-ID`` gets only the later events, and the stage logs are served;
in PostgreSQL mode a stream opened on the other replica sees the same events (two replicas,
fake stage bodies: seconds)."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import SAMPLE_VIDEO
from replica_harness import FAST_QUEUE, Replica, upload
from test_events import parse_sse

from colmap_pipeline.protocol import STAGE_NAMES

pytestmark = pytest.mark.e2e


def read_stream(url: str, headers: dict[str, str] | None = None,
                timeout_s: float = 600) -> tuple[int, list[dict[str, Any]]]:
    """GET an event stream to its end: ``(status, messages)`` (:func:`test_events.parse_sse`)."""
    deadline = time.monotonic() + timeout_s
    raw = b""
    with httpx.Client(timeout=httpx.Timeout(60, connect=10)) as c, \
            c.stream("GET", url, headers=headers) as r:
        if r.status_code == 200:
            assert r.headers["content-type"].startswith("text/event-stream")
        for chunk in r.iter_bytes():
            raw += chunk
            assert time.monotonic() < deadline, "the stream did not end"
        return r.status_code, parse_sse(raw)


class Streamer(threading.Thread):
    """:func:`read_stream` in a thread (opened while the job runs)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.headers = url, headers
        self.status = 0
        self.messages: list[dict[str, Any]] = []

    def run(self) -> None:
        self.status, self.messages = read_stream(self.url, self.headers)


def test_a_stream_follows_the_sample_job_to_completed_and_resumes_after_an_id(start_server):
    srv = start_server()
    with srv.client() as c, open(SAMPLE_VIDEO, "rb") as f:
        r = c.post("/upload-video", files={"video": ("walk.mp4", f, "video/mp4")},
                   data={"project_id": "events", "quality": "low"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        events_url = c.get(f"/jobs/{job_id}").json()["events_url"]
    status, msgs = read_stream(srv.url + events_url)
    assert status == 200
    first, rest = msgs[0]["data"], msgs[1:]
    assert first["kind"] == "snapshot" and first["status"] in ("pending", "processing")
    datas = [m["data"] for m in rest if m["data"] is not None]
    ids = [int(m["id"]) for m in rest if m["id"] is not None]
    assert ids == sorted(set(ids)) and ids[0] > int(msgs[0]["id"])
    progress = [first["progress"]] + [d["progress"] for d in datas]
    assert progress == sorted(progress), "progress went backwards"
    stages = {d["current_stage"] for d in datas}
    assert set(STAGE_NAMES.values()) <= stages, stages - set(STAGE_NAMES.values())
    last = datas[-1]
    assert (last["kind"], last["status"], last["progress"]) == ("status", "completed", 100)
    assert {d["kind"] for d in datas} >= {"status", "progress", "attempt"}

    # a reconnect after the first "Sparse Reconstruction" event: exactly the later events
    mid = next(int(m["id"]) for m in rest
               if m["data"] and m["data"]["current_stage"] == "Sparse Reconstruction")
    status, again = read_stream(srv.url + events_url, {"Last-Event-ID": str(mid)})
    assert status == 200
    assert [int(m["id"]) for m in again] == [i for i in ids if i > mid]
    assert [m["data"] for m in again] == [m["data"] for m in rest if int(m["id"]) > mid]
    status, done = read_stream(srv.url + events_url, {"Last-Event-ID": str(ids[-1])})
    assert (status, done) == (204, [])

    with srv.client() as c:
        log = c.get(f"/jobs/{job_id}/log")
        assert log.status_code == 200
        lines = log.text.splitlines()
        assert int(log.headers["x-next-line"]) == len(lines) > 0
        assert {line[1:].split("] ")[0] for line in lines} <= set(STAGE_NAMES)
        assert any(line.startswith("[features] ") and "Feature extraction" in line
                   for line in lines)  # COLMAP's own log lines
        tail = c.get(f"/jobs/{job_id}/log", params={"since": len(lines) - 1})
        assert tail.text.splitlines() == lines[-1:]


def test_postgres_a_stream_on_the_other_replica_sees_the_same_events(tmp_path: Path,
                                                                     pg_url: str):
    env = {"DATABASE_URL": pg_url, "COLMAP_TEST_FAKE_STAGES": "0.3", **FAST_QUEUE}
    a, b = Replica(tmp_path, "a", env), Replica(tmp_path, "b", env)
    try:
        starting = [threading.Thread(target=r.start) for r in (a, b)]  # together: ~5 s less
        for t in starting:
            t.start()
        for t in starting:
            t.join(90)
        assert all(r.proc is not None and r.proc.poll() is None for r in (a, b))
        job_id = upload(a)
        # both from the job's first event, opened while it runs: one is on the replica that
        # does not run it, woken by NOTIFY
        streams = [Streamer(f"{r.url}/jobs/{job_id}/events", {"Last-Event-ID": "0"})
                   for r in (a, b)]
        for s in streams:
            s.start()
        for s in streams:
            s.join(120)
            assert not s.is_alive() and s.status == 200
        on_a, on_b = ([(m["id"], m["data"]) for m in s.messages] for s in streams)
        assert on_a == on_b
        assert on_a[0][1]["intent"] == "create" and on_a[-1][1]["status"] == "completed"
        progress = [d["progress"] for _, d in on_a]
        assert progress == sorted(progress)
        assert set(STAGE_NAMES.values()) <= {d["current_stage"] for _, d in on_a}
    finally:
        a.stop()
        b.stop()
