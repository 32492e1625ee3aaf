"""colmap_pipeline.web.routes_jobs, in process on the in-memory store and a fake runner."""
from __future__ import annotations

import hashlib

import pytest
from web_harness import add_job

from colmap_pipeline.jobs import JobStatus
from colmap_pipeline.layout import DataDir, write_json_atomic
from colmap_pipeline.web.schemas import MAX_ATTEMPT_RECORDS

pytestmark = pytest.mark.asyncio

RESULT = {"frames_extracted": 30, "frames_used": 30, "registered_images": 30, "points3d": 4321,
          "mean_reprojection_error_px": 0.61, "mean_track_length": 4.2,
          "mapping_attempts": [{"step": "first", "outcome": "passed", "elapsed_s": 12.5}],
          "timings_s": {"frames": 1.5, "total": 40.0}}


def _artifact(data_dir, job_id: str, name: str, body: bytes, media_type: str) -> dict:
    path = DataDir(data_dir).job(job_id).work.artifact(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return {"name": name, "bytes": len(body), "media_type": media_type,
            "sha256": hashlib.sha256(body).hexdigest()}


async def test_unknown_and_deleted_jobs_are_404(api):
    r = await api.client.get("/jobs/00000000-0000-0000-0000-000000000000")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    gone = await add_job(api.store, JobStatus.DELETED)
    for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/cancel"), ("POST", "/retry"),
                         ("GET", "/frames"), ("GET", "/artifacts/sparse.ply")):
        r = await api.client.request(method, f"/jobs/{gone.job_id}{path}")
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "not_found"


async def test_list_filters_pages_and_bounds(api):
    ids = [(await add_job(api.store, project_id=p)).job_id for p in ("a", "b", "a")]
    listing = (await api.client.get("/jobs", params={"project_id": "a"})).json()
    assert listing["total"] == 2 and [j["job_id"] for j in listing["jobs"]] == [ids[2], ids[0]]
    assert [j["queue_position"] for j in listing["jobs"]] == [3, 1]
    page = (await api.client.get("/jobs", params={"limit": 1, "offset": 1})).json()
    assert page["total"] == 3 and [j["job_id"] for j in page["jobs"]] == [ids[1]]
    assert (page["limit"], page["offset"]) == (1, 1)
    assert (await api.client.get("/jobs", params={"status": "failed"})).json()["total"] == 0
    assert (await api.client.get("/jobs", params={"status": "weird"})).status_code == 422


@pytest.mark.parametrize("params", [
    {"offset": "9223372036854775808"}, {"offset": -1}, {"offset": 10**9 + 1}, {"limit": 0},
    {"limit": 201}, {"project_id": "x" * 201}])
async def test_out_of_range_list_parameters_are_422_not_500(api, params):
    """Issue 10 item 4: an offset past SQLite's 64-bit integer answered 500."""
    r = await api.client.get("/jobs", params=params)
    assert r.status_code == 422, r.text
    field = r.json()["error"]["details"]["fields"][0]["field"]
    assert field == f"query.{next(iter(params))}"
    ok = await api.client.get("/jobs", params={"offset": 10**9, "limit": 200})
    assert ok.status_code == 200 and ok.json()["jobs"] == []


async def test_completed_job_serves_typed_results_and_artifacts_get_and_head(api):
    job = await add_job(api.store)
    ply = _artifact(api.data_dir, job.job_id, "sparse.ply", b"ply\n" + b"\0" * 100,
                    "application/octet-stream")
    await api.store.apply(job.job_id, "claim")
    await api.store.apply(job.job_id, "complete", results={**RESULT, "artifacts": [ply]})
    body = (await api.client.get(f"/jobs/{job.job_id}")).json()
    assert body["status"] == "completed" and body["progress"] == 100
    assert body["results"]["registered_images"] == 30
    assert body["results"]["mapping_attempts"][0]["step"] == "first"
    assert body["results"]["timings_s"]["frames"] == 1.5
    assert body["artifacts"] == [{**ply, "url": f"/jobs/{job.job_id}/artifacts/sparse.ply"}]
    assert body["video"]["width"] == 848
    url = body["artifacts"][0]["url"]
    r = await api.client.get(url)
    assert r.status_code == 200 and r.content == b"ply\n" + b"\0" * 100
    head = await api.client.head(url)
    assert head.status_code == 200, head.text
    assert head.content == b""
    assert int(head.headers["content-length"]) == 104
    assert head.headers["content-type"] == "application/octet-stream"
    r = await api.client.get(f"/jobs/{job.job_id}/artifacts/other.zip")
    assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_not_found"
    assert r.json()["error"]["details"] == {"available": ["sparse.ply"]}
    DataDir(api.data_dir).job(job.job_id).work.artifact("sparse.ply").unlink()
    r = await api.client.get(url)
    assert r.status_code == 404 and "gone" in r.json()["error"]["message"]


