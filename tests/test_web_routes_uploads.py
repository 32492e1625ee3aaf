"""colmap_pipeline.web.routes_uploads (and the intake behind it), in process: the app on the
in-memory store and a fake runner, the real probe child. Checks that need a real socket (413
before the body, a stalled body) are in test_api.py and test_multipart.py."""
from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import pytest
from conftest import SAMPLE_VIDEO
from web_harness import files_under

from colmap_pipeline.jobs import Intent, JobStatus

pytestmark = pytest.mark.asyncio
VIDEO = SAMPLE_VIDEO.read_bytes()


def jpeg(seed: int = 0, w: int = 64, h: int = 48) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(seed).integers(0, 255, (h, w, 3),
                                                                        dtype=np.uint8))
    assert ok
    return buf.tobytes()


def without_moov(mp4: bytes) -> bytes:
    """The MP4 with its top-level ``moov`` box (the index) cut out, as after an interrupted
    transfer of a file whose index comes last (ISO/IEC 14496-12 box framing)."""
    out, i = [], 0
    while i < len(mp4):
        size, kind = struct.unpack(">I4s", mp4[i:i + 8])
        if size == 1:
            size = struct.unpack(">Q", mp4[i + 8:i + 16])[0]
        elif size == 0:
            size = len(mp4) - i
        if kind != b"moov":
            out.append(mp4[i:i + size])
        i += size
    assert len(out) < 3, "the sample has no top-level moov box"
    return b"".join(out)


