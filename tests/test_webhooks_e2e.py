"""Webhooks and metrics on a real server (issue 16 items 2 and 3, "Must show"): ``python
main.py`` with fake stage bodies (``COLMAP_TEST_FAKE_STAGES``: real stage children, no
pycolmap) and a real HTTP receiver in a thread of this process (``WEBHOOK_ALLOW_PRIVATE``).

One server for the module (:func:`served`): four jobs end there once (:func:`finished`): one
completed, one failed (its stage child killed twice from outside at the ``pause:matching`` test
hook: ``pipeline_crashed``), two cancelled (one to a receiver answering 500 twice). The last
test restarts the server between two tries of a delivery. The dispatcher's logic in detail:
tests/test_webhooks.py (in process, on fakes).
"""
from __future__ import annotations

import base64
import os
import signal
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psycopg
import pytest
from conftest import SAMPLE_VIDEO, ServerProcess, wait_until
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks import Webhook

from colmap_pipeline.layout import DataDir, Workspace

pytestmark = pytest.mark.e2e

SECRET = "whsec_" + base64.b64encode(b"e2e-webhook-secret-32-bytes-long").decode()
ENV = {"COLMAP_TEST_FAKE_STAGES": "0.05", "TEST_FAULT": "pause:matching",
       "WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOW_PRIVATE": "true",
       # retries wait 0.03-0.3 s twice, then 0.3-3 s (so a restart falls between two tries)
       "WEBHOOK_RETRY_SCHEDULE_S": "0.3,0.3,3,3,3,3"}


