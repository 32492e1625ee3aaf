"""Tests of colmap_pipeline.core.video_probe: which stream is the video, its geometry and rate,
and the files that are not a usable video (issue 10 item 8: a photo named .mp4, an MP4 without
its index, a clip too short), at the probe and at the probe child's command line.
"""
from __future__ import annotations

import json
import subprocess
import sys

import av
import cv2
import numpy as np
import pytest
from conftest import REPO, SAMPLE_VIDEO, shared_file
from factories import (
    cut_file,
    iso_box_offsets,
    jpeg_bytes,
    png_bytes,
    translating_frames,
    write_hlg_video,
    write_video,
)

from colmap_pipeline.core import video_probe
from colmap_pipeline.errors import ERROR_CATALOG, PipelineError


def probe_cli(path) -> tuple[int, dict]:
    """``python -m colmap_pipeline probe FILE`` (what the upload runs): exit code and JSON."""
    r = subprocess.run([sys.executable, "-m", "colmap_pipeline", "probe", str(path)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    return r.returncode, json.loads(r.stdout)


# --- the video stream -----------------------------------------------------------------------

def test_probe_gopro_picks_video_among_audio_and_data_streams():
    info = video_probe.probe_video(shared_file("gopro_max_walk/max-heromode.mp4"))
    assert info["codec"] == "h264"
    assert (info["width"], info["height"]) == (848, 480)
    assert info["rotation"] == 0
    assert info["pix_fmt"] == "yuvj420p"
    assert info["duration_s"] == pytest.approx(10.5, abs=0.1)
    assert info["fps"] == pytest.approx(29.97, abs=0.01)
    assert info["num_frames"] == 315
    assert info["stream_index"] == 0
    assert info["tone_mapped"] is None  # SDR (BT.709)
    types = [s["type"] for s in info["streams"]]
    assert "audio" in types and types.count("data") >= 1 and types.count("video") == 1


@pytest.mark.parametrize("content", [b"this is not a video\n" * 200, b""],
                         ids=["text_named_mp4", "empty"])
def test_probe_rejects_non_video(tmp_path, content):
    p = tmp_path / "upload.mp4"
    p.write_bytes(content)
    with pytest.raises(PipelineError) as ei:
        video_probe.probe_video(p)
    assert ei.value.code == "no_video_stream"


def test_probe_rejects_text_file_that_ffmpeg_renders_as_video(tmp_path):
    # FFmpeg's tty demuxer opens any .txt file as a 640x400 "ansi" video.
    p = tmp_path / "notes.txt"
    p.write_text("a plain text file\n" * 300)
    with pytest.raises(PipelineError) as ei:
        video_probe.probe_video(p)
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
        video_probe.probe_video(p)
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
    info = video_probe.probe_video(p)
    assert (info["codec"], info["width"], info["height"]) == ("h264", 64, 48)


@pytest.mark.parametrize("rotation", [90, 270, 180])
def test_probe_reports_rotation_and_display_size(tmp_path, rotation):
    clip = write_video(tmp_path / f"rot{rotation}.mp4", translating_frames(6, 2.0, size=(64, 48)),
                       rotation=rotation)
    info = video_probe.probe_video(clip)
    assert info["rotation"] == rotation
    assert (info["width"], info["height"]) == ((48, 64) if rotation in (90, 270) else (64, 48))


def test_probe_names_the_hdr_transfer_that_is_tone_mapped(tmp_path):
    if "libx265" not in av.codecs_available:
        pytest.skip("this PyAV build has no libx265 encoder")
    frames = list(translating_frames(4, 3.0))
    info = video_probe.probe_video(write_hlg_video(tmp_path / "hlg.mp4", frames))
    assert (info["codec"], info["pix_fmt"]) == ("hevc", "yuv420p10le")
    assert info["tone_mapped"] == "arib-std-b67"


# --- files that are not a usable video (issue 10 item 8) ------------------------------------

@pytest.mark.parametrize("kind", ["JPEG", "PNG"])
def test_photo_named_mp4_is_a_still_image(tmp_path, kind):
    p = tmp_path / "clip.mp4"
    p.write_bytes(jpeg_bytes(640, 480) if kind == "JPEG" else png_bytes(640, 480))
    with pytest.raises(PipelineError) as ei:
        video_probe.probe_video(p)
    err = ei.value
    assert err.code == "still_image" and err.http_status == 415
    assert err.details == {"file": "clip.mp4", "image_format": kind}
    assert f"still image ({kind})" in err.message
    assert "/upload-images" in err.hint


def test_still_image_found_by_ffmpeg_image_demuxer_is_named(tmp_path):
    """A BMP has no signature in STILL_IMAGE_MAGIC; FFmpeg opens it with ``bmp_pipe``."""
    p = tmp_path / "clip.mp4"
    ok, buf = cv2.imencode(".bmp", np.zeros((48, 64, 3), np.uint8))
    p.write_bytes(buf.tobytes())
    assert video_probe.still_image_kind(p.read_bytes()[:32]) is None
    with pytest.raises(PipelineError) as ei:
        video_probe.probe_video(p)
    assert ei.value.code == "still_image"
    assert ei.value.details == {"file": "clip.mp4", "image_format": "BMP"}


def test_mp4_without_its_index_is_incomplete(tmp_path):
    """The sample stores ``moov`` after the media data: half the file has no index."""
    boxes = iso_box_offsets(SAMPLE_VIDEO)
    assert list(boxes) == ["ftyp", "mdat", "moov"] and boxes["moov"] == 3_638_610
    cut = cut_file(SAMPLE_VIDEO, tmp_path / "walk.mp4", 0.5)
    with pytest.raises(PipelineError) as ei:
        video_probe.probe_video(cut)
    err = ei.value
    assert err.code == "video_incomplete" and err.http_status == 422
    size = cut.stat().st_size
    assert err.details == {"file": "walk.mp4", "bytes": size, "boxes": ["ftyp", "mdat"],
                           "media_bytes_declared": 3_638_590,
                           "media_bytes_present": size - boxes["mdat"]}
    assert "'moov' box) is missing" in err.message
    assert f"{size - 20} of the 3638590 bytes" in err.message
    assert "again" in err.hint


def test_three_frame_clip_is_too_short(tmp_path):
    clip = write_video(tmp_path / "tiny.mp4", translating_frames(3, 3.0), fps=30)
    info = video_probe.probe_video(clip)  # the plain probe describes it ...
    assert info["num_frames"] == 3 and info["duration_s"] == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(PipelineError) as ei:  # ... the upload's probe refuses it
        video_probe.probe_upload(clip)
    err = ei.value
    assert err.code == "clip_too_short" and err.http_status == 422
    assert err.message.startswith("The clip is too short: it lasts 0.10 s and holds 3 frames")
    assert err.details == {"duration_s": 0.1, "num_frames": 3, "min_duration_s": 1.0,
                           "min_frames": 3}


def test_clip_length_rule():
    assert video_probe.clip_length_error(1.2, 12) is None
    assert video_probe.clip_length_error(None, None) is None
    assert video_probe.clip_length_error(0.99, 30).code == "clip_too_short"
    err = video_probe.clip_length_error(8.0, 2)  # a time lapse of two frames
    assert err is not None and "8.00 s and holds 2 frames" in err.message


def test_probe_command_names_each_bad_file(tmp_path):
    """The child the upload runs prints the code on stdout and exits 2."""
    photo = tmp_path / "photo.mp4"
    photo.write_bytes(jpeg_bytes())
    cut = cut_file(SAMPLE_VIDEO, tmp_path / "cut.mp4", 0.5)
    tiny = write_video(tmp_path / "tiny.mp4", translating_frames(3, 3.0), fps=30)
    for path, code in ((photo, "still_image"), (cut, "video_incomplete"),
                       (tiny, "clip_too_short")):
        rc, doc = probe_cli(path)
        assert rc == 2 and doc["error"]["code"] == code, (path.name, doc)
        assert doc["error"]["hint"] == ERROR_CATALOG[code][2]
    rc, doc = probe_cli(SAMPLE_VIDEO)
    assert rc == 0 and doc["num_frames"] == 315 and doc["tone_mapped"] is None
