"""Tests of colmap_pipeline.core.clip_checks: the camera-motion check, the rotation-only check
and the diagnosis that names an unusable clip before SfM.

Motion numbers measured on the real clips (30 frames each, ``low`` preset), which set
``clip_checks.MIN_MOTION_FRACTION = 0.02``:

=====================  ===========  ==============  ===============
clip                   first->last  accumulated     fraction of diag
=====================  ===========  ==============  ===============
EuRoC static drone     1.15 px      1.5 px          0.0017  (fails)
GoPro MAX walk         re-seeded    339 px          0.35    (passes)
GoPro Karma drone      re-seeded    135 px          0.14    (passes)
=====================  ===========  ==============  ===============
"""
from __future__ import annotations

import json
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from conftest import shared_file
from factories import (
    H,
    W,
    parallax_frames,
    rotation_frames,
    translating_frames,
    write_video,
)

from colmap_pipeline.core import clip_checks, frame_select, frame_tracks, pipeline
from colmap_pipeline.errors import PipelineError
from colmap_pipeline.layout import Workspace, write_job
from colmap_pipeline.presets import default_preset

GOPRO_WALK = "gopro_max_walk/max-heromode.mp4"
GOPRO_KARMA = "gopro_karma_drone/karma.mp4"
EUROC_STATIC = "euroc_static/euroc_v101_cam0_20fps.mp4"


def extract(tmp_path: Path, clip: Path, cap: int) -> frame_select.FramesResult:
    return frame_select.extract_frames(clip, tmp_path / "frames", cap)


def _frames_of(tmp_path: Path, clip: Path, n: int = 30) -> list[Path]:
    res = frame_select.extract_frames(clip, tmp_path / "frames", n)
    return [tmp_path / "frames" / f["file"] for f in res["frames"]]


# --- motion ---------------------------------------------------------------------------------

def test_euroc_static_clip_fails_with_insufficient_motion(tmp_path):
    paths = _frames_of(tmp_path, shared_file(EUROC_STATIC))
    with pytest.raises(PipelineError) as ei:
        clip_checks.check_motion(paths)
    d = ei.value.details
    assert ei.value.code == "insufficient_motion" and d is not None
    assert d["measurable"] and d["lost_track_events"] == 0
    assert d["first_to_last_median_px"] < 3.0
    assert d["motion_fraction"] < d["threshold_fraction"] == clip_checks.MIN_MOTION_FRACTION


@pytest.mark.parametrize("clip", [GOPRO_WALK, GOPRO_KARMA], ids=["walk", "karma"])
def test_gopro_clips_pass_the_motion_check(tmp_path, clip):
    m = clip_checks.check_motion(_frames_of(tmp_path, shared_file(clip)))
    assert m["moving"] and m["motion_fraction"] > 5 * clip_checks.MIN_MOTION_FRACTION


def test_synthetic_static_clip_fails(tmp_path):
    rng = np.random.default_rng(1)
    still = next(translating_frames(1, 0))
    frames = [np.clip(still + rng.normal(0, 2, still.shape), 0, 255).astype(np.uint8)
              for _ in range(20)]
    clip = write_video(tmp_path / "static.mp4", frames)
    # near-duplicate rejection (issue 3) keeps only the first frame; the motion measurement
    # over every window's sharpest frame still finds no motion
    res = frame_select.extract_frames(clip, tmp_path / "frames", 10)
    assert len(res["frames"]) == 1
    with pytest.raises(PipelineError) as ei:
        clip_checks.check_clip(res, tmp_path / "frames")
    assert ei.value.code == "insufficient_motion"
    cand = [tmp_path / "all" / f"{i}.png" for i in range(10)]
    cand[0].parent.mkdir()
    with av.open(str(clip)) as c:
        for i, fr in enumerate(f for k, f in enumerate(c.decode(video=0)) if k % 2 == 0):
            cv2.imwrite(str(cand[i]), fr.to_ndarray(format="bgr24"))
    with pytest.raises(PipelineError) as ei:
        clip_checks.check_motion(cand)
    assert ei.value.details is not None and ei.value.details["accumulated_motion_px"] < 1.0


def test_synthetic_translation_is_measured(tmp_path):
    # 20 frames, 4 px per frame; the 10 selected frames (one per pair) span 16-19 steps
    paths = _frames_of(tmp_path, write_video(tmp_path / "pan.mp4", translating_frames(20, 4.0)),
                       10)
    m = clip_checks.check_motion(paths)
    assert m["moving"] and m["lost_track_events"] == 0 and m["segments"] == 1
    assert 16 * 4 - 1 <= m["accumulated_motion_px"] <= 19 * 4 + 1


