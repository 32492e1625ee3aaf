"""Pydantic models of the HTTP contract (field names from the deployment guide; extra fields
added), and the conversion of a stored :class:`..jobs.Job` into its public view.

These are what ``/docs`` shows; every field has a description. A completed job's ``results``,
its ``video`` probe, its run records and the per-frame scores are the typed models of
:mod:`..results`, the same ones the pipeline child writes.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, Field, ValidationError

from ..jobs import Job, JobStatus
from ..presets import Quality
from ..results import Artifact, AttemptRecord, FrameScore, JobResult, JobWarning, VideoProbe

log = logging.getLogger("colmap_worker.api")

_M = TypeVar("_M", bound=BaseModel)

#: attempt records a job view carries (the newest ones); ``attempts_total`` counts them all
MAX_ATTEMPT_RECORDS = 20


class ErrorBody(BaseModel):
    """One error: stable code, message and a hint the user can act on."""

    code: str = Field(description="stable machine-readable code, e.g. no_video_stream")
    message: str = Field(description="what happened")
    hint: str = Field(description="what the user can do about it")
    details: dict[str, Any] | None = Field(None, description="measured values, limits")


class ErrorResponse(BaseModel):
    """The one JSON error shape of every 4xx/5xx answer."""

    error: ErrorBody


class RootResponse(BaseModel):
    """``GET /``."""

    message: str = Field("COLMAP Worker API")
    status: str = Field("running")
    version: str = Field(description="service version")
    gpu_enabled: bool = Field(description="GPU stages will run on a CUDA GPU")
    pycolmap_version: str | None = Field(None, description="pycolmap in the pipeline children")
    gpu: dict[str, Any] | None = Field(None, description="GPU probe: cuda, device_count, "
                                       "enabled, cpu_only_forced, dense_possible, devices (NVML "
                                       "name, memory, utilisation)")


class HealthResponse(BaseModel):
    """``GET /health`` (liveness; cheap, never rate-limited)."""

    status: str = Field("healthy")
    service: str = Field("colmap-worker")
    gpu_status: bool = Field(description="a usable CUDA GPU was found at start-up")
    active_gpu_jobs: int = Field(description="jobs now holding a GPU slot")
    max_gpu_jobs: int = Field(description="GPU slots (MAX_GPU_JOBS)")
    active_jobs: int = Field(description="jobs now processing")
    max_concurrent_jobs: int = Field(description="MAX_CONCURRENT_JOBS")
    auth: Literal["on", "off"] = Field(description="on: API keys are required (API_KEYS); "
                                       "off: the service is open to anyone who reaches it")
    gpu: dict[str, Any] | None = Field(None, description="as in GET /")


class ReadinessResponse(BaseModel):
    """``GET /readiness``: 200 when every check passes, else 503 naming the failing ones."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, bool] = Field(description="check name -> passed")
    failing: list[str] = Field(default_factory=list, description="names of failing checks")
    free_disk_bytes: int | None = Field(None, description="free bytes in DATA_DIR")


class UploadResponse(BaseModel):
    """``POST /upload-video`` and ``POST /upload-images`` → 202."""

    job_id: str
    scan_id: str
    status: JobStatus = Field(description="pending for a new job; a replay (same "
                              "Idempotency-Key) gives the job's current status")
    message: str = Field(description="'Video uploaded successfully', 'Photos uploaded "
                         "successfully', or for a replay what the job is doing now")
    status_url: str = Field(description="where to poll the job")
    replayed: bool = Field(False, description="true when this answers a repeated "
                           "Idempotency-Key (also sent as the Idempotent-Replayed header)")


class ArtifactPublic(Artifact):
    """A downloadable result file."""

    #: required here (optional in a stored result: the web layer makes it)
    url: str = Field(description="download path, relative to the API root; while API keys "
                     "are on it carries a short-lived signed token (SIGNED_URL_TTL_S) so a "
                     "browser can follow it without a header")


class JobError(BaseModel):
    """Why a job failed."""

    code: str = Field(description="stable code: too_few_frames, insufficient_motion, "
                      "reconstruction_failed, pipeline_crashed, job_timeout, …")
    message: str
    hint: str
    details: dict[str, Any] | None = Field(
        None, description="the numbers behind the failure, e.g. for reconstruction_failed: "
        "frames used, median keypoints per frame, verified image pairs, the mapping attempts "
        "with their outcome, the largest model's size")


