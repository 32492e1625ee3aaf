"""Tests of colmap_pipeline.core.frame_scores: the analysis image, the per-frame scores, the
exposure verdict and the output image of a decoded frame."""
from __future__ import annotations

import av
import cv2
import numpy as np
import pytest
from factories import scene_texture, write_video

from colmap_pipeline.core import frame_scores


def test_exposure_reasons_on_known_images():
    tex = cv2.cvtColor(scene_texture(0, 480, 360), cv2.COLOR_BGR2GRAY)
    assert frame_scores.exposure_reason(frame_scores.frame_scores(tex)) is None
    black = (tex // 10).astype(np.uint8)  # everything below 26/255 < BLACK_P98
    assert frame_scores.exposure_reason(frame_scores.frame_scores(black)) == "black"
    white = (235 + tex // 13).astype(np.uint8)  # everything above 235 > OVEREXPOSED_P2
    assert frame_scores.exposure_reason(frame_scores.frame_scores(white)) == "overexposed"
    flat = np.full((360, 480), 120, np.uint8)
    s = frame_scores.frame_scores(flat)
    assert (s["contrast"], s["sharpness"], s["texture"]) == (0.0, 0.0, 0.0)
    assert frame_scores.exposure_reason(s) == "blank"


def test_sharpness_falls_with_blur_and_brightness_is_the_mean():
    tex = cv2.cvtColor(scene_texture(1, 480, 360), cv2.COLOR_BGR2GRAY)
    sharp = frame_scores.frame_scores(tex)
    blurred = frame_scores.frame_scores(cv2.GaussianBlur(tex, (0, 0), 4.0))
    assert sharp["brightness"] == pytest.approx(float(tex.mean()), abs=0.01)
    assert sharp["sharpness"] > 20 * blurred["sharpness"]
    assert blurred["sharpness"] < frame_scores.BLUR_ABSOLUTE < sharp["sharpness"]


def test_analysis_image_and_output_image_sizes(tmp_path):
    img = cv2.resize(scene_texture(2, 960, 540), (1280, 720), interpolation=cv2.INTER_AREA)
    clip = write_video(tmp_path / "hd.mp4", [img] * 3, rotation=90)
    with av.open(str(clip)) as c:
        frame = next(c.decode(video=0))
    gray = frame_scores.analysis_gray(frame)
    assert gray.dtype == np.uint8 and gray.shape == (270, 480)  # not rotated, long side 480
    out = frame_scores.output_image(frame, 640)
    assert out.shape == (640, 360, 3)  # scaled, then turned for display (portrait)
    ref = cv2.cvtColor(cv2.resize(img, (480, 270), interpolation=cv2.INTER_AREA),
                       cv2.COLOR_BGR2GRAY)
    assert np.abs(gray.astype(int) - ref.astype(int)).mean() < 4


def test_write_jpeg_is_atomic_and_leaves_no_temporary(tmp_path):
    img = scene_texture(3, 64, 48)
    frame_scores.write_jpeg(tmp_path / "a.jpg", img)
    assert [p.name for p in tmp_path.iterdir()] == ["a.jpg"]
    back = cv2.imread(str(tmp_path / "a.jpg"))
    assert back.shape == img.shape and np.abs(back.astype(int) - img.astype(int)).mean() < 8
