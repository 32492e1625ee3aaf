"""End to end on real video: a real server, a real upload, a real reconstruction (CPU)."""
from __future__ import annotations

import io
import statistics
import threading
import time
import zipfile

import httpx
import numpy as np
import pytest
from conftest import EUROC_VIDEO, SAMPLE_VIDEO, ServerProcess, shared_file

from colmap_pipeline.core import clip_checks

pytestmark = pytest.mark.e2e


class HealthSampler(threading.Thread):
    """GET /health every 50 ms until stopped; records latencies (s) and status codes."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.latencies: list[float] = []
        self.codes: list[int] = []
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5) as c:
            while not self._halt.is_set():
                t0 = time.perf_counter()
                try:
                    self.codes.append(c.get(self.url + "/health").status_code)
                except httpx.HTTPError:
                    self.codes.append(0)
                self.latencies.append(time.perf_counter() - t0)
                self._halt.wait(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module: its tests' jobs run one after the other."""
    srv = ServerProcess(tmp_path_factory.mktemp("e2e"), {})
    yield srv
    srv.stop()


def test_sample_video_low_quality_end_to_end(server, tmp_path):
    pycolmap = pytest.importorskip("pycolmap")
    plyfile = pytest.importorskip("plyfile")
    srv = server
    sampler = HealthSampler(srv.url)
    sampler.start()
    stages_seen: list[str] = []
    progress_seen: list[int] = []
    try:
        with srv.client() as c, open(SAMPLE_VIDEO, "rb") as f:
            r = c.post("/upload-video", files={"video": ("walk.mp4", f, "video/mp4")},
                       data={"project_id": "e2e", "scan_name": "Walk", "quality": "low",
                             "user_email": "e2e@example.com"})
            assert r.status_code == 202, r.text
            job_id = r.json()["job_id"]
            deadline = time.monotonic() + 600
            while True:
                job = c.get(f"/jobs/{job_id}").json()
                if job["status"] == "processing":
                    stages_seen.append(job["current_stage"])
                    progress_seen.append(job["progress"])
                if job["status"] in ("completed", "failed"):
                    break
                assert time.monotonic() < deadline, "job did not finish in 600 s"
                time.sleep(0.2)
    finally:
        sampler.stop()

    assert job["status"] == "completed", job.get("error")
    res = job["results"]
    assert res["frames_extracted"] == 30
    assert res["registered_images"] >= 27
    # SIFT from the frames' own size at low (issue 14; tests/test_pipeline.py has the same
    # bound): 988-1,049 points measured
    assert res["points3d"] >= 850
    assert 0 < res["mean_reprojection_error_px"] < 1.5
    assert res["mean_track_length"] > 2
    assert job["progress"] == 100
    # the stages named while processing are the real ones, in order, and progress never fell
    order = ["Starting", "Frame Extraction", "Feature Detection", "Feature Matching",
             "Sparse Reconstruction", "Dense Reconstruction", "Meshing", "Exporting",
             "Completed"]
    seen = [s for i, s in enumerate(stages_seen) if i == 0 or stages_seen[i - 1] != s]
    assert [order.index(s) for s in seen] == sorted(order.index(s) for s in seen)
    assert "Feature Detection" in seen and "Sparse Reconstruction" in seen
    assert progress_seen == sorted(progress_seen)
    assert set(res["timings_s"]) >= {"frames", "features", "matching", "mapping", "export"}
    assert res["camera"]["model"] == "SIMPLE_RADIAL"
    # issue 6: no CUDA here, so the dense stages are skipped (not failed) and say why
    assert res["dense"] == {"skipped": True, "reason": "dense skipped: no CUDA GPU"}
    assert res["meshing"] == res["dense"]
    assert not {"fused.ply", "mesh.ply", "mesh.glb"} & {a["name"] for a in res["artifacts"]}
    assert len(res["models"]) >= 1
    assert max(m["registered_images"] for m in res["models"]) == res["registered_images"]

    names = {a["name"]: a for a in job["artifacts"]}
    assert {"sparse.ply", "model.zip", "thumbnail.jpg"} <= set(names)
    with srv.client() as c:
        ply_bytes = c.get(names["sparse.ply"]["url"]).content
        zip_bytes = c.get(names["model.zip"]["url"]).content
        thumb = c.get(names["thumbnail.jpg"]["url"])
        # issue 13: every artifact downloads as an attachment of a safe type (JPEG is one: an
        # <img> may show the thumbnail; nothing in it runs)
        assert thumb.headers["content-type"] == "image/jpeg"
        assert thumb.headers["content-disposition"].startswith("attachment")
        assert thumb.content[:2] == b"\xff\xd8"
        assert c.get(f"/jobs/{job_id}/artifacts/../../colmap_app.db").status_code == 404
        assert c.get(f"/jobs/{job_id}/artifacts/nope.txt").status_code == 404
    assert len(ply_bytes) == names["sparse.ply"]["bytes"]

    ply = plyfile.PlyData.read(io.BytesIO(ply_bytes))
    vertex = ply["vertex"]
    assert vertex.count == res["points3d"]
    assert {"x", "y", "z", "red", "green", "blue"} <= {p.name for p in vertex.properties}
    assert np.isfinite(np.asarray(vertex["x"])).all()

    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
        members = set(zf.namelist())
        model_dir = tmp_path / "model"
        zf.extractall(model_dir)
    bin_files = [m for m in members if m.endswith("cameras.bin")]
    txt_files = [m for m in members if m.endswith("cameras.txt")]
    assert bin_files and txt_files
    for cameras_file in (bin_files[0], txt_files[0]):
        rec = pycolmap.Reconstruction((model_dir / cameras_file).parent)
        assert rec.num_reg_images() == res["registered_images"]
        assert rec.num_points3D() == res["points3d"]
        assert rec.compute_mean_reprojection_error() == pytest.approx(
            res["mean_reprojection_error_px"], abs=1e-3)

    # the event loop was never blocked: /health stayed fast for the whole job
    lat = sorted(sampler.latencies)
    p95 = lat[int(0.95 * (len(lat) - 1))]
    assert len(lat) > 100
    assert set(sampler.codes) == {200}
    assert p95 < 0.100, f"p95 {p95 * 1000:.1f} ms"
    assert max(lat) < 1.0, f"max {max(lat) * 1000:.1f} ms"
    print(f"/health over the job: n={len(lat)} median={statistics.median(lat) * 1000:.1f} ms "
          f"p95={p95 * 1000:.1f} ms max={max(lat) * 1000:.1f} ms")


