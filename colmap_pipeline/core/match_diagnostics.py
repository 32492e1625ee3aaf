"""What the verified matches already say before mapping: rotation, parallax, disconnected scenes.

The recovery ladder (:mod:`.ladder`) reads this before its first attempt and after each of its
matching rungs, to skip the rungs that cannot help and to fail with a narrow code. Everything is
read from the COLMAP database's two-view geometries (the matching stage's RANSAC verification,
COLMAP ``estimators/two_view_geometry.cc``): per image pair the inlier matches and the
configuration, which is ``PLANAR_OR_PANORAMIC`` when a homography explains more than
``max_H_inlier_ratio`` (0.8) of the fundamental/essential-matrix inliers, i.e. when the pair shows
no parallax (a camera turning on the spot, or a flat scene), and ``CALIBRATED`` /
``UNCALIBRATED`` when it does.

Per pair (:class:`PairGeometry`): the inliers, whether a homography explains it, the median
image motion of its inliers (fraction of the image diagonal), and for a homography pair whether
it is a pure rotation ``K R K^-1`` (:func:`.clip_checks.rotation_error`, the same test as the
frames stage's tripod-pan check, here on COLMAP's homography of SIFT matches, so it also covers
photo sets). Over all pairs (:func:`diagnose`, pure, on these records):

* ``disconnected_scenes``: the graph of verified pairs falls apart into at least two
  components each big enough for a model of its own (``max(3, 20%)`` of the images, the
  smallest model the checks accept, :func:`.sfm_mapping.min_registered_images`): two unrelated
  scenes cut together. Matching more pairs (exhaustive, loop closure) can join them; nothing
  else can.
* ``rotation_only``: at least :data:`MIN_WIDE_PAIRS` pairs move by
  :data:`WIDE_PAIR_DISPLACEMENT` of the diagonal or more, and at least
  :data:`ROTATION_PAIR_FRACTION` of them are pure rotations: no mapper or threshold makes
  parallax.
* ``insufficient_parallax``: at least :data:`MIN_HOMOGRAPHY_SHARE` of the verified pairs
  are explained by a homography, and no pair is explained by an essential/fundamental matrix
  (better than by a homography) with at least :data:`MIN_PARALLAX_PAIR_INLIERS` inliers (the
  ladder's relaxed initial-pair minimum): no pair can start a model with depth (a
  mostly-turning pan, or a flat scene seen head-on). Pairs that are merely weak (few inliers,
  but with parallax) are not this: the relaxed initial-pair thresholds may still help.

Triangulation angles are not used: without a known focal length the angle from a
fundamental matrix decomposed with COLMAP's default focal guess (1.2 x the image's longer side)
is unstable; measured on a rendered sideways walk (tests/scenes_moving.py), pairs with the same
image motion gave 2.6 to 67 degrees.

Measured at ``low`` (0.01-0.26 s per reading). Real inputs, all without a verdict: GoPro walk
(30 frames) 119 pairs verified, 98 with parallax, 2.5% homography pairs, 5 wide pairs, none a
rotation, one component; Karma drone 119 verified, 102 with parallax, 2.5% homography, no wide
pair; fountain photos (exhaustive) 51 verified, 37 with parallax, 14% homography, 16 wide,
none a rotation. Rendered scenes (24 frames, ``tests/scenes_moving.py``): sideways walk 89
verified, 61 with parallax, 31% homography (near pairs see the far wall), no wide pair; pan of
40 degrees: 44 wide pairs, all rotation-like (rotation error median 0.002; translation over a
plane gives 0.028-0.042, :mod:`.clip_checks`); the same pan while the camera also moves
sideways by 0.1 m / 0.4 m / 0.8 m (scene 4-10 m away): 32 / 26 / 15 of 32 wide pairs
rotation-like, so ``rotation_only`` / ``rotation_only`` / none; at 0.4 m the ladder's first
attempt still registered every frame, which is why the ladder always makes that attempt and
keeps a good-enough model whatever the verdict; two scenes cut together: components of 12 and
12 images.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..results import MatchDiagnostics
from .clip_checks import (
    PARALLAX_MIN_BASELINE_FRACTION,
    ROTATION_ORTHOGONALITY_MAX,
    ROTATION_PAIR_FRACTION,
    rotation_error,
)

#: A pair counts as verified with at least this many inlier matches (COLMAP's
#: ``TwoViewGeometryOptions.min_num_inliers``).
MIN_VERIFIED_INLIERS = 15
#: A pair can start a model with depth when a fundamental/essential matrix explains it (no
#: homography does as well) with at least this many inliers: the ladder's relaxed
#: ``init_min_num_inliers`` (COLMAP's default 100 halved).
MIN_PARALLAX_PAIR_INLIERS = 50
#: ``insufficient_parallax`` needs at least this share of verified pairs explained by a
#: homography (COLMAP's own ``max_H_inlier_ratio`` is 0.8 per pair).
MIN_HOMOGRAPHY_SHARE = 0.8
#: A pair is wide enough to tell rotation from translation when its inliers move by this
#: fraction of the image diagonal (median), as in the frames stage's check.
WIDE_PAIR_DISPLACEMENT = PARALLAX_MIN_BASELINE_FRACTION
#: ``rotation_only`` needs at least this many wide pairs.
MIN_WIDE_PAIRS = 2
#: A component of the match graph counts as a scene when it has at least
#: max(:data:`MIN_SCENE_IMAGES`, ceil(:data:`MIN_SCENE_FRACTION` x images)) images.
MIN_SCENE_IMAGES = 3
MIN_SCENE_FRACTION = 0.2
#: COLMAP ``TwoViewGeometry::ConfigurationType`` values (``two_view_geometry.h``).
CONFIG_CALIBRATED, CONFIG_UNCALIBRATED = 2, 3
CONFIG_PLANAR, CONFIG_PANORAMIC, CONFIG_PLANAR_OR_PANORAMIC = 4, 5, 6
HOMOGRAPHY_CONFIGS = (CONFIG_PLANAR, CONFIG_PANORAMIC, CONFIG_PLANAR_OR_PANORAMIC)
PARALLAX_CONFIGS = (CONFIG_CALIBRATED, CONFIG_UNCALIBRATED)

VERDICTS = ("disconnected_scenes", "rotation_only", "insufficient_parallax")


@dataclass(frozen=True)
class PairGeometry:
    """One image pair of the database as verification left it.

    Attributes:
        image1, image2: image ids.
        inliers: verified (inlier) matches.
        config: COLMAP configuration value (``CONFIG_*``).
        displacement: median image motion of the inliers / image diagonal (0 without inliers).
        rotation_error: homography pairs: :func:`.clip_checks.rotation_error` (max |singular
            value - 1| of ``K^-1 H K``; 0 for a perfect rotation); ``None`` otherwise.
    """

    image1: int
    image2: int
    inliers: int
    config: int
    displacement: float = 0.0
    rotation_error: float | None = None

    @property
    def verified(self) -> bool:
        """At least :data:`MIN_VERIFIED_INLIERS` inliers."""
        return self.inliers >= MIN_VERIFIED_INLIERS

    @property
    def homography(self) -> bool:
        """Verified and explained by a homography (no parallax in this pair)."""
        return self.verified and self.config in HOMOGRAPHY_CONFIGS

    @property
    def parallax(self) -> bool:
        """Explained by an essential/fundamental matrix with enough inliers to start a model."""
        return self.config in PARALLAX_CONFIGS and self.inliers >= MIN_PARALLAX_PAIR_INLIERS

    @property
    def wide(self) -> bool:
        """Verified, with inliers moving :data:`WIDE_PAIR_DISPLACEMENT` of the diagonal."""
        return self.verified and self.displacement >= WIDE_PAIR_DISPLACEMENT

    @property
    def rotation_like(self) -> bool:
        """A wide homography pair of the form ``K R K^-1`` (pure rotation)."""
        return (self.wide and self.homography and self.rotation_error is not None
                and self.rotation_error <= ROTATION_ORTHOGONALITY_MAX)


def components(nodes: Iterable[int], edges: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components of an undirected graph (union-find), largest first; each sorted.

    Args:
        nodes: node ids (every node appears, isolated ones as singletons).
        edges: pairs of node ids; ids not in ``nodes`` are added.
    """
    parent: dict[int, int] = {int(n): int(n) for n in nodes}

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    for a, b in edges:
        parent.setdefault(int(a), int(a))
        parent.setdefault(int(b), int(b))
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for n in parent:
        groups.setdefault(find(n), []).append(n)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g[0]))


