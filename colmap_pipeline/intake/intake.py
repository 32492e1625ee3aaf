"""Request body -> pending job, for a video and for photos alike: :func:`accept_video` and
:func:`accept_photos` each do, in order, the ``Idempotency-Key`` check, the disk check, the
streaming receipt, the form, the replay check, the probe (video) or the photo install, the
move into the job's folder and the insert of the ``pending`` job.

No web framework here: the body arrives as an :class:`.upload_body.UploadBody` (with its owner,
the API key's name, which scopes the ``Idempotency-Key`` and owns the job), and every refusal
is a :class:`PipelineError` that the web layer turns into the JSON error shape. The probe runs
in a child process (``python -m colmap_pipeline probe``), so this process never loads PyAV.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import unicodedata
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from ..config import Settings
from ..errors import ERROR_CATALOG, PipelineError
from ..jobs import DuplicateKey, Job, JobStore
from ..layout import DataDir, JobDir
from ..presets import Quality
from ..runner.executor import run_json_command
from ..runner.webhook_targets import MAX_URL_LEN
from ..storage import job_sync, store_input
from . import photo_intake
from .multipart import ReceivedFiles, receive_files
from .problems import validation_problems
from .upload_body import UploadBody
from .webhook_url import job_webhook_url

#: seconds the probe child may take for one upload
PROBE_TIMEOUT_S = 60.0
#: longest accepted Idempotency-Key header (characters)
MAX_IDEMPOTENCY_KEY_LEN = 200
#: longest project_id / scan_name (characters)
MAX_NAME_LEN = 200
#: longest e-mail address (RFC 5321 path limit, characters)
MAX_EMAIL_LEN = 254
#: refusals of the probe child passed on to the client as they are (the rest become
#: ``no_video_stream``); only those the catalog knows count
PROBE_CODES = frozenset({"no_video_stream", "still_image", "video_incomplete",
                         "clip_too_short", "video_too_long"})
#: probe refusals that meant "no usable video" before the narrower codes existed
_PROBE_AS_NO_VIDEO = frozenset({"too_few_frames", "video_truncated"})
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_QUALITY_HELP = "low: 30 frames/1000 px; medium: 50/1600; high: 100/2400"

InputKind = Literal["video", "images"]


class UploadForm(BaseModel):
    """The text fields of ``POST /upload-video`` and ``POST /upload-images``."""

    project_id: str = Field(min_length=1, max_length=MAX_NAME_LEN,
                            description="the frontend's project id")
    scan_name: str = Field("Untitled scan", min_length=1, max_length=MAX_NAME_LEN,
                           description="display name of the scan")
    quality: Quality = Field("medium", description=_QUALITY_HELP)
    user_email: str | None = Field(None, max_length=MAX_EMAIL_LEN,
                                   description="owner's e-mail (optional)",
                                   json_schema_extra={"format": "email"})
    webhook_url: str | None = Field(
        None, max_length=MAX_URL_LEN, description="http(s) URL told when the job completes, "
        "fails or is cancelled (signed Standard Webhooks POST; optional, default WEBHOOK_URL)",
        json_schema_extra={"format": "uri"})

    @field_validator("project_id", "scan_name")
    @classmethod
    def _printable(cls, v: str) -> str:
        """Refuse control characters (Unicode category Cc: C0, DEL, C1; tab and newline too):
        they would end up in logs, file listings and the frontend's display."""
        bad = next((c for c in v if unicodedata.category(c) == "Cc"), None)
        if bad is not None:
            raise ValueError(f"contains the control character U+{ord(bad):04X}")
        return v

    @field_validator("user_email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        if not _EMAIL.match(v):
            raise ValueError("not an e-mail address")
        return v


#: the text fields of :class:`UploadForm` (an error may name these; other fields are ignored)
FORM_FIELDS = frozenset(UploadForm.model_fields)


def parse_form(fields: dict[str, str]) -> UploadForm:
    """Validate the text fields (fields the form does not define are ignored).

    Raises: PipelineError("invalid_request") naming each bad field in ``details.fields``
    (:func:`.problems.validation_problems`: the form's limits and allowed values, never the
    value sent).
    """
    try:
        return UploadForm.model_validate(fields)
    except ValidationError as exc:
        problems = validation_problems(exc.errors(), own_messages=True)
        names = ", ".join(p["field"] for p in problems)
        raise PipelineError("invalid_request", f"Invalid or missing form field(s): {names}",
                            "Send project_id, and quality as one of low, medium, high.",
                            details={"fields": problems}) from None


def check_idempotency_key(raw: str | None) -> str | None:
    """The ``Idempotency-Key`` as given (compared byte for byte, never trimmed), or ``None``.

    Raises: PipelineError("invalid_request") for a key outside 1-200 characters.
    """
    if raw is not None and not 1 <= len(raw) <= MAX_IDEMPOTENCY_KEY_LEN:
        raise PipelineError("invalid_request", "Idempotency-Key must be 1-"
                            f"{MAX_IDEMPOTENCY_KEY_LEN} characters.",
                            f"Send a key of 1-{MAX_IDEMPOTENCY_KEY_LEN} characters (a UUID, for "
                            "example), or none.",
                            details={"max_length": MAX_IDEMPOTENCY_KEY_LEN})
    return raw


def request_fingerprint(kind: InputKind, input_sha256: str, form: UploadForm) -> str:
    """Hex SHA-256 of what makes two uploads the same request: the input kind, the digest of
    the file(s) (:func:`input_digest`) and every form field, as canonical JSON."""
    doc = {"kind": kind, "input_sha256": input_sha256, **form.model_dump()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def input_digest(received: ReceivedFiles) -> str:
    """The job's ``input_sha256``: the file's SHA-256 for one file, else the SHA-256 of the
    files' binary digests in the order received."""
    if len(received.files) == 1:
        return received.files[0].sha256
    digest = hashlib.sha256()
    for f in received.files:
        digest.update(bytes.fromhex(f.sha256))
    return digest.hexdigest()


async def require_disk(settings: Settings, content_length: str | None) -> None:
    """Refuse an upload that would leave less than ``MIN_FREE_DISK_BYTES`` free in DATA_DIR
    (``Content-Length`` counted when sent). A ``Content-Length`` over ``MAX_UPLOAD_BYTES`` is
    not a disk problem: it passes here and gets 413 from the receiver (a 507 would invite
    retries).

    Raises: PipelineError("insufficient_storage") (507) with the numbers in ``details``.
    """
    free = (await asyncio.to_thread(shutil.disk_usage, settings.data_dir)).free
    try:
        incoming = max(0, int(content_length or 0))
    except ValueError:
        incoming = 0
    if incoming > settings.max_upload_bytes or free - incoming >= settings.min_free_disk_bytes:
        return
    raise PipelineError(  # the client's Content-Length is not echoed (no request bytes back)
        "insufficient_storage",
        f"Only {free} bytes are free; the service keeps {settings.min_free_disk_bytes} free, "
        "counting this upload's Content-Length.",
        details={"free_disk_bytes": free, "min_free_disk_bytes": settings.min_free_disk_bytes})


#: top-level ISO BMFF box types (ISO/IEC 14496-12) a ``video_incomplete`` answer may list
_KNOWN_BOXES = frozenset({"ftyp", "styp", "moov", "mdat", "free", "skip", "wide", "pdin",
                          "moof", "mfra", "meta", "sidx", "ssix", "prft", "emsg", "uuid"})


def _public_value(key: str, value: Any) -> Any:
    """``value`` when it is the server's (a number, the probe's name of an image format, a
    known box type), else None."""
    if isinstance(value, bool | int | float) or value is None:
        return value
    if key == "image_format" and isinstance(value, str):  # by magic bytes or FFmpeg's demuxer
        return value[:32]
    if key == "boxes" and isinstance(value, list):  # box types are the file's own bytes
        return [b if b in _KNOWN_BOXES else "(other)" for b in value if isinstance(b, str)]
    return None


def _public_details(details: Any) -> dict[str, Any] | None:
    """The probe's ``details`` with only numbers and the server's words: nothing naming the
    server's files (the upload's path or name), and no text read from the upload."""
    if not isinstance(details, dict):
        return None
    out = {k: _public_value(k, v) for k, v in details.items() if k not in ("file", "path")}
    return {k: v for k, v in out.items() if v is not None} or None


def _probe_refusal(rc: int, doc: Any) -> PipelineError:
    """The client-facing error for a probe child that did not describe a video."""
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        return PipelineError("no_video_stream", details={"probe_exit": rc})
    code, message, hint = err.get("code"), err.get("message") or "", err.get("hint") or ""
    if code == "no_video_stream" or code in _PROBE_AS_NO_VIDEO:
        return PipelineError("no_video_stream", message, hint)
    if code in PROBE_CODES and code in ERROR_CATALOG:
        return PipelineError(code, message, hint, _public_details(err.get("details")))
    return PipelineError("no_video_stream", details={"probe_exit": rc})


async def probe_upload(path: Path, settings: Settings) -> dict[str, Any]:
    """Probe an uploaded file in a child process.

    Returns: the probe (:class:`..results.VideoProbe` fields: container, codec, width, height,
        fps, duration_s, rotation, …).
    Raises: PipelineError: the child's refusal when it is one of :data:`PROBE_CODES`
        (``still_image`` for a photo renamed ``.mp4``, ``video_incomplete`` for a file cut
        before its index…), else ``no_video_stream`` (415); ``video_too_long`` (422) over
        ``MAX_VIDEO_SECONDS``; ``pipeline_error`` when the child runs past
        :data:`PROBE_TIMEOUT_S`.
    """
    rc, doc, _ = await run_json_command(["probe", str(path)], timeout_s=PROBE_TIMEOUT_S)
    if rc != 0 or not isinstance(doc, dict) or "error" in doc:
        raise _probe_refusal(rc, doc)
    duration = float(doc.get("duration_s") or 0.0)
    if duration > settings.max_video_seconds:
        raise PipelineError(
            "video_too_long",
            f"The video lasts {duration:.1f} s; the limit is {settings.max_video_seconds:.0f} s.",
            details={"duration_s": duration, "max_video_seconds": settings.max_video_seconds})
    return doc


def container_ext(probe: dict[str, Any]) -> str:
    """File extension for the stored input, from the probed container name (never the
    client's): ``mp4`` for the ``mov,mp4,…`` family, else its first name, else ``bin``."""
    names = [re.sub(r"[^a-z0-9]", "", n.lower())[:8]
             for n in str(probe.get("container", "")).split(",")]
    return "mp4" if "mp4" in names else next((n for n in names if n), "bin")


# ---- the one intake pipeline ------------------------------------------------------------------

@dataclass(frozen=True)
class Accepted:
    """An accepted upload: the job, and whether it is an ``Idempotency-Key`` replay (then the
    job is the earlier one, in its current state)."""

    job: Job
    replayed: bool
    input_kind: InputKind


@dataclass(frozen=True)
class _Installed:
    input_path: Path
    input_filename: str | None
    video_info: dict[str, Any]


Installer = Callable[[ReceivedFiles, JobDir, Settings], Awaitable[_Installed]]


@dataclass(frozen=True)
class _Kind:
    name: InputKind
    file_fields: frozenset[str]
    max_files: int
    install: Installer


def _move(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)


async def _install_video(received: ReceivedFiles, jdir: JobDir,
                         settings: Settings) -> _Installed:
    upload = received.files[0]
    probe = await probe_upload(upload.path, settings)
    dest = jdir.input_video(container_ext(probe))
    await asyncio.to_thread(_move, upload.path, dest)
    return _Installed(dest, upload.client_filename, probe)


async def _install_photos(received: ReceivedFiles, jdir: JobDir,
                          settings: Settings) -> _Installed:
    images = jdir.input_images
    photos = await asyncio.to_thread(photo_intake.install_photo_set, received.files, images)
    name = received.files[0].client_filename if photos.source == "zip" \
        else f"{photos.count} photos"
    return _Installed(images, name, {"kind": "images", "images": photos.count,
                                     "source": photos.source})


VIDEO = _Kind("video", frozenset({"video"}), 1, _install_video)
PHOTOS = _Kind("images", photo_intake.FILE_FIELDS, photo_intake.MAX_PHOTOS, _install_photos)


def _replay(existing: Job, fingerprint: str, kind: _Kind) -> Accepted:
    """The earlier job of this key, or 422 when the key came with another request."""
    if existing.request_fingerprint not in (None, fingerprint):
        raise PipelineError(
            "idempotency_key_reused",
            "This Idempotency-Key belongs to an upload with another file or other fields "
            f"(job {existing.job_id}).", details={"job_id": existing.job_id})
    return Accepted(existing, True, kind.name)


@dataclass(frozen=True)
class _Request:
    """What the insert needs to know about the upload."""

    received: ReceivedFiles
    form: UploadForm
    input_sha256: str
    key: str | None
    fingerprint: str
    owner: str | None
    webhook_url: str | None = None


async def _insert(store: JobStore, settings: Settings, req: _Request, kind: _Kind) -> Accepted:
    """Install the input into a new job folder and insert the pending job; the folder is
    removed again if anything fails (a concurrent upload with the same key included)."""
    job_id = str(uuid.uuid4())
    jdir = DataDir(settings.data_dir).job(job_id)
    try:
        installed = await kind.install(req.received, jdir, settings)
        await store_input(settings, jdir, installed.input_path)  # bucket mode: before the 202
        job = await store.create_job({
            "job_id": job_id, "scan_id": str(uuid.uuid4()), "project_id": req.form.project_id,
            "scan_name": req.form.scan_name, "user_email": req.form.user_email,
            "quality": req.form.quality, "input_path": str(installed.input_path),
            "input_filename": installed.input_filename,
            "input_bytes": req.received.total_bytes, "input_sha256": req.input_sha256,
            "video_info": installed.video_info, "idempotency_key": req.key,
            "request_fingerprint": req.fingerprint, "owner": req.owner,
            "webhook_url": req.webhook_url})
    except DuplicateKey:
        await asyncio.to_thread(job_sync(settings, job_id).discard)  # folder + objects
        existing = (await store.find_by_idempotency_key(req.key, req.owner) if req.key
                    else None)
        if existing is None:
            raise
        return _replay(existing, req.fingerprint, kind)  # a concurrent upload won
    except BaseException:
        await asyncio.to_thread(job_sync(settings, job_id).discard)  # folder + objects
        raise
    return Accepted(job, False, kind.name)


def _remove(received: ReceivedFiles) -> None:
    for f in received.files:
        f.path.unlink(missing_ok=True)  # a no-op once moved into the job folder


async def _accept(body: UploadBody, store: JobStore, settings: Settings,
                  kind: _Kind) -> Accepted:
    key = check_idempotency_key(body.idempotency_key)
    await require_disk(settings, body.content_length)
    received = await receive_files(
        body, DataDir(settings.data_dir).uploads, max_bytes=settings.max_upload_bytes,
        file_fields=kind.file_fields, text_fields=FORM_FIELDS, max_files=kind.max_files,
        read_timeout_s=settings.upload_read_timeout_s)
    try:
        form = parse_form(received.fields)
        digest = input_digest(received)
        fingerprint = request_fingerprint(kind.name, digest, form)
        if key is not None:
            existing = await store.find_by_idempotency_key(key, body.owner)
            if existing is not None:
                return _replay(existing, fingerprint, kind)
        hook = await job_webhook_url(form.webhook_url, settings)  # 422 for a refused target
        return await _insert(store, settings,
                             _Request(received, form, digest, key, fingerprint, body.owner,
                                      hook), kind)
    finally:
        await asyncio.to_thread(_remove, received)


async def accept_video(body: UploadBody, *, store: JobStore, settings: Settings) -> Accepted:
    """``POST /upload-video``: one file in the field ``video`` plus :class:`UploadForm`.

    The file is stored as ``DATA_DIR/jobs/JOB_ID/input/video.<container>`` (a name the server
    makes from the probe); the job's ``owner`` is ``body.owner``. The same ``Idempotency-Key``
    from the same owner with the same request (file digest and fields,
    :func:`request_fingerprint`) replays the earlier job; with another request it is refused.
    Another owner's key of the same text is another key (a new job).

    Returns: the new ``pending`` job, or the replayed one.
    Raises: PipelineError: ``invalid_request`` (bad key, form or body), ``insufficient_storage``,
        the receiver's (``upload_too_large``, ``empty_file``, ``upload_timeout``), the probe's
        (:func:`probe_upload`), ``idempotency_key_reused``. Nothing is left on disk after a
        refusal.
    """
    return await _accept(body, store, settings, VIDEO)


async def accept_photos(body: UploadBody, *, store: JobStore, settings: Settings) -> Accepted:
    """``POST /upload-images``: 3-300 photos in the field ``images`` (or ``zip``), or one zip,
    plus :class:`UploadForm`; otherwise as :func:`accept_video`.

    The photos are stored as ``DATA_DIR/jobs/JOB_ID/input/images/img_NNNNN.jpg|png``; the job's
    ``video_info`` is ``{"kind": "images", "images": n, "source": "photos"|"zip"}``.

    Raises: PipelineError: as :func:`accept_video` without the probe's, plus
        :func:`.photo_intake.install_photo_set`'s (``unsafe_archive``, ``unsupported_image``,
        ``too_few_frames``).
    """
    return await _accept(body, store, settings, PHOTOS)
