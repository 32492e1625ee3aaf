"""The job routes: list, get, delete, cancel, retry, the frame scores. Each is a store read or
one runner call, shaped into :class:`.schemas.JobPublic` for the caller (:mod:`.views`); a job
of another API key is "not found". One artifact's download is in :mod:`.artifacts`."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from ..errors import PipelineError
from ..jobs import JobStatus, JobStore
from ..layout import DataDir, ObjectKeys, read_json
from .artifacts import bucket_json, request_storage
from .auth import AUTH_RESPONSES, CallerDep, Principal
from .deps import NotDraining, RunnerDep, SettingsDep, StoreDep
from .errors import ApiError
from .schemas import ErrorResponse, FramesResponse, JobList, JobPublic, PhotoFrame
from .views import job_view, live_job, must_get, not_found

router = APIRouter(tags=["jobs"], responses=AUTH_RESPONSES)

#: largest ``offset`` of ``GET /jobs`` (larger ones overflowed SQLite's integer: 500)
MAX_LIST_OFFSET = 10**9
#: longest ``project_id`` filter (as the upload form's)
MAX_PROJECT_ID_LEN = 200

_ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (404, 409, 422, 503)}


async def _refused(store: JobStore, job_id: str, caller: Principal, code: str) -> ApiError:
    """409 ``code`` naming the job's status now (404 when it went away meanwhile)."""
    job = await live_job(store, job_id, caller)
    return ApiError(PipelineError(code, f"The job is {job.status.value}.",
                                  details={"status": job.status.value}))


@router.get("/jobs", response_model=JobList, response_model_exclude_unset=True,
            responses={422: {"model": ErrorResponse}}, summary="List jobs, newest first")
async def list_jobs(
        request: Request, store: StoreDep, caller: CallerDep,
        owner: Annotated[str | None, Query(
            max_length=MAX_PROJECT_ID_LEN, description="admin keys: only the jobs of the key "
            "with this name (other keys always see only their own jobs)")] = None,
        project_id: Annotated[str | None, Query(max_length=MAX_PROJECT_ID_LEN)] = None,
        status: Annotated[JobStatus | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=200, description="page size")] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_LIST_OFFSET,
                                     description="jobs to skip")] = 0) -> JobList:
    """Jobs newest first, filtered by project and status (deleted jobs only with
    ``status=deleted``); ``total`` counts every match. 422 ``invalid_request`` for a bad filter
    or a ``limit``/``offset`` out of range. With API keys on, a key lists only its own jobs;
    an admin key lists every job, or one key's with ``owner``."""
    any_match, owner = caller.owner_filter(owner)
    if not any_match:
        return JobList(jobs=[], total=0, limit=limit, offset=offset)
    jobs, total = await store.list_jobs(project_id=project_id, owner=owner,
                                        status=status.value if status else None,
                                        limit=limit, offset=offset)
    return JobList(jobs=[await job_view(request, store, j, caller) for j in jobs], total=total,
                   limit=limit, offset=offset)


@router.get("/jobs/{job_id}", response_model=JobPublic, response_model_exclude_unset=True,
            responses={404: {"model": ErrorResponse}}, summary="Job status, progress, results")
async def get_job(job_id: str, request: Request, store: StoreDep,
                  caller: CallerDep) -> JobPublic:
    """Status, progress (0-100), stage and message; results and artifact links when
    completed; ``error`` {code, message, hint, details} when failed. 404 ``not_found`` for an
    unknown or deleted job, and for another API key's job."""
    return await job_view(request, store, await live_job(store, job_id, caller), caller)


@router.delete("/jobs/{job_id}", response_model=JobPublic,
               response_model_exclude_unset=True, responses=_ERRORS,
               summary="Delete a job and its files")
