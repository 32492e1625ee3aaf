"""Video probing, sharp-frame selection and a cheap camera-motion check.

Everything here uses PyAV (FFmpeg) for decoding and OpenCV for image work; nothing imports
pycolmap or any web/database framework, so ``python -m colmap_pipeline probe`` stays fast.

Facts this module relies on (checked with PyAV 18.1 / OpenCV 5.0):

* A container can hold audio, data (GoPro GPMF/timecode) and attached-picture (cover art)
  streams beside the real video; the video stream is chosen explicitly (:func:`_pick_video_stream`).
* PyAV exposes the display-matrix rotation as ``VideoFrame.rotation`` (degrees,
  counter-clockwise, FFmpeg's ``av_display_rotation_get`` convention) but does not rotate the
  pixels; OpenCV's ``VideoCapture`` does. :func:`_rotate` applies it the way OpenCV / ``ffmpeg``'s
  autorotate display it (the tests check this against ``cv2.VideoCapture``).
* ``VideoFrame.to_ndarray(format="bgr24")`` honours ``color_range`` (full-range ``yuvj420p``
  stays full range: on the GoPro sample the BGR gray level is 0.998 * Y - 1).
* swscale converts bit depth and YUV matrix but ignores the transfer unless asked; FFmpeg 8's
  own tone mapping (``dst_color_trc``) took 4-8 s to set up per reformatter, so PQ/HLG frames
  are tone-mapped here with a documented lookup (:func:`_tone_map`).

Issue 3 layout: colour (:class:`_LumaLut`, :func:`_tone_map`), per-frame analysis
(:func:`analysis_gray`, :func:`frame_scores`, :func:`exposure_reason`), selection
(:func:`extract_frames`), motion (:func:`measure_motion`) and degenerate clips
(:func:`measure_parallax`, :func:`diagnose`, :func:`check_clip`).
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import av
import cv2
import numpy as np

from ..errors import PipelineError

log = logging.getLogger(__name__)

#: JPEG quality of the extracted frames (OpenCV ``IMWRITE_JPEG_QUALITY``, 0-100).
JPEG_QUALITY = 95
#: Fewer selected frames than this cannot give a reconstruction (two views + one to verify).
MIN_FRAMES = 3
#: FFmpeg "video" decoders that render text (ANSI art etc.): FFmpeg's ``tty`` demuxer opens any
#: ``.txt`` file as a 640x400 video of its text. Such streams are not camera footage.
TEXT_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})
#: Packets demuxed while probing before a stream is declared undecodable.
PROBE_MAX_PACKETS = 600

# --- motion check ---------------------------------------------------------------------------
#: Longest side (px) of the gray images used by :func:`measure_motion`; motion is reported in
#: pixels of the ORIGINAL frame (scaled back).
MOTION_MAX_SIDE = 640
#: Shi-Tomasi corners (``cv2.goodFeaturesToTrack``; Shi & Tomasi, CVPR 1994) per anchor frame.
MOTION_MAX_CORNERS = 400
#: Minimum corners in an anchor frame for the measurement to mean anything. With fewer (black,
#: flat or blurred video) the check abstains and leaves the verdict to SfM.
MOTION_MIN_CORNERS = 20
#: Pyramidal Lucas-Kanade (Bouguet 2000, OpenCV ``calcOpticalFlowPyrLK``): window and levels.
#: 4 levels x 21 px window follows displacements of roughly 21 * 2**4 = 336 px.
LK_WIN = 21
LK_LEVELS = 4
#: A track is kept when tracking it forward then backward lands within this many px (of the
#: downscaled image) of where it started (forward-backward check, Kalal et al., ICPR 2010).
LK_FB_MAX_ERR = 1.0
#: When fewer than this fraction of an anchor's tracks survive, re-detect corners in the
#: current frame (start a new segment) and count the segment's motion.
MOTION_RESEED_FRACTION = 0.5
#: If fewer than this fraction of tracks survive a single step between consecutive kept
#: frames, tracking was lost across a large jump: that counts as motion, not as a static camera.
MOTION_LOST_FRACTION = 0.2
#: Pass threshold: accumulated median image motion as a fraction of the image diagonal.
#: Tuned on the real clips (30 frames each, see the report in ``tests/test_video.py``):
#: EuRoC static drone ~0.002 (1.7 px of 892), GoPro walk and Karma drone > 0.3. 0.02 (about
#: 18 px on a 752x480 frame, 19 px on 848x480) sits an order of magnitude above sensor
#: jitter and far below any clip that reconstructs.
MIN_MOTION_FRACTION = 0.02


def _probe_error(path: str | os.PathLike, reason: str) -> PipelineError:
    return PipelineError("no_video_stream", details={"file": Path(path).name, "reason": reason})


def _pick_video_stream(container: av.container.InputContainer):
    """Return the main video stream or ``None``.

    Skips attached pictures (cover art), timed thumbnails and still images (by
    ``disposition``), streams without a decoder and text renderers (``TEXT_CODECS``); prefers
    the largest resolution, then the ``default`` disposition, then the lowest index.
    """
    skip = (av.stream.Disposition.attached_pic | av.stream.Disposition.timed_thumbnails
            | av.stream.Disposition.still_image)
    candidates = []
    for s in container.streams.video:
        if s.disposition & skip:
            continue
        cc = s.codec_context
        if cc is None or not cc.name or cc.name in TEXT_CODECS:
            continue
        area = int(cc.width or 0) * int(cc.height or 0)
        is_default = bool(s.disposition & av.stream.Disposition.default)
        candidates.append((-area, not is_default, s.index, s))
    if not candidates:
        return None
    candidates.sort(key=lambda c: c[:3])
    return candidates[0][3]


def _first_frame(container, stream):
    """Decode until the first frame of ``stream``; ``None`` if none within the packet budget."""
    n = 0
    for packet in container.demux(stream):
        n += 1
        try:
            frames = packet.decode()
        except av.FFmpegError:
            frames = []
        if frames:
            return frames[0]
        if n >= PROBE_MAX_PACKETS:
            return None
    return None


def _fps(stream) -> float | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return None


def _duration_s(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _start_s(stream) -> float | None:
    if stream.start_time is not None and stream.time_base:
        return float(stream.start_time * stream.time_base)
    return None


def _norm_rotation(deg: float | int | None) -> int:
    """Rotation in {0, 90, 180, 270} (counter-clockwise); other angles snap to the nearest 90."""
    if not deg:
        return 0
    return int(round(float(deg) / 90.0)) * 90 % 360


def _rotate(img: np.ndarray, rotation_ccw: int) -> np.ndarray:
    """Rotate ``img`` (H x W [x C]) counter-clockwise by ``rotation_ccw`` in {0,90,180,270}.

    ``VideoFrame.rotation`` is the counter-clockwise angle by which the stored picture must be
    turned for display (``av_display_rotation_get``); ``ffmpeg`` autorotate and OpenCV do the
    same, e.g. a phone's portrait clip tagged ``rotate=90`` reads back as -90 (= 270) and is
    turned 90 degrees clockwise.
    """
    if rotation_ccw == 90:
        return cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)
    if rotation_ccw == 180:
        return cv2.rotate(img, cv2.ROTATE_180)
    if rotation_ccw == 270:
        return cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)
    return img


def probe_video(path: str | os.PathLike) -> dict:
    """Describe the main video stream of ``path`` and prove that it decodes.

    Returns:
        ``{"container": str (FFmpeg format name), "codec": str, "width": int, "height": int``
        (px, after applying rotation), ``"rotation": int`` (deg counter-clockwise, 0/90/180/270),
        ``"fps": float | None, "duration_s": float | None, "num_frames": int | None``
        (container count, else duration x fps), ``"pix_fmt": str | None, "stream_index": int,
        "streams": [{"index", "type", "codec"}]}``.

    Raises:
        PipelineError("no_video_stream"): the file cannot be opened by FFmpeg (not a media file,
            empty, missing), holds no video stream other than cover art, or its video stream
            yields no frame within the first ``PROBE_MAX_PACKETS`` packets.
        PipelineError("video_truncated"): the stream declares frames or a duration but none
            decodes (a file cut short, e.g. an interrupted upload or recording).
    """
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise _probe_error(path, f"not a readable media file: {exc}") from None
    with container:
        streams = [{"index": s.index, "type": s.type,
                    "codec": (s.codec_context.name if s.codec_context is not None else None)}
                   for s in container.streams]
        stream = _pick_video_stream(container)
        if stream is None:
            raise _probe_error(path, "no video stream")
        frame = _first_frame(container, stream)
        if frame is None:
            if stream.frames or stream.duration:  # declared content that does not decode
                raise PipelineError("video_truncated", details={
                    "file": Path(path).name, "frames_decoded": 0,
                    "declared_frames": int(stream.frames or 0),
                    "reason": "the video stream declares frames but none decodes"})
            raise _probe_error(path, "the video stream yields no decodable frame")
        rotation = _norm_rotation(frame.rotation)
        width, height = frame.width, frame.height
        if rotation in (90, 270):
            width, height = height, width
        fps = _fps(stream)
        duration = _duration_s(container, stream)
        num_frames = stream.frames or None
        if num_frames is None and fps and duration:
            num_frames = int(round(fps * duration))
        return {
            "container": container.format.name,
            "codec": stream.codec_context.name,
            "width": int(width),
            "height": int(height),
            "rotation": rotation,
            "fps": fps,
            "duration_s": duration,
            "num_frames": num_frames,
            "pix_fmt": stream.codec_context.pix_fmt,
            "stream_index": stream.index,
            "streams": streams,
        }


# --------------------------------------------------------------------------------------------
# Colour: bit depth, range, HDR transfer
# --------------------------------------------------------------------------------------------

#: 8-bit pixel formats whose first plane is the luma (or gray) image, read without conversion.
_LUMA_FIRST_FORMATS = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p",
                                 "yuvj444p", "yuv440p", "yuvj440p", "yuv411p", "yuv410p",
                                 "nv12", "nv21", "gray"})
#: 9-16-bit little-endian planar formats whose first plane is luma: name -> bits per sample.
_LUMA_FIRST_HI_FORMATS = {f"{p}{b}le": int(b) for p in ("yuv420p", "yuv422p", "yuv444p", "gray")
                          for b in ("9", "10", "12", "14", "16")}
#: FFmpeg ``AVColorTransferCharacteristic`` values of the HDR transfers (ITU-T H.273).
TRC_PQ = 16   # SMPTE ST 2084 (HDR10, Dolby Vision profile 8.1, iPhone "HDR" is HLG)
TRC_HLG = 18  # ARIB STD-B67 / ITU-R BT.2100 HLG
#: SDR reference white in nits (ITU-R BT.2408: "HDR Reference White" = 203 cd/m2); HDR light at
#: this level maps to SDR mid-high gray, brighter light is compressed (see :func:`_tone_map`).
HDR_REFERENCE_WHITE_NITS = 203.0
#: Peak luminance assumed for the tone map (nits): PQ masters are commonly graded to 1000 nits
#: and BT.2100 HLG's nominal display peak is 1000 nits.
HDR_PEAK_NITS = 1000.0
#: BT.2100 HLG OOTF system gamma at a 1000-nit display.
HLG_SYSTEM_GAMMA = 1.2
#: Linear BT.2020 RGB -> linear BT.709 RGB (ITU-R BT.2087-0, section 2).
BT2020_TO_BT709 = np.array([[1.6605, -0.5876, -0.0728],
                            [-0.1246, 1.1329, -0.0083],
                            [-0.0182, -0.1006, 1.1187]], np.float32)


def _pq_eotf(e: np.ndarray) -> np.ndarray:
    """SMPTE ST 2084 EOTF: non-linear signal in [0, 1] -> display light in nits (0-10000)."""
    m1, m2 = 2610 / 16384, 2523 / 4096 * 128
    c1, c2, c3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
    ep = np.power(np.clip(e, 0, 1), 1 / m2)
    return 10000.0 * np.power(np.maximum(ep - c1, 0) / (c2 - c3 * ep), 1 / m1)


def _hlg_eotf(e: np.ndarray) -> np.ndarray:
    """ITU-R BT.2100 HLG inverse OETF, then a per-channel OOTF ``peak * E**1.2`` (nits).

    (The standard OOTF applies the system gamma to luminance; per channel is the usual simple
    approximation and keeps this a lookup table.)"""
    a = 0.17883277
    b, c = 1 - 4 * a, 0.5 - a * math.log(4 * a)
    e = np.clip(e, 0, 1)
    lin = np.where(e <= 0.5, e * e / 3, (np.exp((e - c) / a) + b) / 12)
    return HDR_PEAK_NITS * np.power(lin, HLG_SYSTEM_GAMMA)


def _tone_map(nits: np.ndarray) -> np.ndarray:
    """HDR light (nits) -> SDR signal in [0, 1].

    Extended Reinhard (Reinhard et al., SIGGRAPH 2002, eq. 4) on light relative to reference
    white (``HDR_REFERENCE_WHITE_NITS``) with the white point at ``HDR_PEAK_NITS``, then the
    BT.1886 inverse EOTF (gamma 2.4). Simple on purpose: it keeps HDR footage from looking
    washed out or clipped for feature detection; it is not a grading tool."""
    x = np.maximum(nits, 0) / HDR_REFERENCE_WHITE_NITS
    wp = HDR_PEAK_NITS / HDR_REFERENCE_WHITE_NITS
    y = np.clip(x * (1 + x / (wp * wp)) / (1 + x), 0, 1)
    return np.power(y, 1 / 2.4)


def _hdr_eotf(trc: int):
    return _pq_eotf if trc == TRC_PQ else _hlg_eotf


def _frame_trc(frame: av.VideoFrame) -> int:
    try:
        return int(frame.color_trc or 0)
    except (AttributeError, ValueError, TypeError):
        return 0


def _full_range(frame: av.VideoFrame) -> bool:
    """True for full (JPEG) range: ``yuvj*`` formats or ``color_range`` = 2 (AVCOL_RANGE_JPEG)."""
    if frame.format.name.startswith("yuvj") or frame.format.name.startswith("gray"):
        return True
    try:
        return int(frame.color_range or 0) == 2
    except (AttributeError, ValueError, TypeError):
        return False


class _LumaLut:
    """Cached lookup tables: luma code value (any bit depth, limited or full range, SDR or
    HDR transfer) -> 8-bit full-range SDR luma. Limited range maps 16..235 (x 2**(bits-8)) to
    0..255 (ITU-R BT.601/709 quantisation); HDR transfers go through :func:`_tone_map`."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, bool, int], np.ndarray] = {}

    def get(self, bits: int, full: bool, trc: int) -> np.ndarray | None:
        hdr = trc in (TRC_PQ, TRC_HLG)
        if bits == 8 and full and not hdr:
            return None
        key = (bits, full, trc if hdr else 0)
        lut = self._cache.get(key)
        if lut is None:
            code = np.arange(1 << bits, dtype=np.float64)
            scale = float(1 << (bits - 8))
            e = code / ((1 << bits) - 1) if full else (code - 16 * scale) / (219 * scale)
            e = np.clip(e, 0, 1)
            if hdr:
                e = _tone_map(_hdr_eotf(trc)(e))
            lut = np.clip(np.round(e * 255), 0, 255).astype(np.uint8)
            self._cache[key] = lut
        return lut


