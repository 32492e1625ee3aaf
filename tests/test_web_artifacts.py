"""``GET/HEAD /jobs/{id}/artifacts/{name}`` and ``GET /jobs/{id}/frames`` in bucket mode
(``colmap_pipeline/web/artifacts.py``): the object streamed from the bucket (the emulator's
credentials cannot sign), a 307 to a V4 signed URL where they can, 404 when the object is gone,
503 naming ``storage`` when the bucket fails, frame scores from the bucket."""
from __future__ import annotations

import hashlib
import json

import pytest
from storage_harness import FlakyStorage
from web_harness import add_job

from colmap_pipeline.jobs import JobStatus
from colmap_pipeline.storage import open_storage

pytestmark = pytest.mark.asyncio
PLY = b"ply\nformat binary_little_endian 1.0\n" + bytes(range(256)) * 8000  # ~2 MB: 2 chunks
RESULT = {"frames_extracted": 3, "frames_used": 3, "registered_images": 3, "points3d": 10,
          "mean_reprojection_error_px": 0.5, "mean_track_length": 3.0}


async def _completed_with_ply(api):
    art = {"name": "sparse.ply", "bytes": len(PLY), "media_type": "application/octet-stream",
           "sha256": hashlib.sha256(PLY).hexdigest()}
    job = await add_job(api.store, JobStatus.COMPLETED, results={**RESULT, "artifacts": [art]})
    open_storage(api.settings).write_bytes(f"jobs/{job.job_id}/work/artifacts/sparse.ply", PLY)
    return job, f"/jobs/{job.job_id}/artifacts/sparse.ply"


async def test_artifacts_stream_from_the_bucket_get_and_head(make_api, gcs_bucket):
    api = await make_api(**gcs_bucket)
    job, url = await _completed_with_ply(api)
    assert not (api.data_dir / "jobs").exists()  # nothing on this replica's disk
    r = await api.client.get(url)
    assert r.status_code == 200, r.text
    assert r.content == PLY
    assert r.headers["content-length"] == str(len(PLY))
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == 'attachment; filename="sparse.ply"'
    head = await api.client.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(PLY))
    open_storage(api.settings).delete_prefix(f"jobs/{job.job_id}/")
    gone = await api.client.get(url)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "artifact_not_found"
    other = await api.client.get(f"/jobs/{job.job_id}/artifacts/nope.zip")
    assert other.status_code == 404 and other.json()["error"]["details"] == {
        "available": ["sparse.ply"]}


class _Signing(FlakyStorage):
    """The bucket, with credentials that can sign (a service account's, faked)."""

    def signed_url(self, key, ttl_s, *, filename, media_type):
        return f"https://storage.googleapis.com/b/{key}?X-Goog-Expires={ttl_s}&f={filename}"


async def test_signing_credentials_answer_307_to_a_signed_url(make_api, gcs_bucket):
    api = await make_api(artifact_url_ttl_s=600, **gcs_bucket)
    job, url = await _completed_with_ply(api)
    api.app.state.storage = _Signing(open_storage(api.settings), lambda op, key: False)
    for method in ("GET", "HEAD"):
        r = await api.client.request(method, url)
        assert r.status_code == 307, r.text
        assert r.headers["location"] == (f"https://storage.googleapis.com/b/jobs/{job.job_id}/"
                                         "work/artifacts/sparse.ply?X-Goog-Expires=600"
                                         "&f=sparse.ply")


async def test_a_failing_bucket_is_503_naming_storage(make_api, gcs_bucket):
    api = await make_api(**gcs_bucket)
    _, url = await _completed_with_ply(api)
    api.app.state.storage = FlakyStorage(open_storage(api.settings), lambda op, key: True)
    r = await api.client.get(url)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "not_ready"
    assert r.json()["error"]["details"] == {"failing": ["storage"]}


async def test_the_embedded_mode_serves_the_workspace_file(api):
    assert not open_storage(api.settings).remote
    job, url = await _completed_with_ply(api)  # LocalStorage over DATA_DIR: the same file
    r = await api.client.get(url)
    assert r.status_code == 200 and r.content == PLY
    assert r.headers["content-disposition"] == 'attachment; filename="sparse.ply"'