def test_lost_tracking_across_a_big_jump_counts_as_motion(tmp_path):
    frames = list(translating_frames(1, 0)) * 5 + list(translating_frames(1, 0, seed=7)) * 5
    paths = []
    for i, img in enumerate(frames):
        paths.append(tmp_path / f"{i:02d}.png")
        cv2.imwrite(str(paths[-1]), img)
    m = clip_checks.check_motion(paths)
    assert m["moving"] and m["lost_track_events"] >= 1


def test_flat_video_abstains(tmp_path):
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), np.full((120, 160, 3), 90, np.uint8))
    m = clip_checks.check_motion(paths)
    assert m["measurable"] is False and m["moving"] is True


# --- diagnosis ------------------------------------------------------------------------------

def test_whole_clip_blurry_fails_as_too_blurry(tmp_path):
    frames = [cv2.GaussianBlur(f, (0, 0), 6.0) for f in parallax_frames(20)]
    res = extract(tmp_path, write_video(tmp_path / "blurry.mp4", frames), 10)
    d = clip_checks.diagnose(res, tmp_path / "frames")
    assert d["error"] is not None and d["error"]["code"] == "too_blurry"
    assert d["error"]["details"]["median_sharpness"] < clip_checks.BLUR_ABSOLUTE


def test_static_camera_fails_as_insufficient_motion(tmp_path):
    rng = np.random.default_rng(1)
    still = next(parallax_frames(1))
    frames = [np.clip(still + rng.normal(0, 2, still.shape), 0, 255).astype(np.uint8)
              for _ in range(20)]
    res = extract(tmp_path, write_video(tmp_path / "static.mp4", frames), 10)
    assert len(res["frames"]) == 1
    assert res["selection"]["dropped"] == {"not_sharpest": 10, "near_duplicate": 9}
    near = [r["motion_px"] for r in res["scores"] if r["reason"] == "near_duplicate"]
    assert all(m is not None and m < frame_select.NEAR_DUPLICATE_PX for m in near)
    with pytest.raises(PipelineError) as ei:
        clip_checks.check_clip(res, tmp_path / "frames")
    assert ei.value.code == "insufficient_motion"
    assert ei.value.details is not None and ei.value.details["near_duplicates"] == 9


def test_pure_rotation_fails_as_rotation_only(tmp_path):
    res = extract(tmp_path, write_video(tmp_path / "pan.mp4", rotation_frames(30)), 10)
    assert len(res["frames"]) == 10
    with pytest.raises(PipelineError) as ei:
        clip_checks.check_clip(res, tmp_path / "frames")
    d = ei.value.details
    assert ei.value.code == "rotation_only" and d is not None
    assert d["pairs_tested"] >= 2
    assert d["rotation_like_pairs"] == d["pairs_tested"]


def test_translation_with_parallax_is_not_rotation(tmp_path):
    res = extract(tmp_path, write_video(tmp_path / "walk.mp4", parallax_frames(30)), 10)
    d = clip_checks.check_clip(res, tmp_path / "frames")
    assert d["parallax"] is not None
    assert d["parallax"]["pairs_tested"] >= 1 and d["parallax"]["rotation_like_pairs"] == 0


