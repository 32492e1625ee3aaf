"""Tests of colmap_pipeline.core.frame_colour: bit depth, YUV range and HDR tone mapping.

HDR (issue 10 item 11): an HLG clip made from known SDR frames (ITU-R BT.2408's display-referred
mapping, SDR 100% = 203 nits, :func:`factories.write_hlg_video`) must come out as bright and as
contrasted as those SDR frames. Measured on the extracted frames (gray mean / standard deviation,
0-255), before -> after the fix of :func:`frame_colour.tone_map`:

==========================  ==============  ===============  ==============
scene                       SDR render      old tone map     new tone map
==========================  ==============  ===============  ==============
bright, flat (the issue's)  181.5 / 32.9    154.7 / 20.4     180.1 / 31.8
GoPro sample frames         101.8 / 71.4     89.9 / 56.1     100.2 / 69.4
==========================  ==============  ===============  ==============

(The issue measured 118 / 18 against 182 / 33 on a real phone clip.)
"""
from __future__ import annotations

import av
import cv2
import numpy as np
import pytest
from conftest import SAMPLE_VIDEO, shared_file
from factories import H, W, parallax_frames, write_hlg_video, write_video, write_video_codec

from colmap_pipeline.core import frame_colour, frame_scores, frame_select, video_probe


def need_x265() -> None:
    if "libx265" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx265 encoder")


def test_full_range_video_keeps_its_contrast(tmp_path):
    img = np.zeros((48, 64, 3), np.uint8)
    img[:, :32], img[:, 32:] = 20, 230
    clip = write_video(tmp_path / "full.mp4", [img] * 6, fps=10, pix_fmt="yuvj420p", crf=0)
    assert video_probe.probe_video(clip)["pix_fmt"] == "yuvj420p"
    res = frame_select.extract_frames(clip, tmp_path / "f", 3)
    gray = cv2.imread(str(tmp_path / "f" / res["frames"][0]["file"]), cv2.IMREAD_GRAYSCALE)
    # read as limited range, 20 would become ~5 and 230 ~249
    assert abs(int(np.median(gray[:, 4:28])) - 20) <= 4
    assert abs(int(np.median(gray[:, 36:60])) - 230) <= 4


def test_gopro_full_range_frames_are_not_washed_out():
    with av.open(str(shared_file("gopro_max_walk/max-heromode.mp4"))) as c:
        frame = next(f for i, f in enumerate(c.decode(video=0)) if i == 100)
    got = frame_colour.luma_plane(frame)
    assert got is not None
    y = got[0].astype(float)
    g = cv2.cvtColor(frame.to_ndarray(format="bgr24"), cv2.COLOR_BGR2GRAY).astype(float)
    assert g.min() <= 5 and g.max() >= 250
    slope, _ = np.polyfit(y.ravel(), g.ravel(), 1)
    assert slope == pytest.approx(1.0, abs=0.03)  # limited-range handling would give 1.16


def test_ten_bit_hevc_decodes_to_the_right_8_bit_picture(tmp_path):
    need_x265()
    frames = list(parallax_frames(12))
    clip = write_video_codec(tmp_path / "10bit.mp4", frames, "libx265", "yuv420p10le")
    assert video_probe.probe_video(clip)["pix_fmt"] == "yuv420p10le"
    res = frame_select.extract_frames(clip, tmp_path / "frames", 6)
    assert len(res["frames"]) == 6
    f = res["frames"][2]
    got = cv2.imread(str(tmp_path / "frames" / f["file"]), cv2.IMREAD_GRAYSCALE).astype(int)
    src = cv2.cvtColor(frames[round(f["timestamp_s"] * 10)], cv2.COLOR_BGR2GRAY).astype(int)
    assert np.abs(got - src).mean() < 4  # right range: not washed out, not crushed
    assert abs(got.mean() - src.mean()) < 1.5


