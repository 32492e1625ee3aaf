"""colmap_pipeline.intake.intake: the form, the key, the fingerprint, the probe's refusals, and
the one intake pipeline on the in-memory store (no web layer)."""
from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from fakes import InMemoryJobStore
from web_harness import BOUNDARY, CTYPE, TAIL, files_under, settings_for

from colmap_pipeline.errors import PipelineError
from colmap_pipeline.intake import intake, multipart, upload_body
from colmap_pipeline.intake.intake import (
    UploadForm,
    accept_video,
    check_idempotency_key,
    container_ext,
    input_digest,
    parse_form,
    request_fingerprint,
)
from colmap_pipeline.intake.multipart import ReceivedFile, ReceivedFiles
from colmap_pipeline.intake.upload_body import UploadBody
from colmap_pipeline.jobs import DuplicateKey


def test_parse_form_defaults_and_errors():
    form = parse_form({"project_id": "p"})
    assert form == UploadForm(project_id="p", scan_name="Untitled scan", quality="medium",
                              user_email=None)
    assert parse_form({"project_id": "p", "user_email": ""}).user_email is None
    with pytest.raises(PipelineError) as ei:
        parse_form({"quality": "ultra", "user_email": "nope", "scan_name": ""})
    assert ei.value.code == "invalid_request"
    assert sorted(f["field"] for f in ei.value.details["fields"]) == [
        "project_id", "quality", "scan_name", "user_email"]


def test_form_errors_give_the_rule_never_the_value():
    """Issue 13: no error echoes request bytes; a field unknown to the form is ignored."""
    with pytest.raises(PipelineError) as ei:
        parse_form({"project_id": "MARK" * 60, "quality": "MARK", "user_email": "MARK@x",
                    "scan_name": "MARK\x07", "MARK": "MARK"})
    assert ei.value.message == ("Invalid or missing form field(s): project_id, scan_name, "
                                "quality, user_email")
    assert ei.value.details == {"fields": [
        {"field": "project_id", "problem": "String should have at most 200 characters"},
        {"field": "scan_name", "problem": "Value error, contains the control character U+0007"},
        {"field": "quality", "problem": "Input should be 'low', 'medium' or 'high'"},
        {"field": "user_email", "problem": "Value error, not an e-mail address"}]}
    assert "MARK" not in str(ei.value.to_dict())


def test_idempotency_key_is_kept_as_given_within_1_to_200_characters():
    assert check_idempotency_key(None) is None
    assert check_idempotency_key(" Scan-42 ") == " Scan-42 "
    assert check_idempotency_key("k" * 200) == "k" * 200
    for bad in ("", "k" * 201):
        with pytest.raises(PipelineError) as ei:
            check_idempotency_key(bad)
        assert ei.value.code == "invalid_request" and ei.value.http_status == 422


def test_fingerprint_changes_with_every_part_of_the_request():
    form = parse_form({"project_id": "p", "scan_name": "s", "quality": "low",
                       "user_email": "a@b.co"})
    base = request_fingerprint("video", "ab" * 32, form)
    assert base == request_fingerprint("video", "ab" * 32, form.model_copy())
    assert len(base) == 64 and int(base, 16) >= 0
    others = {request_fingerprint("images", "ab" * 32, form),
              request_fingerprint("video", "cd" * 32, form)}
    for change in ({"project_id": "q"}, {"scan_name": "t"}, {"quality": "high"},
                   {"user_email": None}):
        others.add(request_fingerprint("video", "ab" * 32, form.model_copy(update=change)))
    assert base not in others and len(others) == 6


def _received(tmp_path: Path, *digests: str) -> ReceivedFiles:
    files = [ReceivedFile("images", tmp_path / f"{i}.upload", 10, d, None)
             for i, d in enumerate(digests)]
    return ReceivedFiles({}, files, 10 * len(files))


def test_input_digest_of_one_and_of_several_files(tmp_path):
    one, two = "11" * 32, "22" * 32
    assert input_digest(_received(tmp_path, one)) == one
    assert input_digest(_received(tmp_path, one, two)) == hashlib.sha256(
        bytes.fromhex(one) + bytes.fromhex(two)).hexdigest()


def test_container_ext_comes_from_the_probe_not_the_client():
    assert container_ext({"container": "mov,mp4,m4a,3gp,3g2,mj2"}) == "mp4"
    assert container_ext({"container": "matroska,webm"}) == "matroska"
    assert container_ext({"container": "../../x"}) == "x"
    assert container_ext({}) == "bin"