def tiny_clip(frames: int = 3, fps: int = 30) -> bytes:
    """An H.264 MP4 of ``frames`` 64x64 frames at ``fps`` (0.1 s for 3 at 30)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((64, 64, 3), 40 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


async def upload(api, content: bytes | None, name: str = "clip.mp4", key: str | None = None,
                 **fields):
    data = {"project_id": "proj-1", "scan_name": "Scan", "quality": "low",
            "user_email": "a@example.com", **fields}
    data = {k: v for k, v in data.items() if v is not None}
    files = {"video": (name, content, "video/mp4")} if content is not None else None
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await api.client.post("/upload-video", data=data, files=files, headers=headers)


async def upload_photos(api, photos: list[bytes], key: str | None = None,
                        names: list[str] | None = None, **fields):
    names = names or [f"IMG_{i}.jpg" for i in range(len(photos))]
    files = [("images", (n, p, "image/jpeg")) for n, p in zip(names, photos, strict=True)]
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await api.client.post("/upload-images", files=files, headers=headers,
                                 data={"project_id": "p", "quality": "low", **fields})


def nothing_left(api) -> None:
    assert files_under(api.data_dir / "uploads") == []
    assert files_under(api.data_dir / "jobs") == []


async def test_video_upload_creates_a_pending_job(api):
    r = await upload(api, VIDEO, name="../../evil.mp4")
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["status"] == "pending" and body["message"] == "Video uploaded successfully"
    assert body["status_url"] == f"/jobs/{body['job_id']}" and body["replayed"] is False
    assert "idempotent-replayed" not in r.headers
    assert r.headers["x-ratelimit-limit"] == "20" and r.headers["x-ratelimit-remaining"] == "19"
    assert api.runner.wakes == 1
    job = (await api.client.get(body["status_url"])).json()
    assert job["queue_position"] == 1 and job["input_bytes"] == len(VIDEO)
    assert job["video"]["width"] == 848 and job["scan_name"] == "Scan"
    stored = files_under(api.data_dir)
    assert stored == [f"jobs/{body['job_id']}/input/video.mp4"]
    assert not any("evil" in p for p in stored)


async def test_text_file_named_mp4_is_415_and_leaves_nothing(api):
    r = await upload(api, b"this is not a video\n" * 100, name="fake.mp4")
    assert r.status_code == 415, r.text
    err = r.json()["error"]
    assert err["code"] == "no_video_stream" and err["hint"] and "details" not in err
    assert (await api.client.get("/jobs")).json()["total"] == 0
    nothing_left(api)


async def test_jpeg_renamed_mp4_is_415_still_image_pointing_to_upload_images(api):
    """Issue 10 item 8: it was accepted (202) and failed later as too_few_frames."""
    r = await upload(api, jpeg(w=640, h=480), name="photo.mp4")
    assert r.status_code == 415, r.text
    err = r.json()["error"]
    assert err["code"] == "still_image"
    assert "/upload-images" in err["hint"]
    assert err["details"] == {"image_format": "JPEG"}  # no server file name
    nothing_left(api)


async def test_mp4_without_its_index_says_incomplete(api):
    """Issue 10 item 8: a moov-less MP4 got "Upload a video file such as MP4"."""
    r = await upload(api, without_moov(VIDEO))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "video_incomplete"
    assert "incomplete" in err["message"] and "again" in err["hint"]
    assert "MP4 (H.264" not in err["hint"]
    assert "file" not in err.get("details", {})
    nothing_left(api)


async def test_three_frame_clip_is_clip_too_short_with_its_numbers(api):
    r = await upload(api, tiny_clip())
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "clip_too_short"
    assert err["details"]["num_frames"] == 3
    assert err["details"]["duration_s"] == pytest.approx(0.1, abs=0.02)
    assert "3 frames" in err["message"]
    nothing_left(api)


async def test_empty_file_is_400(api):
    r = await upload(api, b"")
    assert r.status_code == 400 and r.json()["error"]["code"] == "empty_file"
    assert (await api.client.get("/jobs")).json()["total"] == 0


async def test_missing_and_invalid_fields_are_422(api):
    r = await upload(api, VIDEO, project_id=None)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert r.json()["error"]["details"]["fields"][0]["field"] == "project_id"
    r = await upload(api, VIDEO, quality="ultra")
    assert r.status_code == 422
    assert r.json()["error"]["details"]["fields"][0]["field"] == "quality"
    r = await upload(api, VIDEO, project_id="x" * 201, user_email="not-an-address")
    assert sorted(f["field"] for f in r.json()["error"]["details"]["fields"]) == [
        "project_id", "user_email"]
    r = await api.client.post("/upload-video", files={"project_id": (None, "p"),
                                                      "quality": (None, "low")})
    assert r.status_code == 422 and "video" in r.json()["error"]["message"]
    r = await api.client.post("/upload-video", data={"project_id": "p"})  # not multipart
    assert r.status_code == 422
    assert (await api.client.get("/jobs")).json()["total"] == 0
    nothing_left(api)


async def test_content_length_over_the_limit_is_413(make_api):
    api = await make_api(max_upload_bytes=1000)
    r = await upload(api, b"\0" * 100_000)
    assert r.status_code == 413 and r.json()["error"]["code"] == "upload_too_large"
    nothing_left(api)


async def test_video_longer_than_limit_is_422(make_api):
    api = await make_api(max_video_seconds=5)
    r = await upload(api, VIDEO)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "video_too_long" and err["details"]["max_video_seconds"] == 5
    assert 10 < err["details"]["duration_s"] < 11
    assert (await api.client.get("/jobs")).json()["total"] == 0


async def test_low_disk_is_507(make_api):
    api = await make_api(min_free_disk_bytes=10**18)
    r = await upload(api, b"x" * 100)
    assert r.status_code == 507
    err = r.json()["error"]
    assert err["code"] == "insufficient_storage" and err["details"]["min_free_disk_bytes"] == 10**18
    nothing_left(api)


async def test_rate_limit_429_with_retry_after_and_health_not_limited(make_api):
    api = await make_api(max_requests_per_minute=2)
    codes = [(await upload(api, b"not a video")).status_code for _ in range(2)]
    assert codes == [415, 415]
    r = await upload(api, b"not a video")
    assert r.status_code == 429
    assert r.json()["error"] == {
        "code": "rate_limited", "message": "Rate limit exceeded: 2 per 1 minute.",
        "hint": "Wait for the number of seconds in Retry-After and try again."}
    assert 0 < int(r.headers["retry-after"]) <= 60
    assert r.headers["x-ratelimit-remaining"] == "0"
    r = await upload_photos(api, [jpeg(i) for i in range(3)])
    assert r.status_code == 429  # one budget for both upload routes
    for _ in range(30):
        assert (await api.client.get("/health")).status_code == 200
        assert (await api.client.get("/readiness")).status_code == 200


async def test_uploads_while_draining_are_503_with_retry_after(api):
    api.app.state.draining = True
    for r in (await upload(api, VIDEO), await upload_photos(api, [jpeg(i) for i in range(3)])):
        assert r.status_code == 503 and r.headers["retry-after"] == "30"
        assert r.json()["error"]["code"] == "not_ready"
    nothing_left(api)


async def test_photo_upload_answers_photos_uploaded(api):
    r = await upload_photos(api, [jpeg(i) for i in (10, 2, 1)],
                            names=["IMG_10.jpg", "IMG_2.jpg", "IMG_1.jpg"])
    assert r.status_code == 202, r.text
    assert r.json()["message"] == "Photos uploaded successfully"
    job = (await api.client.get(r.json()["status_url"])).json()
    assert job["video"] == {"kind": "images", "images": 3, "source": "photos"}
    imgs = api.data_dir / "jobs" / job["job_id"] / "input" / "images"
    assert (imgs / "img_00000.jpg").read_bytes() == jpeg(1)  # natural order of the names
    assert (imgs / "img_00002.jpg").read_bytes() == jpeg(10)
    assert files_under(api.data_dir / "uploads") == []


async def test_idempotent_replay_answers_the_jobs_current_status(api):
    """Issue 10 item 10: a replay always said pending and "Video uploaded successfully"."""
    first = await upload(api, VIDEO, key="scan-42")
    job_id = first.json()["job_id"]
    await api.store.apply(job_id, Intent.CLAIM)
    await api.store.apply(job_id, Intent.FAIL, error_code="too_blurry")
    again = await upload(api, VIDEO, key="scan-42")
    assert again.status_code == 202 and again.headers["idempotent-replayed"] == "true"
    body = again.json()
    assert body["job_id"] == job_id and body["status"] == "failed" and body["replayed"] is True
    assert body["message"] == ("Replay of an earlier upload with this Idempotency-Key: the job "
                               "is failed.")
    assert (await api.client.get("/jobs")).json()["total"] == 1
    assert files_under(api.data_dir / "uploads") == []


@pytest.mark.parametrize("change", [{"content": VIDEO[:-1000]}, {"project_id": "other"},
                                    {"quality": "high"}, {"scan_name": "Other"},
                                    {"user_email": None}])
async def test_a_key_reused_for_another_request_is_422(api, change):
    """Issue 10 item 10: the same key with another file, project or quality returned the first
    job."""
    first = await upload(api, VIDEO, key="scan-42")
    assert first.status_code == 202
    fields = {k: v for k, v in change.items() if k != "content"}
    r = await upload(api, change.get("content", VIDEO), key="scan-42", **fields)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "idempotency_key_reused"
    assert err["details"] == {"job_id": first.json()["job_id"]}
    assert (await api.client.get("/jobs")).json()["total"] == 1
    assert files_under(api.data_dir / "uploads") == []


async def test_photo_uploads_honour_the_idempotency_key(api):
    photos = [jpeg(i) for i in range(3)]
    r1 = await upload_photos(api, photos, key="photos-1")
    r2 = await upload_photos(api, photos, key="photos-1")
    assert r1.status_code == r2.status_code == 202
    assert r2.json()["job_id"] == r1.json()["job_id"] and r2.json()["replayed"] is True
    assert r2.headers["idempotent-replayed"] == "true"
    r3 = await upload_photos(api, photos[:2] + [jpeg(9)], key="photos-1")
    assert r3.status_code == 422 and r3.json()["error"]["code"] == "idempotency_key_reused"
    r4 = await upload(api, VIDEO, key="photos-1")  # a video under a photo upload's key
    assert r4.status_code == 422
    assert (await api.client.get("/jobs")).json()["total"] == 1


async def test_idempotency_key_length_and_exact_comparison(api):
    assert (await upload(api, b"x", key="x" * 201)).status_code == 422
    r1 = await upload(api, VIDEO, key="Scan-7")
    r2 = await upload(api, VIDEO, key="scan-7")  # keys are compared as given
    assert r1.json()["job_id"] != r2.json()["job_id"]
    # a deleted job frees its key
    assert (await api.client.delete(f"/jobs/{r1.json()['job_id']}")).status_code == 200
    r3 = await upload(api, VIDEO, key="Scan-7")
    assert r3.status_code == 202 and r3.json()["job_id"] != r1.json()["job_id"]
    assert r3.json()["replayed"] is False


async def test_queue_positions_and_processing_job(api):
    ids = []
    for project in ("a", "b", "a"):
        r = await upload(api, VIDEO, project_id=project)
        assert r.status_code == 202, r.text
        ids.append(r.json()["job_id"])
    claimed = await api.store.claim_next_pending()
    assert claimed is not None and claimed.job_id == ids[0]
    await api.store.update_progress(ids[0], 5, "Frame Extraction", "Decoding")
    first = (await api.client.get(f"/jobs/{ids[0]}")).json()
    assert first["current_stage"] == "Frame Extraction" and first["queue_position"] is None
    assert (await api.client.get(f"/jobs/{ids[1]}")).json()["queue_position"] == 1
    third = (await api.client.get(f"/jobs/{ids[2]}")).json()
    assert third["queue_position"] == 2 and third["status"] == "pending"
    assert JobStatus(third["status"]) is JobStatus.PENDING
    stored = files_under(api.data_dir)
    assert sum(p.endswith("input/video.mp4") for p in stored) == 3


async def test_openapi_states_the_form_limits(api):
    spec = (await api.client.get("/openapi.json")).json()

    def form(path):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["multipart/form-data"]
        return body["schema"]

    video = form("/upload-video")
    assert set(video["properties"]) == {"video", "project_id", "scan_name", "quality",
                                        "user_email", "webhook_url"}
    assert video["properties"]["webhook_url"]["maxLength"] == 2000  # issue 16
    assert video["required"] == ["video", "project_id"]
    for name in ("project_id", "scan_name"):
        assert (video["properties"][name]["minLength"],
                video["properties"][name]["maxLength"]) == (1, 200)
    assert video["properties"]["user_email"]["format"] == "email"
    assert video["properties"]["quality"]["enum"] == ["low", "medium", "high"]
    photos = form("/upload-images")
    assert {"images", "zip"} <= set(photos["properties"])
    assert photos["properties"]["zip"]["format"] == "binary"
    assert photos["properties"]["images"]["description"].startswith("3-300 ")
    assert photos["anyOf"] == [{"required": ["images"]}, {"required": ["zip"]}]
    job = spec["components"]["schemas"]["JobPublic"]["properties"]
    assert "description" in job["progress"]
    assert job["results"]["anyOf"][0]["$ref"].endswith("/JobResult")
    assert "attempts_total" in job


async def test_openapi_declares_the_idempotency_key_photo_count_and_headers(api):
    """Issue 10 (fresh-user trial): ``Idempotency-Key`` was not a declared parameter (Swagger
    "Try it out" and schemathesis could not send it), ``images`` said minItems 1 against the
    3-photo minimum, and no response header was declared."""
    spec = (await api.client.get("/openapi.json")).json()
    for path in ("/upload-video", "/upload-images"):
        op = spec["paths"][path]["post"]
        key = [p for p in op["parameters"] if p["name"] == "Idempotency-Key"]
        assert len(key) == 1 and key[0]["in"] == "header" and key[0]["required"] is False
        assert (key[0]["schema"]["minLength"], key[0]["schema"]["maxLength"]) == (1, 200)
        assert {"Idempotent-Replayed", "X-RateLimit-Limit", "X-RateLimit-Remaining",
                "X-RateLimit-Reset"} <= set(op["responses"]["202"]["headers"])
        assert op["responses"]["202"]["content"]["application/json"]["schema"][
            "$ref"].endswith("/UploadResponse")
        assert "Retry-After" in op["responses"]["429"]["headers"]
        assert "X-RateLimit-Remaining" in op["responses"]["429"]["headers"]
        assert "Retry-After" in op["responses"]["503"]["headers"]
    images = spec["paths"]["/upload-images"]["post"]["requestBody"]["content"][
        "multipart/form-data"]["schema"]["properties"]["images"]
    assert (images["minItems"], images["maxItems"]) == (3, 300)


async def test_an_empty_photo_gets_a_hint_about_photos(api):
    """Issue 10 (fresh-user trial): an empty photo was told "Upload a non-empty video file."."""
    r = await upload_photos(api, [jpeg(1), b"", jpeg(2)])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "empty_file" and err["details"] == {"field": "images", "file_index": 1}
    assert err["hint"] == "Upload non-empty JPEG or PNG photos."
    assert "video" not in err["hint"]
    r = await upload(api, b"")
    assert r.json()["error"]["hint"] == "Upload a non-empty video file."
    nothing_left(api)


@pytest.mark.parametrize("field", ["project_id", "scan_name"])
async def test_a_control_character_in_a_name_is_422_naming_the_field(api, field):
    """Issue 10 (fresh-user trial): ``a\\x01b`` was accepted and stored."""
    r = await upload(api, VIDEO, **{field: "a\x01b"})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert err["details"]["fields"] == [
        {"field": field, "problem": "Value error, contains the control character U+0001"}]
    r = await api.client.post(
        "/upload-images", files=[("images", (f"{i}.jpg", jpeg(i), "image/jpeg")) for i in range(3)],
        data={"project_id": "p", "scan_name": "s", field: "tab\there"})
    assert r.status_code == 422 and r.json()["error"]["details"]["fields"][0]["field"] == field
    assert (await api.client.get("/jobs")).json()["total"] == 0
    nothing_left(api)
