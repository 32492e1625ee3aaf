"""HTTP routes (thin): each parses, calls the job glue or the store, and shapes the answer.

Every error answer has one shape, :class:`models.ErrorResponse`:
``{"error": {"code", "message", "hint", "details"?}}``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..config import Settings
from ..errors import PipelineError
from ..intake.intake import create_job_from_upload, job_public, parse_form, probe_upload
from ..intake.multipart import receive_upload
from ..layout import DataDir
from .schemas import (
    ErrorResponse,
    FramesResponse,
    HealthResponse,
    JobList,
    JobPublic,
    ReadinessResponse,
    RootResponse,
    UploadResponse,
)

log = logging.getLogger("colmap_worker.api")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 404, 409, 413, 415, 422, 429, 503, 507)}
#: seconds a client is told to wait (Retry-After) when uploading to a draining server
DRAINING_RETRY_AFTER_S = 30
#: longest accepted Idempotency-Key header (characters)
MAX_IDEMPOTENCY_KEY_LEN = 200


def error_response(code: str, message: str | None = None, hint: str | None = None,
                   details: dict | None = None, status: int | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The one JSON error shape, with the catalog's HTTP status unless ``status`` is given."""
    err = PipelineError(code, message or "", hint or "", details)
    return JSONResponse({"error": err.to_dict()}, status_code=status or err.http_status,
                        headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception to the JSON error shape; never a stack trace to the client."""

    @app.exception_handler(PipelineError)
    async def _pipeline_error(_: Request, exc: PipelineError) -> JSONResponse:
        return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [{"field": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]}
                    for e in exc.errors()]
        return error_response("invalid_request", "Invalid request parameters.",
                              details={"fields": problems})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found"}.get(exc.status_code, "invalid_request")
        return error_response(code, str(exc.detail), status=exc.status_code)

    @app.exception_handler(RateLimitExceeded)
    async def _rate(request: Request, exc: RateLimitExceeded) -> JSONResponse:
        resp = error_response("rate_limited", f"Rate limit exceeded: {exc.detail}.")
        limiter: Limiter = request.app.state.limiter
        resp = limiter._inject_headers(resp, request.state.view_rate_limit)
        if "Retry-After" not in resp.headers:
            resp.headers["Retry-After"] = "60"
        return resp

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> JSONResponse:
        log.info("client disconnected during %s %s", request.method, request.url.path)
        return error_response("invalid_request", "The client disconnected mid-request.",
                              status=400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response("internal_error")


def _state(request: Request) -> Any:
    return request.app.state


State = Annotated[Any, Depends(_state)]


def _free_disk(path: Path) -> int:
    return shutil.disk_usage(path).free


def _writable(path: Path) -> bool:
    probe = path / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
        return True
    except OSError:
        return False


def multipart_body(file_field: str, file_schema: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of an upload route: ``file_field`` plus the scan form fields.

    The routes parse the body themselves (streaming), so FastAPI cannot infer this schema.
    """
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": [file_field, "project_id"],
        "properties": {
            file_field: file_schema,
            "project_id": {"type": "string", "description": "the frontend's project id"},
            "scan_name": {"type": "string", "description": "display name of the scan"},
            "quality": {"type": "string", "enum": ["low", "medium", "high"],
                        "default": "medium",
                        "description": "low: 30 frames/1000 px; medium: 50/1600; high: 100/2400"},
            "user_email": {"type": "string", "description": "owner's e-mail (optional)"}}}}}}}