@pytest.mark.parametrize("rc,doc,code,status,details", [
    (2, {"error": {"code": "still_image", "message": "A JPEG.", "hint": "Use /upload-images",
                   "details": {"file": "abc.upload", "image_format": "JPEG"}}},
     "still_image", 415, {"image_format": "JPEG"}),
    (2, {"error": {"code": "video_incomplete", "message": "No moov.", "hint": "Again.",
                   "details": {"file": "abc.upload", "boxes": ["ftyp", "mdat"],
                               "reason": "cannot open /srv/data/uploads/abc.upload"}}},
     "video_incomplete", 422, {"boxes": ["ftyp", "mdat"]}),
    (2, {"error": {"code": "clip_too_short", "message": "0.10 s, 3 frames",
                   "details": {"duration_s": 0.1, "num_frames": 3}}},
     "clip_too_short", 422, {"duration_s": 0.1, "num_frames": 3}),
    (2, {"error": {"code": "no_video_stream", "message": "No stream.",
                   "details": {"file": "abc.upload", "reason": "/srv/data/uploads/abc.upload"}}},
     "no_video_stream", 415, None),
    (2, {"error": {"code": "video_truncated", "message": "Cut."}}, "no_video_stream", 415, None),
    (2, {"error": {"code": "pipeline_error", "message": "bug"}}, "no_video_stream", 415,
     {"probe_exit": 2}),
    (-9, None, "no_video_stream", 415, {"probe_exit": -9}),
    # the upload's own bytes (box types, text) never come back; numbers and known boxes do
    (2, {"error": {"code": "video_incomplete", "message": "No moov.",
                   "details": {"boxes": ["ftyp", "MARK", "mdat"], "bytes": 99,
                               "brand": "MARK", "media_bytes_present": 50}}},
     "video_incomplete", 422, {"boxes": ["ftyp", "(other)", "mdat"], "bytes": 99,
                               "media_bytes_present": 50}),
])
def test_probe_refusals_map_to_client_errors(monkeypatch, tmp_path, rc, doc, code, status,
                                             details):
    """Issue 10 item 8: the probe child's own code reaches the client, with its numbers but
    never a server path or file name."""
    async def fake_run(args, *, timeout_s):
        return rc, doc, ""

    monkeypatch.setattr(intake, "run_json_command", fake_run)
    upload = tmp_path / "uploads" / "abc.upload"
    with pytest.raises(PipelineError) as ei:
        asyncio.run(intake.probe_upload(upload, settings_for(tmp_path)))
    assert (ei.value.code, ei.value.http_status, ei.value.details) == (code, status, details)
    if doc and doc["error"].get("code") in ("still_image", "clip_too_short"):
        assert ei.value.message == doc["error"]["message"]


def _body(chunks: list[bytes], key: str | None = None, owner: str | None = None) -> UploadBody:
    async def stream():
        for c in chunks:
            yield c

    return UploadBody(CTYPE, None, stream(), key, owner)


def _form_body(content: bytes, **fields: str) -> list[bytes]:
    head = "".join(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                   for k, v in {"project_id": "p", **fields}.items())
    head += (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="video"; '
             f'filename="c.mp4"\r\n\r\n')
    return [head.encode(), content, TAIL]


class LosingStore(InMemoryJobStore):
    """A store where another upload with the same key wins the insert race."""

    def __init__(self, winner_key: str) -> None:
        super().__init__()
        self.winner_key = winner_key

    async def find_by_idempotency_key(self, key, owner=None):
        job = await super().find_by_idempotency_key(key, owner)
        self.looked_up = getattr(self, "looked_up", 0) + 1
        return job if self.looked_up > 1 else None  # not there yet at the first look

    async def create_job(self, job):
        if job.get("idempotency_key") == self.winner_key and job["project_id"] != "winner":
            await super().create_job({**job, "job_id": "winner-job", "project_id": "p"})
            raise DuplicateKey("taken meanwhile")
        return await super().create_job(job)


def test_a_concurrent_upload_with_the_same_key_is_replayed_and_leaves_nothing(monkeypatch,
                                                                              tmp_path):
    async def fake_run(args, *, timeout_s):
        return 0, {"container": "mov,mp4", "duration_s": 10.0, "width": 8, "height": 8}, ""

    monkeypatch.setattr(intake, "run_json_command", fake_run)
    settings = settings_for(tmp_path)
    store = LosingStore("k1")
    accepted = asyncio.run(accept_video(_body(_form_body(b"video bytes"), "k1"), store=store,
                                        settings=settings))
    assert accepted.replayed and accepted.job.job_id == "winner-job"
    assert files_under(Path(settings.data_dir)) == []


def test_accept_video_stores_the_fingerprint_and_key(monkeypatch, tmp_path):
    async def fake_run(args, *, timeout_s):
        return 0, {"container": "mov,mp4", "duration_s": 10.0, "width": 8, "height": 8}, ""

    monkeypatch.setattr(intake, "run_json_command", fake_run)
    settings = settings_for(tmp_path)
    store = InMemoryJobStore()
    accepted = asyncio.run(accept_video(_body(_form_body(b"video bytes"), "k1"), store=store,
                                        settings=settings))
    job = accepted.job
    assert not accepted.replayed and accepted.input_kind == "video"
    assert job.idempotency_key == "k1"
    assert job.request_fingerprint == request_fingerprint(
        "video", hashlib.sha256(b"video bytes").hexdigest(), parse_form({"project_id": "p"}))
    assert Path(job.input_path).read_bytes() == b"video bytes"
    assert files_under(Path(settings.data_dir)) == [f"jobs/{job.job_id}/input/video.mp4"]


