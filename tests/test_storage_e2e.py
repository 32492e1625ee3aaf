"""Bucket mode end to end with the real pipeline on the sample video (``low``): a redeploy with
an ephemeral disk. Server A (the GCS emulator's bucket, its SQLite file outside DATA_DIR, as
a database that outlives the disk) is stopped while the job waits before mapping; its DATA_DIR
is gone; server B, with an empty DATA_DIR, resumes the job from the bucket's checkpoints (the
frames, features and matching stages do not run again), and serves its artifacts from the
bucket; after a second redeploy the job is still listed and its artifacts still download."""
from __future__ import annotations

import io
import shutil
import zipfile

import pytest
from conftest import SAMPLE_VIDEO, wait_until

pytestmark = pytest.mark.e2e

#: frames of the job (``MAX_FRAMES_LOW``, not the preset's 30): the bucket's checkpoints and
#: artifacts carry a smaller model the same way (this test: 20 s with 30 frames, 15 s; the
#: preset's 30 frames end to end: tests/test_e2e.py)
FRAMES = 12


def test_a_redeploy_with_an_empty_disk_resumes_from_the_bucket(start_server, tmp_path,
                                                               gcs_emulator, gcs_bucket):
    pycolmap = pytest.importorskip("pycolmap")
    plyfile = pytest.importorskip("plyfile")
    bucket = gcs_bucket["storage_bucket"]
    env = {"STORAGE_BUCKET": bucket, "DATABASE_PATH": str(tmp_path / "db" / "jobs.db"),
           "MAX_FRAMES_LOW": str(FRAMES),
           "STORAGE_EMULATOR_HOST": gcs_emulator.url}
    (tmp_path / "db").mkdir()
    a = start_server(TEST_FAULT="pause:mapping", **env)
    with a.client() as c, open(SAMPLE_VIDEO, "rb") as f:
        r = c.post("/upload-video", files={"video": ("walk.mp4", f, "video/mp4")},
                   data={"project_id": "e2e", "quality": "low"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
    client = gcs_emulator.client()

    def keys() -> list[str]:
        return sorted(b.name.removeprefix(f"jobs/{job_id}/")
                      for b in client.list_blobs(bucket, prefix=f"jobs/{job_id}/"))

    assert keys() == ["input/video.mp4"]  # in the bucket once the 202 came
    paused = a.data_dir / "jobs" / job_id / "work" / "test_fault_paused.mapping"
    wait_until(paused.exists, 300, "the job to wait before mapping")
    assert [k for k in keys() if k.startswith("work/checkpoints/")] == [
        "work/checkpoints/features.json", "work/checkpoints/frames.json",
        "work/checkpoints/matching.json"]
    a.stop()
    shutil.rmtree(a.data_dir)  # the ephemeral disk is gone

    b = start_server(**env)
    job = b.wait_for_job(job_id, timeout_s=300)
    assert job["status"] == "completed", job.get("error")
    last = job["attempts"][-1]
    assert last["outcome"] == "completed" and last["resumed_from"] == "mapping"
    assert last["skipped_stages"] == ["frames", "features", "matching"]
    assert sorted(last["stage_wall_s"]) == ["dense", "export", "mapping", "meshing"]
    res = job["results"]
    assert set(res["timings_s"]) >= {"frames", "features", "matching", "mapping", "export"}
    assert res["frames_extracted"] == FRAMES and res["registered_images"] >= FRAMES - 1
    logs = b.data_dir / "jobs" / job_id / "work" / "logs"
    assert "frames.log" in {p.name for p in logs.iterdir()}  # restored from the bucket

    names = {x["name"]: x for x in job["artifacts"]}
    assert {"sparse.ply", "model.zip"} <= set(names)
    assert {f"work/artifacts/{n}" for n in names} <= set(keys())
    b.stop()
    shutil.rmtree(b.data_dir)
    c2 = start_server(**env)  # second redeploy: nothing on disk, everything in the bucket
    with c2.client() as c:
        listed = c.get("/jobs").json()
        assert [j["job_id"] for j in listed["jobs"]] == [job_id]
        head = c.head(names["sparse.ply"]["url"])
        assert head.status_code == 200 and int(head.headers["content-length"]) == \
            names["sparse.ply"]["bytes"]
        ply_bytes = c.get(names["sparse.ply"]["url"]).content
        zip_bytes = c.get(names["model.zip"]["url"]).content
    assert plyfile.PlyData.read(io.BytesIO(ply_bytes))["vertex"].count == res["points3d"]
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as zf:
        zf.extractall(tmp_path / "model")
        cameras = next(m for m in zf.namelist() if m.endswith("cameras.bin"))
    rec = pycolmap.Reconstruction((tmp_path / "model" / cameras).parent)
    assert rec.num_reg_images() == res["registered_images"]
    assert rec.num_points3D() == res["points3d"]
