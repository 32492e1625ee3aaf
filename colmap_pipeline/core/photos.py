"""The frames stage's side of a photo set (``POST /upload-images``): upright, scaled frames,
the cameras the photos came from, their order, and each camera's focal length from EXIF.

:func:`prepare_photo_frames` decodes each photo with OpenCV, which applies the EXIF orientation
tag (``cv2.IMREAD_COLOR`` honours it unless ``IMREAD_IGNORE_ORIENTATION`` is given), scales it
to the preset's size and writes it as a plain JPEG without EXIF into ``frames/``. COLMAP then
reads those upright pixels, so decoding and SfM see the same orientation (COLMAP itself ignores
the EXIF orientation tag). Because the frames carry no EXIF, what COLMAP would have read from
it is taken here instead, with Pillow:

* cameras (issue 15): photos are grouped by EXIF make, model and focal length and by their
  pixel size AFTER orientation (:func:`group_cameras`), so a phone's portrait and landscape
  shots are two cameras; photos without EXIF are grouped by size alone, and a set with no EXIF
  at all and several sizes gets one camera per photo (COLMAP's ``PER_IMAGE``). Each group
  shares one COLMAP camera (:func:`.sfm_features.extract_features`);
* each group's focal length (:func:`exif_focal_px`, :func:`shared_focal_prior`), the mapping
  stage's prior for that camera;
* the order (:func:`photo_order`): a set from one camera whose ``DateTimeOriginal`` grows in
  name order is a sequence (sequential matching, like a video); any other set is unordered
  (exhaustive matching while cheap, else retrieval: :func:`.sfm_matching.match_photos`).

The upload's side (magic bytes, zip safety, installation under server-made names) runs in the
API process: :mod:`colmap_pipeline.intake.photo_files`.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

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
#: PixelYDimension, DateTimeOriginal ("YYYY:MM:DD HH:MM:SS"), SubSecTimeOriginal; in IFD0: Make,
#: Model.
EXIF_IFD = 0x8769
TAG_FOCAL_LENGTH = 0x920A
TAG_FOCAL_35MM = 0xA405
TAG_FOCAL_PLANE_XRES = 0xA20E
TAG_FOCAL_PLANE_UNIT = 0xA210
TAG_PIXEL_X = 0xA002
TAG_PIXEL_Y = 0xA003
TAG_DATETIME_ORIGINAL = 0x9003
TAG_SUBSEC_ORIGINAL = 0x9291
TAG_MAKE = 0x010F
TAG_MODEL = 0x0110
#: FocalPlaneResolutionUnit values in mm (2 = inch, 3 = cm, 4 = mm, 5 = micrometre).
_PLANE_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}
#: Diagonal of the 36 x 24 mm frame: the 35 mm equivalent focal length scales with the diagonal
#: (crop factor = 43.27 mm / sensor diagonal).
FULL_FRAME_DIAGONAL_MM = 43.2666
#: Photos whose EXIF focal lengths (px) differ by more than this fraction are not one camera
#: setting (zoomed between shots): no shared prior.
FOCAL_PRIOR_AGREEMENT = 0.02

CameraMode = Literal["single", "per_group", "per_image"]


class FocalPrior(TypedDict):
    """A focal length (px) from EXIF and where it came from."""

    focal_px: float
    source: str


class SharedFocalPrior(FocalPrior):
    """The prior of a camera: its photos' median, and how many photos agree."""

    photos: int


class PhotoFrame(TypedDict):
    """One frame made from a photo (``source``: the photo's server name; ``camera``: index of
    its camera group in ``PhotoFrames.cameras``; ``exif_time``: ``DateTimeOriginal`` with
    sub-seconds, or ``None``)."""

    file: str
    source: str
    width: int
    height: int
    exif_focal_px: float | None
    camera: int
    exif_time: str | None