# --------------------------------------------------------------------------------------------
# Per-frame analysis
# --------------------------------------------------------------------------------------------

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
#: A window's sharpest frame is dropped as *blurry* when its sharpness (variance of the
#: Laplacian at ``ANALYSIS_SIDE``) is below this fraction of the median over all windows'
#: sharpest frames (i.e. the whole window was motion-blurred while the clip is not).
BLUR_RELATIVE = 0.2
#: Absolute sharpness below which a frame counts as blurry whatever the clip (analysis image
#: of ``ANALYSIS_SIDE`` px). Gaussian blur sigma 4 px on 480 px scenes gives 2-6; the sharpest
#: GoPro frames 150-900; EuRoC 60-90.
BLUR_ABSOLUTE = 10.0
#: Near-duplicate: the median image motion (LK tracks, px of the analysis image) from the last
#: kept frame is below this. Static clips (EuRoC) move 0.05-0.3 px between windows; the slowest
#: real clip (Karma drone at 100 frames) moves 0.6-2 px per window.
NEAR_DUPLICATE_PX = 0.5
#: Corners tracked for the near-duplicate test (LK costs ~38 ms per candidate at 480 px with
#: 400 corners). Tried 100: GoPro at cap 100 then kept 89-93 instead of 98-100 (noisier median).
NEAR_DUPLICATE_CORNERS = MOTION_MAX_CORNERS
#: A decode that ends this much before the stream's declared end (s, or this fraction of the
#: duration, whichever is larger) after a decoder error is reported as truncated.
TRUNCATED_SLACK_S = 0.5
TRUNCATED_SLACK_FRACTION = 0.05
#: Decoder threads. FFmpeg's frame threading keeps about one frame in flight per thread, so
#: "auto" (cores + 1) on a 16-core machine holds ~17 decoded 4K frames (12 MiB each, plus
#: references); 4 threads keep the peak bounded and decode at about the same speed on the
#: 2-4 cores a job gets (measured: 1080p, 2 cores: auto 8.3 s / 67 MiB, 4 threads 6.2 s / 74 MiB).
DECODE_MAX_THREADS = 4
#: Target share of the cap (the issue's "at least 80% of the cap"): when fewer windows than
#: this fraction of the cap hold a usable frame (black fades, blown-out stretches, a
#: truncated tail, VFR gaps) while more usable frames exist, a second decode spreads the cap
#: over the usable frames' time only (``selection.refilled``).
TARGET_FILL = 0.8


