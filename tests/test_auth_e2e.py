"""Issue 13 on a real server (``python main.py``, SQLite, the runner paused with
``MAX_CONCURRENT_JOBS=0`` so no reconstruction runs): API keys, per-key isolation on every job
route, admin keys, signed artifact links followed without a header, the pending quota, and a
log that never holds a key.

One server for the module; its store is prepared before it starts with a completed job of
``alice`` whose artifact file exists (so links can be downloaded without running COLMAP).
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import httpx
import pytest
from conftest import SAMPLE_VIDEO, ServerProcess

from colmap_pipeline.jobs import Intent
from colmap_pipeline.layout import DATABASE_FILE, DataDir

KEYS = {"alice": "alice-key-4f9c2a7d1e", "bob": "bob-key-8b3e6f0a2c",
        "quota": "quota-key-1d7a9e3b5f"}
ADMIN = ("ops", "ops-key-6c2d8f4a0b")
WRONG_KEY = "wrong-key-3a5c7e9b1d"
ALICE = {"X-API-Key": KEYS["alice"]}
BOB = {"Authorization": f"Bearer {KEYS['bob']}"}
OPS = {"X-API-Key": ADMIN[1]}
TTL_S = 4
MAX_PENDING = 2
PLY = b"ply\nformat ascii 1.0\nelement vertex 0\nend_header\n"
DONE = "done-alice-1"


def _prepare(data_dir: Path) -> None:
    """A completed job of alice with one artifact on disk, written before the server opens."""
    from database import SqliteJobStore

    path = DataDir(data_dir).job(DONE).work.artifact("sparse.ply")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PLY)
    art = {"name": "sparse.ply", "bytes": len(PLY), "media_type": "application/octet-stream",
           "sha256": hashlib.sha256(PLY).hexdigest()}

    async def make() -> None:
        store = await SqliteJobStore.open(data_dir / DATABASE_FILE)
        try:
            await store.create_job({
                "job_id": DONE, "scan_id": "scan-done", "project_id": "p", "scan_name": "S",
                "quality": "low", "input_path": "/nonexistent.mp4", "input_bytes": 1,
                "input_sha256": "00" * 32, "owner": "alice", "user_email": "a@example.com"})
            assert await store.apply(DONE, Intent.CLAIM)
            assert await store.apply(DONE, Intent.COMPLETE, results={
                "frames_extracted": 3, "frames_used": 3, "registered_images": 3,
                "points3d": 0, "mean_reprojection_error_px": 0.5, "mean_track_length": 3.0,
                "artifacts": [art]})
        finally:
            await store.close()

    asyncio.run(make())


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("auth"), {
        "API_KEYS": ",".join(f"{n}:{k}" for n, k in KEYS.items()),
        "ADMIN_API_KEYS": f"{ADMIN[0]}:{ADMIN[1]}", "SIGNED_URL_TTL_S": str(TTL_S),
        "MAX_CONCURRENT_JOBS": "0", "MAX_PENDING_JOBS_PER_KEY": str(MAX_PENDING),
        "LOG_LEVEL": "info"}, prepare=_prepare)
    yield server
    server.stop()


def _upload(c: httpx.Client, headers: dict[str, str]) -> httpx.Response:
    with SAMPLE_VIDEO.open("rb") as f:
        return c.post("/upload-video", headers=headers,
                      files={"video": ("clip.mp4", f, "video/mp4")},
                      data={"project_id": "auth-e2e", "quality": "low",
                            "user_email": "u@example.com"})


def test_no_key_or_a_wrong_key_is_401_and_the_probes_stay_open(srv):
    with srv.client() as c:
        for headers in ({}, {"X-API-Key": WRONG_KEY}, {"Authorization": f"Bearer {WRONG_KEY}"}):
            for method, path in (("GET", "/jobs"), ("GET", f"/jobs/{DONE}"),
                                 ("POST", "/upload-video")):
                r = c.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error"]["code"] == "unauthorized"
                assert r.headers["www-authenticate"].startswith("Bearer")
        for path in ("/health", "/readiness", "/"):
            assert c.get(path).status_code == 200, path
        assert c.get("/health").json()["auth"] == "on"


def test_another_key_gets_404_on_every_job_route_and_an_admin_sees_all(srv):
    with srv.client() as c:
        up = _upload(c, ALICE)
        assert up.status_code == 202, up.text
        pending = up.json()["job_id"]
        unknown = c.get("/jobs/never-existed", headers=BOB)
        assert unknown.status_code == 404
        for method, path in (
                ("GET", f"/jobs/{pending}"), ("GET", f"/jobs/{pending}/frames"),
                ("GET", f"/jobs/{DONE}/artifacts/sparse.ply"),
                ("HEAD", f"/jobs/{DONE}/artifacts/sparse.ply"),
                ("POST", f"/jobs/{pending}/cancel"), ("POST", f"/jobs/{DONE}/retry"),
                ("DELETE", f"/jobs/{DONE}"), ("DELETE", f"/jobs/{pending}")):
            r = c.request(method, path, headers=BOB)
            assert r.status_code == 404, (method, path, r.text)
            if method != "HEAD":
                assert r.json() == unknown.json()
        bob_list = c.get("/jobs", headers=BOB).json()
        assert bob_list["total"] == 0 and bob_list["jobs"] == []
        mine = c.get("/jobs", headers=ALICE).json()
        assert {DONE, pending} <= {j["job_id"] for j in mine["jobs"]}
        assert all(j["owner"] == "alice" for j in mine["jobs"])
        assert c.get(f"/jobs/{pending}", headers=ALICE).json()["user_email"] == "u@example.com"
        every = c.get("/jobs", headers=OPS).json()
        assert {DONE, pending} <= {j["job_id"] for j in every["jobs"]}
        assert all(j["user_email"] is None for j in every["jobs"])  # the owner's only
        only_bob = c.get("/jobs", headers=OPS, params={"owner": "bob"}).json()
        assert only_bob["total"] == 0
        assert c.get(f"/jobs/{DONE}", headers=ALICE).json()["status"] == "completed"
        r = c.post(f"/jobs/{pending}/cancel", headers=OPS)  # an admin acts on any job
        assert r.status_code == 200 and r.json()["status"] == "cancelled"


def test_a_signed_link_downloads_without_a_header_until_altered_or_expired(srv):
    with srv.client() as c:
        job = c.get(f"/jobs/{DONE}", headers=ALICE).json()
    url = srv.url + job["artifacts"][0]["url"]
    assert "?token=" in url
    with httpx.Client(timeout=30) as browser:  # sends no key
        r = browser.get(url)
        assert r.status_code == 200 and r.content == PLY
        assert r.headers["content-disposition"] == 'attachment; filename="sparse.ply"'
        assert r.headers["x-content-type-options"] == "nosniff"
        token = url.split("token=")[1]
        i = len(token) // 2 + 3
        altered = url[:-len(token)] + token[:i] + ("x" if token[i] != "x" else "y") + \
            token[i + 1:]
        r = browser.get(altered)
        assert r.status_code == 401 and r.json()["error"]["code"] == "link_expired"
        assert "GET /jobs/" in r.json()["error"]["hint"]
        expires = int(token.split(".")[0])
        time.sleep(max(0.0, expires - time.time()) + 0.2)
        r = browser.get(url)
        assert r.status_code == 401 and r.json()["error"]["code"] == "link_expired"


def test_the_pending_quota_refuses_the_next_upload_with_429(srv):
    quota = {"X-API-Key": KEYS["quota"]}
    with srv.client() as c:
        for _ in range(MAX_PENDING):
            r = _upload(c, quota)
            assert r.status_code == 202, r.text
        r = _upload(c, quota)
        assert r.status_code == 429, r.text
        err = r.json()["error"]
        assert err["code"] == "quota_exceeded"
        assert err["details"] == {"pending": MAX_PENDING, "limit": MAX_PENDING}
        assert "retry-after" not in r.headers
        listed = c.get("/jobs", headers=quota, params={"status": "pending"}).json()
        assert listed["total"] == MAX_PENDING  # the runner is paused: they all wait
        assert _upload(c, BOB).status_code == 202  # another key's quota is its own


def test_the_log_holds_no_key_and_no_link_token(srv):
    """Runs last in the module: every key (and the wrong one) was sent above."""
    with srv.client() as c:
        url = c.get(f"/jobs/{DONE}", headers=ALICE).json()["artifacts"][0]["url"]
        assert httpx.get(srv.url + url, timeout=30).status_code == 200
    token = url.split("token=")[1]
    log = srv.log_path.read_text()
    assert "GET /jobs" in log  # the access log is on (LOG_LEVEL=info)
    assert "API keys on: alice, bob, quota, ops" in log  # keys are named by name
    for secret in [*KEYS.values(), ADMIN[1], WRONG_KEY, token.split(".")[1]]:
        assert secret not in log, secret


@pytest.mark.parametrize("env, says", [
    ({"API_KEYS": "alice-key-without-a-name"}, "API_KEYS: entry 1 is not 'name:key'"),
    ({"API_KEYS": "alice:alice-key-4f9c2a7d1e", "CORS_ORIGINS": "*",
      "CORS_ALLOW_CREDENTIALS": "true"}, "CORS_ORIGINS=* with CORS_ALLOW_CREDENTIALS=true"),
])
def test_a_bad_key_or_cors_setting_stops_the_start_with_a_clear_message(tmp_path, env, says):
    import os
    import subprocess
    import sys

    from conftest import REPO

    run = subprocess.run([sys.executable, str(REPO / "main.py")], cwd=tmp_path, timeout=60,
                         capture_output=True, text=True,
                         env={**os.environ, "DATA_DIR": str(tmp_path / "data"), "PORT": "1",
                              **env})
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"refusing to start: {says}" in run.stderr
    assert "alice-key" not in run.stderr and "Traceback" not in run.stderr
