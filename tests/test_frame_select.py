"""Tests of colmap_pipeline.core.frame_select: one sharp, usable, distinct frame per time window,
on synthetic clips with known content (:mod:`factories`) and on the real clips; and the damage
it reports with numbers (issue 10 item 7: a clip cut in half, a clip corrupted in the middle),
also in the frames stage's ``frames.json``.

Every test asserts its exact outcome: frames kept, which were dropped and why, or the code.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import shared_file
from factories import (
    H,
    W,
    corrupt_packets,
    cut_file,
    packet_spans,
    parallax_frames,
    translating_frames,
    write_vfr_video,
    write_video,
    write_video_codec,
)

from colmap_pipeline.core import clip_checks, frame_select, frame_tracks, pipeline, video_probe
from colmap_pipeline.errors import PipelineError
from colmap_pipeline.layout import Workspace, write_job
from colmap_pipeline.presets import default_preset


def extract(tmp_path: Path, clip: Path, cap: int, **kw) -> frame_select.FramesResult:
    return frame_select.extract_frames(clip, tmp_path / "frames", cap, **kw)


def reasons(res: frame_select.FramesResult) -> list[str | None]:
    return [r["reason"] for r in res["scores"]]


def keyframed_clip(tmp_path: Path, n: int = 40) -> Path:
    """A parallax clip of ``n`` frames at 10 fps, a keyframe every 10 frames, its index
    (``moov``) before the media data, so a cut keeps the index and loses the tail."""
    return write_video(tmp_path / "full.mp4", parallax_frames(n, step=3.0), options={"g": "10"},
                       container_options={"movflags": "+faststart"})


# --- windows and formats --------------------------------------------------------------------

def test_extract_frames_one_sharp_frame_per_time_window(tmp_path):
    fps, n, windows = 10, 60, 6  # 6 s clip, one window per second = 10 frames
    sharp = {w: 10 * w + (3 * w + 1) % 10 for w in range(windows)}  # the sharp frame's index
    frames = []
    for i, img in enumerate(translating_frames(n, 2.0)):
        frames.append(img if i in sharp.values() else cv2.GaussianBlur(img, (0, 0), 2.5))
    clip = write_video(tmp_path / "clip.mp4", frames, fps=fps)
    out = tmp_path / "frames"
    res = frame_select.extract_frames(clip, out, windows)
    assert res["num_decoded"] == n
    assert len(res["frames"]) == windows
    for w, f in enumerate(res["frames"]):
        assert f["index"] == w and f["file"] == f"frame_{w:05d}.jpg"
        assert w <= f["timestamp_s"] < w + 1, "frames must spread over the duration"
        assert f["timestamp_s"] == pytest.approx(sharp[w] / fps, abs=1e-6)
        img = cv2.imread(str(out / f["file"]))
        assert img is not None and img.shape == (240, 320, 3)
    assert sorted(p.name for p in out.iterdir()) == [f["file"] for f in res["frames"]]
    assert res["warnings"] == [] and res["truncated"] is False


def test_extract_frames_caps_image_size(tmp_path):
    clip = write_video(tmp_path / "clip.mp4", translating_frames(12, 3.0), fps=10)
    res = frame_select.extract_frames(clip, tmp_path / "f", 4, max_image_size=160)
    img = cv2.imread(str(tmp_path / "f" / res["frames"][0]["file"]))
    assert img.shape[:2] == (120, 160)


def test_extract_frames_too_few_frames(tmp_path):
    clip = write_video(tmp_path / "short.mp4", translating_frames(2, 3.0), fps=10)
    with pytest.raises(PipelineError) as ei:
        frame_select.extract_frames(clip, tmp_path / "f", 30)
    assert ei.value.code == "too_few_frames"
    assert ei.value.details["frames_decoded"] == 2


@pytest.mark.parametrize("rotation", [90, 270, 180])
def test_extract_frames_applies_rotation_like_opencv(tmp_path, rotation):
    base = np.full((48, 64, 3), 40, np.uint8)
    base[4:16, 4:28] = (250, 250, 250)  # bright block at the top-left: orientation marker
    base[30:44, 50:60] = (0, 0, 250)  # red block at the bottom-right
    clip = write_video(tmp_path / f"rot{rotation}.mp4", [base] * 6, fps=10, rotation=rotation)
    info = video_probe.probe_video(clip)
    assert info["rotation"] == rotation
    assert (info["width"], info["height"]) == ((48, 64) if rotation in (90, 270) else (64, 48))
    res = frame_select.extract_frames(clip, tmp_path / "f", 3)
    got = cv2.imread(str(tmp_path / "f" / res["frames"][0]["file"])).astype(int)
    expected = np.rot90(base, k=rotation // 90).astype(int)  # np.rot90 turns counter-clockwise
    assert got.shape == expected.shape
    assert np.abs(got - expected).mean() < 6
    ok, ref = cv2.VideoCapture(str(clip)).read()  # OpenCV applies the display matrix itself
    assert ok and ref.shape == got.shape and np.abs(ref.astype(int) - got).mean() < 6


@pytest.mark.parametrize("rotation", [90, 270])
def test_rotated_moving_clip_keeps_every_window_in_portrait(tmp_path, rotation):
    clip = write_video(tmp_path / "rot.mp4", parallax_frames(20), rotation=rotation)
    res = extract(tmp_path, clip, 10)
    assert res["video"]["rotation"] == rotation
    assert len(res["frames"]) == 10 and res["selection"]["dropped"] == {"not_sharpest": 10}
    for f in res["frames"]:
        assert cv2.imread(str(tmp_path / "frames" / f["file"])).shape == (W, H, 3)
    assert clip_checks.diagnose(res, tmp_path / "frames")["ok"]


def test_variable_frame_rate_is_windowed_by_timestamp(tmp_path):
    # 30 fps for 1 s, then 5 fps for 2 s: 30 + 10 frames, 3 s
    times = [i / 30 for i in range(30)] + [1.0 + i / 5 for i in range(10)]
    clip = write_vfr_video(tmp_path / "vfr.mp4", times, parallax_frames(len(times), step=3.0))
    res = extract(tmp_path, clip, 6)
    got = [r["timestamp_s"] for r in res["scores"]]
    assert got == pytest.approx(times, abs=1e-3)
    dur = res["video"]["duration_s"]
    assert dur is not None and 2.8 < dur <= 3.0
    per_window = [sum(1 for r in res["scores"] if r["window"] == w) for w in range(6)]
    assert per_window == [sum(1 for t in times if min(5, int(t / dur * 6)) == w)
                          for w in range(6)]
    assert per_window[:2] == [15, 14] and sum(per_window[2:]) == 11  # by time, not by count
    assert len(res["frames"]) == 6
    for f, w in zip(res["frames"], range(6), strict=True):
        assert w * dur / 6 <= f["timestamp_s"] < (w + 1) * dur / 6


def test_odd_sized_444_clip(tmp_path):
    frames = [f[:241, :321] for f in parallax_frames(8, size=(330, 250))]
    clip = write_video_codec(tmp_path / "odd.mp4", frames, "libx264", "yuv444p")
    assert video_probe.probe_video(clip)["pix_fmt"] == "yuv444p"
    res = extract(tmp_path, clip, 4)
    assert len(res["frames"]) == 4
    img = cv2.imread(str(tmp_path / "frames" / res["frames"][0]["file"]))
    assert img.shape == (241, 321, 3)
    src = frames[round(res["frames"][0]["timestamp_s"] * 10)].astype(int)
    assert np.abs(img.astype(int) - src).mean() < 6


def test_thumbnail_stream_is_ignored(tmp_path):
    import av

    clip = tmp_path / "thumb.mp4"
    frames = list(parallax_frames(12))
    with av.open(str(clip), "w") as c:
        art = c.add_stream("mjpeg", rate=1)  # first, larger, flagged attached_pic
        art.width, art.height, art.pix_fmt = 640, 480, "yuvj420p"
        art.disposition = av.stream.Disposition.attached_pic
        v = c.add_stream("libx264", rate=10)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        cover = av.VideoFrame.from_ndarray(np.full((480, 640, 3), 200, np.uint8), format="bgr24")
        for pk in art.encode(cover.reformat(format="yuvj420p")):
            c.mux(pk)
        for img in frames:
            for pk in v.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                c.mux(pk)
        for s in (v, art):
            for pk in s.encode():
                c.mux(pk)
    res = extract(tmp_path, clip, 6)
    # the muxer stores the cover second; it is the largest video stream, yet not the one read
    assert [(s["type"], s["codec"]) for s in res["video"]["streams"]] == [
        ("video", "h264"), ("video", "mjpeg")]
    assert res["video"]["stream_index"] == 0 and res["video"]["width"] == W
    assert res["num_decoded"] == 12 and len(res["frames"]) == 6


def test_large_resolution_is_downscaled_while_decoding(tmp_path):
    big = [cv2.resize(f, (3840, 2160), interpolation=cv2.INTER_CUBIC)
           for f in parallax_frames(6, step=8.0)]
    clip = write_video_codec(tmp_path / "4k.mp4", big, "libx264", "yuv420p")
    res = extract(tmp_path, clip, 3, max_image_size=1000)
    assert len(res["frames"]) == 3
    img = cv2.imread(str(tmp_path / "frames" / res["frames"][0]["file"]))
    assert img.shape == (562, 1000, 3)
    src = cv2.resize(big[round(res["frames"][0]["timestamp_s"] * 10)], (1000, 562),
                     interpolation=cv2.INTER_AREA)
    assert np.abs(img.astype(int) - src.astype(int)).mean() < 6


# --- selection ------------------------------------------------------------------------------

def test_black_fades_are_dropped(tmp_path):
    frames = list(parallax_frames(40, step=3.0))
    black = set(range(0, 8)) | set(range(32, 40))
    for i in black:
        frames[i] = np.full_like(frames[i], 8)
    ahead = frame_tracks.MotionLookAhead()
    res = extract(tmp_path, write_video(tmp_path / "fade.mp4", frames), 10, motion=ahead)
    r = reasons(res)
    assert [i for i, x in enumerate(r) if x == "black"] == sorted(black)
    # time windows alone would give 6 of 10 (4 windows are black); the refill pass spreads
    # the 10 windows over the 24 usable frames: the full cap, none of them black
    assert res["selection"]["refilled"] is True
    assert res["selection"]["dropped"] == {"black": 16, "not_sharpest": 14}
    assert len(res["frames"]) == 10
    assert all(0.8 <= f["timestamp_s"] < 3.2 for f in res["frames"])
    assert all(f["brightness"] > 60 for f in res["frames"])
    d = clip_checks.diagnose(res, tmp_path / "frames")
    assert d["ok"]
    # the motion look-ahead started over with the refill pass: its 10 frames are the kept ones
    tracked = ahead.tracks_for(res, tmp_path / "frames")
    assert tracked is not None and len(tracked) == 10
    assert clip_checks.diagnose(res, tmp_path / "frames", tracked) == d


def test_blur_bursts_keep_the_sharp_frame_of_each_window(tmp_path):
    frames = list(parallax_frames(40, step=3.0))
    sharp = {w: 4 * w + (w % 4) for w in range(10)}  # the one sharp frame of each window
    for i in range(40):
        if i not in sharp.values() or i == sharp[6]:  # window 6 is blurred throughout
            frames[i] = cv2.GaussianBlur(frames[i], (0, 0), 3.0)
    res = extract(tmp_path, write_video(tmp_path / "blur.mp4", frames), 10)
    kept_t = [f["timestamp_s"] for f in res["frames"]]
    assert kept_t == pytest.approx([sharp[w] / 10 for w in range(10) if w != 6], abs=1e-6)
    assert [r["window"] for r in res["scores"] if r["reason"] == "blurry"] == [6]
    assert res["selection"]["dropped"] == {"not_sharpest": 30, "blurry": 1}


@pytest.mark.parametrize("rel", ["gopro_max_walk/max-heromode.mp4", "gopro_karma_drone/karma.mp4"],
                         ids=["walk", "karma"])
def test_gopro_clips_fill_the_low_preset_cap(tmp_path, rel):
    res = extract(tmp_path, shared_file(rel), 30, max_image_size=1000)
    assert len(res["frames"]) >= 24
    kept = [r for r in res["scores"] if r["kept"]]
    assert all(r["reason"] is None for r in kept) and len(kept) == len(res["frames"])
    assert min(r["brightness"] for r in kept) > 60
    assert all(r["motion_px"] is None or r["motion_px"] >= frame_select.NEAR_DUPLICATE_PX
               for r in kept[1:])
    assert res["warnings"] == []
    assert clip_checks.diagnose(res, tmp_path / "frames")["ok"]


# --- damaged files (issue 10 item 7) --------------------------------------------------------

def test_clip_cut_in_half_keeps_the_decodable_part_and_says_how_much(tmp_path):
    data_clip = keyframed_clip(tmp_path)
    cut = cut_file(data_clip, tmp_path / "cut.mp4", 0.5)
    res = extract(tmp_path, cut, 8)
    assert res["truncated"] and [w["code"] for w in res["warnings"]] == ["video_truncated"]
    n = res["num_decoded"]
    assert 10 <= n <= 30
    w = res["warnings"][0]
    assert w["details"]["decoded_until_s"] == pytest.approx((n - 1) / 10, abs=1e-6)
    assert w["details"]["declared_duration_s"] == pytest.approx(4.0, abs=1e-6)
    assert w["details"]["frames_decoded"] == n and w["details"]["frames_declared"] == 40
    assert f"decoded {(n - 1) / 10:.2f} s of 4.00 s" in w["message"]
    assert all(f["timestamp_s"] < n / 10 for f in res["frames"])
    assert len(res["frames"]) == len({r["window"] for r in res["scores"]})
    tiny = cut_file(data_clip, tmp_path / "tiny.mp4", 1 / 25)  # the header survives, no frame
    with pytest.raises(PipelineError) as ei:
        extract(tmp_path / "t", tiny, 8)
    assert ei.value.code == "video_truncated"
    assert ei.value.details["frames_decoded"] == 0 and ei.value.details["declared_frames"] == 40


def test_clip_corrupted_in_the_middle_is_decoded_past_the_damage_and_says_so(tmp_path):
    clip = keyframed_clip(tmp_path)
    spans = packet_spans(clip)
    assert len(spans) == 40 and spans[15][2] == pytest.approx(1.4)
    bad = corrupt_packets(clip, tmp_path / "bad.mp4", first=15, count=2)
    res = extract(tmp_path, bad, 8)
    assert not res["truncated"] and [w["code"] for w in res["warnings"]] == ["video_corrupted"]
    d = res["warnings"][0]["details"]
    assert d["frames_declared"] == 40 and d["frames_decoded"] == res["num_decoded"] == 38
    assert d["decode_errors"] == 2
    assert 1.4 <= d["first_error_s"] <= d["last_error_s"] <= 2.0  # where the bytes were hit
    assert "2 packet(s) failed to decode between" in res["warnings"][0]["message"]
    assert "decoded 38 of 40 frames" in res["warnings"][0]["message"]
    # the decode went on past the damage: frames after it were selected too
    assert len(res["frames"]) == 8 and max(f["timestamp_s"] for f in res["frames"]) > 3.0


@pytest.mark.parametrize("damage", ["cut", "corrupted"])
def test_frames_stage_writes_the_damage_warning_to_frames_json(tmp_path, damage):
    clip = keyframed_clip(tmp_path)
    bad = (cut_file(clip, tmp_path / "bad.mp4", 0.5) if damage == "cut"
           else corrupt_packets(clip, tmp_path / "bad.mp4", first=15, count=2))
    ws = Workspace(tmp_path / "ws")
    write_job(ws.root, bad, default_preset("low"))
    summary = pipeline.run_stage("frames", ws.root)
    doc = json.loads(ws.frames_json.read_text())
    code = "video_truncated" if damage == "cut" else "video_corrupted"
    assert [w["code"] for w in doc["warnings"]] == [code]
    assert set(doc["warnings"][0]) == {"code", "message", "details"}
    assert summary["warnings"] == doc["warnings"]
    assert doc["diagnosis"] is None and len(doc["frames"]) >= 8


def test_near_duplicate_look_ahead_changes_nothing(tmp_path, monkeypatch):
    """The near-duplicate tracking done ahead on the helper thread
    (``frame_tracks.look_ahead``) is used only where the last kept frame is the candidate just
    before; after a dropped candidate (near-duplicate, blurry) the test tracks from the last
    kept frame itself. Outcome equal to tracking every candidate in ``_reject``."""
    frames = list(parallax_frames(40, step=3.0))
    frames[12:24] = [frames[12]] * 12  # windows 3-5 static: 4 and 5 are near-duplicates of 3
    frames[28:32] = [cv2.GaussianBlur(f, (0, 0), 6.0) for f in frames[28:32]]  # 7 blurry
    clip = write_video(tmp_path / "clip.mp4", frames)
    where: list[str] = []
    track_median = frame_select.track_median

    def counted(*args):
        where.append(threading.current_thread().name.split("_")[0])
        return track_median(*args)

    monkeypatch.setattr(frame_select, "track_median", counted)
    monkeypatch.setattr(frame_tracks, "track_median", counted)  # the look-ahead's
    ahead = extract(tmp_path / "a", clip, 10)
    cand = [r for r in ahead["scores"] if r["reason"] != "not_sharpest"]
    assert [r["reason"] for r in cand] == [None] * 4 + ["near_duplicate"] * 2 + [
        None, "blurry", None, None]
    # the helper tracks candidates 1-9 from the one before; _reject itself tracks 5 and 6
    # (from 3) and 8 (from 6)
    assert where.count("near-duplicates") == 9 and where.count("MainThread") == 3
    monkeypatch.setattr(frame_tracks, "look_ahead", lambda prev, c: (
        frame_select.corners(c.gray, frame_tracks.NEAR_DUPLICATE_CORNERS), None))
    where.clear()
    alone = extract(tmp_path / "b", clip, 10)
    assert where == ["MainThread"] * 8 and alone["scores"] == ahead["scores"]
    assert alone["frames"] == ahead["frames"]
