"""SIFT features and cameras in the COLMAP database: the first input of every mapping attempt.

Owns feature extraction (in chunks, one camera per video or per photo group), the camera
grouping of a photo set and the focal priors read back per camera, and the small database
readers the later steps share (:func:`image_names`, :func:`read_camera`, :func:`device`,
:func:`chunks`). Matching and pair choice live in :mod:`.sfm_matching`.

Each step is a plain function of ``(paths, options)`` in the style of pycolmap's own Python
examples, reading and writing the job's COLMAP database (``WS/database.db``). Import this
module lazily (inside a pipeline stage): it loads pycolmap.

Facts used here (checked on pycolmap 4.2.1, CPU build):

* ``extract_features`` with ``CameraMode.SINGLE`` creates one camera per call; later calls share
  it when ``ImageReaderOptions.existing_camera_id`` names it, so extraction can run in chunks of
  images (real progress) and still end with one camera in the database (or one per photo
  group, each group extracted this way into the same database; ``CameraMode.PER_IMAGE`` gives
  every image of a call its own camera).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import pycolmap

from ..errors import PipelineError
from ..photo_rules import IMAGE_EXTENSIONS
from ..presets import Preset
from .progress import Progress, no_progress

PathLike = str | os.PathLike[str]
_T = TypeVar("_T")

#: Camera model shared by all frames of a video (one physical camera, fixed zoom):
#: SIMPLE_RADIAL = f, cx, cy, k (COLMAP ``src/colmap/sensor/models.h``), COLMAP's default.
CAMERA_MODEL = "SIMPLE_RADIAL"
#: Images per ``extract_features`` call: at least ``MIN_IMAGES_PER_CHUNK``, about
#: ``TARGET_IMAGE_CHUNKS`` calls, rounded up to a multiple of the threads (a call waits for its
#: slowest image, so 5 images on 2 threads leave one idle for the last). Measured on 2 cores,
#: 30 frames 848x480: one call 11.0 s, chunks of 10: 11.1 s, chunks of 6: 11.6 s, chunks of 3:
#: 13.9 s (per-call start-up cost).
MIN_IMAGES_PER_CHUNK = 10
TARGET_IMAGE_CHUNKS = 3



@dataclass(frozen=True)
class FeatureSummary:
    """What feature extraction left in the database.

    Attributes:
        images: images in the database.
        cameras: cameras in the database (1: one shared camera; a photo set: one per group).
        keypoints: SIFT keypoints over all images.
        mean_keypoints_per_image: keypoints / images.
        images_without_features: images with 0 keypoints.
        device: ``cpu`` or ``cuda``.
    """

    images: int
    cameras: int
    keypoints: int
    mean_keypoints_per_image: float
    images_without_features: int
    device: str

    def to_dict(self) -> dict[str, object]:
        """Plain dict (the features stage's checkpoint summary)."""
        return asdict(self)


def device(use_gpu: bool) -> pycolmap.Device:
    """``Device.cuda`` when asked and pycolmap was built with CUDA, else ``Device.cpu``."""
    return pycolmap.Device.cuda if (use_gpu and pycolmap.has_cuda) else pycolmap.Device.cpu


def chunks(items: list[_T], n_min: int, target: int, multiple_of: int = 1) -> list[list[_T]]:
    """About ``target`` chunks of at least ``n_min`` items, the size rounded up to a multiple
    of ``multiple_of`` (the extractor's threads: a chunk ends when its slowest image does)."""
    size = max(n_min, math.ceil(len(items) / max(1, target)))
    size = math.ceil(size / max(1, multiple_of)) * max(1, multiple_of)
    return [items[i:i + size] for i in range(0, len(items), size)]


def list_images(image_dir: PathLike) -> list[str]:
    """Sorted image file names (``.jpg``/``.jpeg``/``.png``) directly inside ``image_dir``."""
    return sorted(p.name for p in Path(image_dir).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def read_camera(database_path: PathLike) -> pycolmap.Camera:
    """The (first) camera in the database.

    Raises:
        PipelineError("pipeline_error"): the database holds no camera.
    """
    with pycolmap.Database.open(str(database_path)) as db:
        cams = db.read_all_cameras()
    if not cams:
        raise PipelineError("pipeline_error", details={"reason": "database has no camera"})
    return cams[0]


def image_names(database_path: PathLike) -> dict[int, str]:
    """``{image_id: file name}`` of every image in the database."""
    with pycolmap.Database.open(str(database_path)) as db:
        return {int(im.image_id): im.name for im in db.read_all_images()}


def _extraction_options(preset: Preset, dev: pycolmap.Device, num_threads: int,
                        sift_options: Mapping[str, Any]) -> pycolmap.FeatureExtractionOptions:
    ext = pycolmap.FeatureExtractionOptions()
    ext.max_image_size = int(preset.max_image_size)
    ext.sift.max_num_features = int(preset.max_num_features)
    for k, v in sift_options.items():
        if not hasattr(ext.sift, k):
            raise ValueError(f"unknown SIFT option {k!r}")
        setattr(ext.sift, k, v)
    ext.num_threads = num_threads
    ext.use_gpu = dev == pycolmap.Device.cuda
    return ext


def _feature_summary(database_path: PathLike, dev: pycolmap.Device,
                     expected_cameras: int = 1) -> FeatureSummary:
    with pycolmap.Database.open(str(database_path)) as db:
        images = db.read_all_images()
        per_image = [db.num_keypoints_for_image(im.image_id) for im in images]
        num_cameras = db.num_cameras()
    if num_cameras != expected_cameras:
        raise PipelineError("pipeline_error", details={
            "reason": "feature extraction did not end with one camera per camera group",
            "cameras": num_cameras, "expected_cameras": expected_cameras})
    return FeatureSummary(
        images=len(images), cameras=num_cameras, keypoints=int(sum(per_image)),
        mean_keypoints_per_image=round(sum(per_image) / max(1, len(per_image)), 1),
        images_without_features=int(sum(1 for n in per_image if n == 0)), device=dev.name)


def camera_groups(frames: Sequence[Mapping[str, Any]]) -> list[list[str]] | None:
    """The frame files of ``frames.json``'s ``frames`` grouped by their ``camera`` index (a
    photo set, :func:`.photos.prepare_photo_frames`), in index order; ``None`` when no frame
    names a camera (a video: one shared camera)."""
    if not frames or not any("camera" in f for f in frames):
        return None
    groups: dict[int, list[str]] = {}
    for f in frames:
        groups.setdefault(int(f.get("camera", 0)), []).append(str(f["file"]))
    return [groups[k] for k in sorted(groups)]


def _camera_of(database_path: PathLike, name: str) -> int:
    with pycolmap.Database.open(str(database_path)) as db:
        return _camera_in(db, name)


def _camera_in(db: pycolmap.Database, name: str) -> int:
    """Camera id of image ``name``; PipelineError("pipeline_error") when it is absent."""
    im = db.read_image_with_name(name)
    if im is None:
        raise PipelineError("pipeline_error", details={"reason": "image not in the database",
                                                       "image": name})
    return int(im.camera_id)


def camera_ids(database_path: PathLike,
               groups: Sequence[Sequence[str]] | None) -> dict[str, list[int]]:
    """``{"camera_ids": [COLMAP camera id of each group]}`` (the features stage's record of
    which camera each photo group got, in :func:`camera_groups` order); ``{}`` without groups."""
    if not groups:
        return {}
    with pycolmap.Database.open(str(database_path)) as db:
        return {"camera_ids": [_camera_in(db, g[0]) for g in groups]}


def focal_priors(database_path: PathLike,
                 frames_json: Mapping[str, Any]) -> float | dict[int, float] | None:
    """The mapping stage's focal prior(s) (px at the frames' size; ``sfm_cameras.FocalPriors``):
    ``frames.json``'s ``focal_prior_px`` for a video or a photo set of one camera; for several
    cameras, ``{COLMAP camera id: px}`` of each camera whose group has an EXIF prior (the
    database tells which camera each group's photos got), ``None`` when none has."""
    cams = frames_json.get("cameras") or []
    if len(cams) <= 1:
        v = frames_json.get("focal_prior_px")
        return float(v) if v else None
    out: dict[int, float] = {}
    with pycolmap.Database.open(str(database_path)) as db:
        for cam in cams:
            if cam.get("focal_prior_px") and cam.get("frames"):
                cid = _camera_in(db, cam["frames"][0])
                out[cid] = float(cam["focal_prior_px"])
    return out or None


def extract_features(database_path: PathLike, image_dir: PathLike, preset: Preset,
                     use_gpu: bool = False, progress: Progress = no_progress,
                     num_threads: int = -1, names: list[str] | None = None,
                     sift_options: Mapping[str, Any] | None = None,
                     groups: Sequence[Sequence[str]] | None = None) -> FeatureSummary:
    """Detect SIFT features (Lowe, IJCV 2004; COLMAP's SIFT) in every image of ``image_dir``.

    Cameras: one shared camera for all images (a video), or one per group of ``groups`` (a
    photo set, issue 15): model :data:`CAMERA_MODEL`, focal length initialised from COLMAP's
    default 1.2 x max(width, height) (the frames carry no EXIF). Each group is extracted with
    ``CameraMode.SINGLE``: its first chunk creates the group's camera, later chunks reuse it
    through ``existing_camera_id``; groups of one image are extracted together with
    ``CameraMode.PER_IMAGE`` (one camera each, no call per image). Images are downscaled
    internally to ``preset.max_image_size`` px (longest side) and keep at most
    ``preset.max_num_features`` features. Extraction runs in chunks of images so that
    ``progress`` reports real work.

    Args:
        database_path: COLMAP database (created; should not already hold these images).
        image_dir: folder of frames.
        preset: quality preset.
        use_gpu: use CUDA SIFT when pycolmap was built with CUDA (ignored otherwise).
        progress: ``progress(fraction, message)``.
        num_threads: CPU threads (-1 = all cores).
        names: only these files of ``image_dir``, added to the database's existing (first)
            camera (the ladder's ``more_frames`` rung, videos); default: every image.
        sift_options: overrides of pycolmap's ``SiftExtractionOptions`` (e.g.
            ``{"first_octave": 0}``, :data:`..presets.VIDEO_SIFT_OPTIONS`); default: none.
        groups: file names per camera (:func:`camera_groups`); default (and with ``names``):
            one camera for all.

    Returns:
        the database's totals after extraction.

    Raises:
        PipelineError("too_few_frames"): ``image_dir`` holds no image.
        PipelineError("pipeline_error"): the database does not end with one camera per group.
    """
    camera_id, cameras_before = -1, 0
    if names is not None:
        names = list(names)
        camera_id = int(read_camera(database_path).camera_id) if names else -1
        cameras_before = _num_cameras(database_path) if names else 0
        groups = [names]
    elif groups is None:
        groups = [list_images(image_dir)]
    shared = [list(g) for g in groups if len(g) > 1 or len(groups) == 1]
    singles = [g[0] for g in groups if len(g) == 1 and len(groups) > 1]
    total = sum(len(g) for g in shared) + len(singles)
    if not total:
        raise PipelineError("too_few_frames", details={"images": 0})
    dev = device(use_gpu)
    ext = _extraction_options(preset, dev, num_threads, sift_options or {})
    threads = num_threads if num_threads > 0 else (os.cpu_count() or 1)
    done = 0
    progress(0.0, f"Detecting features in images (0/{total})...")

    def run(chunk: list[str], mode: pycolmap.CameraMode, cam: int) -> None:
        nonlocal done
        reader = pycolmap.ImageReaderOptions()
        reader.camera_model = CAMERA_MODEL
        if cam != -1:
            reader.existing_camera_id = cam
        pycolmap.extract_features(database_path, image_dir, image_names=chunk, camera_mode=mode,
                                  reader_options=reader, extraction_options=ext, device=dev)
        done += len(chunk)
        progress(done / total, f"Detecting features in images ({done}/{total})...")

    for group in shared:
        cam = camera_id
        for chunk in chunks(group, MIN_IMAGES_PER_CHUNK, TARGET_IMAGE_CHUNKS,
                             multiple_of=threads):
            run(chunk, pycolmap.CameraMode.SINGLE, cam)
            if cam == -1:
                cam = _camera_of(database_path, chunk[0])
    for chunk in chunks(singles, MIN_IMAGES_PER_CHUNK, TARGET_IMAGE_CHUNKS,
                         multiple_of=threads):
        run(chunk, pycolmap.CameraMode.PER_IMAGE, -1)
    expected = len(shared) + len(singles) if names is None else cameras_before
    return _feature_summary(database_path, dev, expected)


def _num_cameras(database_path: PathLike) -> int:
    with pycolmap.Database.open(str(database_path)) as db:
        return int(db.num_cameras())