class Receiver:
    """A real HTTP receiver: records every POST by path; ``/flaky`` answers 500 twice, then
    200; ``/down`` answers 503 while :attr:`down` is set; anything else 200."""

    def __init__(self) -> None:
        self.got: dict[str, list[tuple[dict[str, str], bytes]]] = defaultdict(list)
        self.down = threading.Event()
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with outer.lock:
                    outer.got[self.path].append((dict(self.headers), body))
                    n = len(outer.got[self.path])
                status = 200
                if self.path == "/flaky" and n <= 2:
                    status = 500
                if self.path == "/down" and outer.down.is_set():
                    status = 503
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def requests(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return list(self.got[path])


def verified(request: tuple[dict[str, str], bytes]) -> dict:
    """The body of a received delivery, verified by standardwebhooks (raises if forged)."""
    headers, body = request
    return Webhook(SECRET).verify(body, headers)


@dataclass
class Served:
    tmp: Path
    receiver: Receiver
    srv: ServerProcess

    def start_again(self) -> None:
        """A new server on the same DATA_DIR (``tmp/data``); stop the old one first."""
        self.srv = ServerProcess(self.tmp, ENV)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    receiver = Receiver()
    tmp = tmp_path_factory.mktemp("webhooks")
    s = Served(tmp, receiver, ServerProcess(tmp, ENV))
    yield s
    s.srv.stop()
    receiver.http.shutdown()


def upload(c: httpx.Client, hook: str) -> str:
    r = c.post("/upload-video", files={"video": ("clip.mp4", SAMPLE_VIDEO.read_bytes(),
                                                 "video/mp4")},
               data={"project_id": "hooks", "quality": "low", "webhook_url": hook})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def pause_flag(s: Served, job_id: str) -> Path:
    ws = DataDir(s.srv.data_dir).job(job_id).work.root
    return Workspace(ws).test_pause_file("matching")


def paused_pid(s: Served, job_id: str, not_pid: int | None = None) -> int:
    """The pid of the job's stage child waiting at the matching pause (another than
    ``not_pid``: the flag of a killed child stays until the next child rewrites it)."""
    flag = pause_flag(s, job_id)

    def pid() -> int | None:
        try:
            value = int(flag.read_text())
        except (OSError, ValueError):
            return None
        return value if value != not_pid else None
    return wait_until(pid, 60, f"job {job_id} at its matching pause")


@dataclass
class Finished:
    completed: str
    failed: str
    cancelled: str
    flaky: str


@pytest.fixture(scope="module")
def finished(served) -> Finished:
    """Four jobs ended on the module's server, each with a webhook (see the module docstring)."""
    s, ok = served, f"{served.receiver.url}/ok"
    with s.srv.client() as c:
        done = upload(c, ok)
        paused_pid(s, done)
        pause_flag(s, done).unlink()  # released: the job completes
        assert s.srv.wait_for_job(done, 120)["status"] == "completed"
        crash = upload(c, ok)
        first = paused_pid(s, crash)
        os.kill(first, signal.SIGKILL)  # from outside: retried once ...
        os.kill(paused_pid(s, crash, not_pid=first), signal.SIGKILL)  # ... then failed
        assert s.srv.wait_for_job(crash, 120)["status"] == "failed"
        cancel, flaky = upload(c, ok), upload(c, f"{s.receiver.url}/flaky")
        for job_id in (cancel, flaky):
            assert c.post(f"/jobs/{job_id}/cancel").status_code == 200
    return Finished(done, crash, cancel, flaky)


def deliveries(s: Served, job_id: str) -> list[dict]:
    with s.srv.client() as c:
        r = c.get(f"/jobs/{job_id}/webhooks")
    assert r.status_code == 200, r.text
    assert r.json()["job_id"] == job_id
    return r.json()["deliveries"]


def test_each_terminal_event_is_delivered_once_and_verifies(served, finished):
    s = served
    wait_until(lambda: len(s.receiver.requests("/ok")) >= 3, 30, "three deliveries to /ok")
    time.sleep(2.5)  # two more dispatcher passes: nothing is sent twice
    bodies = [verified(r) for r in s.receiver.requests("/ok")]
    by_job = {b["data"]["job_id"]: b for b in bodies}
    assert len(bodies) == 3 == len(by_job)
    expected = {finished.completed: ("job.completed", "completed"),
                finished.failed: ("job.failed", "failed"),
                finished.cancelled: ("job.cancelled", "cancelled")}
    assert {j: (b["type"], b["data"]["status"]) for j, b in by_job.items()} == expected
    crash = by_job[finished.failed]["data"]
    assert crash["error"]["code"] == "pipeline_crashed" and crash["error"]["hint"]
    assert by_job[finished.completed]["data"]["results"]["registered_images"] == 3
    ids = {h["webhook-id"] for h, _ in s.receiver.requests("/ok")}
    for job_id in expected:
        [d] = deliveries(s, job_id)
        assert d["webhook_id"] in ids
        assert (d["state"], d["tries"], len(d["attempts"])) == ("delivered", 1, 1)
        assert d["attempts"][0]["http_status"] == 200 and d["attempts"][0]["at"]


def test_a_receiver_answering_500_twice_gets_the_third_try(served, finished):
    s = served
    wait_until(lambda: len(s.receiver.requests("/flaky")) >= 3, 30, "three tries to /flaky")
    got = s.receiver.requests("/flaky")
    assert len({h["webhook-id"] for h, _ in got}) == 1  # one message, tried three times
    assert verified(got[-1])["data"]["job_id"] == finished.flaky
    [d] = wait_until(lambda: [x for x in deliveries(s, finished.flaky)
                              if x["state"] == "delivered"], 10, "the delivery recorded")
    assert [a["http_status"] for a in d["attempts"]] == [500, 500, 200]
    assert [a["try"] for a in d["attempts"]] == [1, 2, 3]


def sample(families: dict, name: str, **labels: str) -> float | None:
    for s in families.get(name, []):
        if all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def test_metrics_count_the_finished_jobs_and_time_every_stage(served, finished):
    with served.srv.client() as c:
        job = c.get(f"/jobs/{finished.completed}").json()
        failed = c.get(f"/jobs/{finished.failed}").json()
        r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f.samples for f in text_string_to_metric_families(r.text)}
    finished_total = "colmap_jobs_finished"  # the parser drops a counter's _total suffix
    got = {(s.labels["outcome"], s.labels["error_code"]): s.value
           for s in families[finished_total] if s.name.endswith("_total")}
    assert got == {("completed", ""): 1, ("failed", failed["error"]["code"]): 1,
                   ("cancelled", ""): 2}
    for status, n in (("completed", 1), ("failed", 1), ("cancelled", 2), ("pending", 0)):
        assert sample(families, "colmap_jobs", status=status) == n
    assert sample(families, "colmap_queue_depth") == 0
    stages = set(job["attempts"][-1]["stage_wall_s"])
    assert stages  # the completed job ran every stage in its attempts
    for stage in stages | set(failed["attempts"][-1]["stage_wall_s"]):
        n = next(s.value for s in families["colmap_stage_duration_seconds"]
                 if s.name.endswith("_count") and s.labels == {"stage": stage, "preset": "low"})
        assert n >= 1, stage
    assert next(s.value for s in families["colmap_registered_share"]
                if s.name.endswith("_sum")) == 1.0  # the fake model: 3 of 3 frames
    assert next(s.value for s in families["colmap_queue_wait_seconds"]
                if s.name.endswith("_count")) >= 2
    uploaded = next(s.value for s in families["colmap_uploaded_bytes"]
                    if s.name.endswith("_total"))
    assert uploaded == 4 * SAMPLE_VIDEO.stat().st_size
    latency = [s for s in families["http_request_duration_seconds"]
               if s.name.endswith("_count") and s.labels.get("handler") == "/jobs/{job_id}"]
    assert latency and latency[0].value >= 2


