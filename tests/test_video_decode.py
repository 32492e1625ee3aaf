"""Tests of colmap_pipeline.core.video_decode: decoding that survives damage and counts it."""
from __future__ import annotations

import av
import pytest
from factories import corrupt_packets, cut_file, packet_spans, parallax_frames, write_video

from colmap_pipeline.core import video_decode, video_probe


def _decode(path) -> tuple[list[float], video_decode.DecodeLog]:
    info = video_probe.probe_video(path)
    damage = video_decode.DecodeLog()
    with av.open(str(path)) as c:
        stream = video_decode.open_stream(c, info)
        assert stream.thread_count == video_decode.DECODE_MAX_THREADS
        assert video_decode.time_range(c, stream, info) == pytest.approx((0.0, 4.0))
        times = [float(f.time) for f in video_decode.decoded_frames(c, stream, damage)]
    return times, damage


def test_bad_packets_are_skipped_and_counted(tmp_path):
    clip = write_video(tmp_path / "full.mp4", parallax_frames(40, step=3.0), options={"g": "10"})
    times, damage = _decode(clip)
    assert len(times) == 40 and damage == video_decode.DecodeLog()
    assert packet_spans(clip)[15][2] == pytest.approx(1.4)
    bad = corrupt_packets(clip, tmp_path / "bad.mp4", first=15, count=2)
    times, damage = _decode(bad)
    # plain container.decode() stops at the first bad packet (about 1.4 s); this goes on
    assert len(times) == 38 and max(times) == pytest.approx(3.9)
    assert damage.errors == 2 and not damage.demux_stopped
    assert len(damage.error_times) == 2 and all(1.4 <= t <= 2.0 for t in damage.error_times)
    assert "Invalid data" in (damage.last_error or "")


def test_a_cut_file_ends_early_without_an_error(tmp_path):
    clip = write_video(tmp_path / "full.mp4", parallax_frames(40, step=3.0), options={"g": "10"},
                       container_options={"movflags": "+faststart"})
    times, damage = _decode(cut_file(clip, tmp_path / "cut.mp4", 0.5))
    assert 10 <= len(times) <= 30 and max(times) < 3.0  # what the frame selection calls truncated
    assert damage.errors == 0
