"""Moving content: matched features that follow a motion of their own, not the static scene's.

SfM reconstructs what stays still. A person walking through the view, a bag swung in front of
the camera or a toy turned in the hands moves *between* two frames in a way no single camera
motion explains; the matching stage's geometric verification (RANSAC of a fundamental or
essential matrix, 4 px) rejects those matches, and the model is of the static part only. The
user cannot see that from a completed job, so the results say so (``moving_content``).

Measure (:func:`measure`, :func:`second_motion_inliers`): for every verified image pair
explained by an essential/fundamental matrix (COLMAP configuration ``CALIBRATED`` /
``UNCALIBRATED``; a pair
explained by a homography keeps only the dominant plane's matches as inliers, so its
rejected matches are the rest of the static scene, not moving content), between images the
chosen model registered: the matches verification rejected are fitted with a *second*
fundamental matrix (OpenCV RANSAC, :data:`SECOND_MOTION_PX` px, confidence 0.999). Its inliers,
when at least :data:`MIN_SECOND_MOTION_MATCHES`, are matches consistent with one rigid motion
of their own: an independently moving object. Random false matches do not line up under one
epipolar geometry at 1 px; the static scene's matches are already the first model's inliers.

``share`` = second-motion matches / all matches of those pairs; the warning needs ``share`` >=
:data:`MOVING_SHARE_MIN` and a second motion in at least :data:`MOVING_PAIR_FRACTION` of the
pairs (a person crossing the view briefly is not the clip). Calibrated at ``low`` on the
chosen models (two CLI runs each, ``python -m colmap_pipeline reconstruct ... --quality low``):
static inputs: GoPro walk 0.0000 (0 of 116-118 pairs); Karma drone (sea waves, static
cliffs) 0.0000-0.0013 (0-2 of 116-117 pairs); fountain photos 0.0000-0.0006 (0-1 of 25-44
pairs); rendered sideways walk (``tests/scenes_moving.py``) 0.0000; the same walk with an
independently moving textured card in front (about 10% of the frame): 0.104-0.112 (in 90% of
the pairs). The threshold 0.03 sits over 20x above every static input and 3x below the moving
card; the pair fraction keeps a brief passer-by from tripping it.
"""
from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..results import JobWarning

#: Second model's RANSAC threshold (px of the frames, as the keypoints are stored).
SECOND_MOTION_PX = 1.0
#: A second motion needs at least this many inliers (COLMAP's ``min_num_inliers``).
MIN_SECOND_MOTION_MATCHES = 15
#: Warning thresholds (see the module docstring for the calibration).
MOVING_SHARE_MIN = 0.03
MOVING_PAIR_FRACTION = 0.25
#: At most this many pairs are measured (the closest in image id first: neighbours in time).
MAX_PAIRS = 300


@dataclass(frozen=True)
class MovingContent:
    """:func:`measure` of one database and model.

    Attributes:
        pairs: pairs measured.
        matches: matches of those pairs (before verification).
        rejected: matches verification rejected.
        second_motion_matches: rejected matches consistent with a second rigid motion.
        pairs_with_second_motion: pairs where a second motion was found.
        share: second_motion_matches / matches (0-1; 0 without pairs).
    """

    pairs: int
    matches: int
    rejected: int
    second_motion_matches: int
    pairs_with_second_motion: int

    @property
    def share(self) -> float:
        """Second-motion matches / all matches."""
        return self.second_motion_matches / self.matches if self.matches else 0.0

    @property
    def pair_fraction(self) -> float:
        """Pairs with a second motion / pairs measured."""
        return self.pairs_with_second_motion / self.pairs if self.pairs else 0.0

    def to_dict(self) -> dict[str, float | int]:
        """The numbers, rounded, for a warning's ``details``."""
        return {"pairs": self.pairs, "matches": self.matches, "rejected": self.rejected,
                "second_motion_matches": self.second_motion_matches,
                "pairs_with_second_motion": self.pairs_with_second_motion,
                "share": round(self.share, 4), "pair_fraction": round(self.pair_fraction, 4),
                "share_threshold": MOVING_SHARE_MIN,
                "pair_fraction_threshold": MOVING_PAIR_FRACTION}