def test_low_texture_fails_as_textureless(tmp_path):
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:H, 0:2 * W]
    wall = (60 + 100 * xx / (2 * W) + 30 * yy / H).astype(np.float32)
    frames = []
    for i in range(20):
        g = wall[:, 4 * i:4 * i + W] + rng.normal(0, 1.5, (H, W))
        frames.append(cv2.cvtColor(np.clip(g, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR))
    res = extract(tmp_path, write_video(tmp_path / "wall.mp4", frames), 10)
    assert res["selection"]["dropped"] == {"blank": 20} and res["frames"] == []
    with pytest.raises(PipelineError) as ei:
        clip_checks.check_clip(res, tmp_path / "frames")
    assert ei.value.code == "textureless"


def test_dark_clip_fails_as_too_dark(tmp_path):
    frames = [(f // 10) for f in parallax_frames(12)]  # everything below 26/255
    res = extract(tmp_path, write_video(tmp_path / "dark.mp4", frames), 6)
    assert res["selection"]["dropped"] == {"black": 12}
    with pytest.raises(PipelineError) as ei:
        clip_checks.check_clip(res, tmp_path / "frames")
    assert ei.value.code == "too_dark"


def test_three_frame_clip_fails_as_too_short_with_its_numbers(tmp_path):
    """Issue 10 item 8: a 3-frame, 0.1 s clip used to fail as insufficient_motion ("Walk or
    fly around"); it is too short, and the frames stage says so with its duration and frames."""
    clip = write_video(tmp_path / "tiny.mp4", translating_frames(3, 3.0), fps=30)
    ws = Workspace(tmp_path / "ws")
    write_job(ws.root, clip, default_preset("low"))
    with pytest.raises(PipelineError) as ei:
        pipeline.run_stage("frames", ws.root)
    err = ei.value
    assert err.code == "clip_too_short"
    assert "it lasts 0.10 s and holds 3 frames" in err.message
    assert err.details is not None
    assert err.details["duration_s"] == 0.1 and err.details["num_frames"] == 3
    assert err.details["frames_decoded"] == 3
    doc = json.loads(ws.frames_json.read_text())  # served at GET /jobs/{id}/frames
    assert doc["diagnosis"]["code"] == "clip_too_short"
    assert doc["diagnosis"]["message"] == err.message


# The EuRoC clip through a real server (the job fails in the frames stage, its frame scores
# served): tests/test_e2e.py::test_static_camera_fails_with_motion_hint_and_its_frames_are_served


def test_motion_and_parallax_share_reads_and_tracks_with_identical_results(tmp_path, monkeypatch):
    """:func:`diagnose` reads each kept frame once and tracks a stretch that both checks follow
    (same anchors, same re-detections) once (:class:`frame_tracks.FrameTracks`); the numbers are
    those of the two checks run apart."""
    res = extract(tmp_path, write_video(tmp_path / "walk.mp4", parallax_frames(30)), 10)
    paths = [tmp_path / "frames" / f["file"] for f in res["frames"]]
    calls = {"load_gray": 0, "track": 0}

    def counted(name, fn):
        def wrapper(*args):
            calls[name] += 1
            return fn(*args)
        return wrapper

    monkeypatch.setattr(frame_tracks, "load_gray", counted("load_gray", frame_tracks.load_gray))
    monkeypatch.setattr(frame_tracks, "track", counted("track", frame_tracks.track))
    apart = (clip_checks.measure_motion(paths), clip_checks.measure_parallax(paths))
    motion_steps = len(paths) - 1
    assert calls["load_gray"] == 2 * len(paths) and calls["track"] > motion_steps
    apart_tracks = calls["track"]
    calls.update(load_gray=0, track=0)
    d = clip_checks.diagnose(res, tmp_path / "frames")
    assert d["ok"] and calls["load_gray"] == len(paths)
    assert motion_steps <= calls["track"] < apart_tracks
    assert d["motion"] == clip_checks.judge_motion(apart[0]) and d["parallax"] == apart[1]
    shared_tracks = calls["track"]
    # looking ahead: the motion check's reads and steps are done while the frames are selected
    calls.update(load_gray=0, track=0)
    ahead = frame_tracks.MotionLookAhead()
    again = frame_select.extract_frames(tmp_path / "walk.mp4", tmp_path / "again", 10,
                                        motion=ahead)
    assert calls == {"load_gray": len(paths), "track": motion_steps}
    frames = ahead.tracks_for(again, tmp_path / "again")
    assert frames is not None and frames.paths == [tmp_path / "again" / f["file"]
                                                   for f in again["frames"]]
    d2 = clip_checks.diagnose(again, tmp_path / "again", frames)
    assert calls == {"load_gray": len(paths), "track": shared_tracks}
    assert (d2["motion"], d2["parallax"]) == (d["motion"], d["parallax"])


def test_motion_look_ahead_is_dropped_when_candidates_were_dropped(tmp_path):
    rng = np.random.default_rng(1)
    still = next(parallax_frames(1))
    frames = [np.clip(still + rng.normal(0, 2, still.shape), 0, 255).astype(np.uint8)
              for _ in range(20)]
    ahead = frame_tracks.MotionLookAhead()
    res = frame_select.extract_frames(write_video(tmp_path / "static.mp4", frames),
                                      tmp_path / "frames", 10, motion=ahead)
    assert len(res["frames"]) == 1 and len(ahead.frames) == 10  # 9 near-duplicates dropped
    assert ahead.tracks_for(res, tmp_path / "frames") is None
