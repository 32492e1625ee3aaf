"""Sparse mapping with pycolmap: run SfM once, judge every model, pick the best.

The recovery ladder (:mod:`.ladder`) calls :func:`map_models` once per attempt; the export stage
reads the chosen model back with :func:`summarize_model`. The ladder's camera edits (focal
priors, camera models) live in :mod:`.sfm_cameras`. Import lazily: it loads pycolmap.

Facts used here (checked on pycolmap 4.2.1, CPU build): ``incremental_mapping`` returns ``{}``
(no exception) on an empty database or a failed initialisation, often returns several models,
and model 0 is frequently a 2-image fragment; it writes model ``k`` to ``output_path/k``.
``global_mapping`` (GLOMAP) has no progress callbacks.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pycolmap

from ..results import CameraModel, ModelCheck, ModelSummary
from .progress import Progress, no_progress
from .sfm_cameras import FocalPriors, prior_for

PathLike = str | os.PathLike[str]

#: Plausible intrinsics (a registered-image count alone does not prove a model right): focal
#: length between these multiples of the image width (0.25 ~ 127 deg horizontal field of view
#: for a pinhole, GoPro wide modes fitted with SIMPLE_RADIAL give about 0.6-0.8; 4 ~ 14 deg;
#: issue 4's bounds) and every distortion parameter |k| <= MAX_ABS_RADIAL (COLMAP's own
#: ``max_extra_param`` is 1.0). Seen on the Karma drone clip: bogus models at f = 46 px,
#: 149 px, 10204 px or k = 256.
PLAUSIBLE_FOCAL_RATIO = (0.25, 4.0)
MAX_ABS_RADIAL = 1.0
#: A best model with fewer registered images than max(MIN_REGISTERED_IMAGES,
#: ceil(MIN_REGISTERED_FRACTION * frames)) is a failure: an empty or 2-image model never is a
#: result.
MIN_REGISTERED_IMAGES = 3
MIN_REGISTERED_FRACTION = 0.2
#: Model checks (issue 4): a model passes when its camera is plausible (:func:`camera_plausible`),
#: its mean reprojection error is at most ``MAX_MEAN_REPROJECTION_ERROR_PX`` (COLMAP filters
#: observations above 4 px, ``filter_max_reproj_error``; a healthy SIFT model is at 0.5-1.2 px),
#: it has at least ``MIN_POINTS3D`` points and at least :func:`min_registered_images` images.
MAX_MEAN_REPROJECTION_ERROR_PX = 2.0
MIN_POINTS3D = 50
#: Under this share of the selected frames registered, a job is ``partial`` (issue 4).
PARTIAL_BELOW_FRACTION = 0.8
#: With a focal length from metadata (EXIF), a model whose mean focal length differs from it by
#: more than this fraction fails the ``focal_disagrees_with_metadata`` check. EXIF's 35 mm
#: equivalent is rounded to whole millimetres (about 4% at 26 mm) and phones crop a little for
#: stabilisation; self-calibration from low-parallax views drifts much further (seen: 27-41% on
#: a synthetic lateral sweep with 0.5-1.5 px noise, tests/test_ladder.py).
FOCAL_PRIOR_TOLERANCE = 0.2
#: Progress of global SfM, which has no callbacks: a heartbeat every ``HEARTBEAT_S`` seconds
#: reports 1 - exp(-t / T) with T = ``GLOBAL_S_PER_FRAME`` x frames (measured on 2 CPU cores:
#: Karma 30 frames 19-26 s, 50 frames 45-53 s; the walk 30 frames 6-9 s), capped below 1, and
#: the elapsed time in the message, so a client sees it moving without a promise of when it
#: ends. pycolmap releases the GIL while mapping, so the thread runs.
HEARTBEAT_S = 2.0
GLOBAL_S_PER_FRAME = 1.0
#: Overrides of ``GlobalPipelineOptions`` for every global mapping (dotted keys for nested
#: options; an attempt's own ``mapper_options`` win) (issue 14; BENCHMARKS.md).
#: ``track_required_tracks_per_view``: global positioning and bundle adjustment use only
#: enough of the longest tracks to give each image this many (COLMAP 4's default keeps all);
#: the final retriangulation adds the rest back. Karma, 30 frames, 2,532 keypoints per frame:
#: 33 s of CPU for mapping with all tracks, 3.2 s with 100 (6.2 s with 200), with the same
#: 30/30 images, 4,132 vs 4,138 points and 0.368 vs 0.366 px; Strecha fountain at low: 6.56-6.58
#: mm median camera-centre error (6.62-6.63 mm with all tracks; runs spread by about 0.1 mm).
GLOBAL_OPTIONS: dict[str, Any] = {"mapper.track_required_tracks_per_view": 100}


def min_registered_images(num_frames: int) -> int:
    """Smallest acceptable best model: max(3, ceil(0.2 * num_frames)) registered images."""
    return max(MIN_REGISTERED_IMAGES, math.ceil(MIN_REGISTERED_FRACTION * num_frames))


def camera_plausible(cam: pycolmap.Camera) -> bool:
    """True when every focal length (fx, fy) is within ``PLAUSIBLE_FOCAL_RATIO`` x the image
    width and every extra (distortion) parameter is within +-``MAX_ABS_RADIAL``."""
    lo, hi = PLAUSIBLE_FOCAL_RATIO
    w = float(cam.width)
    focals = [float(cam.params[i]) for i in cam.focal_length_idxs()]
    extra = [float(cam.params[i]) for i in cam.extra_params_idxs()]
    return bool(all(lo * w <= f <= hi * w for f in focals)
                and all(abs(k) <= MAX_ABS_RADIAL for k in extra))


def _focal_disagrees(stats: Mapping[str, Any], prior: FocalPriors) -> bool:
    """Whether a camera's focal length is off its metadata prior by more than
    ``FOCAL_PRIOR_TOLERANCE`` (one prior: the first camera's; per camera: each camera that has
    registered images and a prior)."""
    if not prior:
        return False
    if isinstance(prior, Mapping):
        by_cam = stats.get("focal_px_by_camera")
        if by_cam is None:  # one camera in the model
            if len(prior) != 1 or not stats.get("focal_px"):
                return False
            by_cam = {str(k): stats["focal_px"] for k in prior}
        pairs = [(float(f), prior_for(prior, int(k))) for k, f in by_cam.items()]
    else:
        pairs = [(float(stats["focal_px"]), float(prior))] if stats.get("focal_px") else []
    return any(p and abs(f / p - 1.0) > FOCAL_PRIOR_TOLERANCE for f, p in pairs)


def check_model(stats: Mapping[str, Any], num_frames: int,
                focal_prior_px: FocalPriors = None) -> ModelCheck:
    """Judge one model's statistics.

    Args:
        stats: ``{"registered_images", "points3d", "mean_reprojection_error_px" (px),
            "camera_plausible", "focal_px"? (px), "focal_px_by_camera"? ({camera id: px})}``;
            a missing value fails its check.
        num_frames: frames selected for SfM.
        focal_prior_px: focal length from metadata (px at the frames' size): one for every
            camera, one per camera id (:data:`FocalPriors`), or ``None``.

    Returns:
        the verdict: ``failures`` (empty when passed) names any of ``implausible_intrinsics``,
        ``focal_disagrees_with_metadata`` (only with a prior: off by more than
        ``FOCAL_PRIOR_TOLERANCE``), ``reprojection_error``, ``too_few_points``,
        ``too_few_images``; ``partial`` when under ``PARTIAL_BELOW_FRACTION`` registered.
    """
    reg = int(stats.get("registered_images", 0))
    share = reg / max(1, num_frames)
    failures = []
    if not stats.get("camera_plausible", False):
        failures.append("implausible_intrinsics")
    if _focal_disagrees(stats, focal_prior_px):
        failures.append("focal_disagrees_with_metadata")
    if float(stats.get("mean_reprojection_error_px", 1e9)) > MAX_MEAN_REPROJECTION_ERROR_PX:
        failures.append("reprojection_error")
    if int(stats.get("points3d", 0)) < MIN_POINTS3D:
        failures.append("too_few_points")
    if reg < min_registered_images(num_frames):
        failures.append("too_few_images")
    return ModelCheck(passed=not failures, registered_share=round(share, 4),
                      partial=share < PARTIAL_BELOW_FRACTION, failures=failures)


def model_key(m: ModelSummary) -> tuple[int, int, float]:
    """Order of models, best last: more registered images, then more points, then lower
    mean reprojection error."""
    return (m.registered_images, m.points3d, -m.mean_reprojection_error_px)


def best_model(models: list[ModelSummary]) -> ModelSummary | None:
    """The largest model that passes its checks (:func:`model_key`); ``None`` when none does."""
    ok = [m for m in models if m.checks.passed]
    return max(ok, key=model_key) if ok else None


def _model_stats(rec: pycolmap.Reconstruction) -> dict[str, Any]:
    out: dict[str, Any] = {
        "registered_images": int(rec.num_reg_images()),
        "points3d": int(rec.num_points3D()),
        "mean_reprojection_error_px": round(float(rec.compute_mean_reprojection_error()), 4),
        "mean_track_length": round(float(rec.compute_mean_track_length()), 4),
        "camera_plausible": all(camera_plausible(c) for c in rec.cameras.values()),
    }
    cams = list(rec.cameras.values())
    if cams:
        cam = cams[0]
        out.update(camera_model=cam.model_name,
                   focal_px=round(float(cam.mean_focal_length()), 3),
                   focal_ratio=round(float(cam.mean_focal_length()) / max(1, cam.width), 4),
                   camera_params=[round(float(v), 6) for v in cam.params])
    if len(cams) > 1:  # several cameras (photo sets): each one that has registered images
        used = {int(rec.images[i].camera_id) for i in rec.reg_image_ids()}
        out["focal_px_by_camera"] = {
            str(cid): round(float(c.mean_focal_length()), 3)
            for cid, c in sorted(rec.cameras.items()) if int(cid) in used}
    return out


class _RegistrationCounter:
    """``on_image(initial)`` for ``incremental_mapping``'s image callbacks.

    Called with ``True`` for an initial pair and ``False`` for each next image. The callbacks
    fire for every initialisation trial (failed trials are discarded), so the count restarts at
    2 on each initial pair; ``progress`` receives the running maximum as
    ``(registered / num_frames, message)`` and so never goes backwards.
    """

    def __init__(self, progress: Progress, num_frames: int):
        self.progress, self.num_frames = progress, num_frames
        self.registered = self.best = 0

    def __call__(self, initial: bool) -> None:
        self.registered = 2 if initial else self.registered + 1
        if self.registered > self.best:
            self.best = self.registered
            n = min(self.best, self.num_frames)
            self.progress(n / max(1, self.num_frames),
                          f"Registering images ({n}/{self.num_frames})...")


@contextlib.contextmanager
def _heartbeat(progress: Progress, num_frames: int) -> Iterator[None]:
    stop = threading.Event()
    t0 = time.monotonic()
    expected = max(5.0, GLOBAL_S_PER_FRAME * num_frames)

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            t = time.monotonic() - t0
            progress(min(0.95, 1.0 - math.exp(-t / expected)),
                     f"Global SfM: rotation averaging, positions, bundle adjustment "
                     f"({t:.0f} s)...")

    th = threading.Thread(target=beat, name="global-sfm-heartbeat", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


def _override(target: object, overrides: Mapping[str, Any], what: str) -> None:
    """``setattr`` each override on ``target`` (a dotted key such as
    ``"mapper.ba_num_iterations"`` sets a nested option); ``ValueError`` names an unknown
    option."""
    for k, v in overrides.items():
        obj = target
        *path, attr = k.split(".")
        for part in path:
            obj = getattr(obj, part, None)
        if obj is None or not hasattr(obj, attr):
            raise ValueError(f"unknown {what} option {k!r}")
        setattr(obj, attr, v)


def _run_incremental(database_path: PathLike, image_dir: PathLike, out: Path, num_frames: int,
                     overrides: dict[str, Any], pipe_over: Mapping[str, Any],
                     progress: Progress, num_threads: int,
                     random_seed: int) -> dict[int, pycolmap.Reconstruction]:
    opts = pycolmap.IncrementalPipelineOptions()
    opts.num_threads = opts.mapper.num_threads = num_threads
    opts.random_seed = opts.mapper.random_seed = random_seed
    opts.triangulation.random_seed = random_seed
    _override(opts.mapper, overrides, "incremental mapper")
    _override(opts, pipe_over, "incremental pipeline")
    on_image = _RegistrationCounter(progress, num_frames)
    return dict(pycolmap.incremental_mapping(
        database_path, image_dir, out, options=opts,
        initial_image_pair_callback=lambda: on_image(True),
        next_image_callback=lambda: on_image(False)) or {})


def _run_global(database_path: PathLike, image_dir: PathLike, out: Path, num_frames: int,
                overrides: dict[str, Any], progress: Progress, num_threads: int,
                random_seed: int) -> dict[int, pycolmap.Reconstruction]:
    opts = pycolmap.GlobalPipelineOptions()
    opts.num_threads = opts.mapper.num_threads = num_threads
    opts.random_seed = opts.mapper.random_seed = random_seed
    _override(opts, {**GLOBAL_OPTIONS, **overrides}, "global pipeline")
    with _heartbeat(progress, num_frames):
        return dict(pycolmap.global_mapping(database_path, image_dir, out, options=opts) or {})


def map_models(database_path: PathLike, image_dir: PathLike, output_dir: PathLike,
               num_frames: int, mapper: str = "incremental",
               mapper_options: Mapping[str, Any] | None = None,
               progress: Progress = no_progress, num_threads: int = -1, random_seed: int = -1,
               focal_prior_px: FocalPriors = None) -> list[ModelSummary]:
    """Run SfM once and judge every model it returns; never raises for a failed mapping.

    Incremental: Schoenberger & Frahm, CVPR 2016 (``pycolmap.incremental_mapping``); global:
    GLOMAP, Pan et al., ECCV 2024 (``pycolmap.global_mapping``). Model ``k`` is written to
    ``output_dir/<k>`` (binary).

    Args:
        database_path, image_dir: inputs (features and verified matches must exist).
        output_dir: created; must not hold older models.
        num_frames: frames given to SfM (progress and checks).
        mapper: ``"incremental"`` or ``"global"``.
        mapper_options: attribute overrides of ``IncrementalPipelineOptions.mapper``
            (``IncrementalMapperOptions``, e.g. ``{"init_min_num_inliers": 50}``) or, for the
            global mapper, of ``GlobalPipelineOptions``; the key ``"pipeline"`` may hold
            overrides of ``IncrementalPipelineOptions`` itself (e.g. ``ba_refine_focal_length``).
        progress: incremental: registered images / frames (never decreasing); global: a
            heartbeat (:data:`HEARTBEAT_S`).
        num_threads, random_seed: -1 = all cores / random; fix both (1, seed) for exact numbers.
        focal_prior_px: focal length(s) from metadata, for :func:`check_model`.

    Returns:
        every model with its statistics and checks, sorted by index; ``[]`` when SfM found no
        initial pair.

    Raises:
        ValueError: unknown ``mapper`` or option name.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(mapper_options or {})
    pipe_over = dict(overrides.pop("pipeline", None) or {})
    progress(0.0, "Initializing reconstruction...")
    if mapper == "incremental":
        recs = _run_incremental(database_path, image_dir, out, num_frames, overrides, pipe_over,
                                progress, num_threads, random_seed)
    elif mapper == "global":
        recs = _run_global(database_path, image_dir, out, num_frames,
                           {**overrides, **pipe_over}, progress, num_threads, random_seed)
    else:
        raise ValueError(f"unknown mapper {mapper!r}")
    models = []
    for k in sorted(recs):
        model_dir = out / str(k)
        if not (model_dir / "images.bin").exists():
            model_dir.mkdir(parents=True, exist_ok=True)
            recs[k].write_binary(str(model_dir))
        stats = {"index": int(k), **_model_stats(recs[k])}
        models.append(ModelSummary(**stats,
                                   checks=check_model(stats, num_frames, focal_prior_px)))
    progress(1.0, "Mapping done")
    return models


# --- the chosen model, read back ------------------------------------------------------------

def camera_model(cam: pycolmap.Camera, images: int | None = None) -> CameraModel:
    """A pycolmap camera with its parameters named as pycolmap names them (``params_info``:
    SIMPLE_RADIAL ``f, cx, cy, k``; OPENCV ``fx, fy, cx, cy, k1, k2, p1, p2``), px / unitless;
    ``images``: registered images taken with it."""
    names = [n.strip() for n in cam.params_info.split(",")]
    params = {n: round(float(v), 6) for n, v in zip(names, cam.params, strict=False)}
    return CameraModel(camera_id=int(cam.camera_id), model=cam.model_name,
                       width=int(cam.width), height=int(cam.height), params=params,
                       images=images)


@dataclass
class SparseModelReport:
    """Statistics of one COLMAP model, all read from the reconstruction.

    Attributes:
        registered_images, points3d, observations: counts.
        mean_reprojection_error_px: px.
        mean_track_length: observations per 3D point.
        mean_observations_per_image: per registered image.
        cameras: every camera with registered images (one for a video), with its count.
        registered_image_names: sorted file names.
    """

    registered_images: int
    points3d: int
    observations: int
    mean_reprojection_error_px: float
    mean_track_length: float
    mean_observations_per_image: float
    cameras: list[CameraModel] = field(default_factory=list)
    registered_image_names: list[str] = field(default_factory=list)


def summarize_model(model_dir: PathLike) -> SparseModelReport:
    """Read the COLMAP model in ``model_dir`` and measure it.

    Raises:
        ValueError / RuntimeError from pycolmap when ``model_dir`` holds no readable model.
    """
    rec = pycolmap.Reconstruction(str(model_dir))
    stats = _model_stats(rec)
    used: dict[int, int] = {}
    for i in rec.reg_image_ids():
        cid = int(rec.images[i].camera_id)
        used[cid] = used.get(cid, 0) + 1
    return SparseModelReport(
        registered_images=stats["registered_images"], points3d=stats["points3d"],
        observations=int(rec.compute_num_observations()),
        mean_reprojection_error_px=stats["mean_reprojection_error_px"],
        mean_track_length=stats["mean_track_length"],
        mean_observations_per_image=round(
            float(rec.compute_mean_observations_per_reg_image()), 4),
        cameras=[camera_model(c, used[int(cid)]) for cid, c in sorted(rec.cameras.items())
                 if used.get(int(cid))],
        registered_image_names=sorted(rec.images[i].name for i in rec.reg_image_ids()))


# --- GPU capability -------------------------------------------------------------------------

def _nvml_device_count() -> int | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver / no GPU: report, never crash
        return 0


def gpu_capabilities() -> dict[str, Any]:
    """What this process can use for GPU stages. Never raises.

    Returns:
        ``{"pycolmap_version": str, "colmap_version": str, "cuda": bool`` (pycolmap built with
        CUDA, ``pycolmap.has_cuda``), ``"device_count": int`` (NVIDIA GPUs usable by pycolmap:
        0 without CUDA support or without a driver), ``"nvml_device_count": int | None`` (GPUs
        the driver reports through NVML, ``None`` without nvidia-ml-py), ``"dense_possible":
        bool`` (PatchMatch stereo needs CUDA and a device)}.
    """
    cuda = bool(getattr(pycolmap, "has_cuda", False))
    nvml = _nvml_device_count()
    count = (nvml or 0) if cuda else 0
    return {
        "pycolmap_version": getattr(pycolmap, "__version__", "unknown"),
        "colmap_version": str(getattr(pycolmap, "COLMAP_version", "unknown")),
        "cuda": cuda,
        "device_count": int(count),
        "nvml_device_count": nvml,
        "dense_possible": bool(cuda and count > 0),
    }