class PhotoCamera(TypedDict):
    """One camera group of a photo set (``frames.json``'s ``cameras``; one COLMAP camera).

    ``camera``: the group's index (0 = the group of the first photo); ``frames``: its frame
    files; ``width``/``height``: frame size (px, upright, scaled); ``photo_width`` /
    ``photo_height``: the photos' size (px, upright, before scaling); ``make``, ``model``,
    ``focal_length_mm``, ``focal_35mm``: the EXIF key (``None`` when absent);
    ``focal_prior``: its focal length from EXIF (px at the frame size) or ``None``.
    """

    camera: int
    frames: list[str]
    width: int
    height: int
    photo_width: int
    photo_height: int
    make: str | None
    model: str | None
    focal_length_mm: float | None
    focal_35mm: float | None
    focal_prior: SharedFocalPrior | None
    focal_prior_px: float | None


class PhotoOrder(TypedDict):
    """Whether the photos are a sequence: ``reason`` is ``exif_time_increasing`` (ordered),
    ``several_cameras``, ``no_exif_time`` (some photo has none) or ``exif_time_not_increasing``."""

    ordered: bool
    reason: str


class PhotoFrames(TypedDict):
    """What :func:`prepare_photo_frames` returns: the photo set's ``frames.json`` (the shape of
    the video path's, with ``video`` describing the set and no per-frame scores)."""

    frames: list[PhotoFrame]
    num_decoded: int
    input_kind: str
    video: dict[str, Any]
    cameras: list[PhotoCamera]
    camera_mode: CameraMode
    order: PhotoOrder
    focal_prior: SharedFocalPrior | None
    focal_prior_px: float | None
    warnings: list[dict[str, Any]]


@dataclass(frozen=True)
class PhotoExif:
    """What the grouping and ordering read from one photo's EXIF (``None``: absent).

    Attributes:
        make, model: IFD0 ``Make`` / ``Model``, stripped.
        focal_length_mm: ``FocalLength`` (mm), rounded to 0.01 mm.
        focal_35mm: ``FocalLengthIn35mmFilm`` (mm).
        time: ``DateTimeOriginal`` + ``.SubSecTimeOriginal`` when present (sorts as text).
    """

    make: str | None = None
    model: str | None = None
    focal_length_mm: float | None = None
    focal_35mm: float | None = None
    time: str | None = None

    @property
    def has_camera(self) -> bool:
        """Whether the EXIF names a camera (make, model or focal length)."""
        return any(v is not None for v in (self.make, self.model, self.focal_length_mm,
                                           self.focal_35mm))


@dataclass(frozen=True)
class CameraGrouping:
    """:func:`group_cameras`'s answer: ``group[i]`` = camera index of photo ``i`` (0, 1, ...
    in order of first appearance) and the ``mode`` (``single``: one camera; ``per_group``:
    several by EXIF and size; ``per_image``: one camera per photo)."""

    group: list[int]
    mode: CameraMode

    @property
    def cameras(self) -> int:
        """Number of cameras."""
        return max(self.group, default=-1) + 1


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


def _exif_text(ifd: Any, tag: int) -> str | None:
    """A printable EXIF text (at most 64 characters), or ``None``."""
    raw = ifd.get(tag)
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str):
        return None
    text = "".join(c for c in raw if c.isprintable()).strip().strip("\x00")[:64]
    return text or None


