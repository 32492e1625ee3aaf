"""Typed results: what a completed job holds, in one schema.

The export stage (a child) builds a :class:`JobResult` and writes it to ``WS/result.json``; the
runner stores it on the job row; the API serves the same model as ``JobPublic.results``, so
``/docs`` shows every field a frontend reads, with its unit. The probe of the input
(:class:`VideoProbe`), per-frame scores (:class:`FrameScore`), each run of the job
(:class:`AttemptRecord`) and each artifact (:class:`Artifact`) are typed here too. A light leaf:
pydantic only.

Sub-models allow extra keys (``extra="allow"``) so that a newer child's result still loads in an
older server during a rolling deploy; the fields listed are the contract.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .protocol import STAGES


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class JobWarning(_Open):
    """Something the user should know about a job that still completed."""

    code: str = Field(description="stable code, e.g. video_truncated, focal_metadata_ignored, "
                      "partial_reconstruction, moving_content")
    message: str = Field(description="what happened, with its numbers, e.g. 'decoded 0.40 s "
                         "of 1.33 s'")
    details: dict[str, Any] = Field(default_factory=dict, description="the numbers behind it")
    hint: str | None = Field(None, description="what the user can do about it")


class VideoProbe(_Open):
    """Facts about the input, probed before the job is queued (``kind`` = video or images)."""

    kind: Literal["video", "images"] = Field("video", description="video or photo set")
    container: str | None = Field(None, description="FFmpeg container name, e.g. mov,mp4,m4a")
    codec: str | None = Field(None, description="video codec, e.g. h264, hevc")
    width: int | None = Field(None, description="px, after rotation")
    height: int | None = Field(None, description="px, after rotation")
    rotation: int | None = Field(None, description="deg counter-clockwise: 0, 90, 180, 270")
    fps: float | None = Field(None, description="frames per second (average)")
    duration_s: float | None = Field(None, description="s")
    num_frames: int | None = Field(None, description="frames the container announces")
    tone_mapped: str | None = Field(None, description="HDR transfer tone-mapped to SDR: "
                                    "arib-std-b67 (HLG), smpte2084 (PQ); null for SDR")
    images: int | None = Field(None, description="photo sets: number of photos")
    source: str | None = Field(None, description="photo sets: photos or zip")


class FrameScore(BaseModel):
    """One decoded frame's scores and the selection's verdict on it."""

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


class Artifact(_Open):
    """One downloadable file of a completed job."""

    name: str = Field(description="file name, e.g. sparse.ply, model.zip, transforms.json")
    bytes: int = Field(description="size in bytes")
    media_type: str = Field(description="MIME type")
    sha256: str = Field(description="hex digest of the file")
    url: str | None = Field(None, description="download path, relative to the API root")


class CameraModel(_Open):
    """One COLMAP camera of the sparse model. A video has one; a photo set one per group of
    photos with the same EXIF camera, focal length and upright size (issue 15)."""

    camera_id: int
    model: str = Field(description="COLMAP camera model, e.g. SIMPLE_RADIAL, OPENCV")
    width: int = Field(description="px")
    height: int = Field(description="px")
    params: dict[str, float] = Field(description="named as pycolmap names them (f, cx, cy in px; "
                                     "k, k1, k2, p1, p2 unitless)")
    images: int | None = Field(None, description="registered images taken with this camera")


class ModelCheck(_Open):
    """The checks of one sparse model (the chosen one in a result)."""

    passed: bool
    registered_share: float = Field(description="registered images / frames used, 0-1")
    partial: bool = Field(description="fewer than 80% of the frames registered")
    failures: list[str] = Field(default_factory=list, description="failed checks: "
                                "implausible_intrinsics, reprojection_error, too_few_points, "
                                "too_few_images, focal_disagrees_with_metadata")
    overridden: list[str] = Field(default_factory=list, description="failed checks the ladder "
                                  "overrode: focal_disagrees_with_metadata when the images "
                                  "outvoted the photos' metadata")


class ModelSummary(_Open):
    """One model a mapping attempt produced, with its checks."""

    index: int = Field(description="model index k (sparse/<k>)")
    registered_images: int = Field(description="images with a pose in this model")
    points3d: int = Field(description="3D points")
    mean_reprojection_error_px: float = Field(description="mean reprojection error (px)")
    mean_track_length: float = Field(description="observations per 3D point")
    camera_plausible: bool = Field(description="focal 0.25-4 x image width, |distortion| <= 1")
    camera_model: str | None = Field(None, description="COLMAP camera model")
    focal_px: float | None = Field(None, description="mean focal length (px)")
    focal_ratio: float | None = Field(None, description="focal length / image width")
    camera_params: list[float] = Field(default_factory=list,
                                       description="COLMAP camera parameters, in COLMAP order")
    focal_px_by_camera: dict[str, float] | None = Field(
        None, description="several cameras: mean focal length (px) of each camera with "
        "registered images, keyed by camera id")
    checks: ModelCheck


class MappingAttempt(_Open):
    """One mapping attempt of the recovery ladder (the first one included)."""

    step: str = Field(description="ladder rung: baseline, more_overlap, exhaustive, "
                      "loop_closure, other_mapper, init_thresholds, focal_prior, camera_model, "
                      "more_frames")
    outcome: Literal["improved", "passed", "failed_checks", "no_model", "rejected",
                     "skipped"] = Field(
        description="improved (best model so far), passed (passed its checks, not better), "
        "failed_checks, no_model (SfM found no initial pair), rejected (vetoed, see reason), "
        "skipped (not run, see reason)")
    elapsed_s: float = Field(0.0, description="wall time of the attempt (s)")
    settings: dict[str, Any] = Field(default_factory=dict,
                                     description="what this attempt changed")
    reason: str | None = Field(None, description="why it was skipped or rejected, e.g. "
                               "time_budget, no_new_pairs, no_focal_length_metadata")
    frames: int | None = Field(None, description="frames given to this attempt")
    models: list[ModelSummary] = Field(default_factory=list,
                                       description="every model it produced")
    model_sizes: list[int] = Field(default_factory=list,
                                   description="registered images per model")
    best: ModelSummary | None = Field(None, description="its best model passing the checks")
    new_pairs: int | None = Field(None, description="matching rungs: image pairs matched")
    verified_pairs: int | None = Field(None, description="matching rungs: verified pairs in "
                                       "the database after matching")
    camera_kept: bool | None = Field(None, description="camera rungs: the changed camera "
                                     "stayed for the later stages")


class MatchDiagnostics(_Open):
    """What the verified matches say before mapping (:mod:`.core.match_diagnostics`): the
    share of pairs verified, homography vs essential-matrix pairs, pure rotations, and the
    components of the match graph; ``verdict`` names what rules a model out."""

    images: int = Field(description="images in the database")
    pairs: int = Field(description="image pairs matched (tried)")
    verified_pairs: int = Field(description="pairs with at least 15 inlier matches")
    verified_share: float = Field(description="verified_pairs / pairs, 0-1")
    strong_pairs: int = Field(description="verified pairs with at least 100 inliers (COLMAP's "
                              "initial-pair minimum)")
    parallax_pairs: int = Field(description="pairs explained by an essential/fundamental "
                                "matrix (not a homography) with at least 50 inliers")
    homography_share: float = Field(description="share of verified pairs explained by a "
                                    "homography (no parallax), 0-1")
    wide_pairs: int = Field(description="verified pairs whose inliers move at least 8% of the "
                            "image diagonal (median)")
    rotation_like_pairs: int = Field(description="wide pairs that are a pure rotation K R K^-1")
    median_rotation_error: float | None = Field(None, description="median rotation error of the "
                                                "wide homography pairs (0 = pure rotation)")
    median_inliers: int = Field(0, description="median inliers of the verified pairs")
    components: list[int] = Field(default_factory=list, description="sizes (images) of the "
                                  "match graph's connected components, largest first")
    isolated_images: int = Field(0, description="images in no verified pair")
    scenes: list[list[int]] = Field(default_factory=list, description="disconnected_scenes: "
                                    "image ids of each component big enough for a model")
    largest_component_share: float = Field(0.0, description="images in the largest component "
                                           "/ images, 0-1")
    verdict: str | None = Field(None, description="disconnected_scenes, rotation_only, "
                                "insufficient_parallax, or null")
    elapsed_s: float = Field(0.0, description="time to read and judge the matches (s)")


class MappingSummary(_Open):
    """The mapping stage's outcome: the ladder's chosen model and every attempt."""

    frames: int = Field(description="frames given to the chosen attempt")
    frames_added: list[str] = Field(default_factory=list,
                                    description="frames the more_frames rung added")
    mapper: str = Field(description="the first attempt's mapper (the preset's)")
    chosen_mapper: str = Field(description="mapper of the chosen attempt")
    budget_s: float = Field(description="time budget of the attempts after the first (s)")
    ladder_elapsed_s: float = Field(description="time spent after the first attempt (s)")
    models: list[ModelSummary] = Field(description="models of the chosen attempt")
    chosen_model: int = Field(description="index of the chosen model (sparse/<k>)")
    chosen_attempt: int = Field(description="index of the chosen attempt")
    model_sizes: dict[str, list[int]] = Field(
        description="registered images per model, keyed by attempt index")
    registered_images: int
    points3d: int
    checks: ModelCheck
    partial: bool = Field(description="fewer than 80% of the frames registered")
    quality_warning: JobWarning | None = Field(None, description="the first warning")
    warnings: list[JobWarning] = Field(default_factory=list)
    mapping_attempts: list[MappingAttempt] = Field(default_factory=list)
    match_diagnostics: MatchDiagnostics | None = Field(
        None, description="the matches as the ladder last judged them")


class StageTimings(_Open):
    """Wall time of each stage (s); null for a stage that did not run in this workspace."""

    frames: float | None = None
    features: float | None = None
    matching: float | None = None
    mapping: float | None = None
    dense: float | None = None
    meshing: float | None = None
    export: float | None = None
    total: float | None = None


class JobResult(_Open):
    """A completed job's results: every number read from the reconstruction itself."""

    frames_extracted: int = Field(description="frames selected from the video (or photos)")
    frames_used: int = Field(description="frames given to the chosen mapping attempt")
    frames_added: list[str] = Field(default_factory=list,
                                    description="frames the more_frames rung added")
    registered_images: int = Field(description="images with a pose in the sparse model")
    points3d: int = Field(description="3D points of the sparse model")
    observations: int | None = Field(None, description="2D observations of the 3D points")
    mean_reprojection_error_px: float = Field(description="mean reprojection error (px)")
    mean_track_length: float = Field(description="observations per 3D point")
    mean_observations_per_image: float | None = Field(None, description="per registered image")
    camera: CameraModel | None = Field(None, description="the (first) camera")
    cameras: list[CameraModel] | None = Field(None, description="all cameras with registered "
                                              "images, when several (photo sets: one per "
                                              "group of photos, see photo_cameras)")
    photo_cameras: list[dict[str, Any]] | None = Field(
        None, description="photo sets: how the photos were grouped into cameras, one entry per "
        "COLMAP camera: camera_id, frames (photos), width, height (px, upright, scaled), "
        "photo_width, photo_height (px, before scaling), make, model, focal_length_mm, "
        "focal_35mm (EXIF; null when absent), focal_prior_px (px, from EXIF)")
    camera_mode: str | None = Field(None, description="photo sets: single (one camera), "
                                    "per_group (by EXIF camera and size) or per_image")
    models: list[ModelSummary] = Field(default_factory=list,
                                       description="models of the chosen mapping attempt")
    chosen_model: int | None = Field(None, description="index of the model served")
    checks: ModelCheck | None = None
    partial: bool = Field(False, description="fewer than 80% of the frames registered")
    quality_warning: JobWarning | None = Field(None, description="the first warning of the "
                                               "mapping stage (kept for older clients)")
    warnings: list[JobWarning] = Field(default_factory=list,
                                    description="every warning of every stage")
    mapper: str | None = Field(None, description="mapper of the chosen attempt: global or "
                               "incremental")
    first_mapper: str | None = Field(None, description="the preset's first mapper")
    mapping_attempts: list[MappingAttempt] = Field(
        default_factory=list, description="every mapping attempt of the recovery ladder")
    match_diagnostics: MatchDiagnostics | None = Field(
        None, description="what the verified matches said before mapping (issue 15)")
    focal_prior_px: float | None = Field(None, description="focal length from EXIF (px)")
    input_kind: str = Field("video", description="video or images")
    preset: dict[str, Any] | None = Field(None, description="quality, max_frames, "
                                          "max_image_size (px), max_num_features")
    video: dict[str, Any] | None = Field(None, description="probe of the input")
    motion: dict[str, Any] | None = None
    features: dict[str, Any] | None = Field(None, description="feature extraction summary")
    matching: dict[str, Any] | None = Field(
        None, description="matching summary: method (sequential: videos and photo sets in "
        "EXIF time order; exhaustive: unordered photo sets up to 50 photos; retrieval: larger "
        "unordered sets), image_pairs (pairs matched), matched_pairs, verified_pairs, "
        "inlier_matches, device; photo sets also order {ordered, reason}")
    model_sizes: dict[str, list[int]] | None = Field(
        None, description="registered images per model, keyed by mapping attempt index")
    dense: dict[str, Any] | None = Field(None, description="dense MVS summary, or "
                                         "{skipped, reason}")
    meshing: dict[str, Any] | None = None
    timings_s: StageTimings | None = Field(None, description="wall time per stage (s)")
    artifacts: list[Artifact] = Field(default_factory=list)
    job_wall_time_s: float | None = Field(None, description="wall time of the attempt that "
                                          "completed (s), queue time excluded")


