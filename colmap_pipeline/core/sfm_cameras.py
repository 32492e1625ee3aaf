"""Camera edits in the COLMAP database: the ladder's ``focal_prior`` and ``camera_model`` rungs.

Owns the focal prior(s) from metadata (:data:`FocalPriors`, one value or one per camera) and
how they are recorded and worded, and replacing every database camera by another model
(:func:`set_camera_model`) and back (:func:`restore_cameras`). Mapping itself lives in
:mod:`.sfm_mapping`. Import lazily: it loads pycolmap.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pycolmap

PathLike = str | os.PathLike[str]

#: COLMAP's default focal-length guess: 1.2 x max(width, height)
#: (``ImageReaderOptions.default_focal_length_factor``).
DEFAULT_FOCAL_FACTOR = 1.2

#: Focal length prior(s) from metadata, px at the frames' size: one value for every camera (a
#: video has none; a photo set of one camera), ``{camera id: px}`` (a photo set of several
#: cameras, issue 15: each camera its own group's EXIF; cameras without EXIF absent), or
#: ``None``.
FocalPriors = float | Mapping[int, float] | None


def prior_for(focal: FocalPriors, camera_id: int) -> float | None:
    """The prior (px) of camera ``camera_id``: the one value, its entry, or ``None``."""
    if isinstance(focal, Mapping):
        v = focal.get(int(camera_id))
        return float(v) if v else None
    return float(focal) if focal else None


def prior_record(focal: float | Mapping[Any, float] | None) -> float | dict[str, float] | None:
    """The prior as recorded in an attempt's settings: px, ``{"<camera id>": px}`` or ``None``
    (rounded to 0.001 px)."""
    if isinstance(focal, Mapping):
        return {str(k): round(float(v), 3) for k, v in sorted(focal.items()) if v}
    return round(float(focal), 3) if focal else None


def prior_text(focal: float | Mapping[Any, float] | None) -> str:
    """The prior in words: ``"1000 px"``, or ``"500, 420 px (per camera)"``."""
    if isinstance(focal, Mapping):
        vals = [f"{float(v):.0f}" for _, v in sorted(focal.items()) if v]
        return f"{', '.join(vals)} px (per camera)" if len(vals) > 1 else f"{''.join(vals)} px"
    return f"{float(focal or 0.0):.0f} px"


@dataclass(frozen=True)
class SavedCamera:
    """A database camera as it was before :func:`set_camera_model` replaced it."""

    model: str
    params: list[float]
    has_prior_focal_length: bool


def set_camera_model(database_path: PathLike, model_name: str, focal_px: FocalPriors = None,
                     prior: bool = False) -> dict[int, SavedCamera]:
    """Replace every database camera by a fresh ``model_name`` camera of the same size.

    Each new camera's focal length is its prior from ``focal_px`` (:func:`prior_for`: one value
    for all, or each camera its own) or COLMAP's default guess (:data:`DEFAULT_FOCAL_FACTOR` x
    max(width, height)), the principal point is the image centre and the distortion terms are
    0. ``prior=True`` sets ``has_prior_focal_length`` on the cameras that have a prior, so the
    incremental mapper trusts the focal length for the initial pair (COLMAP
    ``IncrementalMapper`` uses the prior when set).

    Returns:
        the replaced cameras keyed by camera id (for :func:`restore_cameras`).
    """
    old = {}
    with pycolmap.Database.open(str(database_path)) as db:
        for cam in db.read_all_cameras():
            old[int(cam.camera_id)] = SavedCamera(
                cam.model_name, [float(v) for v in cam.params], bool(cam.has_prior_focal_length))
            known = prior_for(focal_px, int(cam.camera_id))
            f = known or DEFAULT_FOCAL_FACTOR * max(cam.width, cam.height)
            new = pycolmap.Camera.create_from_model_name(int(cam.camera_id), model_name, f,
                                                         int(cam.width), int(cam.height))
            new.has_prior_focal_length = bool(prior and known)
            db.update_camera(new)
    return old


def restore_cameras(database_path: PathLike, saved: Mapping[int, SavedCamera]) -> None:
    """Undo :func:`set_camera_model` with the cameras it returned."""
    with pycolmap.Database.open(str(database_path)) as db:
        for cam in db.read_all_cameras():
            s = saved.get(int(cam.camera_id))
            if s is None:
                continue
            new = pycolmap.Camera.create_from_model_name(int(cam.camera_id), s.model, 1.0,
                                                         int(cam.width), int(cam.height))
            new.params = s.params
            new.has_prior_focal_length = s.has_prior_focal_length
            db.update_camera(new)
