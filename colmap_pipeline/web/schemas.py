"""Pydantic models of the HTTP contract (field names from the deployment guide; extra fields added).

These are what ``/docs`` shows; every field has a description.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatus = Literal["pending", "processing", "completed", "failed", "cancelled", "expired",
                    "deleted"]


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
    gpu: dict[str, Any] | None = Field(None, description="as in GET /")


class ReadinessResponse(BaseModel):
    """``GET /readiness``: 200 when every check passes, else 503 naming the failing ones."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, bool] = Field(description="check name -> passed")
    failing: list[str] = Field(default_factory=list, description="names of failing checks")
    free_disk_bytes: int | None = Field(None, description="free bytes in DATA_DIR")


class UploadResponse(BaseModel):
    """``POST /upload-video`` → 202."""

    job_id: str
    scan_id: str
    status: Literal["pending"] = "pending"
    message: str = "Video uploaded successfully"
    status_url: str = Field(description="where to poll the job")


class ArtifactPublic(BaseModel):
    """A downloadable result file."""

    name: str = Field(description="file name, e.g. sparse.ply")
    url: str = Field(description="download path")
    bytes: int = Field(description="size in bytes")
    media_type: str
    sha256: str


class JobError(BaseModel):
    """Why a job failed."""

    code: str = Field(description="stable code: too_few_frames, insufficient_motion, "
                      "reconstruction_failed, pipeline_crashed, job_timeout, …")
    message: str
    hint: str


class JobPublic(BaseModel):
    """``GET /jobs/{job_id}``."""

    job_id: str
    scan_id: str
    project_id: str
    scan_name: str
    quality: Literal["low", "medium", "high"]
    status: JobStatus = Field(description="pending|processing|completed|failed|cancelled")
    progress: int = Field(description="0-100, never goes backwards within an attempt")
    current_stage: str | None = Field(description="Frame Extraction, Feature Detection, Feature "
                                      "Matching, Sparse Reconstruction, Exporting …")
    message: str | None = Field(description="what is happening now")
    queue_position: int | None = Field(None, description="1-based position while pending")
    created_at: str = Field(description="ISO-8601 UTC")
    started_at: str | None = None
    finished_at: str | None = None
    attempt: int = Field(description="number of times the job was started")
    input_bytes: int = Field(description="size of the uploaded file")
    input_sha256: str = Field(description="sha256 of the uploaded file")
    video: dict[str, Any] | None = Field(None, description="probed stream facts: codec, width, "
                                         "height, fps, duration_s, rotation")
    error: JobError | None = Field(None, description="set when status is failed")
    results: dict[str, Any] | None = Field(
        None, description="completed jobs: metrics read from the reconstruction "
        "(frames_extracted, frames_used (more when the ladder added frames), frames_added, "
        "registered_images, points3d, mean_reprojection_error_px, mean_track_length, models, "
        "camera, checks, partial, quality_warning, attempts (every mapping attempt of the "
        "recovery ladder with settings, outcome, time), focal_prior_px, timings_s)")
    artifacts: list[ArtifactPublic] = Field(default_factory=list)
    attempts: list[dict[str, Any]] = Field(
        default_factory=list, description="one record per run of the job: attempt, outcome, "
        "failed_stage, error_code, started_at, finished_at, stage_wall_s (wall time of each "
        "stage's process, s)")


class JobList(BaseModel):
    """``GET /jobs``: newest first."""

    jobs: list[JobPublic]
    total: int = Field(description="jobs matching the filters")
    limit: int
    offset: int


class FrameScore(BaseModel):
    """One decoded frame's scores and the selection's verdict on it (issue 3)."""

    timestamp_s: float = Field(description="presentation time (s) from the stream's pts")
    window: int = Field(description="time window (0 .. cap-1) the frame fell in")
    sharpness: float = Field(description="variance of the Laplacian on the 480 px analysis image")
    brightness: float = Field(description="mean luma, 0-255 (full range, HDR tone-mapped)")
    contrast: float | None = Field(None, description="luma standard deviation, 0-255")
    texture: float | None = Field(None, description="variance of the Laplacian at 1/4 scale")
    motion_px: float | None = Field(
        None, description="median tracked motion (px of the 480 px analysis image) since the "
        "last kept frame; only for window candidates; null when not measured or tracking lost")
    kept: bool = Field(description="handed to SfM")
    reason: str | None = Field(None, description="why it was dropped: black, overexposed, "
                               "blank, not_sharpest, blurry, near_duplicate; null when kept")
    file: str | None = Field(None, description="image file name when kept")


class FramesResponse(BaseModel):
    """``GET /jobs/{job_id}/frames``: the frame selection of the job's last frames stage."""

    job_id: str
    cap: int = Field(description="the preset's frame cap (number of time windows)")
    kept: int = Field(description="frames handed to SfM")
    num_decoded: int = Field(description="frames decoded from the video")
    dropped: dict[str, int] = Field(description="dropped frame count by reason")
    warnings: list[dict[str, Any]] = Field(default_factory=list,
                                           description="e.g. video_truncated")
    diagnosis: dict[str, Any] | None = Field(
        None, description="the degenerate-clip error found before SfM: {code, details}")
    video: dict[str, Any] | None = Field(None, description="probe of the input video")
    frames: list[FrameScore] = Field(description="every decoded frame, in decode order")