async def test_artifact_of_an_unfinished_job_is_409(api):
    job = await add_job(api.store, JobStatus.PROCESSING)
    r = await api.client.get(f"/jobs/{job.job_id}/artifacts/sparse.ply")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_completed"
    r = await api.client.head(f"/jobs/{job.job_id}/artifacts/sparse.ply")
    assert r.status_code == 409 and r.content == b""


async def test_failed_job_error_carries_its_details(api):
    """Issue 10 item 6 (API side): ``error.details`` is served from ``job.error_details``."""
    details = {"frames_used": 30, "median_keypoints": 812, "verified_pairs": 3,
               "attempts": [{"step": "first", "outcome": "failed"}], "largest_model": 2}
    job = await add_job(api.store, JobStatus.FAILED, error_code="reconstruction_failed",
                        error_message="No model.", error_hint="Film more.",
                        error_details=details)
    body = (await api.client.get(f"/jobs/{job.job_id}")).json()
    assert body["error"] == {"code": "reconstruction_failed", "message": "No model.",
                             "hint": "Film more.", "details": details}
    assert body["results"] is None


async def test_attempt_records_are_capped_with_a_total(api):
    """Issue 10 item 11: a job retried 180 times served all 180 records on every GET."""
    job = await add_job(api.store, JobStatus.FAILED)
    for n in range(1, 31):
        await api.store.append_attempt(job.job_id, {"attempt": n, "outcome": "failed",
                                                    "stage_wall_s": {"frames": 0.5}})
    body = (await api.client.get(f"/jobs/{job.job_id}")).json()
    assert body["attempts_total"] == 30
    assert [a["attempt"] for a in body["attempts"]] == list(range(31 - MAX_ATTEMPT_RECORDS, 31))
    assert body["attempts"][-1]["stage_wall_s"] == {"frames": 0.5}


async def test_a_result_that_no_longer_fits_its_model_is_left_out_not_500(api):
    job = await add_job(api.store, JobStatus.COMPLETED, results={"frames_used": "many"})
    r = await api.client.get(f"/jobs/{job.job_id}")
    assert r.status_code == 200 and r.json()["results"] is None