async def test_byte_ranges_are_served_and_bad_ones_get_the_json_error_shape(api):
    """A valid Range gets 206 with those bytes (Starlette's own answer); a malformed one and
    one past the end were text/plain 400 and 416 from Starlette and are now JSON errors."""
    _, url = await _completed_with_ply(api)
    part = await api.client.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == PLY[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(PLY)}"
    for value, status, code in (("bytes=abc", 400, "invalid_range"),
                                ("lines=0-5", 400, "invalid_range"),
                                ("bytes=9-3", 400, "invalid_range"),
                                (f"bytes={len(PLY)}-", 416, "range_not_satisfiable")):
        r = await api.client.get(url, headers={"Range": value})
        assert (r.status_code, r.headers["content-type"]) == (status, "application/json"), value
        assert r.json()["error"]["code"] == code and r.json()["error"]["hint"]
        if status == 416:
            assert r.headers["content-range"] == f"bytes */{len(PLY)}"


async def test_frame_scores_come_from_the_bucket_when_the_disk_lacks_them(make_api, gcs_bucket):
    api = await make_api(**gcs_bucket)
    job = await add_job(api.store, JobStatus.PROCESSING)
    r = await api.client.get(f"/jobs/{job.job_id}/frames")
    assert r.status_code == 409 and r.json()["error"]["code"] == "frames_not_ready"
    score = {"timestamp_s": 0.5, "window": 0, "sharpness": 120.5, "brightness": 110.0,
             "kept": True, "file": "frame_00000.jpg"}
    open_storage(api.settings).write_bytes(f"jobs/{job.job_id}/work/frames.json", json.dumps({
        "frames": [{"file": "frame_00000.jpg"}], "scores": [score], "num_decoded": 40,
        "selection": {"cap": 30, "dropped": {"blurry": 2}}}).encode())
    body = (await api.client.get(f"/jobs/{job.job_id}/frames")).json()
    assert (body["cap"], body["kept"], body["num_decoded"]) == (30, 1, 40)
    assert body["frames"][0]["sharpness"] == 120.5


async def test_signed_link_downloads_without_a_header_until_altered_or_expired(make_api):
    """With API keys on, the job's artifact URL carries a token: a client with no header
    downloads it; one changed byte, another job's path, or the expiry gives 401 link_expired."""
    from colmap_pipeline.layout import DataDir
    from colmap_pipeline.web.signing import LinkSigner

    now = [1_800_000_000.0]
    api = await make_api(api_keys="alice:alice-key-0123456789,bob:bob-key-9876543210",
                         signed_url_ttl_s=60)
    api.app.state.signer = LinkSigner("test-secret", 60, clock=lambda: now[0])
    art = {"name": "sparse.ply", "bytes": len(PLY), "media_type": "application/octet-stream",
           "sha256": hashlib.sha256(PLY).hexdigest()}
    job = await add_job(api.store, JobStatus.COMPLETED, owner="alice",
                        results={**RESULT, "artifacts": [art]})
    path = DataDir(api.data_dir).job(job.job_id).work.artifact("sparse.ply")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(PLY)
    body = (await api.client.get(f"/jobs/{job.job_id}",
                                 headers={"X-API-Key": "alice-key-0123456789"})).json()
    url = body["artifacts"][0]["url"]
    assert url.startswith(f"/jobs/{job.job_id}/artifacts/sparse.ply?token=1800000060.")
    r = await api.client.get(url)  # no header at all
    assert r.status_code == 200 and r.content == PLY
    assert r.headers["content-disposition"] == 'attachment; filename="sparse.ply"'
    head = await api.client.head(url)
    assert head.status_code == 200 and head.headers["content-length"] == str(len(PLY))
    token = url.split("token=")[1]
    flipped = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    other = await add_job(api.store, JobStatus.COMPLETED, owner="bob",
                          results={**RESULT, "artifacts": [art]})
    for bad in (url.replace(token, flipped),
                f"/jobs/{other.job_id}/artifacts/sparse.ply?token={token}"):
        r = await api.client.get(bad)
        assert r.status_code == 401 and r.json()["error"]["code"] == "link_expired"
        assert "GET /jobs/" in r.json()["error"]["hint"] and "www-authenticate" in r.headers
    now[0] += 60
    r = await api.client.get(url)
    assert r.status_code == 401 and r.json()["error"]["code"] == "link_expired"
    r = await api.client.get(url.split("?")[0])  # no token, no key
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
