"""The frames stage's side of a photo set (``POST /upload-images``): upright, scaled frames
and the focal length from EXIF.

:func:`prepare_photo_frames` decodes each photo with OpenCV, which applies the EXIF orientation
tag (``cv2.IMREAD_COLOR`` honours it unless ``IMREAD_IGNORE_ORIENTATION`` is given), scales it
to the preset's size and writes it as a plain JPEG without EXIF into ``frames/``. COLMAP then
reads those upright pixels, so decoding and SfM see the same orientation (COLMAP itself ignores
the EXIF orientation tag). Because the frames carry no EXIF, the focal length COLMAP would have
read from it is taken here instead (:func:`exif_focal_px`, with Pillow) and handed to the
mapping stage as ``focal_prior_px``.

The upload's side (magic bytes, zip safety, installation under server-made names) runs in the
API process: :mod:`colmap_pipeline.intake.photo_files`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, TypedDict

from ..errors import PipelineError
from ..photo_rules import (  # noqa: F401 - MIN/MAX_PHOTOS re-exported for callers of photos
    IMAGE_EXTENSIONS,
    MAX_PHOTOS,
    MIN_PHOTOS,
    check_count,
    natural_key,
    not_image_error,
)

#: EXIF tags (CIPA DC-008 / JEITA CP-3451): the Exif sub-IFD pointer, FocalLength (mm),
#: FocalLengthIn35mmFilm (mm), FocalPlaneXResolution, FocalPlaneResolutionUnit, PixelXDimension,
#: PixelYDimension.
EXIF_IFD = 0x8769
TAG_FOCAL_LENGTH = 0x920A
TAG_FOCAL_35MM = 0xA405
TAG_FOCAL_PLANE_XRES = 0xA20E
TAG_FOCAL_PLANE_UNIT = 0xA210
TAG_PIXEL_X = 0xA002
TAG_PIXEL_Y = 0xA003
#: FocalPlaneResolutionUnit values in mm (2 = inch, 3 = cm, 4 = mm, 5 = micrometre).
_PLANE_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}
#: Diagonal of the 36 x 24 mm frame: the 35 mm equivalent focal length scales with the diagonal
#: (crop factor = 43.27 mm / sensor diagonal).
FULL_FRAME_DIAGONAL_MM = 43.2666
#: Photos whose EXIF focal lengths (px) differ by more than this fraction are not one camera
#: setting (zoomed between shots): no shared prior.
FOCAL_PRIOR_AGREEMENT = 0.02


class FocalPrior(TypedDict):
    """A focal length (px) from EXIF and where it came from."""

    focal_px: float
    source: str


class SharedFocalPrior(FocalPrior):
    """The prior of a photo set: the photos' median, and how many photos agree."""

    photos: int


class PhotoFrame(TypedDict):
    """One frame made from a photo (``source``: the photo's server name)."""

    file: str
    source: str
    width: int
    height: int
    exif_focal_px: float | None


class PhotoFrames(TypedDict):
    """What :func:`prepare_photo_frames` returns: the photo set's ``frames.json`` (the shape of
    the video path's, with ``video`` describing the set and no per-frame scores)."""

    frames: list[PhotoFrame]
    num_decoded: int
    input_kind: str
    video: dict[str, Any]
    focal_prior: SharedFocalPrior | None
    focal_prior_px: float | None
    warnings: list[dict[str, Any]]


def _exif_number(ifd: Any, tag: int) -> float | None:
    """A positive finite EXIF number, or ``None`` (absent, zero, NaN, inf, not a number)."""
    raw = ifd.get(tag)
    if raw is None:
        return None
    try:
        v = float(raw)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return v if v > 0 and math.isfinite(v) else None