def second_motion_inliers(points1: np.ndarray, points2: np.ndarray) -> int:
    """Inliers of one fundamental matrix fitted to the rejected matches ``points1`` ->
    ``points2`` (N x 2 px each): 0 when fewer than :data:`MIN_SECOND_MOTION_MATCHES` fit (or
    fewer are given)."""
    if len(points1) < MIN_SECOND_MOTION_MATCHES:
        return 0
    _, mask = cv2.findFundamentalMat(np.asarray(points1, np.float64),
                                     np.asarray(points2, np.float64), cv2.FM_RANSAC,
                                     SECOND_MOTION_PX, 0.999)
    n = int(mask.sum()) if mask is not None else 0
    return n if n >= MIN_SECOND_MOTION_MATCHES else 0


def _rejected(raw: np.ndarray, inliers: np.ndarray) -> np.ndarray:
    """Rows of ``raw`` (N x 2 feature indices) that are not in ``inliers``."""
    if len(inliers) == 0:
        return raw
    key = raw[:, 0].astype(np.int64) << 32 | raw[:, 1].astype(np.int64)
    ik = inliers[:, 0].astype(np.int64) << 32 | inliers[:, 1].astype(np.int64)
    return raw[~np.isin(key, ik)]


def registered_ids(model_dir: str | os.PathLike[str]) -> set[int]:
    """Image ids (= database ids) registered in the COLMAP model at ``model_dir``."""
    import pycolmap

    return {int(i) for i in pycolmap.Reconstruction(str(model_dir)).images}


def measure(database_path: str | os.PathLike[str],
            images: Collection[int] | None = None) -> MovingContent:
    """Measure moving content in the database's verified pairs between ``images`` (ids;
    ``None``: all), as the module docstring says.

    Raises:
        pycolmap errors when the database cannot be read.
    """
    import pycolmap

    from .match_diagnostics import MIN_VERIFIED_INLIERS, PARALLAX_CONFIGS

    counts = [0, 0, 0, 0, 0]  # pairs, matches, rejected, second, pairs with second
    with pycolmap.Database.open(str(database_path)) as db:
        pair_ids, geometries = db.read_two_view_geometries()
        chosen = []
        for pid, g in zip(pair_ids, geometries, strict=True):
            a, b = (int(x) for x in pycolmap.pair_id_to_image_pair(pid))
            if images is not None and (a not in images or b not in images):
                continue
            if int(g.config) in PARALLAX_CONFIGS and len(g.inlier_matches) >= \
                    MIN_VERIFIED_INLIERS:
                chosen.append((abs(b - a), a, b, np.asarray(g.inlier_matches)))
        chosen.sort(key=lambda c: (c[0], c[1]))
        keypoints: dict[int, np.ndarray] = {}
        for _, a, b, inl in chosen[:MAX_PAIRS]:
            for i in (a, b):
                if i not in keypoints:
                    keypoints[i] = np.asarray(db.read_keypoints(i))[:, :2]
            raw = np.asarray(db.read_matches(a, b))
            rej = _rejected(raw, inl)
            second = second_motion_inliers(keypoints[a][rej[:, 0]], keypoints[b][rej[:, 1]]) \
                if len(rej) else 0
            for k, v in enumerate((1, len(raw), len(rej), second, int(second > 0))):
                counts[k] += v
    return MovingContent(*counts)


def warning(m: MovingContent) -> JobWarning | None:
    """The ``moving_content`` warning when ``m`` passes both thresholds, else ``None``."""
    if m.share < MOVING_SHARE_MIN or m.pair_fraction < MOVING_PAIR_FRACTION:
        return None
    return JobWarning(
        code="moving_content",
        message=f"Part of the scene moved while filming: {100 * m.share:.0f}% of the matched "
                f"features (in {m.pairs_with_second_motion} of {m.pairs} image pairs) follow a "
                f"motion of their own. The model shows the static part of the scene only.",
        details=m.to_dict(),
        hint="Keep people, vehicles and other moving things out of the frame; to scan an "
             "object, put it down and walk around it with the camera rather than turning it "
             "in your hands.")


def check(database_path: str | os.PathLike[str], model_dir: str | os.PathLike[str] | None
          ) -> tuple[MovingContent, JobWarning | None]:
    """:func:`measure` over the images ``model_dir`` registered (all without a model), and
    :func:`warning`."""
    ids = registered_ids(model_dir) if model_dir is not None and Path(model_dir).exists() \
        else None
    m = measure(database_path, ids)
    return m, warning(m)