def min_scene_images(num_images: int) -> int:
    """Images a match-graph component needs to count as a scene of its own."""
    return max(MIN_SCENE_IMAGES, math.ceil(MIN_SCENE_FRACTION * num_images))


def diagnose(pairs: Sequence[PairGeometry], images: Sequence[int]) -> MatchDiagnostics:
    """The diagnostics of ``pairs`` (every pair the database holds) over ``images`` (ids).

    Returns:
        :class:`..results.MatchDiagnostics`; ``verdict`` is the first of
        ``disconnected_scenes``, ``rotation_only``, ``insufficient_parallax`` that holds (see
        the module docstring), else ``None``. Never raises.
    """
    verified = [p for p in pairs if p.verified]
    wide = [p for p in verified if p.wide]
    rotation = [p for p in wide if p.rotation_like]
    parallax = [p for p in verified if p.parallax]
    comps = components(images, [(p.image1, p.image2) for p in verified])
    n = len(images)
    scenes = [c for c in comps if len(c) >= min_scene_images(n)]
    verdict = None
    if len(scenes) >= 2:
        verdict = "disconnected_scenes"
    elif len(wide) >= MIN_WIDE_PAIRS and len(rotation) >= ROTATION_PAIR_FRACTION * len(wide):
        verdict = "rotation_only"
    elif verified and not parallax and sum(p.homography for p in verified) >= \
            MIN_HOMOGRAPHY_SHARE * len(verified):
        verdict = "insufficient_parallax"
    rot_errors = [p.rotation_error for p in wide if p.homography and p.rotation_error is not None]
    return MatchDiagnostics(
        images=n, pairs=len(pairs), verified_pairs=len(verified),
        verified_share=round(len(verified) / len(pairs), 4) if pairs else 0.0,
        strong_pairs=sum(p.inliers >= 2 * MIN_PARALLAX_PAIR_INLIERS for p in verified),
        parallax_pairs=len(parallax),
        homography_share=round(sum(p.homography for p in verified) / len(verified), 4)
        if verified else 0.0,
        wide_pairs=len(wide), rotation_like_pairs=len(rotation),
        median_rotation_error=round(float(np.median(rot_errors)), 5) if rot_errors else None,
        median_inliers=int(np.median([p.inliers for p in verified])) if verified else 0,
        components=[len(c) for c in comps if len(c) > 1],
        isolated_images=sum(len(c) == 1 for c in comps),
        scenes=[[int(i) for i in c] for c in scenes] if len(scenes) >= 2 else [],
        largest_component_share=round(len(comps[0]) / n, 4) if comps and n else 0.0,
        verdict=verdict)