def exif_focal_px(path: str | os.PathLike, width: int, height: int) -> FocalPrior | None:
    """Focal length (px) of a photo at the size it is given to SfM, from its EXIF.

    In order: ``FocalLengthIn35mmFilm`` x (pixel diagonal / 43.27 mm); else ``FocalLength`` x
    ``FocalPlaneXResolution`` (px per unit on the sensor, at ``PixelXDimension``), scaled to
    ``max(width, height)``. Both are what COLMAP's own image reader would use when it sees the
    EXIF (``src/colmap/sensor/bitmap.cc``, ``ExifFocalLength``); the frames written here carry no
    EXIF, so the value is passed on instead.

    Args:
        path: the uploaded photo (JPEG or PNG; PNG usually has no EXIF).
        width, height: size (px) of the frame made from it (after orientation and scaling).

    Returns:
        ``{"focal_px": float, "source": "exif_focal_35mm" | "exif_focal_plane"}``, or ``None``
        when the photo has no usable EXIF focal length. Never raises for bad EXIF.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            ifd = im.getexif().get_ifd(EXIF_IFD)
            orig = (im.width, im.height)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None
    f35 = _exif_number(ifd, TAG_FOCAL_35MM)
    if f35:
        diag = (float(width) ** 2 + float(height) ** 2) ** 0.5
        return {"focal_px": f35 * diag / FULL_FRAME_DIAGONAL_MM, "source": "exif_focal_35mm"}
    f_mm, xres = _exif_number(ifd, TAG_FOCAL_LENGTH), _exif_number(ifd, TAG_FOCAL_PLANE_XRES)
    unit = _PLANE_UNIT_MM.get(int(_exif_number(ifd, TAG_FOCAL_PLANE_UNIT) or 2))
    if f_mm and xres and unit:
        px_w = _exif_number(ifd, TAG_PIXEL_X) or max(orig)
        px_h = _exif_number(ifd, TAG_PIXEL_Y) or min(orig)
        f_orig = f_mm * xres / unit  # px at the sensor's full resolution
        return {"focal_px": f_orig * max(width, height) / max(px_w, px_h),
                "source": "exif_focal_plane"}
    return None


def shared_focal_prior(priors: list[FocalPrior | None]) -> SharedFocalPrior | None:
    """One focal prior for a photo set (one shared camera): the median of the photos' EXIF
    focal lengths when every photo has one and they agree within ``FOCAL_PRIOR_AGREEMENT``;
    else ``None``. Returns ``{"focal_px", "source", "photos"}``."""
    known = [p for p in priors if p is not None]
    if not known or len(known) != len(priors):
        return None
    f = sorted(p["focal_px"] for p in known)
    if f[-1] > f[0] * (1.0 + FOCAL_PRIOR_AGREEMENT):
        return None
    mid = f[len(f) // 2] if len(f) % 2 else 0.5 * (f[len(f) // 2 - 1] + f[len(f) // 2])
    return {"focal_px": round(mid, 3), "source": known[0]["source"], "photos": len(known)}


def _write_frame(src: Path, out: Path, max_image_size: int | None,
                 jpeg_quality: int) -> tuple[int, int]:
    """Decode ``src`` upright, scale it, write it to ``out``; returns (width, height) in px."""
    import cv2

    img = cv2.imread(str(src), cv2.IMREAD_COLOR)  # applies EXIF orientation
    if img is None:
        raise not_image_error(src.name, "it cannot be decoded")
    h, w = img.shape[:2]
    if max_image_size and max(h, w) > max_image_size:
        s = max_image_size / max(h, w)
        img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))),
                         interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    if not cv2.imwrite(str(out), img, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]):
        raise PipelineError("pipeline_error", details={"reason": f"cannot write {out.name}"})
    return w, h


def prepare_photo_frames(input_dir: str | os.PathLike, frames_dir: str | os.PathLike,
                         max_image_size: int | None = None,
                         jpeg_quality: int = 95) -> PhotoFrames:
    """Decode every photo of ``input_dir`` upright (EXIF orientation applied by OpenCV), scale
    its longest side to at most ``max_image_size`` px (INTER_AREA) and write it to
    ``frames_dir/frame_NNNNN.jpg`` (no EXIF, so COLMAP sees the same upright pixels).

    Returns:
        ``{"frames": [{"file", "source", "width", "height", "exif_focal_px"}], "num_decoded":
        int, "video": {"kind": "images", "images": int, "width": int, "height": int},
        "input_kind": "images", "focal_prior_px": float | None, "focal_prior": {"focal_px",
        "source", "photos"} | None, "warnings": []}`` (the shape of the video path's
        ``frames.json``; the prior from :func:`shared_focal_prior`).

    Raises:
        PipelineError("unsupported_image"): a photo cannot be decoded;
        PipelineError("too_few_frames"): fewer than ``MIN_PHOTOS`` photos;
        PipelineError("invalid_request"): photos of different sizes (one shared camera).
    """
    src = Path(input_dir)
    out = Path(frames_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted((p.name for p in src.iterdir()
                    if p.is_file() and os.path.splitext(p.name)[1].lower() in IMAGE_EXTENSIONS),
                   key=natural_key)
    check_count(len(names))
    frames: list[PhotoFrame] = []
    priors: list[FocalPrior | None] = []
    for i, name in enumerate(names):
        file = f"frame_{i:05d}.jpg"
        w, h = _write_frame(src / name, out / file, max_image_size, jpeg_quality)
        exif = exif_focal_px(src / name, w, h)
        priors.append(exif)
        frames.append({"file": file, "source": name, "width": w, "height": h,
                       "exif_focal_px": None if exif is None else round(exif["focal_px"], 3)})
    sizes = {(f["width"], f["height"]) for f in frames}
    if len(sizes) != 1:
        raise PipelineError("invalid_request",
                            message="The photos have different sizes after orientation; one "
                                    "camera (same size, same zoom) is expected.",
                            hint="Upload photos from one camera at one resolution and zoom.",
                            details={"sizes": sorted(sizes)[:10]})
    w, h = sizes.pop()
    prior = shared_focal_prior(priors)
    return {"frames": frames, "num_decoded": len(frames), "input_kind": "images",
            "video": {"kind": "images", "images": len(frames), "width": w, "height": h},
            "focal_prior": prior, "focal_prior_px": None if prior is None else prior["focal_px"],
            "warnings": []}
