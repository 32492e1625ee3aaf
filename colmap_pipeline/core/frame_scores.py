"""Per-frame analysis: the small gray image every decoded frame is judged on, its exposure,
contrast, sharpness and texture, and the verdict "black / overexposed / blank / usable";
plus the output image (scaled, colour-correct, rotated) of a frame that is kept.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TypedDict

import av
import cv2
import numpy as np

from .frame_colour import LumaLut, frame_to_bgr, frame_trc, full_range, luma_plane
from .video_probe import norm_rotation, rotate

#: JPEG quality of the extracted frames (OpenCV ``IMWRITE_JPEG_QUALITY``, 0-100).
JPEG_QUALITY = 95
#: Long side (px) of the gray image every decoded frame is analysed at (sharpness, exposure,
#: texture, motion). A fixed size makes the absolute thresholds below resolution independent;
#: downscaling first also makes the variance of the Laplacian (Pech-Pacheco et al., ICPR 2000,
#: "Diatom autofocusing in brightfield microscopy") cheap and less sensitive to sensor noise.
ANALYSIS_SIDE = 480
#: Exposure: a frame is *black* when 98% of its pixels are darker than this (8-bit full-range
#: luma). Fades to black and lens-cap frames fall far below; a dim but lit room does not.
BLACK_P98 = 40
#: ... and *overexposed* (blown out) when 98% of its pixels are brighter than this.
OVEREXPOSED_P2 = 225
#: A frame is *blank* when its luma standard deviation is below this (a uniform wall, a frame
#: of one colour), or its coarse texture (:data:`TEXTURE_MIN`) is below that threshold.
BLANK_STD = 4.0
#: Coarse texture = variance of the Laplacian of the analysis image downscaled 4x (120 px long
#: side): blur by a few px leaves it high, a featureless surface does not. Measured: random
#: texture scenes 300-3000, GoPro clips 60-900, smooth gradients / flat walls with sensor noise < 5.
TEXTURE_MIN = 8.0
#: Absolute sharpness below which a frame counts as blurry whatever the clip (analysis image
#: of ``ANALYSIS_SIDE`` px). Gaussian blur sigma 4 px on 480 px scenes gives 2-6; the sharpest
#: GoPro frames 150-900; EuRoC 60-90.
BLUR_ABSOLUTE = 10.0
#: Reasons of :func:`exposure_reason`: a frame dropped for one of them is not *usable*.
EXPOSURE_REASONS = ("black", "overexposed", "blank")


class Scores(TypedDict):
    """What :func:`frame_scores` measures on an analysis image."""

    brightness: float
    contrast: float
    p2: int
    p98: int
    sharpness: float
    texture: float


def fit(w: int, h: int, side: int) -> tuple[int, int]:
    """(w, h) scaled so the long side is at most ``side`` (never up), each >= 1 px."""
    s = min(1.0, side / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s))


def _shrink(img: np.ndarray, side: int) -> np.ndarray:
    """Downscale ``img`` to long side ``side``: integer box filter first (cheap), then area."""
    h, w = img.shape[:2]
    k = max(1, max(h, w) // side)
    if k > 1:
        img = cv2.resize(img, (w // k, h // k), interpolation=cv2.INTER_AREA)
    tw, th = fit(w, h, side)
    if max(img.shape[:2]) > side:
        img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
    return img


def analysis_gray(frame: av.VideoFrame, luts: LumaLut | None = None) -> np.ndarray:
    """8-bit full-range SDR luma of ``frame`` with long side ``ANALYSIS_SIDE`` (not rotated).

    Reads the luma plane directly (8-16 bit, limited or full range, HDR tone-mapped through
    :class:`.frame_colour.LumaLut`); other formats (RGB, palette...) go through swscale at the
    small size.
    """
    luts = luts or LumaLut()
    got = luma_plane(frame)
    if got is None:
        w, h = fit(frame.width, frame.height, ANALYSIS_SIDE)
        g = frame.reformat(width=w, height=h, format="gray").to_ndarray()
        lut = luts.get(8, True, frame_trc(frame))
        return g if lut is None else lut[g]
    y, bits = got
    y = _shrink(y, ANALYSIS_SIDE)
    lut = luts.get(bits, full_range(frame), frame_trc(frame))
    return np.ascontiguousarray(y if lut is None else lut[y])


def frame_scores(gray: np.ndarray) -> Scores:
    """Exposure, contrast, sharpness and texture of an analysis image (uint8, H x W).

    Returns ``{"brightness": mean luma 0-255, "contrast": std, "p2", "p98": percentiles,
    "sharpness": variance of the Laplacian (Pech-Pacheco et al., ICPR 2000), "texture":
    variance of the Laplacian of the image downscaled 4x}``.
    """
    hist = cv2.calcHist([gray], [0], None, [256], [0, 256]).ravel()
    cdf = np.cumsum(hist) / max(1.0, hist.sum())
    p2, p98 = int(np.searchsorted(cdf, 0.02)), int(np.searchsorted(cdf, 0.98))
    mean, std = cv2.meanStdDev(gray)
    lap = cv2.Laplacian(gray, cv2.CV_16S)
    _, lstd = cv2.meanStdDev(lap)
    small = cv2.resize(gray, (max(1, gray.shape[1] // 4), max(1, gray.shape[0] // 4)),
                       interpolation=cv2.INTER_AREA)
    _, tstd = cv2.meanStdDev(cv2.Laplacian(small, cv2.CV_16S))
    return {"brightness": round(float(mean[0, 0]), 2), "contrast": round(float(std[0, 0]), 2),
            "p2": p2, "p98": p98, "sharpness": round(float(lstd[0, 0]) ** 2, 3),
            "texture": round(float(tstd[0, 0]) ** 2, 3)}


def exposure_reason(s: Scores | dict) -> str | None:
    """``"black"``, ``"overexposed"``, ``"blank"`` or ``None`` (usable) for :func:`frame_scores`
    (only ``p98``, ``p2``, ``contrast`` and ``texture`` are read)."""
    if s["p98"] < BLACK_P98:
        return "black"
    if s["p2"] > OVEREXPOSED_P2:
        return "overexposed"
    if s["contrast"] < BLANK_STD or s["texture"] < TEXTURE_MIN:
        return "blank"
    return None


def output_image(frame: av.VideoFrame, max_image_size: int | None) -> np.ndarray:
    """BGR uint8 image of ``frame`` scaled (swscale, area) so the long side is at most
    ``max_image_size``, tone-mapped when the transfer is PQ/HLG, then rotated for display.

    The full-resolution RGB image is never built: swscale scales and converts in one pass,
    so a 4K or 8K frame costs only its decoded YUV planes plus the small output.
    """
    w, h = frame.width, frame.height
    if max_image_size:
        w, h = fit(w, h, max_image_size)
    return rotate(frame_to_bgr(frame, w, h), norm_rotation(frame.rotation))


def write_jpeg(path: Path, img: np.ndarray) -> None:
    """Write ``img`` as a JPEG (quality ``JPEG_QUALITY``) atomically: temporary file + rename.

    Raises:
        OSError: OpenCV could not write the file.
    """
    tmp = path.with_name(f".{path.name}.tmp.jpg")
    if not cv2.imwrite(str(tmp), img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"could not write {tmp}")
    os.replace(tmp, path)