class AttemptRecord(_Open):
    """One run of a job (the job's ``attempts``; not the ladder's mapping attempts)."""

    attempt: int = Field(description="1-based run number")
    outcome: str = Field(description="completed, failed, retrying, cancelled, deleted, "
                         "interrupted, stopped")
    failed_stage: str | None = None
    error_code: str | None = None
    started_at: str | None = Field(None, description="ISO-8601 UTC")
    finished_at: str | None = Field(None, description="ISO-8601 UTC")
    stage_wall_s: dict[str, float] = Field(default_factory=dict,
                                           description="wall time of each stage child (s), "
                                           "in pipeline order")
    resumed_from: str | None = Field(None, description="first stage run in this attempt")
    skipped_stages: list[str] = Field(default_factory=list,
                                      description="stages reused from checkpoints")
    retry: str | None = Field(None, description="why an automatic retry followed")
    detail: str | None = None

    @field_validator("stage_wall_s")
    @classmethod
    def _pipeline_order(cls, v: dict[str, float]) -> dict[str, float]:
        """Stages in run order: PostgreSQL's JSONB stores object keys sorted, so the order they
        were recorded in does not survive a round trip there."""
        rank = {s: i for i, s in enumerate(STAGES)}
        return dict(sorted(v.items(), key=lambda kv: rank.get(kv[0], len(rank))))