def _luma_plane(frame: av.VideoFrame) -> tuple[np.ndarray, int] | None:
    """The luma plane (H x W, uint8 or uint16) and its bit depth, without conversion; ``None``
    for formats whose first plane is not luma."""
    name = frame.format.name
    plane = frame.planes[0]
    if name in _LUMA_FIRST_FORMATS:
        buf = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        return buf[:, :frame.width], 8
    bits = _LUMA_FIRST_HI_FORMATS.get(name)
    if bits is not None:
        buf = np.frombuffer(plane, np.uint16).reshape(plane.height, plane.line_size // 2)
        return buf[:, :frame.width], bits
    return None


def _fit(w: int, h: int, side: int) -> tuple[int, int]:
    """(w, h) scaled so the long side is at most ``side`` (never up), each >= 1 px."""
    s = min(1.0, side / max(w, h))
    return max(1, round(w * s)), max(1, round(h * s))


def _shrink(img: np.ndarray, side: int) -> np.ndarray:
    """Downscale ``img`` to long side ``side``: integer box filter first (cheap), then area."""
    h, w = img.shape[:2]
    k = max(1, max(h, w) // side)
    if k > 1:
        img = cv2.resize(img, (w // k, h // k), interpolation=cv2.INTER_AREA)
    tw, th = _fit(w, h, side)
    if max(img.shape[:2]) > side:
        img = cv2.resize(img, (tw, th), interpolation=cv2.INTER_AREA)
    return img


def analysis_gray(frame: av.VideoFrame, luts: _LumaLut | None = None) -> np.ndarray:
    """8-bit full-range SDR luma of ``frame`` with long side ``ANALYSIS_SIDE`` (not rotated).

    Reads the luma plane directly (8-16 bit, limited or full range, HDR tone-mapped through
    :class:`_LumaLut`); other formats (RGB, palette...) go through swscale at the small size.
    """
    luts = luts or _LumaLut()
    got = _luma_plane(frame)
    if got is None:
        w, h = _fit(frame.width, frame.height, ANALYSIS_SIDE)
        g = frame.reformat(width=w, height=h, format="gray").to_ndarray()
        lut = luts.get(8, True, _frame_trc(frame))
        return g if lut is None else lut[g]
    y, bits = got
    y = _shrink(y, ANALYSIS_SIDE)
    lut = luts.get(bits, _full_range(frame), _frame_trc(frame))
    return np.ascontiguousarray(y if lut is None else lut[y])


def frame_scores(gray: np.ndarray) -> dict:
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


def exposure_reason(s: dict) -> str | None:
    """``"black"``, ``"overexposed"``, ``"blank"`` or ``None`` (usable) for :func:`frame_scores`."""
    if s["p98"] < BLACK_P98:
        return "black"
    if s["p2"] > OVEREXPOSED_P2:
        return "overexposed"
    if s["contrast"] < BLANK_STD or s["texture"] < TEXTURE_MIN:
        return "blank"
    return None


def _track_median(g0: np.ndarray, p0: np.ndarray, g1: np.ndarray) -> float:
    """Median LK displacement (px) of corners ``p0`` from ``g0`` to ``g1``; ``inf`` when fewer
    than ``MOTION_LOST_FRACTION`` of them survive (a jump too big to track = motion)."""
    p1, ok = _track(g0, g1, p0)
    if ok.sum() < max(3, MOTION_LOST_FRACTION * len(p0)):
        return math.inf
    return float(np.median(np.linalg.norm((p1[ok] - p0[ok]).reshape(-1, 2), axis=1)))


def _output_image(frame: av.VideoFrame, max_image_size: int | None) -> np.ndarray:
    """BGR uint8 image of ``frame`` scaled (swscale, area) so the long side is at most
    ``max_image_size``, tone-mapped when the transfer is PQ/HLG, then rotated for display.

    The full-resolution RGB image is never built: swscale scales and converts in one pass,
    so a 4K or 8K frame costs only its decoded YUV planes plus the small output.
    """
    w, h = frame.width, frame.height
    if max_image_size:
        w, h = _fit(w, h, max_image_size)
    trc = _frame_trc(frame)
    interp = "AREA" if (w, h) != (frame.width, frame.height) else None
    if trc in (TRC_PQ, TRC_HLG):
        rgb = frame.reformat(width=w, height=h, format="rgb48le",
                             interpolation=interp).to_ndarray()
        e = rgb.astype(np.float32) / 65535.0
        lin = _hdr_eotf(trc)(e)
        try:
            bt2020 = int(frame.color_primaries or 0) == 9
        except (ValueError, TypeError):
            bt2020 = True
        if bt2020:
            lin = lin @ BT2020_TO_BT709.T
        out = np.clip(np.round(_tone_map(lin) * 255), 0, 255).astype(np.uint8)
        img = cv2.cvtColor(out, cv2.COLOR_RGB2BGR)
    else:
        img = frame.reformat(width=w, height=h, format="bgr24",
                             interpolation=interp).to_ndarray()
    return _rotate(img, _norm_rotation(frame.rotation))


def _write_jpeg(path: Path, img: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp.jpg")
    if not cv2.imwrite(str(tmp), img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"could not write {tmp}")
    os.replace(tmp, path)


def _time_range(container, stream, info: dict) -> tuple[float, float]:
    """(start, end) presentation time in s of ``stream``; demuxes packets if metadata lacks it."""
    start = _start_s(stream)
    duration = info.get("duration_s")
    if start is not None and duration:
        return start, start + duration
    # Fallback (e.g. streams without duration): one demux pass over packet timestamps.
    t_min, t_max = math.inf, -math.inf
    for packet in container.demux(stream):
        if packet.pts is None or packet.time_base is None:
            continue
        t = float(packet.pts * packet.time_base)
        dt = float((packet.duration or 0) * packet.time_base)
        t_min, t_max = min(t_min, t), max(t_max, t + dt)
    container.seek(0)
    if not math.isfinite(t_min) or t_max <= t_min:
        return (start or 0.0), (start or 0.0) + (duration or 0.0)
    return t_min, t_max


def extract_frames(path: str | os.PathLike, out_dir: str | os.PathLike, max_frames: int,
                   max_image_size: int | None = None,
                   progress: Callable[[float, str], None] | None = None) -> dict:
    """Select up to ``max_frames`` sharp, usable, distinct frames and write them as JPEGs.

    Algorithm (one sequential decode; memory bounded by the cap, not by the clip):

    1. The presentation-time range is split into ``max_frames`` equal windows; each frame's
       window comes from its own timestamp (``frame.time``), so variable frame rate clips are
       windowed by time, not by frame count.
    2. Every decoded frame is scored on its analysis image (:func:`analysis_gray`,
       :func:`frame_scores`); black, overexposed and blank frames (:func:`exposure_reason`)
       are dropped.
    3. In each window the sharpest usable frame is the candidate; only it is kept in memory,
       already scaled to ``max_image_size`` (:func:`_output_image`), and written to disk
       when decoding leaves the window.
    4. Candidates below ``BLUR_RELATIVE`` x the median candidate sharpness or below
       ``BLUR_ABSOLUTE`` are dropped as ``blurry``; then, in time order, a candidate whose
       median LK motion from the last kept frame is below ``NEAR_DUPLICATE_PX`` is dropped as
       ``near_duplicate``.
    5. A decoder error stops decoding; what decoded is kept and, when the stream ends early,
       a ``video_truncated`` warning is recorded.
    6. Refill: when fewer than ``TARGET_FILL`` x cap windows had a usable frame but more
       usable frames exist, the windows are re-cut over the usable frames' time alone and
       the clip is decoded once more (steps 2-4 again).

    Args:
        path: video file.
        out_dir: created if needed; receives ``frame_00000.jpg``... (kept frames, time order,
            JPEG quality ``JPEG_QUALITY``).
        max_frames: the cap (>= 1): number of time windows.
        max_image_size: optional cap (px) on the longest output side.
        progress: optional ``progress(fraction in [0, 1], message)``.

    Returns:
        ``{"video": probe_video(path), "frames": [{"index", "file", "timestamp_s",
        "sharpness", "brightness", "motion_px"}]`` (kept), ``"num_decoded": int,
        "scores": [{"timestamp_s", "window", "sharpness", "brightness", "contrast", "texture",
        "motion_px" (None unless it was a candidate), "kept": bool, "reason": None | "black" |
        "overexposed" | "blank" | "not_sharpest" | "blurry" | "near_duplicate", "file"}]``
        (every decoded frame), ``"selection": {"cap", "windows_with_frames", "kept",
        "candidates", "dropped": {reason: count}, "usable": int, "median_sharpness": float |
        None, "analysis_side_px": int, "refilled": bool}, "warnings": [{"code", "message",
        ...}], "truncated": bool}``. ``motion_px`` is in px of the analysis image.

    Raises:
        PipelineError("no_video_stream"): see :func:`probe_video`.
        PipelineError("video_truncated"): decoding failed early and fewer than ``MIN_FRAMES``
            frames decoded.
        PipelineError("too_few_frames"): fewer than ``MIN_FRAMES`` frames decoded.
        ValueError: ``max_frames`` < 1.
    """
    if max_frames < 1:
        raise ValueError("max_frames must be >= 1")
    info = probe_video(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    luts = _LumaLut()
    st: dict = {}

    def flush(best: dict | None) -> None:
        if best is None:
            return
        name = f".cand_{best['window']:05d}.jpg"
        _write_jpeg(out / name, best.pop("image"))
        best["tmp"] = name
        st["candidates"].append(best)

    def run_pass(window_map: dict[int, int] | None, prior: list[dict] | None) -> None:
        """One sequential decode. ``window_map`` (refill pass): decode index -> window for
        the frames usable in the first pass; the others keep their first-pass record."""
        st.update(scores=[], candidates=[], num_decoded=0, decode_error=None, last_t=None)
        scores = st["scores"]
        with av.open(str(path), mode="r") as container:
            stream = container.streams[info["stream_index"]]
            stream.thread_type = "AUTO"
            stream.thread_count = DECODE_MAX_THREADS
            t0, t1 = _time_range(container, stream, info)
            span = max(t1 - t0, 1e-9)
            fps = info.get("fps") or 30.0
            st.update(t0=t0, t1=t1, span=span, fps=fps)
            cur_window, best = -1, None
            try:
                for frame in container.decode(stream):
                    i = st["num_decoded"]
                    t = frame.time if frame.time is not None else t0 + i / fps
                    st["num_decoded"] += 1
                    st["last_t"] = t if st["last_t"] is None else max(st["last_t"], t)
                    if window_map is not None:
                        if i not in window_map:
                            if prior is not None and i < len(prior):
                                scores.append(dict(prior[i]))
                            continue
                        w = window_map[i]
                    else:
                        w = min(max_frames - 1, max(0, int((t - t0) / span * max_frames)))
                    if w != cur_window:
                        if w < cur_window:  # out-of-order timestamp: stay in the window
                            w = cur_window
                        else:
                            flush(best)
                            best, cur_window = None, w
                            if progress is not None:
                                progress(w / max_frames, f"Selecting sharp frames "
                                         f"({len(st['candidates'])}/{max_frames})...")
                    gray = analysis_gray(frame, luts)
                    sc = frame_scores(gray)
                    rec = {"timestamp_s": round(float(t), 6), "window": w,
                           "sharpness": sc["sharpness"], "brightness": sc["brightness"],
                           "contrast": sc["contrast"], "texture": sc["texture"],
                           "motion_px": None, "kept": False, "reason": exposure_reason(sc),
                           "file": None}
                    scores.append(rec)
                    if rec["reason"] is not None:
                        continue
                    if best is None or sc["sharpness"] > best["rec"]["sharpness"]:
                        if best is not None:
                            best["rec"]["reason"] = "not_sharpest"
                        best = {"window": w, "rec": rec, "gray": gray,
                                "image": _output_image(frame, max_image_size)}
                    else:
                        rec["reason"] = "not_sharpest"
            except (av.FFmpegError, EOFError) as exc:
                st["decode_error"] = str(exc)
                log.warning("decoding stopped after %d frames: %s", st["num_decoded"], exc)
            flush(best)

    run_pass(None, None)
    refilled = False
    exposure = ("black", "overexposed", "blank")
    usable_idx = [i for i, r in enumerate(st["scores"]) if r["reason"] not in exposure]
    if (len(st["candidates"]) < TARGET_FILL * max_frames
            and len(usable_idx) > len(st["candidates"]) and st["num_decoded"] >= MIN_FRAMES):
        # Windows emptied by black/blown-out/blank stretches: spread the cap over the usable
        # frames' own time (each usable frame counts for its gap to the next, at most twice
        # the typical gap) and decode again.
        ts = np.array([st["scores"][i]["timestamp_s"] for i in usable_idx])
        gaps = np.diff(ts)
        typical = float(np.median(gaps)) if len(gaps) else 1.0
        dur = np.minimum(np.append(gaps, typical), 2 * typical)
        u = np.concatenate([[0.0], np.cumsum(dur)[:-1]]) / max(float(dur.sum()), 1e-9)
        window_map = {i: min(max_frames - 1, int(x * max_frames)) for i, x in zip(usable_idx, u)}
        prior = st["scores"]
        for c in st["candidates"]:
            (out / c["tmp"]).unlink(missing_ok=True)
        run_pass(window_map, prior)
        refilled = True
    scores, candidates = st["scores"], st["candidates"]
    num_decoded, decode_error, last_t = st["num_decoded"], st["decode_error"], st["last_t"]
    t0, t1, span, fps = st["t0"], st["t1"], st["span"], st["fps"]

    warnings: list[dict] = []
    expected_end = t1
    slack = max(TRUNCATED_SLACK_S, TRUNCATED_SLACK_FRACTION * span)
    declared = int(info.get("num_frames") or 0)
    # A decoder error, or (threaded decoders may swallow it) fewer frames than the container
    # declares, AND the decoded part ends well before the declared end = truncated.
    truncated = (decode_error is not None or num_decoded < declared) and (
        last_t is None or last_t + 1.0 / fps < expected_end - slack)
    if truncated:
        warnings.append({"code": "video_truncated",
                         "message": f"The video is damaged or cut short: decoding stopped at "
                                    f"{(last_t or t0) - t0:.2f} s of {span:.2f} s; frames were "
                                    f"selected from the decodable part.",
                         "decoded_until_s": round((last_t or t0) - t0, 3),
                         "declared_duration_s": round(span, 3), "error": decode_error})
    if num_decoded < MIN_FRAMES:
        for c in candidates:
            (out / c["tmp"]).unlink(missing_ok=True)
        details = {"frames_decoded": num_decoded, "minimum": MIN_FRAMES,
                   "frames_selected": 0}
        if truncated:
            raise PipelineError("video_truncated", details={**details, **warnings[0]})
        raise PipelineError("too_few_frames", details=details)

    # --- blur and near-duplicate rejection over the window candidates -------------------
    sharp = [c["rec"]["sharpness"] for c in candidates]
    median_sharp = float(np.median(sharp)) if sharp else None
    kept: list[dict] = []
    last_gray, last_pts = None, None
    for c in candidates:
        rec = c["rec"]
        if rec["sharpness"] < max(BLUR_ABSOLUTE, BLUR_RELATIVE * (median_sharp or 0.0)):
            rec["reason"] = "blurry"
            continue
        if last_gray is not None and len(last_pts) >= MOTION_MIN_CORNERS \
                and last_gray.shape == c["gray"].shape:
            m = _track_median(last_gray, last_pts, c["gray"])
            rec["motion_px"] = round(m, 3) if math.isfinite(m) else None  # None: lost = big
            if m < NEAR_DUPLICATE_PX:
                rec["reason"] = "near_duplicate"
                continue
        rec["reason"], rec["kept"] = None, True
        kept.append(c)
        last_gray, last_pts = c["gray"], _corners(c["gray"], NEAR_DUPLICATE_CORNERS)
    frames: list[dict] = []
    for c in candidates:
        if c["rec"]["kept"]:
            name = f"frame_{len(frames):05d}.jpg"
            os.replace(out / c["tmp"], out / name)
            c["rec"]["file"] = name
            frames.append({"index": len(frames), "file": name,
                           "timestamp_s": c["rec"]["timestamp_s"],
                           "sharpness": c["rec"]["sharpness"],
                           "brightness": c["rec"]["brightness"],
                           "motion_px": c["rec"]["motion_px"]})
        else:
            (out / c["tmp"]).unlink(missing_ok=True)
    dropped: dict[str, int] = {}
    for r in scores:
        if r["reason"]:
            dropped[r["reason"]] = dropped.get(r["reason"], 0) + 1
    selection = {"cap": max_frames, "windows_with_frames": len({r["window"] for r in scores}),
                 "candidates": len(candidates), "kept": len(frames), "dropped": dropped,
                 "usable": sum(1 for r in scores if r["reason"] not in
                               ("black", "overexposed", "blank")),
                 "median_sharpness": None if median_sharp is None else round(median_sharp, 3),
                 "analysis_side_px": ANALYSIS_SIDE, "refilled": refilled}
    if progress is not None:
        progress(1.0, f"Selected {len(frames)} frames")
    return {"video": info, "frames": frames, "num_decoded": num_decoded, "scores": scores,
            "selection": selection, "warnings": warnings, "truncated": truncated}


#: :func:`extract_between` looks for an in-between frame only in the middle of each gap (from
#: this fraction of the gap to 1 minus it), so the new frame halves the baseline.
BETWEEN_MARGIN = 0.25


def between_name(file: str) -> str:
    """Name of the frame inserted after ``file``: ``frame_00003.jpg`` -> ``frame_00003_m.jpg``.

    It sorts after ``frame_00003.jpg`` ('.' < '_') and before ``frame_00004.jpg``, so name
    order (what sequential matching follows) stays time order."""
    stem, dot, ext = file.rpartition(".")
    return f"{stem}_m.{ext}" if dot else f"{file}_m"


def extract_between(path: str | os.PathLike, out_dir: str | os.PathLike, kept: list[dict],
                    max_image_size: int | None = None) -> list[dict]:
    """Add one frame in the middle of each gap between consecutive kept frames ("more frames",
    a rung of the recovery ladder, :mod:`.ladder`): halves the baseline between neighbours, for
    clips whose frames at the preset's cap are too far apart to match.

    One sequential decode. For each gap between ``kept[i]`` and ``kept[i + 1]`` the sharpest
    frame whose timestamp lies in the middle half of the gap (``BETWEEN_MARGIN``) and that is
    not black, overexposed, blank (:func:`exposure_reason`) or blurry (sharpness below
    ``BLUR_ABSOLUTE``) is written as :func:`between_name` of ``kept[i]["file"]``, scaled like
    the kept frames. A gap whose middle holds no usable frame gets none; an existing file of
    that name is left alone (already added).

    Args:
        path: the video.
        out_dir: the frames folder.
        kept: frames as in ``extract_frames(...)["frames"]`` (``file``, ``timestamp_s``), in
            time order.
        max_image_size: as for :func:`extract_frames`.

    Returns:
        ``[{"file", "timestamp_s", "sharpness", "after"}]`` of the frames written, time order.

    Raises:
        PipelineError("no_video_stream"): see :func:`probe_video`.
    """
    out = Path(out_dir)
    info = probe_video(path)
    gaps = []
    for a, b in zip(kept, kept[1:], strict=False):
        ta, tb = float(a["timestamp_s"]), float(b["timestamp_s"])
        name = between_name(a["file"])
        if tb - ta > 0 and not (out / name).exists():
            m = BETWEEN_MARGIN * (tb - ta)
            gaps.append({"lo": ta + m, "hi": tb - m, "name": name, "after": a["file"],
                         "best": None})
    if not gaps:
        return []
    luts = _LumaLut()
    end = gaps[-1]["hi"]
    g = 0
    with av.open(str(path), mode="r") as container:
        stream = container.streams[info["stream_index"]]
        stream.thread_type = "AUTO"
        stream.thread_count = DECODE_MAX_THREADS
        fps = info.get("fps") or 30.0
        t0 = _time_range(container, stream, info)[0]
        try:
            for i, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else t0 + i / fps
                if t > end:
                    break
                while g < len(gaps) and t > gaps[g]["hi"]:
                    g += 1
                if g >= len(gaps) or t < gaps[g]["lo"]:
                    continue
                sc = frame_scores(analysis_gray(frame, luts))
                if exposure_reason(sc) is not None or sc["sharpness"] < BLUR_ABSOLUTE:
                    continue
                best = gaps[g]["best"]
                if best is None or sc["sharpness"] > best["sharpness"]:
                    gaps[g]["best"] = {"timestamp_s": round(float(t), 6),
                                       "sharpness": sc["sharpness"],
                                       "image": _output_image(frame, max_image_size)}
        except (av.FFmpegError, EOFError) as exc:
            log.warning("decoding for in-between frames stopped: %s", exc)
    added = []
    for gap in gaps:
        best = gap["best"]
        if best is None:
            continue
        _write_jpeg(out / gap["name"], best.pop("image"))  # atomic (temporary + rename)
        added.append({"file": gap["name"], "timestamp_s": best["timestamp_s"],
                      "sharpness": best["sharpness"], "after": gap["after"]})
    return added


# --------------------------------------------------------------------------------------------
# Motion check
# --------------------------------------------------------------------------------------------

def _load_gray(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise OSError(f"cannot read image {path}")
    scale = min(1.0, MOTION_MAX_SIDE / max(img.shape[:2]))
    if scale < 1.0:
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                         interpolation=cv2.INTER_AREA)
    return img, scale


def _corners(gray: np.ndarray, max_corners: int = MOTION_MAX_CORNERS) -> np.ndarray:
    pts = cv2.goodFeaturesToTrack(gray, maxCorners=max_corners, qualityLevel=0.01,
                                  minDistance=max(4, min(gray.shape) // 60), blockSize=7)
    return np.empty((0, 1, 2), np.float32) if pts is None else pts.astype(np.float32)


def _track(g0: np.ndarray, g1: np.ndarray, p0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pyramidal LK from g0 to g1 with a forward-backward check; returns (p1, ok mask)."""
    if len(p0) == 0:
        return p0, np.zeros(0, bool)
    crit = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01)
    kw = dict(winSize=(LK_WIN, LK_WIN), maxLevel=LK_LEVELS, criteria=crit)
    p1, st1, _ = cv2.calcOpticalFlowPyrLK(g0, g1, p0, None, **kw)
    pb, st2, _ = cv2.calcOpticalFlowPyrLK(g1, g0, p1, None, **kw)
    fb = np.linalg.norm((pb - p0).reshape(-1, 2), axis=1)
    ok = (st1.ravel() == 1) & (st2.ravel() == 1) & (fb < LK_FB_MAX_ERR)
    return p1, ok


def measure_motion(frame_paths: Iterable[str | os.PathLike]) -> dict:
    """Measure how far the image content moves across the selected frames (cheap, pre-SfM).

    Method: Shi-Tomasi corners in the first frame (the *anchor*) are tracked frame to frame
    with pyramidal Lucas-Kanade and a forward-backward check. For every frame the median
    displacement of the surviving tracks from their anchor position is taken; when fewer than
    ``MOTION_RESEED_FRACTION`` of the anchor's tracks survive, the segment ends (its largest
    median displacement is added to the accumulated motion) and corners are re-detected in the
    current frame. A step that loses more than ``1 - MOTION_LOST_FRACTION`` of the tracks is
    recorded as a *lost track* event (a big jump, or a scene change). Displacements are in px
    of the original frames (images are tracked at ``MOTION_MAX_SIDE``).

    Args:
        frame_paths: ordered image files (>= 2 for a measurement).

    Returns:
        ``{"num_frames": int, "diagonal_px": float,
        "first_to_last_median_px": float | None`` (median displacement of tracks that survive
        from the first to the last frame without re-detection; ``None`` if none do),
        ``"max_median_motion_px": float`` (largest per-frame median displacement within a
        segment), ``"accumulated_motion_px": float`` (sum over segments), ``"motion_fraction":
        float`` (accumulated / diagonal), ``"num_corners": int`` (in the first frame),
        ``"segments": int, "lost_track_events": int, "measurable": bool}``.
        ``measurable`` is False when the first frame has fewer than ``MOTION_MIN_CORNERS``
        corners (flat, dark or very blurred video).

    Raises:
        OSError: an image cannot be read.
    """
    paths = [Path(p) for p in frame_paths]
    result = {"num_frames": len(paths), "diagonal_px": 0.0, "first_to_last_median_px": None,
              "max_median_motion_px": 0.0, "accumulated_motion_px": 0.0, "motion_fraction": 0.0,
              "num_corners": 0, "segments": 0, "lost_track_events": 0, "measurable": False}
    if len(paths) < 2:
        return result
    g_prev, scale = _load_gray(paths[0])
    h, w = g_prev.shape
    result["diagonal_px"] = round(math.hypot(w, h) / scale, 2)
    anchor = _corners(g_prev)
    result["num_corners"] = int(len(anchor))
    if len(anchor) < MOTION_MIN_CORNERS:
        return result
    result["measurable"] = True
    cur = anchor.copy()
    n_anchor = len(anchor)
    seg_max, accumulated, segments, lost = 0.0, 0.0, 1, 0
    max_median = 0.0
    first_segment = True
    for i, p in enumerate(paths[1:], start=1):
        g, _ = _load_gray(p)
        nxt, ok = _track(g_prev, g, cur)
        if len(cur) and ok.mean() < MOTION_LOST_FRACTION:
            lost += 1
        anchor, cur = anchor[ok], nxt[ok]
        if len(cur):
            med = float(np.median(np.linalg.norm((cur - anchor).reshape(-1, 2), axis=1))) / scale
            seg_max = max(seg_max, med)
            max_median = max(max_median, med)
            if first_segment and i == len(paths) - 1:
                result["first_to_last_median_px"] = round(med, 3)
        if len(cur) < max(MOTION_MIN_CORNERS, MOTION_RESEED_FRACTION * n_anchor):
            accumulated += seg_max
            seg_max, first_segment = 0.0, False
            anchor = _corners(g)
            cur, n_anchor = anchor.copy(), len(anchor)
            if i < len(paths) - 1:
                segments += 1
        g_prev = g
    accumulated += seg_max
    result.update({
        "max_median_motion_px": round(max_median, 3),
        "accumulated_motion_px": round(accumulated, 3),
        "motion_fraction": round(accumulated / result["diagonal_px"], 5),
        "segments": segments,
        "lost_track_events": lost,
    })
    return result


def judge_motion(measurement: dict, min_fraction: float = MIN_MOTION_FRACTION) -> dict:
    """Add the verdict to a :func:`measure_motion` result (returns a new dict, never raises).

    The camera counts as moving when the accumulated median motion is at least
    ``min_fraction`` of the image diagonal, or when tracking was lost across a step (a big jump
    is motion, not stillness). A video whose motion cannot be measured (too few corners)
    counts as moving: SfM gives the verdict.

    Returns:
        ``measurement`` plus ``"threshold_fraction": float`` and ``"moving": bool``.
    """
    m = dict(measurement)
    m["threshold_fraction"] = min_fraction
    m["moving"] = bool(not m["measurable"] or m["lost_track_events"] > 0
                       or m["motion_fraction"] >= min_fraction)
    return m


def check_motion(frame_paths: Iterable[str | os.PathLike],
                 min_fraction: float = MIN_MOTION_FRACTION) -> dict:
    """Measure (:func:`measure_motion`), judge (:func:`judge_motion`) and fail fast when the
    camera does not move.

    Returns:
        the :func:`judge_motion` dict (``moving`` is True).

    Raises:
        PipelineError("insufficient_motion"): details carry the measured numbers and threshold.
    """
    m = judge_motion(measure_motion(frame_paths), min_fraction)
    if not m["moving"]:
        raise PipelineError("insufficient_motion", details=m)
    return m


# --------------------------------------------------------------------------------------------
# Degenerate clips: named before SfM
# --------------------------------------------------------------------------------------------

#: Parallax check: kept frames are chained until the median tracked displacement from the
#: pair's first frame reaches this fraction of the analysis-image diagonal (enough baseline
#: for a homography to tell rotation from translation).
PARALLAX_MIN_BASELINE_FRACTION = 0.08
#: A pair is explained by a homography when at least this fraction of its tracks are RANSAC
#: inliers at ``HOMOGRAPHY_RANSAC_PX`` (px of the analysis image) ...
HOMOGRAPHY_INLIER_FRACTION = 0.9
HOMOGRAPHY_RANSAC_PX = 1.5
#: ... and that homography is a rotation ``K R K^-1`` for some focal length in
#: ``ROTATION_FOCAL_RANGE`` (x image width; FOV about 28-120 degrees, phones to action cams):
#: ``K^-1 H K``, scaled to unit determinant, has all singular values within this of 1.
#: Measured (tests/test_video_ingest.py scenes): synthetic pan 0.0006-0.001 (focal found
#: 319 px for a true 320); sideways translation over a flat plane or two depth layers
#: 0.028-0.042 (such planar scenes are left to SfM); GoPro walk pairs 0.019-0.21 with 20-46%
#: inliers (fail the inlier test first).
ROTATION_ORTHOGONALITY_MAX = 0.012
ROTATION_FOCAL_RANGE = (0.3, 2.0)
#: Fraction of tested pairs that must look like pure rotation to call the clip rotation-only.
ROTATION_PAIR_FRACTION = 0.8


def _rotation_error(H: np.ndarray, w: int, h: int) -> tuple[float, float]:
    """(min over focal f of max |singular value - 1| of ``K^-1 H K`` scaled to det 1, best f).

    A homography between two views of a camera that only rotates is ``K R K^-1`` (Hartley &
    Zisserman, *Multiple View Geometry*, 2nd ed., sec. 8.4.2); the principal point is assumed
    at the image centre with square pixels, and f is searched on a geometric grid."""
    best = (math.inf, 0.0)
    cx, cy = w / 2.0, h / 2.0
    for f in np.geomspace(ROTATION_FOCAL_RANGE[0] * w, ROTATION_FOCAL_RANGE[1] * w, 80):
        K = np.array([[f, 0, cx], [0, f, cy], [0, 0, 1]])
        M = np.linalg.inv(K) @ H @ K
        d = np.linalg.det(M)
        if d <= 0:
            continue
        sv = np.linalg.svd(M / np.cbrt(d), compute_uv=False)
        err = float(np.max(np.abs(sv - 1)))
        if err < best[0]:
            best = (err, float(f))
    return best


def measure_parallax(frame_paths: Iterable[str | os.PathLike]) -> dict:
    """Tell a camera that only turns (tripod pan) from one that moves, before SfM.

    Kept frames are chained with LK tracks until the median displacement reaches
    ``PARALLAX_MIN_BASELINE_FRACTION`` of the diagonal; for that pair a homography is fitted
    with RANSAC (``cv2.findHomography``). With translation and depth variation no homography
    explains all tracks; with pure rotation one does, and it has the form ``K R K^-1``
    (:func:`_rotation_error`). Then the chain restarts from the pair's second frame.

    Returns:
        ``{"pairs": [{"first", "second" (frame indices), "tracks", "inlier_fraction",
        "rotation_error", "focal_px", "rotation_like": bool}], "pairs_tested": int,
        "rotation_like_pairs": int, "rotation_only": bool}`` (px of the analysis images,
        long side ``MOTION_MAX_SIDE``).

    Raises:
        OSError: an image cannot be read.
    """
    paths = [Path(p) for p in frame_paths]
    out = {"pairs": [], "pairs_tested": 0, "rotation_like_pairs": 0, "rotation_only": False}
    if len(paths) < 2:
        return out
    grays = [_load_gray(p)[0] for p in paths]
    h, w = grays[0].shape
    need = PARALLAX_MIN_BASELINE_FRACTION * math.hypot(w, h)
    i = 0
    while i < len(grays) - 1:
        p0 = _corners(grays[i])
        if len(p0) < MOTION_MIN_CORNERS:
            i += 1
            continue
        start, cur, prev = p0, p0, grays[i]
        j, reached = i, False
        while j < len(grays) - 1:
            j += 1
            nxt, ok = _track(prev, grays[j], cur)
            start, cur, prev = start[ok], nxt[ok], grays[j]
            if len(cur) < max(MOTION_MIN_CORNERS, MOTION_RESEED_FRACTION * len(p0)):
                break
            if np.median(np.linalg.norm((cur - start).reshape(-1, 2), axis=1)) >= need:
                reached = True
                break
        if reached:
            H, mask = cv2.findHomography(start, cur, cv2.RANSAC, HOMOGRAPHY_RANSAC_PX)
            inl = float(mask.mean()) if mask is not None else 0.0
            err, f = _rotation_error(H, w, h) if H is not None else (math.inf, 0.0)
            like = bool(inl >= HOMOGRAPHY_INLIER_FRACTION and err <= ROTATION_ORTHOGONALITY_MAX)
            out["pairs"].append({"first": i, "second": j, "tracks": int(len(cur)),
                                 "inlier_fraction": round(inl, 4),
                                 "rotation_error": round(err, 5) if math.isfinite(err) else None,
                                 "focal_px": round(f, 1), "rotation_like": like})
        i = max(j, i + 1)
    out["pairs_tested"] = len(out["pairs"])
    out["rotation_like_pairs"] = sum(p["rotation_like"] for p in out["pairs"])
    out["rotation_only"] = bool(out["pairs_tested"] and out["rotation_like_pairs"]
                                >= ROTATION_PAIR_FRACTION * out["pairs_tested"])
    return out


def diagnose(res: dict, frames_dir: str | os.PathLike) -> dict:
    """Name what makes a clip unusable for SfM, from an :func:`extract_frames` result.

    Checks, in order (the first that fails gives the code):

    1. ``too_dark`` / ``overexposed`` / ``textureless``: fewer than ``MIN_FRAMES`` usable
       frames, named after the commonest exposure reason (black / overexposed / blank);
    2. ``too_blurry``: fewer than ``MIN_FRAMES`` window candidates survive the blur test, or
       the median sharpness of the usable frames is below ``BLUR_ABSOLUTE``;
    3. ``insufficient_motion``: near-duplicate rejection leaves fewer than ``MIN_FRAMES``
       frames, or :func:`judge_motion` on the kept frames says the camera does not move;
    4. ``too_few_frames``: fewer than ``MIN_FRAMES`` kept for any other reason;
    5. ``rotation_only``: :func:`measure_parallax` finds only pure-rotation pairs.

    Returns:
        ``{"ok": bool, "error": None | {"code", "details"}, "motion": judge_motion dict |
        None, "parallax": measure_parallax dict | None}``. Never raises for content.
    """
    sel = res["selection"]
    dropped = sel["dropped"]
    kept = sel["kept"]
    diag = {"ok": False, "error": None, "motion": None, "parallax": None}
    usable = sel["usable"]
    base = {"frames_decoded": res["num_decoded"], "frames_usable": usable,
            "frames_selected": kept, "minimum": MIN_FRAMES, "dropped": dropped}

    def fail(code: str, **details) -> dict:
        diag["error"] = {"code": code, "details": {**base, **details}}
        return diag

    if usable < MIN_FRAMES:
        exp = {r: dropped.get(r, 0) for r in ("black", "overexposed", "blank")}
        worst = max(exp, key=exp.get)
        code = {"black": "too_dark", "overexposed": "overexposed", "blank": "textureless"}[worst]
        return fail(code, thresholds={"black_p98": BLACK_P98, "overexposed_p2": OVEREXPOSED_P2,
                                      "blank_std": BLANK_STD, "texture_min": TEXTURE_MIN})
    usable_sharp = [r["sharpness"] for r in res["scores"]
                    if r["reason"] not in ("black", "overexposed", "blank")]
    med = float(np.median(usable_sharp))
    not_blurry = sel["candidates"] - dropped.get("blurry", 0)
    if med < BLUR_ABSOLUTE or not_blurry < MIN_FRAMES:
        return fail("too_blurry", median_sharpness=round(med, 3),
                    blur_absolute=BLUR_ABSOLUTE, blur_relative=BLUR_RELATIVE)
    if kept < MIN_FRAMES and dropped.get("near_duplicate", 0):
        return fail("insufficient_motion", near_duplicates=dropped["near_duplicate"],
                    near_duplicate_px=NEAR_DUPLICATE_PX)
    if kept < MIN_FRAMES:
        return fail("too_few_frames")
    paths = [Path(frames_dir) / f["file"] for f in res["frames"]]
    motion = judge_motion(measure_motion(paths))
    diag["motion"] = motion
    if not motion["moving"]:
        return fail("insufficient_motion", **{k: motion[k] for k in (
            "motion_fraction", "threshold_fraction", "accumulated_motion_px",
            "first_to_last_median_px", "measurable")})
    par = measure_parallax(paths)
    diag["parallax"] = par
    if par["rotation_only"]:
        return fail("rotation_only", pairs_tested=par["pairs_tested"],
                    rotation_like_pairs=par["rotation_like_pairs"])
    diag["ok"] = True
    return diag


def check_clip(res: dict, frames_dir: str | os.PathLike) -> dict:
    """:func:`diagnose`, raising the error it names.

    Raises:
        PipelineError: ``too_dark``, ``overexposed``, ``textureless``, ``too_blurry``,
            ``insufficient_motion``, ``too_few_frames`` or ``rotation_only``, with measured
            values and thresholds in ``details``.
    """
    d = diagnose(res, frames_dir)
    if d["error"]:
        raise PipelineError(d["error"]["code"], details=d["error"]["details"])
    return d


__all__ = ["probe_video", "extract_frames", "measure_motion", "judge_motion", "check_motion",
           "measure_parallax", "diagnose", "check_clip", "analysis_gray", "frame_scores",
           "MIN_MOTION_FRACTION", "JPEG_QUALITY", "MIN_FRAMES"]
