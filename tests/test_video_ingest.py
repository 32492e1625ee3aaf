"""Issue 3: video ingest on synthetic clips with known camera motion, and on the real clips.

Each synthetic clip is rendered here with PyAV from textures drawn by the tests (fixed seeds):

* ``parallax_frames``: a sideways-moving camera over two textured layers at different depths
  (background moves 0.4x as fast as the foreground blobs), so no homography explains the
  motion, as in real footage;
* ``rotation_frames``: a camera turning on a tripod, rendered exactly as ``K R K^-1`` warps of
  a texture (Hartley & Zisserman, sec. 8.4.2).

Every test asserts its exact outcome: frames kept, which were dropped and why, or the code.
"""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
from conftest import shared_file
from test_video import scene_texture, write_video

from colmap_pipeline.core import video
from colmap_pipeline.errors import PipelineError

W, H = 320, 240


def parallax_frames(n: int, step: float = 6.0, size=(W, H), seed: int = 0):
    """Camera translating sideways: background layer moves ``0.4 * step`` px per frame, a
    foreground layer of random blobs ``step`` px per frame (depth ratio 2.5)."""
    w, h = size
    bg = scene_texture(seed, width=max(2400, w + int(n * step) + 8), height=max(480, h + 8))
    fg = scene_texture(seed + 1, width=bg.shape[1], height=bg.shape[0])
    rng = np.random.default_rng(seed + 2)
    mask = np.zeros(bg.shape[:2], np.uint8)
    for _ in range(bg.shape[1] // 25):
        cv2.circle(mask, (int(rng.integers(0, bg.shape[1])), int(rng.integers(0, bg.shape[0]))),
                   int(rng.integers(10, 30)), 255, -1)
    for i in range(n):
        xb, xf = int(round(0.4 * i * step)), int(round(i * step))
        img = bg[4:4 + h, xb:xb + w].copy()
        m = mask[4:4 + h, xf:xf + w] > 0
        img[m] = fg[4:4 + h, xf:xf + w][m]
        yield img


def rotation_frames(n: int, total_deg: float = 24.0, size=(W, H), seed: int = 0):
    """A camera panning (yaw) by ``total_deg`` in ``n`` frames about its centre, f = width."""
    w, h = size
    tex = scene_texture(seed, width=3 * w, height=2 * h)
    f = float(w)
    k_tex = np.array([[f, 0, tex.shape[1] / 2], [0, f, tex.shape[0] / 2], [0, 0, 1]])
    k_fr = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]])
    for i in range(n):
        a = math.radians(total_deg * (i / max(1, n - 1) - 0.5))
        r = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
        hom = k_fr @ r @ np.linalg.inv(k_tex)
        yield cv2.warpPerspective(tex, hom, (w, h), flags=cv2.INTER_LINEAR)


def extract(tmp_path: Path, clip: Path, cap: int, **kw) -> dict:
    return video.extract_frames(clip, tmp_path / "frames", cap, **kw)


def reasons(res: dict) -> list[str | None]:
    return [r["reason"] for r in res["scores"]]


# --- formats --------------------------------------------------------------------------------

@pytest.mark.parametrize("rotation", [90, 270])
def test_rotated_moving_clip_keeps_every_window_in_portrait(tmp_path, rotation):
    clip = write_video(tmp_path / "rot.mp4", parallax_frames(20), rotation=rotation)
    res = extract(tmp_path, clip, 10)
    assert res["video"]["rotation"] == rotation
    assert len(res["frames"]) == 10 and res["selection"]["dropped"] == {"not_sharpest": 10}
    for f in res["frames"]:
        assert cv2.imread(str(tmp_path / "frames" / f["file"])).shape == (W, H, 3)
    assert video.diagnose(res, tmp_path / "frames")["ok"]


