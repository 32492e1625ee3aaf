"""Tests of colmap_pipeline.core.video: probing, frame selection, rotation, colour range, motion check.

Synthetic clips are rendered here with PyAV (libx264) from a random texture with a fixed seed;
real clips come from ``../shared/data`` and are skipped with a reason when it is absent.

Motion numbers measured on the real clips (30 frames each, ``low`` preset), which set
``video.MIN_MOTION_FRACTION = 0.02``:

=====================  ===========  ==============  ===============
clip                   first->last  accumulated     fraction of diag
=====================  ===========  ==============  ===============
EuRoC static drone     1.15 px      1.5 px          0.0017  (fails)
GoPro MAX walk         re-seeded    339 px          0.35    (passes)
GoPro Karma drone      re-seeded    135 px          0.14    (passes)
=====================  ===========  ==============  ===============
"""
from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from colmap_pipeline.core import video
from colmap_pipeline.errors import PipelineError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
GOPRO_WALK = DATA / "gopro_max_walk" / "max-heromode.mp4"
GOPRO_KARMA = DATA / "gopro_karma_drone" / "karma.mp4"
EUROC_STATIC = DATA / "euroc_static" / "euroc_v101_cam0_20fps.mp4"


def need(path: Path) -> Path:
    """Skip the test when a real clip is missing (a fresh clone has no ../shared)."""
    if not path.exists():
        pytest.skip(f"real test clip {path} not found (../shared/data is absent)")
    return path


# --- synthetic clips ------------------------------------------------------------------------