class JobPublic(BaseModel):
    """``GET /jobs/{job_id}``."""

    job_id: str
    scan_id: str
    project_id: str
    scan_name: str
    quality: Quality
    status: JobStatus = Field(description="pending|processing|completed|failed|cancelled|"
                              "expired|deleted")
    progress: int = Field(description="0-100, never goes backwards within an attempt (a "
                          "retry starts again from 0)")
    current_stage: str | None = Field(description="Frame Extraction, Feature Detection, Feature "
                                      "Matching, Sparse Reconstruction, Exporting …")
    message: str | None = Field(description="what is happening now")
    queue_position: int | None = Field(None, description="1-based position while pending")
    owner: str | None = Field(None, description="name of the API key that created the job "
                              "(null with authentication off)")
    user_email: str | None = Field(None, description="the upload's user_email: shown to the "
                                   "job's owner only, removed when retention removes the files")
    created_at: str = Field(description="ISO-8601 UTC")
    started_at: str | None = None
    finished_at: str | None = None
    attempt: int = Field(description="number of times the job was started")
    input_bytes: int = Field(description="size of the uploaded file(s), bytes")
    input_sha256: str = Field(description="sha256 of the uploaded file (of the files' digests "
                              "for several photos)")
    video: VideoProbe | None = Field(None, description="probe of the input")
    error: JobError | None = Field(None, description="set when status is failed")
    results: JobResult | None = Field(None, description="set when status is completed")
    artifacts: list[ArtifactPublic] = Field(
        default_factory=list, description="downloadable files of a completed job (empty for a "
        "deleted one: its files are gone)")
    attempts: list[AttemptRecord] = Field(
        default_factory=list, description=f"the newest {MAX_ATTEMPT_RECORDS} runs of the job, "
        "oldest first (attempts_total counts them all)")
    attempts_total: int = Field(0, description="number of run records the job has")
    events_url: str | None = Field(None, description="the job's live events (Server-Sent "
                                   "Events, GET /jobs/{job_id}/events); signed like artifact "
                                   "URLs while API keys are on, so an EventSource can open it")

    @classmethod
    def from_job(cls, job: Job, queue_position: int | None = None, *,
                 link: Callable[[str], str] | None = None,
                 show_email: bool = True) -> JobPublic:
        """The public view of a stored job. A stored result or run record that no longer
        fits its model (written by an older child) is left out and logged, never a 500.

        ``link`` turns an artifact's path into its URL (a signed link while keys are on;
        default: the path itself); ``show_email`` includes ``user_email`` (its owner only)."""
        link = link or (lambda path: path)
        error = None
        if job.error_code:
            error = JobError(code=job.error_code, message=job.error_message or "",
                             hint=job.error_hint or "", details=job.error_details or None)
        results = _parse(JobResult, job.results, job.job_id)
        if results is not None and job.status in (JobStatus.DELETED, JobStatus.EXPIRED):
            # its files are gone: no artifact (nor URL) that would answer 404 or 409
            results = results.model_copy(update={"artifacts": []})
        artifacts = [ArtifactPublic(**{**a.model_dump(), "url":
                                       link(f"/jobs/{job.job_id}/artifacts/{a.name}")})
                     for a in (results.artifacts if results else [])]
        records = [r for r in (_parse(AttemptRecord, a, job.job_id)
                               for a in job.attempts[-MAX_ATTEMPT_RECORDS:]) if r is not None]
        return cls(
            job_id=job.job_id, scan_id=job.scan_id, project_id=job.project_id,
            scan_name=job.scan_name, quality=job.quality,
            status=job.status, progress=job.progress, current_stage=job.current_stage,
            message=job.message, queue_position=queue_position, owner=job.owner,
            user_email=job.user_email if show_email else None, created_at=job.created_at,
            started_at=job.started_at, finished_at=job.finished_at, attempt=job.attempt,
            input_bytes=job.input_bytes, input_sha256=job.input_sha256,
            video=_parse(VideoProbe, job.video_info, job.job_id), error=error, results=results,
            artifacts=artifacts, attempts=records, attempts_total=len(job.attempts),
            events_url=link(f"/jobs/{job.job_id}/events"))


def _parse(model: type[_M], data: Any, job_id: str) -> _M | None:
    if data is None:
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        log.warning("job %s: stored %s does not fit its model: %s", job_id, model.__name__,
                    exc.errors()[:3])
        return None


class JobList(BaseModel):
    """``GET /jobs``: newest first."""

    jobs: list[JobPublic]
    total: int = Field(description="jobs matching the filters")
    limit: int
    offset: int


class PhotoFrame(BaseModel):
    """One kept photo of a photo job, as the frames stage wrote it (upright, scaled)."""

    file: str = Field(description="frame file handed to SfM, e.g. frame_00000.jpg")
    source: str = Field(description="the stored photo's name (the upload's index, not the "
                        "client's file name)")
    width: int = Field(description="width (px) after EXIF orientation and scaling")
    height: int = Field(description="height (px) after EXIF orientation and scaling")
    exif_focal_px: float | None = Field(None, description="focal length (px, at this size) "
                                        "from the photo's EXIF; null when absent")
    camera: int | None = Field(None, description="index of the photo's camera group (EXIF "
                               "make, model, focal length and size after orientation; "
                               "results.photo_cameras lists the groups)")
    exif_time: str | None = Field(None, description="the photo's EXIF DateTimeOriginal (with "
                                  "sub-seconds when present); null when absent")


class FramesResponse(BaseModel):
    """``GET /jobs/{job_id}/frames``: the frame selection of the job's last frames stage.

    A video job lists every decoded frame's scores in ``frames``. A photo job has no frame
    selection (every photo is kept): ``frames`` is empty, ``photos`` lists the kept photos,
    ``cap`` is 0 and ``kept`` = ``num_decoded`` = number of photos."""

    job_id: str
    input_kind: Literal["video", "images"] = Field("video", description="video or images")
    cap: int = Field(description="the preset's frame cap (number of time windows); 0 for a "
                     "photo job")
    kept: int = Field(description="frames (photos) handed to SfM")
    num_decoded: int = Field(description="frames decoded from the video (photos decoded)")
    dropped: dict[str, int] = Field(description="dropped frame count by reason")
    warnings: list[JobWarning] = Field(default_factory=list,
                                       description="e.g. video_truncated")
    diagnosis: dict[str, Any] | None = Field(
        None, description="the degenerate-clip error found before SfM: {code, details}")
    video: VideoProbe | None = Field(None, description="probe of the input video")
    frames: list[FrameScore] = Field(description="every decoded frame, in decode order; "
                                     "empty for a photo job")
    photos: list[PhotoFrame] = Field(default_factory=list,
                                     description="photo job: the kept photos, in name order")
    focal_prior_px: float | None = Field(None, description="photo job: the focal length (px) "
                                         "shared by the photos' EXIF, if any")
