"""Tests of colmap_pipeline.core.tracks: corners and forward-backward LK tracks."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from factories import scene_texture

from colmap_pipeline.core import tracks


def _gray(seed: int, x: int) -> np.ndarray:
    tex = cv2.cvtColor(scene_texture(seed), cv2.COLOR_BGR2GRAY)
    return np.ascontiguousarray(tex[100:340, x:x + 320])


def test_a_known_shift_is_measured():
    g0, g1 = _gray(0, 0), _gray(0, 7)  # the view moves 7 px right: content moves 7 px left
    p0 = tracks.corners(g0)
    assert tracks.MOTION_MIN_CORNERS <= len(p0) <= tracks.MOTION_MAX_CORNERS
    p1, ok = tracks.track(g0, g1, p0)
    assert ok.mean() > 0.8
    shift = np.median((p1[ok] - p0[ok]).reshape(-1, 2), axis=0)
    assert shift == pytest.approx([-7.0, 0.0], abs=0.1)
    assert tracks.track_median(g0, p0, g1) == pytest.approx(7.0, abs=0.1)


def test_another_scene_loses_the_tracks():
    g0 = _gray(0, 0)
    assert tracks.track_median(g0, tracks.corners(g0), _gray(7, 0)) == math.inf


def test_flat_image_has_no_corners_and_load_gray_scales_down(tmp_path):
    assert len(tracks.corners(np.full((120, 160), 90, np.uint8))) == 0
    p = tmp_path / "big.png"
    cv2.imwrite(str(p), scene_texture(0, 1280, 720))
    g, scale = tracks.load_gray(p)
    assert g.shape == (360, 640) and scale == pytest.approx(0.5)
    with pytest.raises(OSError):
        tracks.load_gray(tmp_path / "missing.png")