async def delete_job(job_id: str, request: Request, store: StoreDep, runner: RunnerDep,
                     caller: CallerDep) -> JobPublic:
    """Cancels the job if it runs, removes its files, and keeps the row as ``deleted``
    (then ``GET /jobs/{job_id}`` answers 404)."""
    await live_job(store, job_id, caller)
    if not await runner.delete(job_id):
        raise not_found()
    return await job_view(request, store, await must_get(store, job_id), caller)


@router.post("/jobs/{job_id}/cancel", response_model=JobPublic,
             response_model_exclude_unset=True, responses=_ERRORS,
             summary="Cancel a pending or processing job")
async def cancel_job(job_id: str, request: Request, store: StoreDep, runner: RunnerDep,
                     caller: CallerDep) -> JobPublic:
    """Stops the job's child process group (gone within a few seconds) and frees its GPU
    slot; the workspace stays until retention so a retry reuses its checkpoints."""
    await live_job(store, job_id, caller)
    if not await runner.cancel(job_id):
        raise await _refused(store, job_id, caller, "job_not_cancellable")
    return await job_view(request, store, await must_get(store, job_id), caller)


@router.post("/jobs/{job_id}/retry", response_model=JobPublic,
             response_model_exclude_unset=True, responses=_ERRORS,
             dependencies=[NotDraining], summary="Retry a failed or cancelled job")
async def retry_job(job_id: str, request: Request, store: StoreDep, runner: RunnerDep,
                     caller: CallerDep) -> JobPublic:
    """Queues the job again with the same ``job_id``; it resumes from its first stage
    without a valid checkpoint."""
    await live_job(store, job_id, caller)
    if not await runner.retry(job_id):
        raise await _refused(store, job_id, caller, "job_not_retryable")
    return await job_view(request, store, await must_get(store, job_id), caller)


def _read_frames_json(path: Path) -> dict[str, Any] | None:
    """``frames.json`` of a workspace, or ``None`` when absent or half-written."""
    try:
        doc = read_json(path)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


@router.get("/jobs/{job_id}/frames", response_model=FramesResponse,
            response_model_exclude_unset=True,
            responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
            summary="Per-frame scores of the frame selection")
async def get_frames(job_id: str, request: Request, store: StoreDep,
                     settings: SettingsDep, caller: CallerDep) -> FramesResponse:
    """Every decoded frame's timestamp, sharpness, brightness, motion and whether it was
    kept (or why not); for a photo job the kept photos (``photos``; ``frames`` empty).
    Available once the frames stage has run, also for failed jobs; 409 before."""
    await live_job(store, job_id, caller)
    doc = await asyncio.to_thread(_read_frames_json,
                                  DataDir(settings.data_dir).job(job_id).work.frames_json)
    if doc is None:  # bucket mode: the stage may have run on another replica
        doc = await bucket_json(request_storage(request, settings),
                                ObjectKeys(job_id).frames_json)
    if doc is not None and doc.get("input_kind") == "images":
        return _photo_frames(job_id, doc)
    if doc is None or "scores" not in doc:
        raise PipelineError("frames_not_ready")
    sel = doc.get("selection") or {}
    return FramesResponse(job_id=job_id, input_kind="video", cap=sel.get("cap", 0),
                          kept=len(doc.get("frames", [])), num_decoded=doc.get("num_decoded", 0),
                          dropped=sel.get("dropped", {}), warnings=doc.get("warnings", []),
                          diagnosis=doc.get("diagnosis"), video=doc.get("video"),
                          frames=doc["scores"])


def _photo_frames(job_id: str, doc: dict[str, Any]) -> FramesResponse:
    """A photo job's ``frames.json`` (no scores: every photo is kept) as the frames answer."""
    photos = [PhotoFrame.model_validate(f) for f in doc.get("frames", [])]
    return FramesResponse(job_id=job_id, input_kind="images", cap=0, kept=len(photos),
                          num_decoded=doc.get("num_decoded", len(photos)), dropped={},
                          warnings=doc.get("warnings", []), video=doc.get("video"),
                          frames=[], photos=photos, focal_prior_px=doc.get("focal_prior_px"))