def test_tone_map_keeps_sdr_light_below_the_knee_and_compresses_above():
    """Below ``HDR_KNEE`` x reference white the SDR value of BT.2408's mapping comes back (light
    L nits -> (L / 203) ** (1 / 2.4)); reference white lands at signal 0.946 (241/255), the
    1000-nit peak at 1.0, and the curve rises monotonically."""
    ref = frame_colour.HDR_REFERENCE_WHITE_NITS
    x = np.array([0.0, 0.01, 0.18, 0.5, 0.75])
    assert frame_colour.tone_map(x * ref) == pytest.approx(x ** (1 / 2.4), abs=1e-9)
    assert float(frame_colour.tone_map(np.array(ref))) == pytest.approx(0.946, abs=0.001)
    assert float(frame_colour.tone_map(np.array(1000.0))) == pytest.approx(1.0, abs=1e-9)
    curve = frame_colour.tone_map(np.linspace(0, 2000, 2001))
    assert np.all(np.diff(curve) >= 0) and curve[-1] == 1.0


def _bright_flat_scene(n: int) -> list[np.ndarray]:
    """Gray frames of the parallax scene with mean 182 and standard deviation 33 (the issue's
    SDR numbers)."""
    out = []
    for f in parallax_frames(n):
        g = cv2.cvtColor(f, cv2.COLOR_BGR2GRAY).astype(float)
        g = (g - g.mean()) / g.std() * 33 + 182
        out.append(cv2.cvtColor(np.clip(g, 0, 255).astype(np.uint8), cv2.COLOR_GRAY2BGR))
    return out


def _sample_frames(n: int) -> list[np.ndarray]:
    """Every tenth frame of the repository's sample clip (real content, 848x480)."""
    out = []
    with av.open(str(SAMPLE_VIDEO)) as c:
        for i, f in enumerate(c.decode(video=0)):
            if i % 10 == 0:
                out.append(f.to_ndarray(format="bgr24"))
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("scene", ["bright_flat", "gopro"])
def test_hlg_clip_is_as_bright_and_contrasted_as_its_sdr_render(tmp_path, scene):
    need_x265()
    sdr = _bright_flat_scene(12) if scene == "bright_flat" else _sample_frames(12)
    clip = write_hlg_video(tmp_path / "hlg.mp4", sdr)
    res = frame_select.extract_frames(clip, tmp_path / "frames", 4)
    assert res["video"]["tone_mapped"] == "arib-std-b67"
    assert len(res["frames"]) == 4
    got_mean, got_std, sdr_mean, sdr_std = [], [], [], []
    for f in res["frames"]:
        got = cv2.imread(str(tmp_path / "frames" / f["file"]), cv2.IMREAD_GRAYSCALE)
        ref = cv2.cvtColor(sdr[round(f["timestamp_s"] * 10)], cv2.COLOR_BGR2GRAY)
        got_mean.append(got.mean())
        got_std.append(got.std())
        sdr_mean.append(ref.mean())
        sdr_std.append(ref.std())
        # the analysis image (luma lookup table) agrees with the output image
        assert f["brightness"] == pytest.approx(got.mean(), abs=2.5)
    # old tone map: 154.7 / 20.4 against 181.5 / 32.9 (bright_flat), 89.9 / 56.1 against
    # 101.8 / 71.4 (gopro)
    assert abs(np.mean(got_mean) - np.mean(sdr_mean)) < 3.0
    assert np.mean(got_std) / np.mean(sdr_std) > 0.95


def test_hdr_pq_is_tone_mapped_not_washed_out(tmp_path):
    """A PQ frame at the HDR reference white (203 nits, signal 0.58) comes out at the tone
    map's value for 203 nits (241/255: near SDR white, as BT.2408 maps SDR white to 203 nits),
    where an 8-bit conversion that ignores the transfer gives 148/255 (washed out)."""
    need_x265()
    e = float(np.round(1023 * 0.5806) / 1023)  # PQ(203 nits)
    assert frame_colour.pq_eotf(np.array(e)) == pytest.approx(203, rel=0.01)
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
    expected = round(float(frame_colour.tone_map(np.array(203.0))) * 255)
    assert 238 <= expected <= 244  # the old tone map gave 194
    assert video_probe.probe_video(clip)["tone_mapped"] == "smpte2084"
    with av.open(str(clip)) as c:
        frame = next(c.decode(video=0))
        assert frame.color_trc == frame_colour.TRC_PQ
        gray = frame_scores.analysis_gray(frame)
        img = frame_scores.output_image(frame, None)
        plain = frame.to_ndarray(format="bgr24")
    assert abs(int(np.median(gray)) - expected) <= 2
    assert np.abs(np.median(img, axis=(0, 1)) - expected).max() <= 3
    assert abs(int(np.median(plain)) - 148) <= 3  # what ignoring PQ would hand to SfM
