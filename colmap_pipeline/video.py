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
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from collections.abc import Callable, Iterable

import av
import cv2
import numpy as np

from .errors import PipelineError

log = logging.getLogger(__name__)

#: JPEG quality of the extracted frames (OpenCV ``IMWRITE_JPEG_QUALITY``, 0-100).
JPEG_QUALITY = 95
#: Longest side (px) of the gray image on which sharpness is measured. Downscaling first makes
#: the variance of the Laplacian (Pech-Pacheco et al., ICPR 2000, "Diatom autofocusing in
#: brightfield microscopy") cheap and less sensitive to sensor noise.
SHARPNESS_MAX_SIDE = 640
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


#: 8-bit pixel formats whose first plane is the luma (or gray) image, read without conversion.
_LUMA_FIRST_FORMATS = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p",
                                 "yuvj444p", "yuv440p", "yuvj440p", "yuv411p", "yuv410p",
                                 "nv12", "nv21", "gray"})


def _gray(frame: av.VideoFrame) -> np.ndarray:
    """Luma of ``frame`` (H x W uint8): the Y plane itself when possible, else a conversion."""
    if frame.format.name in _LUMA_FIRST_FORMATS:
        plane = frame.planes[0]
        buf = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
        return buf[:, :frame.width]
    return frame.to_ndarray(format="gray")


def _sharpness(frame: av.VideoFrame) -> float:
    """Variance of the Laplacian of the luma, downscaled by an integer factor so that the
    longest side is at most ``SHARPNESS_MAX_SIDE`` (integer-factor INTER_AREA is a fast box
    filter; a fractional one cost 3 ms/frame more on 848x480). Only the ranking within one clip
    matters, so the scale of the value is irrelevant."""
    gray = _gray(frame)
    k = math.ceil(max(gray.shape) / SHARPNESS_MAX_SIDE)
    if k > 1:
        gray = cv2.resize(gray, (gray.shape[1] // k, gray.shape[0] // k),
                          interpolation=cv2.INTER_AREA)
    lap = cv2.Laplacian(gray, cv2.CV_16S)
    _, std = cv2.meanStdDev(lap)
    return float(std[0, 0]) ** 2


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
    """Select up to ``max_frames`` sharp, evenly spread frames and write them as JPEGs.

    The clip's presentation-time range is split into ``max_frames`` equal windows; frames are
    decoded once, sequentially, and in each window the frame with the highest sharpness
    (variance of the Laplacian, see ``SHARPNESS_MAX_SIDE``) is kept. Memory is bounded: only the
    current window's best candidate is held; it is written out when decoding enters a later
    window. Rotation metadata is applied (:func:`_rotate`), colour conversion keeps the
    stream's range, and with ``max_image_size`` the longest side is downscaled (INTER_AREA) to
    at most that many px. A corrupt tail stops decoding; the frames before it are kept.

    Args:
        path: video file.
        out_dir: created if needed; receives ``frame_00000.jpg``, ``frame_00001.jpg``... in
            time order (JPEG quality ``JPEG_QUALITY``).
        max_frames: number of time windows (>= 1); a window with no decoded frame is skipped,
            so short clips may give fewer frames.
        max_image_size: optional cap (px) on the longest image side.
        progress: optional ``progress(fraction in [0, 1], message)``, called when decoding
            enters a new window (fraction = decoded presentation time / clip duration).

    Returns:
        ``{"video": probe_video(path), "frames": [{"index": int, "file": str (name inside
        out_dir), "timestamp_s": float, "sharpness": float}], "num_decoded": int}``.

    Raises:
        PipelineError("no_video_stream"): see :func:`probe_video`.
        PipelineError("too_few_frames"): fewer than ``MIN_FRAMES`` frames decoded or selected.
        ValueError: ``max_frames`` < 1.
    """
    if max_frames < 1:
        raise ValueError("max_frames must be >= 1")
    info = probe_video(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames: list[dict] = []
    num_decoded = 0

    def flush(cand: tuple[float, float, av.VideoFrame] | None) -> None:
        if cand is None:
            return
        sharp, t, frame = cand
        img = frame.to_ndarray(format="bgr24")
        img = _rotate(img, _norm_rotation(frame.rotation))
        if max_image_size and max(img.shape[:2]) > max_image_size:
            s = max_image_size / max(img.shape[:2])
            size = (max(1, round(img.shape[1] * s)), max(1, round(img.shape[0] * s)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        idx = len(frames)
        name = f"frame_{idx:05d}.jpg"
        tmp = out / f".{name}.tmp.jpg"
        if not cv2.imwrite(str(tmp), img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OSError(f"could not write {tmp}")
        os.replace(tmp, out / name)
        frames.append({"index": idx, "file": name, "timestamp_s": round(t, 6),
                       "sharpness": round(sharp, 3)})

    with av.open(str(path), mode="r") as container:
        stream = container.streams[info["stream_index"]]
        stream.thread_type = "AUTO"
        t0, t1 = _time_range(container, stream, info)
        span = max(t1 - t0, 1e-9)
        fps = info.get("fps") or 30.0
        cur_window, best = -1, None
        try:
            for frame in container.decode(stream):
                t = frame.time if frame.time is not None else t0 + num_decoded / fps
                num_decoded += 1
                w = min(max_frames - 1, max(0, int((t - t0) / span * max_frames)))
                if w != cur_window:
                    if w < cur_window:  # out-of-order timestamp: stay in the current window
                        w = cur_window
                    else:
                        flush(best)
                        best, cur_window = None, w
                        if progress is not None:
                            progress(w / max_frames, f"Selecting sharp frames ({len(frames)}"
                                                     f"/{max_frames})...")
                s = _sharpness(frame)
                if best is None or s > best[0]:
                    best = (s, t, frame)
        except (av.FFmpegError, EOFError) as exc:
            log.warning("decoding stopped after %d frames: %s", num_decoded, exc)
        flush(best)
    if progress is not None:
        progress(1.0, f"Selected {len(frames)} frames")
    if len(frames) < MIN_FRAMES:
        raise PipelineError("too_few_frames", details={
            "frames_decoded": num_decoded, "frames_selected": len(frames), "minimum": MIN_FRAMES})
    return {"video": info, "frames": frames, "num_decoded": num_decoded}


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


def _corners(gray: np.ndarray) -> np.ndarray:
    pts = cv2.goodFeaturesToTrack(gray, maxCorners=MOTION_MAX_CORNERS, qualityLevel=0.01,
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


__all__ = ["probe_video", "extract_frames", "measure_motion", "judge_motion", "check_motion",
           "MIN_MOTION_FRACTION", "JPEG_QUALITY", "MIN_FRAMES"]
