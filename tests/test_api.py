"""HTTP contract against a real server (``python main.py`` in a subprocess, real SQLite)."""
from __future__ import annotations

import socket
import time

import httpx
from conftest import SAMPLE_VIDEO


def _files(tree) -> list[str]:
    return sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())


def _read_response(sock: socket.socket) -> str:
    """One whole HTTP/1.1 response (headers + Content-Length body) from a raw socket."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed early: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def _upload(client: httpx.Client, content: bytes | None, name: str = "clip.mp4", **fields):
    data = {"project_id": "proj-1", "scan_name": "Scan", "quality": "low",
            "user_email": "a@example.com"}
    data.update(fields)
    data = {k: v for k, v in data.items() if v is not None}
    files = {"video": (name, content, "video/mp4")} if content is not None else None
    return client.post("/upload-video", data=data, files=files)


def test_identity_health_readiness_docs(start_server):
    srv = start_server()
    with srv.client() as c:
        root = c.get("/").json()
        assert root["message"] == "COLMAP Worker API" and root["status"] == "running"
        assert root["gpu_enabled"] is False and root["version"]
        health = c.get("/health").json()
        gpu = health.pop("gpu")  # issue 6: probe details (tests/test_deploy.py checks them)
        assert gpu["enabled"] is False and gpu["cpu_only_forced"] is True and gpu["devices"] == []
        assert health == {"status": "healthy", "service": "colmap-worker", "gpu_status": False,
                          "active_gpu_jobs": 0, "max_gpu_jobs": 4, "active_jobs": 0,
                          "max_concurrent_jobs": 1}
        ready = c.get("/readiness")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "ready" and all(ready.json()["checks"].values())
        spec = c.get("/openapi.json").json()
        upload = spec["paths"]["/upload-video"]["post"]
        props = upload["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
        assert set(props) == {"video", "project_id", "scan_name", "quality", "user_email"}
        job_schema = spec["components"]["schemas"]["JobPublic"]["properties"]
        assert "description" in job_schema["progress"]
        assert c.get("/docs").status_code == 200


def test_readiness_fails_naming_low_disk(start_server):
    srv = start_server(MIN_FREE_DISK_BYTES=str(10**18))
    with srv.client() as c:
        r = c.get("/readiness")
    assert r.status_code == 503
    assert r.json()["failing"] == ["free_disk"]


def test_text_file_named_mp4_is_415_and_leaves_nothing(start_server):
    srv = start_server()
    with srv.client() as c:
        r = _upload(c, b"this is not a video\n" * 100, name="fake.mp4")
        assert r.status_code == 415, r.text
        err = r.json()["error"]
        assert err["code"] == "no_video_stream" and err["hint"]
        assert c.get("/jobs").json()["total"] == 0
    assert _files(srv.data_dir / "uploads") == []
    assert _files(srv.data_dir / "jobs") == []


def test_empty_file_is_refused(start_server):
    srv = start_server()
    with srv.client() as c:
        r = _upload(c, b"")
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "empty_file"
        assert c.get("/jobs").json()["total"] == 0


def test_missing_and_invalid_fields_are_422_and_unknown_job_404(start_server):
    srv = start_server()
    video = SAMPLE_VIDEO.read_bytes()
    with srv.client() as c:
        r = _upload(c, video, project_id=None)
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
        assert r.json()["error"]["details"]["fields"][0]["field"] == "project_id"
        r = _upload(c, video, quality="ultra")
        assert r.status_code == 422
        assert r.json()["error"]["details"]["fields"][0]["field"] == "quality"
        r = c.post("/upload-video", files={"project_id": (None, "p"), "quality": (None, "low")})
        assert r.status_code == 422 and "video" in r.json()["error"]["message"]
        r = c.post("/upload-video", data={"project_id": "p"})  # urlencoded, not multipart
        assert r.status_code == 422
        assert c.get("/jobs").json()["total"] == 0
        r = c.get("/jobs/00000000-0000-0000-0000-000000000000")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert c.get("/jobs", params={"status": "weird"}).status_code == 422
    assert _files(srv.data_dir / "uploads") == []


def test_over_limit_gets_413_before_the_body_is_sent(start_server):
    limit = 1_000_000
    srv = start_server(MAX_UPLOAD_BYTES=limit)
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


def test_video_longer_than_limit_is_422(start_server):
    srv = start_server(MAX_VIDEO_SECONDS=5)
    with srv.client() as c:
        r = _upload(c, SAMPLE_VIDEO.read_bytes())
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "video_too_long" and err["details"]["max_video_seconds"] == 5
        assert 10 < err["details"]["duration_s"] < 11
        assert c.get("/jobs").json()["total"] == 0


def test_rate_limit_429_with_retry_after_and_health_not_limited(start_server):
    srv = start_server(MAX_REQUESTS_PER_MINUTE=2)
    with srv.client() as c:
        codes = [_upload(c, b"not a video").status_code for _ in range(2)]
        assert codes == [415, 415]
        r = _upload(c, b"not a video")
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "rate_limited"
        assert 0 < int(r.headers["Retry-After"]) <= 60
        for _ in range(30):
            assert c.get("/health").status_code == 200
            assert c.get("/readiness").status_code == 200


def test_sigabrt_in_child_fails_job_as_pipeline_crashed(start_server):
    srv = start_server(TEST_FAULT="abort:features")
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


def test_queue_position_listing_and_stored_names(start_server):
    srv = start_server(TEST_FAULT="sleep:frames", MAX_CONCURRENT_JOBS=1)
    video = SAMPLE_VIDEO.read_bytes()
    with srv.client() as c:
        ids = []
        for i, project in enumerate(["a", "b", "a"]):
            r = _upload(c, video, name=f"../../evil{i}.mp4", project_id=project)
            assert r.status_code == 202, r.text
            ids.append(r.json()["job_id"])
        deadline = time.monotonic() + 30
        while c.get(f"/jobs/{ids[0]}").json()["status"] != "processing":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        first = c.get(f"/jobs/{ids[0]}").json()
        assert first["current_stage"] == "Frame Extraction" and first["queue_position"] is None
        assert c.get(f"/jobs/{ids[1]}").json()["queue_position"] == 1
        second_pending = c.get(f"/jobs/{ids[2]}").json()
        assert second_pending["queue_position"] == 2 and second_pending["status"] == "pending"
        assert second_pending["input_bytes"] == len(video)
        assert second_pending["video"]["width"] == 848
        listing = c.get("/jobs", params={"project_id": "a"}).json()
        assert listing["total"] == 2 and [j["job_id"] for j in listing["jobs"]] == [ids[2], ids[0]]
        page = c.get("/jobs", params={"limit": 1, "offset": 1}).json()
        assert page["total"] == 3 and [j["job_id"] for j in page["jobs"]] == [ids[1]]
        r = c.get(f"/jobs/{ids[0]}/artifacts/sparse.ply")
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_completed"
    stored = _files(srv.data_dir)
    assert not any("evil" in p for p in stored)
    assert sum(p.endswith("input/video.mp4") for p in stored) == 3


def test_content_length_beyond_the_disk_is_413_not_507(start_server):
    """A Content-Length larger than the free disk AND the upload limit is the client's error
    (413, do not retry), not the operator's (507)."""
    srv = start_server()
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
    assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