def build_router(settings: Settings, limiter: Limiter) -> APIRouter:
    """All routes; the upload route is limited to ``MAX_REQUESTS_PER_MINUTE`` per client."""
    router = APIRouter()

    @router.get("/", response_model=RootResponse, summary="Service identity")
    async def root(state: State) -> RootResponse:
        return RootResponse(version=__version__, gpu_enabled=state.gpu.enabled,
                            pycolmap_version=state.gpu.pycolmap_version,
                            gpu=await asyncio.to_thread(state.gpu.public))

    @router.get("/health", response_model=HealthResponse, summary="Liveness probe")
    async def health(state: State) -> HealthResponse:
        runner = state.runner
        return HealthResponse(gpu_status=state.gpu.enabled,
                              active_gpu_jobs=runner.active_gpu_jobs,
                              max_gpu_jobs=runner.max_gpu_jobs, active_jobs=runner.active_jobs,
                              max_concurrent_jobs=settings.max_concurrent_jobs,
                              gpu=await asyncio.to_thread(state.gpu.public))

    @router.get("/readiness", response_model=ReadinessResponse, summary="Readiness probe",
                responses={503: {"model": ReadinessResponse}})
    async def readiness(state: State) -> JSONResponse:
        data_dir = Path(settings.data_dir)
        free = await asyncio.to_thread(_free_disk, data_dir)
        checks = {
            "database": await state.store.ping(),
            "data_dir_writable": await asyncio.to_thread(_writable, data_dir),
            "free_disk": free >= settings.min_free_disk_bytes,
            "runner": state.runner.running,
            "not_draining": not state.draining,
        }
        failing = [k for k, ok in checks.items() if not ok]
        body = ReadinessResponse(status="not_ready" if failing else "ready", checks=checks,
                                 failing=failing, free_disk_bytes=free)
        return JSONResponse(body.model_dump(), status_code=503 if failing else 200)

    @router.post("/upload-video", status_code=202, response_model=UploadResponse,
                 responses=ERROR_RESPONSES, summary="Upload a video and queue a job",
                 openapi_extra=multipart_body("video", {
                     "type": "string", "format": "binary",
                     "description": "the video file (MP4/MOV/MKV…)"}))
    @limiter.limit(lambda: f"{settings.max_requests_per_minute}/minute")
    async def upload_video(request: Request) -> JSONResponse:
        """Stream the body to disk (size limit enforced while it arrives), validate the fields,
        probe the file, then create a pending job."""
        state = request.app.state
        if state.draining:
            return error_response("not_ready", "The service is shutting down.",
                                  headers={"Retry-After": str(DRAINING_RETRY_AFTER_S)})
        key = request.headers.get("idempotency-key")
        if key is not None:
            key = key.strip()
            if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY_LEN:
                raise PipelineError("invalid_request", "Idempotency-Key must be 1-"
                                    f"{MAX_IDEMPOTENCY_KEY_LEN} characters.")
            existing = await state.store.find_by_idempotency_key(key)
            if existing is not None:
                return _replayed(existing)
        await _require_disk(request)
        upload_dir = DataDir(settings.data_dir).uploads
        received = await receive_upload(request, upload_dir, max_bytes=settings.max_upload_bytes)
        try:
            form = parse_form(received.fields)
            video = await probe_upload(received.path, settings)
            try:
                row = await create_job_from_upload(
                    state.store, settings, upload_path=received.path,
                    size_bytes=received.size_bytes, sha256=received.sha256,
                    client_filename=received.client_filename, form=form, video=video,
                    idempotency_key=key)
            except sqlite3.IntegrityError:
                existing = await state.store.find_by_idempotency_key(key) if key else None
                if existing is None:
                    raise
                return _replayed(existing)  # a concurrent upload with the same key won
        finally:
            await asyncio.to_thread(received.path.unlink, True)  # no-op once moved
        state.runner.wake()
        body = UploadResponse(job_id=row["job_id"], scan_id=row["scan_id"],
                              status_url=f"/jobs/{row['job_id']}")
        return JSONResponse(body.model_dump(), status_code=202)

    def _replayed(row: dict) -> JSONResponse:
        """The answer of the upload that created ``row`` (Idempotency-Key replay)."""
        body = UploadResponse(job_id=row["job_id"], scan_id=row["scan_id"],
                              status_url=f"/jobs/{row['job_id']}")
        return JSONResponse(body.model_dump(), status_code=202,
                            headers={"Idempotent-Replayed": "true"})

    async def _require_disk(request: Request) -> None:
        """507 ``insufficient_storage`` when the upload would leave less than
        ``MIN_FREE_DISK_BYTES`` free in DATA_DIR (``Content-Length`` counted when sent). A
        ``Content-Length`` over ``MAX_UPLOAD_BYTES`` is not a disk problem: it passes here and
        gets 413 ``upload_too_large`` from the upload itself (a 507 would invite retries)."""
        free = await asyncio.to_thread(_free_disk, Path(settings.data_dir))
        try:
            incoming = max(0, int(request.headers.get("content-length") or 0))
        except ValueError:
            incoming = 0
        if incoming > settings.max_upload_bytes:
            return
        if free - incoming < settings.min_free_disk_bytes:
            raise PipelineError(
                "insufficient_storage",
                f"Only {free} bytes are free; the service keeps {settings.min_free_disk_bytes}.",
                details={"free_disk_bytes": free, "upload_bytes": incoming,
                         "min_free_disk_bytes": settings.min_free_disk_bytes})

    @router.post("/jobs/{job_id}/cancel", response_model=JobPublic, responses=ERROR_RESPONSES,
                 summary="Cancel a pending or processing job")
    async def cancel_job(job_id: str, state: State) -> JobPublic:
        """Stops the job's child process group (gone within a few seconds) and frees its GPU
        slot; the workspace stays until retention so a retry reuses its checkpoints."""
        row = await _get(state, job_id)
        if not await state.runner.cancel(job_id):
            raise PipelineError("job_not_cancellable", f"Job {job_id} is {row['status']}.",
                                details={"status": row["status"]})
        return job_public(await state.store.get_job(job_id))

    @router.post("/jobs/{job_id}/retry", response_model=JobPublic, responses=ERROR_RESPONSES,
                 summary="Retry a failed or cancelled job")
    async def retry_job(job_id: str, state: State) -> JobPublic:
        """Queues the job again with the same ``job_id``; it resumes from its first stage
        without a valid checkpoint."""
        row = await _get(state, job_id)
        if state.draining:
            return error_response("not_ready", "The service is shutting down.",
                                  headers={"Retry-After": str(DRAINING_RETRY_AFTER_S)})
        if not await state.runner.retry(job_id):
            raise PipelineError("job_not_retryable", f"Job {job_id} is {row['status']}.",
                                details={"status": row["status"]})
        row = await state.store.get_job(job_id)
        return job_public(row, await state.store.queue_position(job_id))

    @router.delete("/jobs/{job_id}", response_model=JobPublic, responses=ERROR_RESPONSES,
                   summary="Delete a job and its files")
    async def delete_job(job_id: str, state: State) -> JobPublic:
        """Cancels the job if it runs, removes its files, and keeps the row as ``deleted``
        (then ``GET /jobs/{job_id}`` answers 404)."""
        await _get(state, job_id)
        if not await state.runner.delete(job_id):
            raise PipelineError("not_found", f"No job with id {job_id!r}.")
        return job_public(await state.store.get_job(job_id))

    @router.post("/upload-images", status_code=202, response_model=UploadResponse,
                 responses=ERROR_RESPONSES, summary="Upload photos (or one zip) and queue a job",
                 openapi_extra=multipart_body("images", {
                     "type": "array", "items": {"type": "string", "format": "binary"},
                     "description": "JPEG/PNG photos (repeat the field), or one zip of them"}))
    @limiter.limit(lambda: f"{settings.max_requests_per_minute}/minute")
    async def upload_images(request: Request) -> JSONResponse:
        """Photo-set input (issue 4): same flow, limits and errors as ``/upload-video``; zips
        are checked (zip-slip, links, entry count, size and ratio caps) before extraction."""
        from ..intake.photo_intake import create_photo_job

        state = request.app.state
        if state.draining:
            return error_response("not_ready", "The service is shutting down.",
                                  headers={"Retry-After": str(DRAINING_RETRY_AFTER_S)})
        await _require_disk(request)
        row = await create_photo_job(request, state.store, settings)
        state.runner.wake()
        body = UploadResponse(job_id=row["job_id"], scan_id=row["scan_id"],
                              status_url=f"/jobs/{row['job_id']}")
        return JSONResponse(body.model_dump(), status_code=202)

    @router.get("/jobs", response_model=JobList, summary="List jobs, newest first")
    async def list_jobs(state: State,
                        project_id: Annotated[str | None, Query(max_length=200)] = None,
                        status: Annotated[str | None, Query(
                            pattern="^(pending|processing|completed|failed|cancelled|expired|"
                                    "deleted)$")] = None,
                        limit: Annotated[int, Query(ge=1, le=200)] = 50,
                        offset: Annotated[int, Query(ge=0)] = 0) -> JobList:
        rows, total = await state.store.list_jobs(project_id=project_id, status=status,
                                                  limit=limit, offset=offset)
        jobs = [job_public(r, await state.store.queue_position(r["job_id"])
                           if r["status"] == "pending" else None) for r in rows]
        return JobList(jobs=jobs, total=total, limit=limit, offset=offset)

    async def _get(state: Any, job_id: str) -> dict:
        row = await state.store.get_job(job_id)
        if row is None or row["status"] == "deleted":
            raise PipelineError("not_found", f"No job with id {job_id!r}.")
        return row

    @router.get("/jobs/{job_id}", response_model=JobPublic, responses={404: {"model": ErrorResponse}},
                summary="Job status, progress, results")
    async def get_job(job_id: str, state: State) -> JobPublic:
        row = await _get(state, job_id)
        pos = await state.store.queue_position(job_id) if row["status"] == "pending" else None
        return job_public(row, pos)

    @router.get("/jobs/{job_id}/artifacts/{name}", responses={404: {"model": ErrorResponse},
                                                              409: {"model": ErrorResponse}},
                response_class=FileResponse, summary="Download one artifact")
    async def get_artifact(job_id: str, name: str, state: State) -> FileResponse:
        row = await _get(state, job_id)
        if row["status"] != "completed":
            raise PipelineError("job_not_completed", f"Job {job_id} is {row['status']}.")
        arts = {a["name"]: a for a in (row.get("results") or {}).get("artifacts", [])}
        if name not in arts:
            raise PipelineError("artifact_not_found", f"No artifact {name!r}.",
                                details={"available": sorted(arts)})
        path = DataDir(settings.data_dir).job(job_id).work.artifact(name)
        if not await asyncio.to_thread(path.is_file):
            raise PipelineError("artifact_not_found", f"The file of {name!r} is gone.")
        return FileResponse(path, media_type=arts[name].get("media_type"), filename=name)

    @router.get("/jobs/{job_id}/frames", response_model=FramesResponse,
                responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
                summary="Per-frame scores of the frame selection")
    async def get_frames(job_id: str, state: State) -> FramesResponse:
        """Every decoded frame's timestamp, sharpness, brightness, motion and whether it was
        kept (or why not). Available once the frames stage has run, also for failed jobs."""
        await _get(state, job_id)
        doc = await asyncio.to_thread(_read_frames_json,
                                      DataDir(settings.data_dir).job(job_id).work.frames_json)
        if doc is None or "scores" not in doc:
            raise PipelineError("frames_not_ready")
        sel = doc.get("selection") or {}
        return FramesResponse(job_id=job_id, cap=sel.get("cap", 0), kept=len(doc["frames"]),
                              num_decoded=doc.get("num_decoded", 0),
                              dropped=sel.get("dropped", {}), warnings=doc.get("warnings", []),
                              diagnosis=doc.get("diagnosis"), video=doc.get("video"),
                              frames=doc["scores"])

    return router


def _read_frames_json(path: Path) -> dict | None:
    """``frames.json`` of a workspace, or ``None`` when absent or half-written."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def make_limiter() -> Limiter:
    """A per-app slowapi limiter keyed by client address (in-memory counters)."""
    return Limiter(key_func=get_remote_address, headers_enabled=True, storage_uri="memory://")