def read_photo_exif(path: str | os.PathLike) -> PhotoExif:
    """The camera and time EXIF of a photo (:class:`PhotoExif`); all ``None`` for a photo
    without EXIF (PNG, stripped JPEG). Never raises for bad EXIF or an unreadable file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            ifd0 = im.getexif()
            sub = ifd0.get_ifd(EXIF_IFD)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return PhotoExif()
    f_mm = _exif_number(sub, TAG_FOCAL_LENGTH)
    time = _exif_text(sub, TAG_DATETIME_ORIGINAL)
    sub_s = _exif_text(sub, TAG_SUBSEC_ORIGINAL)
    if time and sub_s and sub_s.isdigit():
        time = f"{time}.{sub_s}"
    return PhotoExif(make=_exif_text(ifd0, TAG_MAKE), model=_exif_text(ifd0, TAG_MODEL),
                     focal_length_mm=None if f_mm is None else round(f_mm, 2),
                     focal_35mm=_exif_number(sub, TAG_FOCAL_35MM), time=time)


def group_cameras(exifs: Sequence[PhotoExif], sizes: Sequence[tuple[int, int]]) -> CameraGrouping:
    """Group photos into cameras (issue 15).

    Key: EXIF make, model, focal length (mm and 35 mm equivalent) and the photo's size (px)
    after orientation, so one phone's portrait and landscape shots are two cameras and a zoom
    change is another; photos without camera EXIF are keyed by size alone. A set where no photo
    has camera EXIF and the sizes differ gets one camera per photo (``per_image``: nothing says
    which photos share a lens).

    Args:
        exifs: per photo, in the set's order.
        sizes: per photo, (width, height) in px after orientation.

    Returns:
        the camera index of each photo (first appearance order) and the mode.

    Raises:
        ValueError: ``exifs`` and ``sizes`` differ in length.
    """
    if len(exifs) != len(sizes):
        raise ValueError("one EXIF record and one size per photo")
    if not any(e.has_camera for e in exifs) and len(set(sizes)) > 1:
        return CameraGrouping(list(range(len(sizes))), "per_image")
    index: dict[tuple[object, ...], int] = {}
    group = []
    for e, size in zip(exifs, sizes, strict=True):
        key = (e.make, e.model, e.focal_length_mm, e.focal_35mm, *size)
        group.append(index.setdefault(key, len(index)))
    return CameraGrouping(group, "single" if len(index) <= 1 else "per_group")


def photo_order(times: Sequence[str | None], cameras: int) -> PhotoOrder:
    """Whether photos in name order are a sequence (sequential matching) or unordered.

    Ordered only when they come from one camera and every ``DateTimeOriginal`` is present and
    never decreases in name order (equal times allowed: bursts within a second), and not all are
    equal (then the times say nothing).

    Args:
        times: per photo in name order, :attr:`PhotoExif.time` (text that sorts by time).
        cameras: number of camera groups.
    """
    if cameras > 1:
        return {"ordered": False, "reason": "several_cameras"}
    known = [t for t in times if t]
    if len(known) != len(times) or not known:
        return {"ordered": False, "reason": "no_exif_time"}
    if any(b < a for a, b in zip(known, known[1:], strict=False)) or known[0] == known[-1]:
        return {"ordered": False, "reason": "exif_time_not_increasing"}
    return {"ordered": True, "reason": "exif_time_increasing"}


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
    """One focal prior for the photos of one camera: the median of their EXIF focal lengths
    when every photo has one and they agree within ``FOCAL_PRIOR_AGREEMENT``; else ``None``.
    Returns ``{"focal_px", "source", "photos"}``."""
    known = [p for p in priors if p is not None]
    if not known or len(known) != len(priors):
        return None
    f = sorted(p["focal_px"] for p in known)
    if f[-1] > f[0] * (1.0 + FOCAL_PRIOR_AGREEMENT):
        return None
    mid = f[len(f) // 2] if len(f) % 2 else 0.5 * (f[len(f) // 2 - 1] + f[len(f) // 2])
    return {"focal_px": round(mid, 3), "source": known[0]["source"], "photos": len(known)}


def _write_frame(src: Path, out: Path, max_image_size: int | None,
                 jpeg_quality: int) -> tuple[int, int, int, int]:
    """Decode ``src`` upright, scale it, write it to ``out``; returns (frame width, height,
    photo width, height) in px, both upright."""
    import cv2

    img = cv2.imread(str(src), cv2.IMREAD_COLOR)  # applies EXIF orientation
    if img is None:
        raise not_image_error(src.name, "it cannot be decoded")
    h0, w0 = img.shape[:2]
    if max_image_size and max(h0, w0) > max_image_size:
        s = max_image_size / max(h0, w0)
        img = cv2.resize(img, (max(1, round(w0 * s)), max(1, round(h0 * s))),
                         interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    if not cv2.imwrite(str(out), img, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]):
        raise PipelineError("pipeline_error", details={"reason": f"cannot write {out.name}"})
    return w, h, w0, h0


def _cameras(frames: list[PhotoFrame], exifs: list[PhotoExif], photo_sizes: list[tuple[int, int]],
             priors: list[FocalPrior | None], n: int) -> list[PhotoCamera]:
    cams: list[PhotoCamera] = []
    for k in range(n):
        idx = [i for i, f in enumerate(frames) if f["camera"] == k]
        e, first = exifs[idx[0]], frames[idx[0]]
        prior = shared_focal_prior([priors[i] for i in idx])
        cams.append({"camera": k, "frames": [frames[i]["file"] for i in idx],
                     "width": first["width"], "height": first["height"],
                     "photo_width": photo_sizes[idx[0]][0],
                     "photo_height": photo_sizes[idx[0]][1], "make": e.make, "model": e.model,
                     "focal_length_mm": e.focal_length_mm, "focal_35mm": e.focal_35mm,
                     "focal_prior": prior,
                     "focal_prior_px": None if prior is None else prior["focal_px"]})
    return cams


def prepare_photo_frames(input_dir: str | os.PathLike, frames_dir: str | os.PathLike,
                         max_image_size: int | None = None,
                         jpeg_quality: int = 95) -> PhotoFrames:
    """Decode every photo of ``input_dir`` upright (EXIF orientation applied by OpenCV), scale
    its longest side to at most ``max_image_size`` px (INTER_AREA) and write it to
    ``frames_dir/frame_NNNNN.jpg`` (no EXIF, so COLMAP sees the same upright pixels); group the
    photos into cameras (:func:`group_cameras`) and decide their order (:func:`photo_order`).

    Returns:
        ``frames.json``: ``{"frames": [{"file", "source", "width", "height", "exif_focal_px",
        "camera", "exif_time"}], "num_decoded": int, "video": {"kind": "images", "images": int,
        "width": int, "height": int, "cameras": int}`` (the size of the first camera's frames),
        ``"input_kind": "images"``, ``"cameras": [PhotoCamera]``, ``"camera_mode"``,
        ``"order": {"ordered", "reason"}``, ``"focal_prior_px"``, ``"focal_prior"`` (the
        camera's, for a set of one camera; ``None`` with several: each has its own),
        ``"warnings": []}``.

    Raises:
        PipelineError("unsupported_image"): a photo cannot be decoded;
        PipelineError("too_few_frames"): fewer than ``MIN_PHOTOS`` photos.
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
    exifs: list[PhotoExif] = []
    photo_sizes: list[tuple[int, int]] = []
    for i, name in enumerate(names):
        file = f"frame_{i:05d}.jpg"
        w, h, w0, h0 = _write_frame(src / name, out / file, max_image_size, jpeg_quality)
        exif = exif_focal_px(src / name, w, h)
        priors.append(exif)
        exifs.append(read_photo_exif(src / name))
        photo_sizes.append((w0, h0))
        frames.append({"file": file, "source": name, "width": w, "height": h,
                       "exif_focal_px": None if exif is None else round(exif["focal_px"], 3),
                       "camera": 0, "exif_time": exifs[-1].time})
    grouping = group_cameras(exifs, photo_sizes)
    for f, k in zip(frames, grouping.group, strict=True):
        f["camera"] = k
    cams = _cameras(frames, exifs, photo_sizes, priors, grouping.cameras)
    prior = cams[0]["focal_prior"] if len(cams) == 1 else None
    return {"frames": frames, "num_decoded": len(frames), "input_kind": "images",
            "video": {"kind": "images", "images": len(frames), "width": cams[0]["width"],
                      "height": cams[0]["height"], "cameras": len(cams)},
            "cameras": cams, "camera_mode": grouping.mode,
            "order": photo_order([e.time for e in exifs], len(cams)),
            "focal_prior": prior, "focal_prior_px": None if prior is None else prior["focal_px"],
            "warnings": []}


def photo_camera_record(frames_json: Mapping[str, Any],
                        features: Mapping[str, Any] | None) -> list[dict[str, Any]] | None:
    """``results.photo_cameras`` of a photo set: each camera group of ``frames.json``
    (:class:`PhotoCamera`, its frame list replaced by a count) with the COLMAP ``camera_id``
    it got (the features stage's ``camera_ids``; ``None`` when not recorded); ``None`` for a
    video."""
    cams = frames_json.get("cameras")
    if not cams:
        return None
    ids = list((features or {}).get("camera_ids") or [])
    out = []
    for k, cam in enumerate(cams):
        rec = {key: v for key, v in cam.items() if key not in ("frames", "focal_prior")}
        rec.update(camera_id=ids[k] if k < len(ids) else None, frames=len(cam["frames"]))
        out.append(rec)
    return out