def median_displacement(points1: np.ndarray, points2: np.ndarray, diagonal: float) -> float:
    """Median of |points2 - points1| (px, N x 2 each) over ``diagonal`` (px); 0 when empty."""
    if len(points1) == 0 or diagonal <= 0:
        return 0.0
    return float(np.median(np.linalg.norm(points2 - points1, axis=1)) / diagonal)


def read_pairs(database_path: str | os.PathLike[str]) -> tuple[list[PairGeometry], list[int]]:
    """Every pair of the database's two-view geometries as :class:`PairGeometry`, and the
    image ids. Rotation errors are computed for wide homography pairs only (cheap: tens of
    ms for a few hundred pairs).

    Raises:
        pycolmap errors when the database cannot be read.
    """
    import pycolmap

    out: list[PairGeometry] = []
    with pycolmap.Database.open(str(database_path)) as db:
        cams = {c.camera_id: c for c in db.read_all_cameras()}
        images = {im.image_id: im for im in db.read_all_images()}
        keypoints: dict[int, np.ndarray] = {}

        def kps(i: int) -> np.ndarray:
            if i not in keypoints:
                keypoints[i] = np.asarray(db.read_keypoints(i))[:, :2]
            return keypoints[i]

        pair_ids, geometries = db.read_two_view_geometries()
        for pid, g in zip(pair_ids, geometries, strict=True):
            a, b = (int(x) for x in pycolmap.pair_id_to_image_pair(pid))
            m = np.asarray(g.inlier_matches)
            config = int(g.config)
            disp, rot = 0.0, None
            if len(m) >= MIN_VERIFIED_INLIERS and a in images and b in images:
                cam = cams[images[a].camera_id]
                disp = median_displacement(kps(a)[m[:, 0]], kps(b)[m[:, 1]],
                                           math.hypot(cam.width, cam.height))
                if (config in HOMOGRAPHY_CONFIGS and g.H is not None
                        and disp >= WIDE_PAIR_DISPLACEMENT):
                    rot = rotation_error(np.asarray(g.H), cam.width, cam.height)[0]
            out.append(PairGeometry(a, b, int(len(m)), config, round(disp, 5),
                                    None if rot is None or not math.isfinite(rot)
                                    else round(rot, 5)))
    return out, sorted(images)


def diagnose_database(database_path: str | os.PathLike[str]) -> MatchDiagnostics:
    """:func:`diagnose` of :func:`read_pairs`, with ``elapsed_s`` (s) filled in."""
    t0 = time.monotonic()
    pairs, images = read_pairs(database_path)
    d = diagnose(pairs, images)
    d.elapsed_s = round(time.monotonic() - t0, 3)
    return d


def describe(d: MatchDiagnostics) -> str:
    """One sentence with the numbers behind ``d.verdict`` (for an error message)."""
    if d.verdict == "disconnected_scenes":
        sizes = " and ".join(str(len(s)) for s in d.scenes)
        return (f"The frames show unrelated scenes: the matches split them into groups of "
                f"{sizes} frames, and no image pair across the groups was verified (each of the "
                f"{d.verified_pairs} verified pairs lies within one group).")
    if d.verdict == "rotation_only":
        return (f"The camera only turns on the spot: {d.rotation_like_pairs} of {d.wide_pairs} "
                f"image pairs with enough motion are explained by a pure rotation, so there is "
                f"no parallax to recover depth from.")
    if d.verdict == "insufficient_parallax":
        return (f"No image pair shows enough parallax to start a model: "
                f"{100 * d.homography_share:.0f}% of the {d.verified_pairs} verified pairs are "
                f"explained by a homography (a camera turning, or a flat scene), and none by an "
                f"essential matrix with at least {MIN_PARALLAX_PAIR_INLIERS} inliers.")
    return "The matches show nothing that rules a model out."