def _fake_probe(monkeypatch) -> None:
    async def fake_run(args, *, timeout_s):
        return 0, {"container": "mov,mp4", "duration_s": 10.0, "width": 8, "height": 8}, ""

    monkeypatch.setattr(intake, "run_json_command", fake_run)


def test_the_idempotency_key_is_scoped_to_the_api_key_that_sent_it(monkeypatch, tmp_path):
    """Issue 13: "alice" and "bob" sending the same Idempotency-Key get two jobs, each owned
    by its sender; "alice" sending it again replays hers; with another file it is refused."""
    _fake_probe(monkeypatch)
    settings = settings_for(tmp_path)
    store = InMemoryJobStore()

    def upload(owner: str | None, content: bytes = b"video bytes"):
        return asyncio.run(accept_video(_body(_form_body(content), "K", owner), store=store,
                                        settings=settings))
    alice, bob = upload("alice"), upload("bob")
    assert not alice.replayed and not bob.replayed
    assert alice.job.job_id != bob.job.job_id
    assert (alice.job.owner, bob.job.owner) == ("alice", "bob")
    assert (alice.job.idempotency_key, bob.job.idempotency_key) == ("K", "K")
    again = upload("alice")
    assert again.replayed and again.job.job_id == alice.job.job_id
    anonymous = upload(None)  # authentication off: an owner of its own
    assert not anonymous.replayed and anonymous.job.owner is None
    assert len({alice.job.job_id, bob.job.job_id, anonymous.job.job_id}) == 3
    with pytest.raises(PipelineError) as ei:
        upload("bob", b"another video")
    assert (ei.value.code, ei.value.details) == ("idempotency_key_reused",
                                                 {"job_id": bob.job.job_id})
    assert asyncio.run(store.list_jobs(owner="alice"))[1] == 1
    assert sorted(files_under(Path(settings.data_dir))) == sorted(
        f"jobs/{j.job_id}/input/video.mp4" for j in (alice.job, bob.job, anonymous.job))


def test_a_lost_insert_race_replays_the_same_owners_job(monkeypatch, tmp_path):
    """The replay after a DuplicateKey looks the key up among the sender's jobs."""
    _fake_probe(monkeypatch)
    store = LosingStore("K")
    accepted = asyncio.run(accept_video(_body(_form_body(b"v"), "K", "alice"), store=store,
                                        settings=settings_for(tmp_path)))
    assert accepted.replayed and accepted.job.job_id == "winner-job"


def test_a_part_is_named_only_when_the_form_defines_its_name(monkeypatch, tmp_path):
    """The receiver knows the form's text fields: 'scan_name' sent twice is named; a field
    the form does not define (the client's word) is named by its position."""
    _fake_probe(monkeypatch)
    store, settings = InMemoryJobStore(), settings_for(tmp_path)
    for name, message, details in (
            ("scan_name", "Form field 'scan_name' repeats", {"field": "scan_name"}),
            ("MARK", "Part 2 of the form repeats", {"part_index": 1})):
        twice = "".join(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"'
                        f"\r\n\r\nv\r\n" for _ in range(2)).encode()
        with pytest.raises(PipelineError) as ei:
            asyncio.run(accept_video(_body([twice] + _form_body(b"v")), store=store,
                                     settings=settings))
        assert ei.value.message.startswith(message) and ei.value.details == details
    assert files_under(Path(settings.data_dir)) == []


def test_no_disk_answer_gives_the_free_bytes_not_the_clients_content_length(monkeypatch,
                                                                           tmp_path):
    settings = settings_for(tmp_path, min_free_disk_bytes=10**15)
    with pytest.raises(PipelineError) as ei:
        asyncio.run(intake.require_disk(settings, "123456789"))
    free = ei.value.details["free_disk_bytes"]
    assert ei.value.code == "insufficient_storage" and ei.value.http_status == 507
    assert ei.value.details == {"free_disk_bytes": free, "min_free_disk_bytes": 10**15}
    assert "123456789" not in str(ei.value.to_dict())


def test_upload_body_lives_in_its_own_module():
    """``UploadBody`` moved out of multipart.py (500-line limit); the old import still works,
    and the owner defaults to none (authentication off)."""
    assert multipart.UploadBody is upload_body.UploadBody is UploadBody
    assert _body([]).owner is None and _body([], owner="alice").owner == "alice"
