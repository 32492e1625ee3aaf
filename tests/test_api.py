"""The HTTP contract where a real server matters (``python main.py`` in a subprocess, real
SQLite, real runner): 413 before the body arrives, a stalled body, a malformed request line,
concurrent writes, a crashing stage child. Everything else about the routes is tested in
process (tests/test_web_*.py)."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
from conftest import SAMPLE_VIDEO, ServerProcess
from web_harness import files_under, read_response

from colmap_pipeline.jobs import Intent


def _files(tree) -> list[str]:
    return sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())


def _read_response(sock: socket.socket) -> str:
    """One whole HTTP/1.1 response (headers + Content-Length body) from a raw socket."""
    status, headers, body = read_response(sock, timeout=10)
    head = "\r\n".join(f"{k}: {v}" for k, v in headers.items())
    return f"HTTP/1.1 {status} x\r\n{head}\r\n\r\n{body.decode(errors='replace')}"


def _upload(client: httpx.Client, content: bytes | None, name: str = "clip.mp4", **fields):
    data = {"project_id": "proj-1", "scan_name": "Scan", "quality": "low",
            "user_email": "a@example.com"}
    data.update(fields)
    data = {k: v for k, v in data.items() if v is not None}
    files = {"video": (name, content, "video/mp4")} if content is not None else None
    return client.post("/upload-video", data=data, files=files)


#: MAX_UPLOAD_BYTES of :func:`small_limit_server`
SMALL_LIMIT = 1_000_000


@pytest.fixture(scope="module")
def small_limit_server(tmp_path_factory):
    """One server with a 1 MB upload limit for the two 413 tests (neither creates a job)."""
    srv = ServerProcess(tmp_path_factory.mktemp("limit"), {"MAX_UPLOAD_BYTES": str(SMALL_LIMIT)})
    yield srv
    srv.stop()


def test_over_limit_gets_413_before_the_body_is_sent(small_limit_server):
    limit = SMALL_LIMIT
    srv = small_limit_server
    before_data, before_tmp = _files(srv.data_dir), _files(srv.tmp_dir)
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; "
            f"filename=\"big.mp4\"\r\nContent-Type: video/mp4\r\n\r\n").encode()
    declared = 50 * limit
    sent = 0
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall((f"POST /upload-video HTTP/1.1\r\nHost: x\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {declared}\r\n\r\n").encode() + head)
        sock.sendall(b"\0" * 65536)
        sent = len(head) + 65536
        reply = _read_response(sock)
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert "upload_too_large" in reply
    assert sent < declared / 100  # the answer came long before the client finished
    assert _files(srv.data_dir) == before_data
    assert _files(srv.tmp_dir) == before_tmp
    # a streamed (chunked) body over the limit is cut off too, and nothing is left behind
    with srv.client() as c:
        def body():
            yield head
            for _ in range(40):
                yield b"\1" * 65536
            yield f"\r\n--{boundary}--\r\n".encode()
        r = c.post("/upload-video", content=body(),
                   headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == 413
        assert c.get("/health").status_code == 200
    assert _files(srv.data_dir) == before_data
    assert _files(srv.tmp_dir) == before_tmp


def test_content_length_beyond_the_disk_is_413_not_507(small_limit_server):
    """A Content-Length larger than the free disk AND the upload limit is the client's error
    (413, do not retry), not the operator's (507)."""
    srv = small_limit_server
    for path in ("/upload-video", "/upload-images"):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                          "Content-Type: multipart/form-data; boundary=XX\r\n"
                          "Content-Length: 99999999999999\r\n\r\nx").encode())
            data = b""
            while b'"hint"' not in data:  # the JSON error body ends with its hint
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert int(head.split(b" ", 2)[1]) == 413, data
        assert b'"code":"upload_too_large"' in body.replace(b" ", b""), body
    # a Content-Length that is not a number never reaches the app, and still gets JSON
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall(b"POST /upload-video HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n")
        status, headers, body = read_response(sock)
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "invalid_request"
    assert httpx.get(srv.url + "/health", timeout=5).status_code == 200


def test_stalled_upload_gets_408_and_its_file_is_removed(start_server):
    """Issue 10 item 9: a body that stopped arriving kept its connection (and up to 1 MiB of
    memory) after 180 s."""
    srv = start_server(UPLOAD_READ_TIMEOUT_S="1")
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"project_id\"\r\n\r\np\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"video\"; "
            f"filename=\"v.mp4\"\r\n\r\n").encode()
    video = SAMPLE_VIDEO.read_bytes()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
        sock.sendall((f"POST /upload-video HTTP/1.1\r\nHost: x\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {len(head) + len(video) + 64}\r\n\r\n").encode()
                     + head + video[:2_500_000])  # then the client stalls
        started = time.monotonic()
        status, headers, body = read_response(sock, timeout=15)
        waited = time.monotonic() - started
        assert status == 408, body
        err = json.loads(body)["error"]
        assert err["code"] == "upload_timeout" and err["details"]["read_timeout_s"] == 1
        assert err["details"]["received_bytes"] >= 2_000_000
        assert headers["connection"] == "close"
        assert sock.recv(1) == b""  # the server hung up
    assert waited < 10
    assert files_under(srv.data_dir / "uploads") == []
    assert files_under(srv.data_dir / "jobs") == []
    assert httpx.get(srv.url + "/jobs", timeout=5).json()["total"] == 0