def scene_texture(seed: int = 0, width: int = 2400, height: int = 480) -> np.ndarray:
    """A random, corner-rich BGR texture (fixed seed): blurred noise plus random rectangles."""
    rng = np.random.default_rng(seed)
    tex = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    tex = cv2.resize(tex, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(width // 6):
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        w, h = int(rng.integers(8, 40)), int(rng.integers(8, 40))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.rectangle(tex, (x, y), (x + w, y + h), color, -1)
    return tex


def translating_frames(n: int, step_px: float, size=(320, 240), seed: int = 0):
    """Frames of a camera translating sideways over a fronto-parallel textured plane: frame i is
    the window of the texture starting at x = i * step_px (pure image translation)."""
    tex = scene_texture(seed)
    w, h = size
    for i in range(n):
        x = int(round(i * step_px))
        yield np.ascontiguousarray(tex[100:100 + h, x:x + w])


def write_video(path: Path, frames, fps: int = 10, rotation: int | None = None,
                pix_fmt: str = "yuv420p", crf: int = 16) -> Path:
    """Encode BGR frames with libx264; ``rotation`` writes a display matrix (deg, CCW)."""
    frames = list(frames)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        s.options = {"crf": str(crf), "preset": "veryfast"}
        if pix_fmt == "yuvj420p":
            s.codec_context.color_range = 2  # JPEG / full range
        if rotation is not None:
            s.set_display_rotation(rotation)
        for img in frames:
            fr = av.VideoFrame.from_ndarray(img, format="bgr24")
            if pix_fmt == "yuvj420p":
                fr = fr.reformat(format=pix_fmt, dst_color_range=2)
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


# --- probe ----------------------------------------------------------------------------------

def test_probe_gopro_picks_video_among_audio_and_data_streams():
    info = video.probe_video(need(GOPRO_WALK))
    assert info["codec"] == "h264"
    assert (info["width"], info["height"]) == (848, 480)
    assert info["rotation"] == 0
    assert info["pix_fmt"] == "yuvj420p"
    assert info["duration_s"] == pytest.approx(10.5, abs=0.1)
    assert info["fps"] == pytest.approx(29.97, abs=0.01)
    assert info["num_frames"] == 315
    assert info["stream_index"] == 0
    types = [s["type"] for s in info["streams"]]
    assert "audio" in types and types.count("data") >= 1 and types.count("video") == 1


@pytest.mark.parametrize("content", [b"this is not a video\n" * 200, b""],
                         ids=["text_named_mp4", "empty"])
def test_probe_rejects_non_video(tmp_path, content):
    p = tmp_path / "upload.mp4"
    p.write_bytes(content)
    with pytest.raises(PipelineError) as ei:
        video.probe_video(p)
    assert ei.value.code == "no_video_stream"


def test_probe_rejects_text_file_that_ffmpeg_renders_as_video(tmp_path):
    # FFmpeg's tty demuxer opens any .txt file as a 640x400 "ansi" video.
    p = tmp_path / "notes.txt"
    p.write_text("a plain text file\n" * 300)
    with pytest.raises(PipelineError) as ei:
        video.probe_video(p)
    assert ei.value.code == "no_video_stream"


def test_probe_rejects_audio_only(tmp_path):
    p = tmp_path / "audio.mp4"
    with av.open(str(p), "w") as c:
        s = c.add_stream("aac", rate=44100)
        for i in range(20):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                            layout="mono")
            fr.sample_rate, fr.pts = 44100, i * 1024
            for pk in s.encode(fr):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    with pytest.raises(PipelineError) as ei:
        video.probe_video(p)
    assert ei.value.code == "no_video_stream"


def test_probe_skips_attached_picture(tmp_path):
    """A larger cover-art stream (disposition attached_pic) must not win over the video."""
    p = tmp_path / "cover.mp4"
    with av.open(str(p), "w") as c:
        v = c.add_stream("libx264", rate=10)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        art = c.add_stream("mjpeg", rate=1)
        art.width, art.height, art.pix_fmt = 640, 480, "yuvj420p"
        art.disposition = av.stream.Disposition.attached_pic
        for img in translating_frames(5, 2, size=(64, 48)):
            for pk in v.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                c.mux(pk)
        cover = av.VideoFrame.from_ndarray(np.zeros((480, 640, 3), np.uint8), format="bgr24")
        for pk in art.encode(cover.reformat(format="yuvj420p")):
            c.mux(pk)
        for s in (v, art):
            for pk in s.encode():
                c.mux(pk)
    info = video.probe_video(p)
    assert (info["codec"], info["width"], info["height"]) == ("h264", 64, 48)


# --- frame selection ------------------------------------------------------------------------

def test_extract_frames_one_sharp_frame_per_time_window(tmp_path):
    fps, n, windows = 10, 60, 6  # 6 s clip, one window per second = 10 frames
    sharp = {w: 10 * w + (3 * w + 1) % 10 for w in range(windows)}  # the sharp frame's index
    frames = []
    for i, img in enumerate(translating_frames(n, 2.0)):
        frames.append(img if i in sharp.values() else cv2.GaussianBlur(img, (0, 0), 2.5))
    clip = write_video(tmp_path / "clip.mp4", frames, fps=fps)
    out = tmp_path / "frames"
    res = video.extract_frames(clip, out, windows)
    assert res["num_decoded"] == n
    assert len(res["frames"]) == windows
    for w, f in enumerate(res["frames"]):
        assert f["index"] == w and f["file"] == f"frame_{w:05d}.jpg"
        assert w <= f["timestamp_s"] < w + 1, "frames must spread over the duration"
        assert f["timestamp_s"] == pytest.approx(sharp[w] / fps, abs=1e-6)
        img = cv2.imread(str(out / f["file"]))
        assert img is not None and img.shape == (240, 320, 3)
    assert sorted(p.name for p in out.iterdir()) == [f["file"] for f in res["frames"]]


def test_extract_frames_caps_image_size(tmp_path):
    clip = write_video(tmp_path / "clip.mp4", translating_frames(12, 3.0), fps=10)
    res = video.extract_frames(clip, tmp_path / "f", 4, max_image_size=160)
    img = cv2.imread(str(tmp_path / "f" / res["frames"][0]["file"]))
    assert img.shape[:2] == (120, 160)


def test_extract_frames_too_few_frames(tmp_path):
    clip = write_video(tmp_path / "short.mp4", translating_frames(2, 3.0), fps=10)
    with pytest.raises(PipelineError) as ei:
        video.extract_frames(clip, tmp_path / "f", 30)
    assert ei.value.code == "too_few_frames"
    assert ei.value.details["frames_decoded"] == 2


@pytest.mark.parametrize("rotation", [90, 270, 180])
def test_extract_frames_applies_rotation_like_opencv(tmp_path, rotation):
    base = np.full((48, 64, 3), 40, np.uint8)
    base[4:16, 4:28] = (250, 250, 250)  # bright block at the top-left: orientation marker
    base[30:44, 50:60] = (0, 0, 250)  # red block at the bottom-right
    clip = write_video(tmp_path / f"rot{rotation}.mp4", [base] * 6, fps=10, rotation=rotation)
    info = video.probe_video(clip)
    assert info["rotation"] == rotation
    assert (info["width"], info["height"]) == ((48, 64) if rotation in (90, 270) else (64, 48))
    res = video.extract_frames(clip, tmp_path / "f", 3)
    got = cv2.imread(str(tmp_path / "f" / res["frames"][0]["file"])).astype(int)
    expected = np.rot90(base, k=rotation // 90).astype(int)  # np.rot90 turns counter-clockwise
    assert got.shape == expected.shape
    assert np.abs(got - expected).mean() < 6
    ok, ref = cv2.VideoCapture(str(clip)).read()  # OpenCV applies the display matrix itself
    assert ok and ref.shape == got.shape and np.abs(ref.astype(int) - got).mean() < 6


def test_full_range_video_keeps_its_contrast(tmp_path):
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, :32], img[:, 32:] = 20, 230
    clip = write_video(tmp_path / "full.mp4", [img] * 6, fps=10, pix_fmt="yuvj420p", crf=0)
    assert video.probe_video(clip)["pix_fmt"] == "yuvj420p"
    res = video.extract_frames(clip, tmp_path / "f", 3)
    gray = cv2.imread(str(tmp_path / "f" / res["frames"][0]["file"]), cv2.IMREAD_GRAYSCALE)
    # read as limited range, 20 would become ~5 and 230 ~249
    assert abs(int(np.median(gray[:, 4:28])) - 20) <= 4
    assert abs(int(np.median(gray[:, 36:60])) - 230) <= 4


def test_gopro_full_range_frames_are_not_washed_out():
    with av.open(str(need(GOPRO_WALK))) as c:
        frame = next(f for i, f in enumerate(c.decode(video=0)) if i == 100)
    y = video._luma_plane(frame)[0].astype(float)
    g = cv2.cvtColor(frame.to_ndarray(format="bgr24"), cv2.COLOR_BGR2GRAY).astype(float)
    assert g.min() <= 5 and g.max() >= 250
    slope, _ = np.polyfit(y.ravel(), g.ravel(), 1)
    assert slope == pytest.approx(1.0, abs=0.03)  # limited-range handling would give 1.16


# --- motion check ---------------------------------------------------------------------------

def _frames_of(tmp_path: Path, clip: Path, n: int = 30) -> list[Path]:
    res = video.extract_frames(clip, tmp_path / "frames", n)
    return [tmp_path / "frames" / f["file"] for f in res["frames"]]


def test_euroc_static_clip_fails_with_insufficient_motion(tmp_path):
    paths = _frames_of(tmp_path, need(EUROC_STATIC))
    with pytest.raises(PipelineError) as ei:
        video.check_motion(paths)
    d = ei.value.details
    assert ei.value.code == "insufficient_motion"
    assert d["measurable"] and d["lost_track_events"] == 0
    assert d["first_to_last_median_px"] < 3.0
    assert d["motion_fraction"] < d["threshold_fraction"] == video.MIN_MOTION_FRACTION


@pytest.mark.parametrize("clip", [GOPRO_WALK, GOPRO_KARMA], ids=["walk", "karma"])
def test_gopro_clips_pass_the_motion_check(tmp_path, clip):
    m = video.check_motion(_frames_of(tmp_path, need(clip)))
    assert m["moving"] and m["motion_fraction"] > 5 * video.MIN_MOTION_FRACTION


def test_synthetic_static_clip_fails(tmp_path):
    rng = np.random.default_rng(1)
    still = next(translating_frames(1, 0))
    frames = [np.clip(still + rng.normal(0, 2, still.shape), 0, 255).astype(np.uint8)
              for _ in range(20)]
    clip = write_video(tmp_path / "static.mp4", frames)
    # near-duplicate rejection (issue 3) keeps only the first frame; the motion measurement
    # over every window's sharpest frame still finds no motion
    res = video.extract_frames(clip, tmp_path / "frames", 10)
    assert len(res["frames"]) == 1
    with pytest.raises(PipelineError) as ei:
        video.check_clip(res, tmp_path / "frames")
    assert ei.value.code == "insufficient_motion"
    cand = [tmp_path / "all" / f"{i}.png" for i in range(10)]
    cand[0].parent.mkdir()
    with av.open(str(clip)) as c:
        for i, fr in enumerate(f for k, f in enumerate(c.decode(video=0)) if k % 2 == 0):
            cv2.imwrite(str(cand[i]), fr.to_ndarray(format="bgr24"))
    with pytest.raises(PipelineError) as ei:
        video.check_motion(cand)
    assert ei.value.details["accumulated_motion_px"] < 1.0


def test_synthetic_translation_is_measured(tmp_path):
    # 20 frames, 4 px per frame; the 10 selected frames (one per pair) span 16-19 steps
    paths = _frames_of(tmp_path, write_video(tmp_path / "pan.mp4", translating_frames(20, 4.0)), 10)
    m = video.check_motion(paths)
    assert m["moving"] and m["lost_track_events"] == 0 and m["segments"] == 1
    assert 16 * 4 - 1 <= m["accumulated_motion_px"] <= 19 * 4 + 1


def test_lost_tracking_across_a_big_jump_counts_as_motion(tmp_path):
    frames = list(translating_frames(1, 0)) * 5 + [f for f in translating_frames(1, 0, seed=7)] * 5
    paths = []
    for i, img in enumerate(frames):
        paths.append(tmp_path / f"{i:02d}.png")
        cv2.imwrite(str(paths[-1]), img)
    m = video.check_motion(paths)
    assert m["moving"] and m["lost_track_events"] >= 1


def test_flat_video_abstains(tmp_path):
    paths = []
    for i in range(5):
        paths.append(tmp_path / f"{i}.png")
        cv2.imwrite(str(paths[-1]), np.full((120, 160, 3), 90, np.uint8))
    m = video.check_motion(paths)
    assert m["measurable"] is False and m["moving"] is True
