"""``POST /upload-video`` and ``POST /upload-images``: one call into the intake each
(:func:`..intake.intake.accept_video` / :func:`~..intake.intake.accept_photos`), which receives
the streamed body, checks it and inserts the pending job; the route wakes the runner and
answers 202.

The routes read the body themselves (streaming, size-limited while it arrives), so FastAPI
cannot infer its schema: :func:`form_schema` writes it from :class:`..intake.intake.UploadForm`.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from ..config import Settings
from ..intake.intake import (
    MAX_IDEMPOTENCY_KEY_LEN,
    Accepted,
    UploadForm,
    accept_photos,
    accept_video,
)
from ..intake.multipart import UploadBody
from ..intake.photo_intake import MAX_PHOTOS, MIN_PHOTOS
from ..jobs import JobStore
from .auth import AUTH_RESPONSES, CallerDep, Principal
from .deps import NotDraining, RunnerControl, RunnerDep, SettingsDep, StoreDep
from .quota import pending_quota
from .rate_limit import upload_rate_limit
from .schemas import ErrorResponse, UploadResponse

router = APIRouter(tags=["uploads"], responses=AUTH_RESPONSES)

_MESSAGES = {"video": "Video uploaded successfully", "images": "Photos uploaded successfully"}
_BINARY = {"type": "string", "format": "binary"}


def _header(description: str, schema_type: str = "integer") -> dict[str, Any]:
    return {"description": description, "schema": {"type": schema_type}}


#: response headers of the upload routes (OpenAPI): the rate limiter's on every counted
#: answer (:mod:`.rate_limit`), ``Retry-After`` on 429/503, ``Idempotent-Replayed`` on a replay
_RATE_HEADERS = {
    "X-RateLimit-Limit": _header("uploads allowed per minute for this API key (else "
                                 "client address)"),
    "X-RateLimit-Remaining": _header("uploads left in the current minute"),
    "X-RateLimit-Reset": _header("when the current minute ends (epoch seconds)")}
_RETRY_AFTER = {"Retry-After": _header("seconds to wait before trying again")}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 408, 413, 415, 422, 429, 503, 507)}
_RESPONSES[202] = {"headers": {
    "Idempotent-Replayed": _header("true when this answers a repeated Idempotency-Key",
                                   "string"), **_RATE_HEADERS}}
_RESPONSES[429]["headers"] = {**_RETRY_AFTER, **_RATE_HEADERS}
_RESPONSES[429]["description"] = (
    "rate_limited (with Retry-After), or quota_exceeded: the API key has "
    "MAX_PENDING_JOBS_PER_KEY jobs waiting (no Retry-After)")
_RESPONSES[503]["headers"] = dict(_RETRY_AFTER)
#: the ``Idempotency-Key`` request header (read from the raw request, so declared by hand;
#: the intake checks its length: :func:`..intake.intake.check_idempotency_key`)
IDEMPOTENCY_KEY_PARAM: dict[str, Any] = {
    "name": "Idempotency-Key", "in": "header", "required": False,
    "description": "any 1-200 character key: repeating an upload with the same key, file and "
                   "fields returns the first job (Idempotent-Replayed: true) instead of a new "
                   "one; with another file or fields, 422 idempotency_key_reused",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_LEN}}


def form_schema(files: dict[str, Any], required: list[str],
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of an upload route: the file field(s) plus the fields of
    :class:`UploadForm` with their limits (lengths, e-mail format, quality values); and the
    ``Idempotency-Key`` header parameter."""
    props: dict[str, Any] = dict(files)
    for name, prop in UploadForm.model_json_schema()["properties"].items():
        prop = {k: v for k, v in prop.items() if k != "title"}
        branches = prop.pop("anyOf", None)
        if branches:  # an optional field: describe its non-null form
            prop = {**next(b for b in branches if b.get("type") != "null"), **prop}
        if prop.get("default", 0) is None:
            del prop["default"]
        props[name] = prop
    schema = {"type": "object", "required": required, "properties": props, **(extra or {})}
    return {"parameters": [IDEMPOTENCY_KEY_PARAM],
            "requestBody": {"required": True,
                            "content": {"multipart/form-data": {"schema": schema}}}}