def test_static_camera_fails_with_motion_hint_and_its_frames_are_served(server):
    """The EuRoC static clip fails as ``insufficient_motion`` in the frames stage (no SIFT
    stage runs), with a hint to move, and its frame scores are served."""
    video = shared_file(EUROC_VIDEO.relative_to(EUROC_VIDEO.parents[1]).as_posix())
    with server.client() as c, open(video, "rb") as f:
        r = c.post("/upload-video", files={"video": ("static.mp4", f, "video/mp4")},
                   data={"project_id": "e2e", "scan_name": "Static", "quality": "low"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        job = server.wait_for_job(job_id, timeout_s=300)
        assert job["status"] == "failed"
        assert job["error"]["code"] == "insufficient_motion"
        assert "mov" in job["error"]["hint"].lower()
        assert job["results"] is None and job["artifacts"] == []
        # caught before feature extraction: no SIFT stage ever ran
        [attempt] = job["attempts"]
        assert attempt["failed_stage"] == "frames"
        assert attempt["error_code"] == "insufficient_motion"
        assert list(attempt["stage_wall_s"]) == ["frames"]
        # the frame selection that found it is served
        fr = c.get(f"/jobs/{job_id}/frames")
        assert fr.status_code == 200
        body = fr.json()
        assert body["cap"] == 30 and body["num_decoded"] == 95 and len(body["frames"]) == 95
        assert body["diagnosis"]["code"] == "insufficient_motion"
        assert body["dropped"]["near_duplicate"] >= 25 and body["kept"] < clip_checks.MIN_FRAMES
        assert sum(f["kept"] for f in body["frames"]) == body["kept"]
        missing = c.get("/jobs/nope/frames")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert c.get("/health").json()["status"] == "healthy"
        assert c.get("/readiness").status_code == 200