def test_variable_frame_rate_is_windowed_by_timestamp(tmp_path):
    # 30 fps for 1 s, then 5 fps for 2 s: 30 + 10 frames, 3 s
    times = [i / 30 for i in range(30)] + [1.0 + i / 5 for i in range(10)]
    frames = list(parallax_frames(len(times), step=3.0))
    clip = tmp_path / "vfr.mp4"
    with av.open(str(clip), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        s.options = {"crf": "16", "preset": "veryfast", "bf": "0"}
        for t, img in zip(times, frames):
            fr = av.VideoFrame.from_ndarray(img, format="bgr24")
            fr.pts, fr.time_base = round(t * 1000), Fraction(1, 1000)
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    res = extract(tmp_path, clip, 6)
    got = [r["timestamp_s"] for r in res["scores"]]
    assert got == pytest.approx(times, abs=1e-3)
    dur = res["video"]["duration_s"]
    assert 2.8 < dur <= 3.0
    per_window = [sum(1 for r in res["scores"] if r["window"] == w) for w in range(6)]
    assert per_window == [sum(1 for t in times if min(5, int(t / dur * 6)) == w)
                          for w in range(6)]
    assert per_window[:2] == [15, 14] and sum(per_window[2:]) == 11  # by time, not by count
    assert len(res["frames"]) == 6
    for f, w in zip(res["frames"], range(6)):
        assert w * dur / 6 <= f["timestamp_s"] < (w + 1) * dur / 6


def test_ten_bit_hevc_decodes_to_the_right_8_bit_picture(tmp_path):
    if "libx265" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx265 encoder")
    frames = list(parallax_frames(12))
    clip = write_video_codec(tmp_path / "10bit.mp4", frames, "libx265", "yuv420p10le")
    assert video.probe_video(clip)["pix_fmt"] == "yuv420p10le"
    res = extract(tmp_path, clip, 6)
    assert len(res["frames"]) == 6
    f = res["frames"][2]
    got = cv2.imread(str(tmp_path / "frames" / f["file"]), cv2.IMREAD_GRAYSCALE).astype(int)
    src = cv2.cvtColor(frames[round(f["timestamp_s"] * 10)], cv2.COLOR_BGR2GRAY).astype(int)
    assert np.abs(got - src).mean() < 4  # right range: not washed out, not crushed
    assert abs(got.mean() - src.mean()) < 1.5


def write_video_codec(path: Path, frames, codec: str, pix_fmt: str, trc: int | None = None):
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=10)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], pix_fmt
        s.options = ({"crf": "8", "preset": "ultrafast", "x265-params": "log-level=error"}
                     if codec == "libx265" else {"crf": "8", "preset": "ultrafast"})
        if trc is not None:
            s.codec_context.color_trc, s.codec_context.color_primaries = trc, 9
            s.codec_context.colorspace = 9
        for img in frames:
            fr = av.VideoFrame.from_ndarray(img, format="bgr24").reformat(format=pix_fmt)
            if trc is not None:
                fr.color_trc, fr.color_primaries, fr.colorspace = trc, 9, 9
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def test_hdr_pq_is_tone_mapped_not_washed_out(tmp_path):
    """A PQ frame at the HDR reference white (203 nits, signal 0.58) comes out at the tone
    map's value for 203 nits (about 194/255), where an 8-bit conversion that ignores the
    transfer gives 148/255 (washed out)."""
    if "libx265" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx265 encoder")
    e = float(np.round(1023 * 0.5806) / 1023)  # PQ(203 nits)
    assert video._pq_eotf(np.array(e)) == pytest.approx(203, rel=0.01)
    y = np.full((H, W), 64 + round(e * 876), np.uint16)  # limited-range 10-bit luma
    clip = tmp_path / "pq.mp4"
    with av.open(str(clip), "w") as c:
        s = c.add_stream("libx265", rate=10)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p10le"
        s.options = {"crf": "4", "preset": "ultrafast", "x265-params": "log-level=error"}
        s.codec_context.color_trc, s.codec_context.color_primaries = 16, 9
        s.codec_context.colorspace = 9
        for i in range(3):
            arr = np.vstack([y, np.full((H // 2, W), 512, np.uint16)])
            fr = av.VideoFrame.from_ndarray(arr, format="yuv420p10le")
            fr.pts, fr.color_trc, fr.color_primaries, fr.colorspace = i, 16, 9, 9
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    expected = round(float(video._tone_map(np.array(203.0))) * 255)
    assert 188 <= expected <= 198
    with av.open(str(clip)) as c:
        frame = next(c.decode(video=0))
        assert frame.color_trc == video.TRC_PQ
        gray = video.analysis_gray(frame)
        img = video._output_image(frame, None)
        plain = frame.to_ndarray(format="bgr24")
    assert abs(int(np.median(gray)) - expected) <= 2
    assert np.abs(np.median(img, axis=(0, 1)) - expected).max() <= 3
    assert abs(int(np.median(plain)) - 148) <= 3  # what ignoring PQ would hand to SfM


def test_odd_sized_444_clip(tmp_path):
    frames = [f[:241, :321] for f in parallax_frames(8, size=(330, 250))]
    clip = write_video_codec(tmp_path / "odd.mp4", frames, "libx264", "yuv444p")
    assert video.probe_video(clip)["pix_fmt"] == "yuv444p"
    res = extract(tmp_path, clip, 4)
    assert len(res["frames"]) == 4
    img = cv2.imread(str(tmp_path / "frames" / res["frames"][0]["file"]))
    assert img.shape == (241, 321, 3)
    src = frames[round(res["frames"][0]["timestamp_s"] * 10)].astype(int)
    assert np.abs(img.astype(int) - src).mean() < 6


def test_thumbnail_stream_is_ignored(tmp_path):
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


def test_truncated_file_keeps_the_decodable_part_or_fails_clearly(tmp_path):
    clip = tmp_path / "full.mp4"
    frames = list(parallax_frames(40, step=3.0))
    with av.open(str(clip), "w", options={"movflags": "+faststart"}) as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.options = {"crf": "16", "preset": "veryfast", "g": "10"}
        for img in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = clip.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[:len(data) // 2])
    res = extract(tmp_path, cut, 8)
    assert res["truncated"] and [w["code"] for w in res["warnings"]] == ["video_truncated"]
    n = res["num_decoded"]
    assert 10 <= n <= 30
    assert res["warnings"][0]["decoded_until_s"] == pytest.approx((n - 1) / 10, abs=1e-6)
    assert all(f["timestamp_s"] < n / 10 for f in res["frames"])
    assert len(res["frames"]) == len({r["window"] for r in res["scores"]})
    tiny = tmp_path / "tiny.mp4"
    tiny.write_bytes(data[:len(data) // 25])  # the header survives, no frame does
    with pytest.raises(PipelineError) as ei:
        extract(tmp_path / "t", tiny, 8)
    assert ei.value.code == "video_truncated"
    assert ei.value.details["frames_decoded"] == 0 and ei.value.details["declared_frames"] == 40


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
    res = extract(tmp_path, write_video(tmp_path / "fade.mp4", frames), 10)
    r = reasons(res)
    assert [i for i, x in enumerate(r) if x == "black"] == sorted(black)
    # time windows alone would give 6 of 10 (4 windows are black); the refill pass spreads
    # the 10 windows over the 24 usable frames: the full cap, none of them black
    assert res["selection"]["refilled"] is True
    assert res["selection"]["dropped"] == {"black": 16, "not_sharpest": 14}
    assert len(res["frames"]) == 10
    assert all(0.8 <= f["timestamp_s"] < 3.2 for f in res["frames"])
    assert all(f["brightness"] > 60 for f in res["frames"])
    assert video.diagnose(res, tmp_path / "frames")["ok"]


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


def test_whole_clip_blurry_fails_as_too_blurry(tmp_path):
    frames = [cv2.GaussianBlur(f, (0, 0), 6.0) for f in parallax_frames(20)]
    res = extract(tmp_path, write_video(tmp_path / "blurry.mp4", frames), 10)
    d = video.diagnose(res, tmp_path / "frames")
    assert d["error"]["code"] == "too_blurry"
    assert d["error"]["details"]["median_sharpness"] < video.BLUR_ABSOLUTE


def test_static_camera_fails_as_insufficient_motion(tmp_path):
    rng = np.random.default_rng(1)
    still = next(parallax_frames(1))
    frames = [np.clip(still + rng.normal(0, 2, still.shape), 0, 255).astype(np.uint8)
              for _ in range(20)]
    res = extract(tmp_path, write_video(tmp_path / "static.mp4", frames), 10)
    assert len(res["frames"]) == 1
    assert res["selection"]["dropped"] == {"not_sharpest": 10, "near_duplicate": 9}
    assert all(r["motion_px"] < video.NEAR_DUPLICATE_PX for r in res["scores"]
               if r["reason"] == "near_duplicate")
    with pytest.raises(PipelineError) as ei:
        video.check_clip(res, tmp_path / "frames")
    assert ei.value.code == "insufficient_motion"
    assert ei.value.details["near_duplicates"] == 9


def test_pure_rotation_fails_as_rotation_only(tmp_path):
    res = extract(tmp_path, write_video(tmp_path / "pan.mp4", rotation_frames(30)), 10)
    assert len(res["frames"]) == 10
    with pytest.raises(PipelineError) as ei:
        video.check_clip(res, tmp_path / "frames")
    assert ei.value.code == "rotation_only"
    assert ei.value.details["pairs_tested"] >= 2
    assert ei.value.details["rotation_like_pairs"] == ei.value.details["pairs_tested"]


def test_translation_with_parallax_is_not_rotation(tmp_path):
    res = extract(tmp_path, write_video(tmp_path / "walk.mp4", parallax_frames(30)), 10)
    d = video.check_clip(res, tmp_path / "frames")
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
        video.check_clip(res, tmp_path / "frames")
    assert ei.value.code == "textureless"


def test_dark_clip_fails_as_too_dark(tmp_path):
    frames = [(f // 10) for f in parallax_frames(12)]  # everything below 26/255
    res = extract(tmp_path, write_video(tmp_path / "dark.mp4", frames), 6)
    assert res["selection"]["dropped"] == {"black": 12}
    with pytest.raises(PipelineError) as ei:
        video.check_clip(res, tmp_path / "frames")
    assert ei.value.code == "too_dark"


# --- real clips -----------------------------------------------------------------------------

@pytest.mark.parametrize("rel", ["gopro_max_walk/max-heromode.mp4", "gopro_karma_drone/karma.mp4"],
                         ids=["walk", "karma"])
def test_gopro_clips_fill_the_low_preset_cap(tmp_path, rel):
    res = extract(tmp_path, shared_file(rel), 30, max_image_size=1000)
    assert len(res["frames"]) >= 24
    kept = [r for r in res["scores"] if r["kept"]]
    assert all(r["reason"] is None for r in kept) and len(kept) == len(res["frames"])
    assert min(r["brightness"] for r in kept) > 60
    assert all(r["motion_px"] is None or r["motion_px"] >= video.NEAR_DUPLICATE_PX
               for r in kept[1:])
    assert video.diagnose(res, tmp_path / "frames")["ok"]


def test_euroc_static_fails_before_sfm_and_frames_are_served(start_server):
    clip = shared_file("euroc_static/euroc_v101_cam0_20fps.mp4")
    srv = start_server()
    with srv.client() as c:
        with open(clip, "rb") as fh:
            r = c.post("/upload-video", files={"video": ("euroc.mp4", fh, "video/mp4")},
                       data={"project_id": "p", "quality": "low"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        job = srv.wait_for_job(job_id, timeout_s=120)
        assert job["status"] == "failed" and job["error"]["code"] == "insufficient_motion"
        assert list(job["attempts"][-1]["stage_wall_s"]) == ["frames"]
        fr = c.get(f"/jobs/{job_id}/frames")
        assert fr.status_code == 200
        body = fr.json()
        assert body["cap"] == 30 and body["num_decoded"] == 95 and len(body["frames"]) == 95
        assert body["diagnosis"]["code"] == "insufficient_motion"
        assert body["dropped"]["near_duplicate"] >= 25 and body["kept"] < video.MIN_FRAMES
        assert sum(f["kept"] for f in body["frames"]) == body["kept"]
        missing = c.get("/jobs/nope/frames")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
