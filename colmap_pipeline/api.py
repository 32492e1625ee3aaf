"""HTTP routes (thin): each parses, calls the job glue or the store, and shapes the answer.

Every error answer has one shape, :class:`models.ErrorResponse`:
``{"error": {"code", "message", "hint", "details"?}}``.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
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

from . import __version__
from .config import Settings
from .errors import PipelineError
from .jobs import create_job_from_upload, job_public, parse_form, probe_upload
from .models import (ErrorResponse, HealthResponse, JobList, JobPublic, ReadinessResponse,
                     RootResponse, UploadResponse)
from .runner import workspace_dir
from .uploads import receive_upload

log = logging.getLogger("colmap_worker.api")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (400, 404, 409, 413, 415, 422, 429, 503)}


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


def build_router(settings: Settings, limiter: Limiter) -> APIRouter:
    """All routes; the upload route is limited to ``MAX_REQUESTS_PER_MINUTE`` per client."""
    router = APIRouter()

    @router.get("/", response_model=RootResponse, summary="Service identity")
    async def root(state: State) -> RootResponse:
        return RootResponse(version=__version__, gpu_enabled=state.gpu.enabled,
                            pycolmap_version=state.gpu.pycolmap_version)

    @router.get("/health", response_model=HealthResponse, summary="Liveness probe")
    async def health(state: State) -> HealthResponse:
        runner = state.runner
        return HealthResponse(gpu_status=state.gpu.enabled,
                              active_gpu_jobs=runner.active_gpu_jobs,
                              max_gpu_jobs=runner.max_gpu_jobs, active_jobs=runner.active_jobs,
                              max_concurrent_jobs=settings.max_concurrent_jobs)

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
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "multipart/form-data": {"schema": {
                         "type": "object", "required": ["video", "project_id"],
                         "properties": {
                             "video": {"type": "string", "format": "binary",
                                       "description": "the video file (MP4/MOV/MKV…)"},
                             "project_id": {"type": "string"},
                             "scan_name": {"type": "string"},
                             "quality": {"type": "string", "enum": ["low", "medium", "high"],
                                         "default": "medium"},
                             "user_email": {"type": "string"}}}}}}})
    @limiter.limit(lambda: f"{settings.max_requests_per_minute}/minute")
    async def upload_video(request: Request) -> JSONResponse:
        """Stream the body to disk (size limit enforced while it arrives), validate the fields,
        probe the file, then create a pending job."""
        state = request.app.state
        if state.draining:
            raise PipelineError("not_ready", "The service is shutting down.")
        upload_dir = Path(settings.data_dir) / "uploads"
        received = await receive_upload(request, upload_dir, max_bytes=settings.max_upload_bytes)
        try:
            form = parse_form(received.fields)
            video = await probe_upload(received.path, settings)
            row = await create_job_from_upload(
                state.store, settings, upload_path=received.path,
                size_bytes=received.size_bytes, sha256=received.sha256,
                client_filename=received.client_filename, form=form, video=video)
        finally:
            await asyncio.to_thread(received.path.unlink, True)  # no-op once moved
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
        path = workspace_dir(settings, job_id) / "artifacts" / name
        if not await asyncio.to_thread(path.is_file):
            raise PipelineError("artifact_not_found", f"The file of {name!r} is gone.")
        return FileResponse(path, media_type=arts[name].get("media_type"), filename=name)

    return router


def make_limiter() -> Limiter:
    """A per-app slowapi limiter keyed by client address (in-memory counters)."""
    return Limiter(key_func=get_remote_address, headers_enabled=True, storage_uri="memory://")