VIDEO_FORM = form_schema(
    {"video": {**_BINARY, "description": "the video file (MP4/MOV/MKV…)"}},
    ["video", "project_id"])
PHOTOS_FORM = form_schema(
    {"images": {"type": "array", "items": _BINARY, "minItems": MIN_PHOTOS,
                "maxItems": MAX_PHOTOS,
                "description": f"{MIN_PHOTOS}-{MAX_PHOTOS} JPEG/PNG photos (repeat the field; "
                               "typed by content, not by name); a zip of them goes in zip"},
     "zip": {**_BINARY, "description": f"one zip of {MIN_PHOTOS}-{MAX_PHOTOS} JPEG/PNG photos "
                                       "(instead of images)"}},
    ["project_id"], {"anyOf": [{"required": ["images"]}, {"required": ["zip"]}]})

Accept = Callable[..., Awaitable[Accepted]]


def upload_body(request: Request, caller: Principal) -> UploadBody:
    """The request as the intake takes it: headers plus the unread body stream, and the
    caller's key name (the new job's ``owner``; it scopes the ``Idempotency-Key``)."""
    h = request.headers
    return UploadBody(content_type=h.get("content-type"), content_length=h.get("content-length"),
                      chunks=request.stream(), idempotency_key=h.get("idempotency-key"),
                      owner=caller.name)


async def _upload(accept: Accept, request: Request, response: Response, store: JobStore,
                  runner: RunnerControl, settings: Settings, caller: Principal) -> UploadResponse:
    accepted = await accept(upload_body(request, caller), store=store, settings=settings)
    job = accepted.job
    if accepted.replayed:
        response.headers["Idempotent-Replayed"] = "true"
        message = (f"Replay of an earlier upload with this Idempotency-Key: the job is "
                   f"{job.status.value}.")
    else:
        runner.wake()
        message = _MESSAGES[accepted.input_kind]
    return UploadResponse(job_id=job.job_id, scan_id=job.scan_id, status=job.status,
                          message=message, status_url=f"/jobs/{job.job_id}",
                          replayed=accepted.replayed)


#: in this order: the key (401), the rate limit (429), the pending quota (429), draining (503)
_GUARDS = [Depends(upload_rate_limit), Depends(pending_quota), NotDraining]


@router.post("/upload-video", status_code=202, response_model=UploadResponse,
             responses=_RESPONSES, dependencies=_GUARDS, openapi_extra=VIDEO_FORM,
             summary="Upload a video and queue a job")
async def upload_video(request: Request, response: Response, store: StoreDep,
                       runner: RunnerDep, settings: SettingsDep,
                       caller: CallerDep) -> UploadResponse:
    """Stream the body to disk (size limit enforced while it arrives), validate the fields,
    probe the file in a child, then create a pending job. ``Idempotency-Key`` (1-200
    characters): the same key with the same file and fields returns the first job (header
    ``Idempotent-Replayed: true``); with another file or fields, 422."""
    return await _upload(accept_video, request, response, store, runner, settings, caller)


@router.post("/upload-images", status_code=202, response_model=UploadResponse,
             responses=_RESPONSES, dependencies=_GUARDS, openapi_extra=PHOTOS_FORM,
             summary="Upload photos (or one zip) and queue a job")
async def upload_images(request: Request, response: Response, store: StoreDep,
                        runner: RunnerDep, settings: SettingsDep,
                        caller: CallerDep) -> UploadResponse:
    """Photo-set input: same flow, limits, errors and ``Idempotency-Key`` as
    ``/upload-video``; zips are checked (zip-slip, links, entry count, size and ratio caps)
    before extraction."""
    return await _upload(accept_photos, request, response, store, runner, settings,
                         caller)