def test_a_delivery_survives_a_server_restart_between_tries(served, finished):
    s = served
    s.receiver.down.set()
    with s.srv.client() as c:
        job_id = upload(c, f"{s.receiver.url}/down")
        assert c.post(f"/jobs/{job_id}/cancel").status_code == 200
    wait_until(lambda: s.receiver.requests("/down"), 30, "a first try")
    s.srv.stop()  # SIGTERM between two tries
    failed_tries = len(s.receiver.requests("/down"))
    s.receiver.down.clear()
    time.sleep(1.0)
    assert len(s.receiver.requests("/down")) == failed_tries  # nobody sends while down
    s.start_again()
    wait_until(lambda: len(s.receiver.requests("/down")) > failed_tries, 30, "the next try")
    got = s.receiver.requests("/down")
    assert len(got) == failed_tries + 1
    assert verified(got[-1])["data"]["job_id"] == job_id
    [d] = wait_until(lambda: [x for x in deliveries(s, job_id)
                              if x["state"] == "delivered"], 10, "the delivery recorded")
    assert {h["webhook-id"] for h, _ in got} == {d["webhook_id"]}  # the same message
    assert [a["http_status"] for a in d["attempts"]] == [503] * failed_tries + [200]


def test_postgres_mode_delivers_through_the_queue_once_per_event_across_replicas(
        tmp_path, pg_url):
    """PostgreSQL mode, two replicas on one database: each delivery runs in a procrastinate
    task (periodic ``colmap.deliver_webhooks``, one waiting pass whatever the replicas), and
    each terminal event reaches the receiver exactly once, verified."""
    receiver = Receiver()
    env = {"DATABASE_URL": pg_url, "COLMAP_TEST_FAKE_STAGES": "0.05",
           "WEBHOOK_SECRET": SECRET, "WEBHOOK_ALLOW_PRIVATE": "true",
           "QUEUE_HEARTBEAT_INTERVAL_S": "1"}
    a, b = ServerProcess(tmp_path / "a", env), ServerProcess(tmp_path / "b", env)
    try:
        ids = []
        for srv in (a, b, a, b):
            with srv.client() as c:
                ids.append(upload(c, f"{receiver.url}/pg"))
        for job_id in ids:
            assert a.wait_for_job(job_id, 120)["status"] == "completed"
        wait_until(lambda: len(receiver.requests("/pg")) >= len(ids), 30, "four deliveries")
        time.sleep(2.5)  # more periodic passes on both replicas: nothing is sent twice
        events = [verified(r) for r in receiver.requests("/pg")]
        assert sorted(e["data"]["job_id"] for e in events) == sorted(ids)
        assert {e["type"] for e in events} == {"job.completed"}
        with b.client() as c:  # the other replica lists the try its neighbour may have made
            [d] = c.get(f"/jobs/{ids[0]}/webhooks").json()["deliveries"]
        assert d["state"] == "delivered" and [t["http_status"] for t in d["attempts"]] == [200]
    finally:
        a.stop()
        b.stop()
        receiver.http.shutdown()
    # the queue's own record: the periodic pass was deferred as a task
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT count(*) FROM procrastinate_periodic_defers "
                           "WHERE task_name = 'colmap.deliver_webhooks'").fetchone()
    assert row is not None and row[0] > 0