def _two_failed_jobs(data_dir) -> None:
    """Two failed jobs written into the server's SQLite store before it starts."""
    from database import SqliteJobStore

    async def make() -> None:
        store = await SqliteJobStore.open(data_dir / "colmap_app.db")
        try:
            for n in (1, 2):
                await store.create_job({
                    "job_id": f"failed-{n}", "scan_id": f"scan-{n}", "project_id": "race",
                    "scan_name": "Race", "quality": "low", "input_path": "/nonexistent.mp4",
                    "input_bytes": 1, "input_sha256": "00" * 32})
                assert await store.apply(f"failed-{n}", Intent.CLAIM)
                assert await store.apply(f"failed-{n}", Intent.FAIL, error_code="too_blurry")
        finally:
            await store.close()

    asyncio.run(make())


async def _burst(url: str, requests: list[tuple[str, str]]) -> list[httpx.Response]:
    """All ``(job_id, action)`` POSTs at once, each on its own connection."""
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        return list(await asyncio.gather(*(c.post(f"/jobs/{job}/{action}")
                                           for job, action in requests)))


def _job(srv, job_id: str) -> dict:
    return httpx.get(f"{srv.url}/jobs/{job_id}", timeout=10).json()


def _wait_failed(srv, jobs: list[str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while any(_job(srv, j)["status"] != "failed" for j in jobs):
        assert time.monotonic() < deadline, [_job(srv, j)["status"] for j in jobs]
        time.sleep(0.1)


def test_parallel_retries_while_the_runner_writes_never_500(start_server):
    """Issue 10 item 2: retries of two failed jobs, in parallel, while the runner claims and
    fails them again, answered 500 (one shared SQLite connection: "cannot commit transaction -
    SQL statements in progress"), and some of those 500s had requeued the job anyway. Here:
    0 x 500, and every retry answered 200 made exactly one more run (``attempt``), no other
    did."""
    srv = start_server(prepare=_two_failed_jobs, TEST_FAULT="fail:frames",
                       MAX_CONCURRENT_JOBS=2)
    jobs = ["failed-1", "failed-2"]
    accepted = dict.fromkeys(jobs, 0)
    for _ in range(6):
        _wait_failed(srv, jobs)
        answers = asyncio.run(_burst(srv.url, [(j, "retry") for j in jobs] * 30))
        assert {a.status_code for a in answers} <= {200, 409}, [
            (a.status_code, a.text[:200]) for a in answers if a.status_code not in (200, 409)]
        for j in jobs:
            accepted[j] += sum(a.status_code == 200 and a.request.url.path == f"/jobs/{j}/retry"
                               for a in answers)
    _wait_failed(srv, jobs)
    for j in jobs:
        job = _job(srv, j)
        assert accepted[j] >= 6
        assert job["attempt"] == 1 + accepted[j], (j, job["attempt"], accepted[j])


def test_concurrent_retry_and_cancel_never_500_and_every_200_happened(start_server):
    """Issue 10 item 2, cancel and retry racing on the same jobs (a paused job holds the only
    worker slot, so retried jobs stay pending): exactly one of each burst wins per job, and the
    winners alternate."""
    srv = start_server(prepare=_two_failed_jobs, TEST_FAULT="pause:frames",
                       MAX_CONCURRENT_JOBS=1)
    jobs = ["failed-1", "failed-2"]
    with srv.client() as c:  # a paused job holds the only slot: retried jobs stay pending
        r = _upload(c, SAMPLE_VIDEO.read_bytes())
        assert r.status_code == 202, r.text
        blocker = r.json()["job_id"]
        srv.wait_for_job(blocker, 60, statuses=("processing",))

    def status(job_id: str) -> str:
        return httpx.get(f"{srv.url}/jobs/{job_id}", timeout=10).json()["status"]

    for action, target in (("retry", "pending"), ("cancel", "cancelled")):
        answers = asyncio.run(_burst(srv.url, [(j, action) for j in jobs] * 30))
        assert sorted({a.status_code for a in answers}) == [200, 409], action
        for j in jobs:
            mine = [a for a in answers if a.request.url.path.startswith(f"/jobs/{j}/")]
            ok = [a for a in mine if a.status_code == 200]
            assert len(ok) == 1, (action, j, [a.status_code for a in mine])
            assert ok[0].json()["status"] == target
            assert status(j) == target
    # mixed: retries and cancels race on each job; the successful ones must alternate
    mixed = [(j, a) for _ in range(15) for j in jobs for a in ("retry", "cancel")]
    answers = asyncio.run(_burst(srv.url, mixed))
    assert all(a.status_code in (200, 409) for a in answers), [
        (a.status_code, a.text[:200]) for a in answers if a.status_code not in (200, 409)]
    for j in jobs:
        ok = {act: sum(1 for a in answers if a.status_code == 200
                       and a.request.url.path == f"/jobs/{j}/{act}")
              for act in ("retry", "cancel")}
        # from cancelled: retry, cancel, retry, ... so retries lead by 0 or 1
        assert ok["retry"] - ok["cancel"] in (0, 1), ok
        assert status(j) == ("pending" if ok["retry"] > ok["cancel"] else "cancelled"), ok
    assert status(blocker) == "processing"


def test_sigabrt_in_child_fails_job_as_pipeline_crashed(start_server):
    # fake stage bodies (the frames stage does not decode the sample); the fault still
    # aborts the real features child before its body
    srv = start_server(TEST_FAULT="abort:features", COLMAP_TEST_FAKE_STAGES="0")
    with srv.client() as c:
        r = _upload(c, SAMPLE_VIDEO.read_bytes())
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["status"] == "pending" and body["message"] == "Video uploaded successfully"
        job = srv.wait_for_job(body["job_id"], timeout_s=120)
        assert job["status"] == "failed"
        assert job["error"]["code"] == "pipeline_crashed"
        assert "SIGABRT" in job["error"]["message"] and job["error"]["hint"]
        assert job["current_stage"] == "Feature Detection"
        assert c.get("/health").json()["status"] == "healthy"
        assert c.get("/jobs", params={"status": "failed"}).json()["total"] == 1