async def test_cancel_retry_delete(api):
    job = await add_job(api.store)
    r = await api.client.post(f"/jobs/{job.job_id}/retry")
    assert r.status_code == 409
    assert r.json()["error"] == {
        "code": "job_not_retryable", "message": "The job is pending.",
        "hint": "GET /jobs/{job_id} shows the job's status; an expired job's files are gone, "
                "upload the video again.", "details": {"status": "pending"}}
    r = await api.client.post(f"/jobs/{job.job_id}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = await api.client.post(f"/jobs/{job.job_id}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_cancellable"
    assert r.json()["error"]["details"] == {"status": "cancelled"}
    r = await api.client.post(f"/jobs/{job.job_id}/retry")
    assert r.status_code == 200 and r.json()["status"] == "pending"
    assert r.json()["queue_position"] == 1 and api.runner.wakes == 1
    r = await api.client.delete(f"/jobs/{job.job_id}")
    assert r.status_code == 200 and r.json()["status"] == "deleted"
    assert (await api.client.get(f"/jobs/{job.job_id}")).status_code == 404
    assert (await api.client.delete(f"/jobs/{job.job_id}")).status_code == 404


async def test_deleted_jobs_are_not_listed_and_delete_names_no_artifact(api):
    """Issue 10 (fresh-user trial): ``GET /jobs`` listed and counted deleted jobs, with
    artifact URLs that 404; the DELETE answer listed them too. Tombstones only on request."""
    keep = await add_job(api.store)
    art = _artifact(api.data_dir, "job-0001", "sparse.ply", b"ply\n", "application/x-ply")
    done = await add_job(api.store, JobStatus.COMPLETED, results={**RESULT, "artifacts": [art]})
    r = await api.client.delete(f"/jobs/{done.job_id}")
    assert r.status_code == 200 and r.json()["status"] == "deleted"
    assert r.json()["artifacts"] == [] and r.json()["results"]["artifacts"] == []
    assert r.json()["results"]["points3d"] == 4321
    listing = (await api.client.get("/jobs")).json()
    assert listing["total"] == 1 and [j["job_id"] for j in listing["jobs"]] == [keep.job_id]
    tomb = (await api.client.get("/jobs", params={"status": "deleted"})).json()
    assert tomb["total"] == 1 and tomb["jobs"][0]["job_id"] == done.job_id
    assert tomb["jobs"][0]["artifacts"] == []


async def test_retry_while_draining_is_503_with_retry_after(api):
    job = await add_job(api.store, JobStatus.FAILED)
    api.app.state.draining = True
    r = await api.client.post(f"/jobs/{job.job_id}/retry")
    assert r.status_code == 503 and r.headers["retry-after"] == "30"
    assert r.json()["error"]["code"] == "not_ready"
    assert (await api.store.get_job(job.job_id)).status == JobStatus.FAILED


async def test_frames_scores(api):
    job = await add_job(api.store, JobStatus.PROCESSING)
    r = await api.client.get(f"/jobs/{job.job_id}/frames")
    assert r.status_code == 409 and r.json()["error"]["code"] == "frames_not_ready"
    score = {"timestamp_s": 0.5, "window": 0, "sharpness": 120.5, "brightness": 110.0,
             "kept": True, "file": "frame_00000.jpg"}
    write_json_atomic(DataDir(api.data_dir).job(job.job_id).work.frames_json, {
        "frames": [{"file": "frame_00000.jpg"}], "scores": [score], "num_decoded": 40,
        "selection": {"cap": 30, "dropped": {"blurry": 2}},
        "warnings": [{"code": "video_truncated", "message": "decoded 0.40 s of 1.33 s",
                      "decoded_until_s": 0.4}],
        "video": {"codec": "h264", "width": 848, "height": 480}})
    body = (await api.client.get(f"/jobs/{job.job_id}/frames")).json()
    assert (body["cap"], body["kept"], body["num_decoded"]) == (30, 1, 40)
    assert body["dropped"] == {"blurry": 2} and body["video"]["codec"] == "h264"
    assert body["frames"][0]["sharpness"] == 120.5 and body["frames"][0]["kept"] is True
    assert body["warnings"][0]["code"] == "video_truncated"
    assert body["warnings"][0]["decoded_until_s"] == 0.4


async def test_frames_of_a_photo_job(api):
    """Issue 10 (fresh-user trial): a photo job's ``frames.json`` has no ``scores``, so
    ``GET /jobs/{id}/frames`` answered 409 frames_not_ready forever; now it serves the photos."""
    job = await add_job(api.store, JobStatus.PROCESSING)
    r = await api.client.get(f"/jobs/{job.job_id}/frames")
    assert r.status_code == 409 and r.json()["error"]["code"] == "frames_not_ready"
    frames = [{"file": f"frame_{i:05d}.jpg", "source": f"{i:04d}.jpg", "width": 640,
               "height": 480, "exif_focal_px": 512.5 if i else None,
               "camera": min(i, 1), "exif_time": f"2026:11:30 10:00:0{i}.25" if i else None}
              for i in range(3)]  # issue 15: the camera group and EXIF time come through
    write_json_atomic(DataDir(api.data_dir).job(job.job_id).work.frames_json, {
        "frames": frames, "num_decoded": 3, "input_kind": "images",
        "video": {"kind": "images", "images": 3, "width": 640, "height": 480},
        "focal_prior": None, "focal_prior_px": 512.5, "warnings": []})
    r = await api.client.get(f"/jobs/{job.job_id}/frames")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["input_kind"], body["cap"], body["kept"], body["num_decoded"]) == (
        "images", 0, 3, 3)
    assert body["frames"] == [] and body["dropped"] == {} and body["warnings"] == []
    assert body["photos"] == frames and body["focal_prior_px"] == 512.5
    assert body["video"]["images"] == 3 and body["video"]["width"] == 640


async def test_an_expired_job_names_no_artifact_url(api):
    """Retention removed its files: the numbers stay, no link that would answer 409."""
    art = _artifact(api.data_dir, "job-0001", "sparse.ply", b"ply\n", "application/x-ply")
    job = await add_job(api.store, JobStatus.EXPIRED, results={**RESULT, "artifacts": [art]})
    body = (await api.client.get(f"/jobs/{job.job_id}")).json()
    assert body["status"] == "expired"
    assert body["artifacts"] == [] and body["results"]["artifacts"] == []
    assert body["results"]["registered_images"] == RESULT["registered_images"]
