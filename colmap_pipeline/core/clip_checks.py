"""Clip checks before SfM: does the camera move (:func:`measure_motion`), does it only turn
on the spot (:func:`measure_parallax`), and which stable error names what makes a clip
unusable (:func:`diagnose`: too short, dark, blown out, textureless, blurry, static, pan).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypedDict

import cv2
import numpy as np

from ..errors import PipelineError
from .frame_scores import BLACK_P98, BLANK_STD, BLUR_ABSOLUTE, OVEREXPOSED_P2, TEXTURE_MIN
from .frame_select import BLUR_RELATIVE, NEAR_DUPLICATE_PX, FramesResult
from .frame_tracks import MOTION_RESEED_FRACTION, FrameTracks, Segments
from .tracks import MOTION_MIN_CORNERS
from .video_probe import MIN_FRAMES, clip_length_error

# --- motion check ---------------------------------------------------------------------------
#: Pass threshold: accumulated median image motion as a fraction of the image diagonal.
#: Tuned on the real clips (30 frames each, see the report in ``tests/test_clip_checks.py``):
#: EuRoC static drone ~0.002 (1.7 px of 892), GoPro walk and Karma drone > 0.3. 0.02 (about
#: 18 px on a 752x480 frame, 19 px on 848x480) sits an order of magnitude above sensor
#: jitter and far below any clip that reconstructs.
MIN_MOTION_FRACTION = 0.02

# --- degenerate clips -----------------------------------------------------------------------
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
#: Measured (tests/test_clip_checks.py scenes): synthetic pan 0.0006-0.001 (focal found
#: 319 px for a true 320); sideways translation over a flat plane or two depth layers
#: 0.028-0.042 (such planar scenes are left to SfM); GoPro walk pairs 0.019-0.21 with 20-46%
#: inliers (fail the inlier test first).
ROTATION_ORTHOGONALITY_MAX = 0.012
ROTATION_FOCAL_RANGE = (0.3, 2.0)
#: Fraction of tested pairs that must look like pure rotation to call the clip rotation-only.
ROTATION_PAIR_FRACTION = 0.8


class Motion(TypedDict, total=False):
    """:func:`measure_motion` (px of the original frames), plus :func:`judge_motion`'s
    ``threshold_fraction`` and ``moving``."""

    num_frames: int
    diagonal_px: float
    first_to_last_median_px: float | None
    max_median_motion_px: float
    accumulated_motion_px: float
    motion_fraction: float
    num_corners: int
    segments: int
    lost_track_events: int
    measurable: bool
    threshold_fraction: float
    moving: bool


class Diagnosis(TypedDict):
    """:func:`diagnose`: ``error`` = ``{"code", "message" (None: the catalog's), "details"}``."""

    ok: bool
    error: dict[str, Any] | None
    motion: Motion | None
    parallax: dict[str, Any] | None


def measure_motion(frame_paths: Iterable[str | os.PathLike],
                   frames: FrameTracks | None = None) -> Motion:
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
        frames: the same files as a :class:`FrameTracks` shared with :func:`measure_parallax`
            (``frame_paths`` is then ignored); ``None``: read ``frame_paths`` here.

    Returns:
        :class:`Motion`: ``num_frames``, ``diagonal_px``, ``first_to_last_median_px`` (median
        displacement of tracks that survive from the first to the last frame without
        re-detection; ``None`` if none do), ``max_median_motion_px`` (largest per-frame median
        displacement within a segment), ``accumulated_motion_px`` (sum over segments),
        ``motion_fraction`` (accumulated / diagonal), ``num_corners`` (in the first frame),
        ``segments``, ``lost_track_events``, ``measurable`` (False when the first frame has
        fewer than ``MOTION_MIN_CORNERS`` corners: flat, dark or very blurred video).

    Raises:
        OSError: an image cannot be read.
    """
    frames = frames if frames is not None else FrameTracks(frame_paths)
    n = len(frames)
    result: Motion = {
        "num_frames": n, "diagonal_px": 0.0, "first_to_last_median_px": None,
        "max_median_motion_px": 0.0, "accumulated_motion_px": 0.0, "motion_fraction": 0.0,
        "num_corners": 0, "segments": 0, "lost_track_events": 0, "measurable": False}
    if n < 2:
        return result
    g0, scale = frames.gray(0)
    h, w = g0.shape
    result["diagonal_px"] = round(math.hypot(w, h) / scale, 2)
    anchor = frames.corners(0)
    result["num_corners"] = int(len(anchor))
    if len(anchor) < MOTION_MIN_CORNERS:
        return result
    result["measurable"] = True
    run = Segments(scale=scale, anchor=anchor, cur=anchor.copy(), n_anchor=len(anchor))
    for i in range(1, n):
        run.step(frames, i, is_last=i == n - 1)
    accumulated = run.accumulated + run.seg_max
    result.update({
        "first_to_last_median_px": run.first_to_last,
        "max_median_motion_px": round(run.max_median, 3),
        "accumulated_motion_px": round(accumulated, 3),
        "motion_fraction": round(accumulated / result["diagonal_px"], 5),
        "segments": run.segments,
        "lost_track_events": run.lost,
    })
    return result


def judge_motion(measurement: Motion, min_fraction: float = MIN_MOTION_FRACTION) -> Motion:
    """Add the verdict to a :func:`measure_motion` result (returns a new dict, never raises).

    The camera counts as moving when the accumulated median motion is at least
    ``min_fraction`` of the image diagonal, or when tracking was lost across a step (a big jump
    is motion, not stillness). A video whose motion cannot be measured (too few corners)
    counts as moving: SfM gives the verdict.

    Returns:
        ``measurement`` plus ``"threshold_fraction": float`` and ``"moving": bool``.
    """
    m = measurement.copy()
    m["threshold_fraction"] = min_fraction
    m["moving"] = bool(not m["measurable"] or m["lost_track_events"] > 0
                       or m["motion_fraction"] >= min_fraction)
    return m


def check_motion(frame_paths: Iterable[str | os.PathLike],
                 min_fraction: float = MIN_MOTION_FRACTION) -> Motion:
    """Measure (:func:`measure_motion`), judge (:func:`judge_motion`) and fail fast when the
    camera does not move.

    Returns:
        the :func:`judge_motion` dict (``moving`` is True).

    Raises:
        PipelineError("insufficient_motion"): details carry the measured numbers and threshold.
    """
    m = judge_motion(measure_motion(frame_paths), min_fraction)
    if not m["moving"]:
        raise PipelineError("insufficient_motion", details=dict(m))
    return m


# --- parallax: a camera that only turns -----------------------------------------------------

def rotation_error(H: np.ndarray, w: int, h: int) -> tuple[float, float]:
    """(min over focal f of max |singular value - 1| of ``K^-1 H K`` scaled to det 1, best f).

    A homography between two views of a camera that only rotates is ``K R K^-1`` (Hartley &
    Zisserman, *Multiple View Geometry*, 2nd ed., sec. 8.4.2); the principal point is assumed
    at the image centre with square pixels, and f is searched on a geometric grid. ``H`` is
    defined up to scale, sign included (COLMAP stores some with a negative determinant)."""
    best = (math.inf, 0.0)
    cx, cy = w / 2.0, h / 2.0
    H = -H if np.linalg.det(H) < 0 else H
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


def _chain(frames: FrameTracks, i: int, p0: np.ndarray,
           need: float) -> tuple[int, np.ndarray, np.ndarray] | tuple[int, None, None]:
    """Track ``p0`` from frame ``i`` onwards until the median displacement reaches ``need``
    px: ``(j, tracks in i, tracks in j)``; ``(j, None, None)`` when tracks run out first."""
    start, cur = p0, p0
    j = i
    while j < len(frames) - 1:
        j += 1
        nxt, ok = frames.track(j - 1, j, cur)
        start, cur = start[ok], nxt[ok]
        if len(cur) < max(MOTION_MIN_CORNERS, MOTION_RESEED_FRACTION * len(p0)):
            break
        if np.median(np.linalg.norm((cur - start).reshape(-1, 2), axis=1)) >= need:
            return j, start, cur
    return j, None, None


def _pair(i: int, j: int, start: np.ndarray, cur: np.ndarray, w: int, h: int) -> dict:
    """Homography test of one frame pair (see :func:`measure_parallax`)."""
    H, mask = cv2.findHomography(start, cur, cv2.RANSAC, HOMOGRAPHY_RANSAC_PX)
    inl = float(mask.mean()) if mask is not None else 0.0
    err, f = rotation_error(H, w, h) if H is not None else (math.inf, 0.0)
    like = bool(inl >= HOMOGRAPHY_INLIER_FRACTION and err <= ROTATION_ORTHOGONALITY_MAX)
    return {"first": i, "second": j, "tracks": int(len(cur)), "inlier_fraction": round(inl, 4),
            "rotation_error": round(err, 5) if math.isfinite(err) else None,
            "focal_px": round(f, 1), "rotation_like": like}


def measure_parallax(frame_paths: Iterable[str | os.PathLike],
                     frames: FrameTracks | None = None) -> dict:
    """Tell a camera that only turns (tripod pan) from one that moves, before SfM.

    Kept frames are chained with LK tracks until the median displacement reaches
    ``PARALLAX_MIN_BASELINE_FRACTION`` of the diagonal; for that pair a homography is fitted
    with RANSAC (``cv2.findHomography``). With translation and depth variation no homography
    explains all tracks; with pure rotation one does, and it has the form ``K R K^-1``
    (:func:`rotation_error`). Then the chain restarts from the pair's second frame.

    Args:
        frame_paths: ordered image files.
        frames: the same files as a :class:`FrameTracks` shared with :func:`measure_motion`
            (``frame_paths`` is then ignored); ``None``: read ``frame_paths`` here.

    Returns:
        ``{"pairs": [{"first", "second" (frame indices), "tracks", "inlier_fraction",
        "rotation_error", "focal_px", "rotation_like": bool}], "pairs_tested": int,
        "rotation_like_pairs": int, "rotation_only": bool}`` (px of the analysis images,
        long side ``MOTION_MAX_SIDE``).

    Raises:
        OSError: an image cannot be read.
    """
    frames = frames if frames is not None else FrameTracks(frame_paths)
    pairs: list[dict] = []
    out: dict[str, Any] = {"pairs": pairs, "pairs_tested": 0, "rotation_like_pairs": 0,
                           "rotation_only": False}
    if len(frames) < 2:
        return out
    h, w = frames.gray(0)[0].shape
    need = PARALLAX_MIN_BASELINE_FRACTION * math.hypot(w, h)
    i = 0
    while i < len(frames) - 1:
        p0 = frames.corners(i)
        if len(p0) < MOTION_MIN_CORNERS:
            i += 1
            continue
        j, start, cur = _chain(frames, i, p0, need)
        if start is not None and cur is not None:
            pairs.append(_pair(i, j, start, cur, w, h))
        i = max(j, i + 1)
    out["pairs_tested"] = len(pairs)
    out["rotation_like_pairs"] = sum(p["rotation_like"] for p in pairs)
    out["rotation_only"] = bool(pairs and out["rotation_like_pairs"]
                                >= ROTATION_PAIR_FRACTION * len(pairs))
    return out


# --- diagnosis ------------------------------------------------------------------------------

def _frame_failure(res: FramesResult) -> tuple[str, dict] | None:
    """Checks 2-5 of :func:`diagnose` that need only the frame scores."""
    sel = res["selection"]
    dropped = sel["dropped"]
    if sel["usable"] < MIN_FRAMES:
        exp = {r: dropped.get(r, 0) for r in ("black", "overexposed", "blank")}
        worst = max(exp, key=lambda r: exp[r])
        code = {"black": "too_dark", "overexposed": "overexposed", "blank": "textureless"}[worst]
        return code, {"thresholds": {"black_p98": BLACK_P98, "overexposed_p2": OVEREXPOSED_P2,
                                     "blank_std": BLANK_STD, "texture_min": TEXTURE_MIN}}
    usable_sharp = [r["sharpness"] for r in res["scores"]
                    if r["reason"] not in ("black", "overexposed", "blank")]
    med = float(np.median(usable_sharp))
    if med < BLUR_ABSOLUTE or sel["candidates"] - dropped.get("blurry", 0) < MIN_FRAMES:
        return "too_blurry", {"median_sharpness": round(med, 3), "blur_absolute": BLUR_ABSOLUTE,
                              "blur_relative": BLUR_RELATIVE}
    if sel["kept"] < MIN_FRAMES and dropped.get("near_duplicate", 0):
        return "insufficient_motion", {"near_duplicates": dropped["near_duplicate"],
                                       "near_duplicate_px": NEAR_DUPLICATE_PX}
    if sel["kept"] < MIN_FRAMES:
        return "too_few_frames", {}
    return None


def diagnose(res: FramesResult, frames_dir: str | os.PathLike,
             frames: FrameTracks | None = None) -> Diagnosis:
    """Name what makes a clip unusable for SfM, from an :func:`.frame_select.extract_frames`
    result.

    Checks, in order (the first that fails gives the code):

    1. ``clip_too_short``: the clip lasts less than ``MIN_CLIP_S`` or holds fewer than
       ``MIN_FRAMES`` frames (:func:`.video_probe.clip_length_error`; the message gives both);
    2. ``too_dark`` / ``overexposed`` / ``textureless``: fewer than ``MIN_FRAMES`` usable
       frames, named after the commonest exposure reason (black / overexposed / blank);
    3. ``too_blurry``: fewer than ``MIN_FRAMES`` window candidates survive the blur test, or
       the median sharpness of the usable frames is below ``BLUR_ABSOLUTE``;
    4. ``insufficient_motion``: near-duplicate rejection leaves fewer than ``MIN_FRAMES``
       frames, or :func:`judge_motion` on the kept frames says the camera does not move;
    5. ``too_few_frames``: fewer than ``MIN_FRAMES`` kept for any other reason;
    6. ``rotation_only``: :func:`measure_parallax` finds only pure-rotation pairs.

    Args:
        res: the frame selection's result.
        frames_dir: the folder of its kept frames.
        frames: the kept frames already read and partly tracked
            (:meth:`MotionLookAhead.tracks_for`); ``None`` or another frame count: read here.

    Returns:
        :class:`Diagnosis`: ``{"ok", "error": None | {"code", "message", "details"},
        "motion": judge_motion dict | None, "parallax": measure_parallax dict | None}``.
        Never raises for content.
    """
    sel = res["selection"]
    diag: Diagnosis = {"ok": False, "error": None, "motion": None, "parallax": None}
    base = {"frames_decoded": res["num_decoded"], "frames_usable": sel["usable"],
            "frames_selected": sel["kept"], "minimum": MIN_FRAMES, "dropped": sel["dropped"]}

    def fail(code: str, details: dict, message: str | None = None) -> Diagnosis:
        diag["error"] = {"code": code, "message": message, "details": {**base, **details}}
        return diag

    short = clip_length_error(res["video"].get("duration_s"), res["video"].get("num_frames"))
    if short is not None:
        return fail(short.code, short.details or {}, short.message)
    failure = _frame_failure(res)
    if failure is not None:
        return fail(*failure)
    if frames is None or len(frames) != len(res["frames"]):
        frames = FrameTracks(Path(frames_dir) / f["file"] for f in res["frames"])
    motion = judge_motion(measure_motion((), frames))
    diag["motion"] = motion
    if not motion["moving"]:
        return fail("insufficient_motion", {k: motion.get(k) for k in (
            "motion_fraction", "threshold_fraction", "accumulated_motion_px",
            "first_to_last_median_px", "measurable")})
    par = measure_parallax((), frames)
    diag["parallax"] = par
    if par["rotation_only"]:
        return fail("rotation_only", {"pairs_tested": par["pairs_tested"],
                                      "rotation_like_pairs": par["rotation_like_pairs"]})
    diag["ok"] = True
    return diag


def check_clip(res: FramesResult, frames_dir: str | os.PathLike) -> Diagnosis:
    """:func:`diagnose`, raising the error it names.

    Raises:
        PipelineError: ``clip_too_short``, ``too_dark``, ``overexposed``, ``textureless``,
            ``too_blurry``, ``insufficient_motion``, ``too_few_frames`` or ``rotation_only``,
            with measured values and thresholds in ``details``.
    """
    d = diagnose(res, frames_dir)
    if d["error"]:
        raise PipelineError(d["error"]["code"], message=d["error"]["message"] or "",
                            details=d["error"]["details"])
    return d
