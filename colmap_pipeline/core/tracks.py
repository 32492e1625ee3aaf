"""Corner tracks between two gray images: Shi-Tomasi corners and pyramidal Lucas-Kanade with a
forward-backward check. Shared by the frame selection's near-duplicate test and the clip
checks (motion, parallax).
"""
from __future__ import annotations

import math
import os

import cv2
import numpy as np

#: Longest side (px) of the gray images read by :func:`load_gray` (motion and parallax checks);
#: motion is reported in pixels of the ORIGINAL frame (scaled back).
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
#: If fewer than this fraction of tracks survive a single step between consecutive kept
#: frames, tracking was lost across a large jump: that counts as motion, not as a static camera.
MOTION_LOST_FRACTION = 0.2


def load_gray(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """The image at ``path`` as gray uint8, downscaled to long side ``MOTION_MAX_SIDE``, and the
    scale applied (<= 1).

    Raises:
        OSError: the image cannot be read.
    """
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise OSError(f"cannot read image {path}")
    scale = min(1.0, MOTION_MAX_SIDE / max(img.shape[:2]))
    if scale < 1.0:
        img = cv2.resize(img, (round(img.shape[1] * scale), round(img.shape[0] * scale)),
                         interpolation=cv2.INTER_AREA)
    return img, scale


def corners(gray: np.ndarray, max_corners: int = MOTION_MAX_CORNERS) -> np.ndarray:
    """Shi-Tomasi corners of ``gray`` as float32 (N x 1 x 2), N <= ``max_corners``."""
    pts = cv2.goodFeaturesToTrack(gray, maxCorners=max_corners, qualityLevel=0.01,
                                  minDistance=max(4, min(gray.shape) // 60), blockSize=7)
    return np.empty((0, 1, 2), np.float32) if pts is None else pts.astype(np.float32)


def track(g0: np.ndarray, g1: np.ndarray, p0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pyramidal LK from g0 to g1 with a forward-backward check; returns (p1, ok mask)."""
    if len(p0) == 0:
        return p0, np.zeros(0, bool)
    crit = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 30, 0.01)
    win = (LK_WIN, LK_WIN)
    # nextPts=None lets OpenCV allocate the output (valid C++ API); its stubs demand an array.
    p1, st1, _ = cv2.calcOpticalFlowPyrLK(g0, g1, p0, None,  # type: ignore[call-overload]
                                          winSize=win, maxLevel=LK_LEVELS, criteria=crit)
    pb, st2, _ = cv2.calcOpticalFlowPyrLK(g1, g0, p1, None,  # type: ignore[call-overload]
                                          winSize=win, maxLevel=LK_LEVELS, criteria=crit)
    fb = np.linalg.norm((pb - p0).reshape(-1, 2), axis=1)
    ok = (st1.ravel() == 1) & (st2.ravel() == 1) & (fb < LK_FB_MAX_ERR)
    return p1, ok


def track_median(g0: np.ndarray, p0: np.ndarray, g1: np.ndarray) -> float:
    """Median LK displacement (px) of corners ``p0`` from ``g0`` to ``g1``; ``inf`` when fewer
    than ``MOTION_LOST_FRACTION`` of them survive (a jump too big to track = motion)."""
    p1, ok = track(g0, g1, p0)
    if ok.sum() < max(3, MOTION_LOST_FRACTION * len(p0)):
        return math.inf
    return float(np.median(np.linalg.norm((p1[ok] - p0[ok]).reshape(-1, 2), axis=1)))
