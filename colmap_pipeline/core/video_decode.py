"""Sequential decoding of a video stream that survives damage: a packet the decoder refuses is
counted and skipped, an error of the demuxer ends the decode, and what was seen is recorded
(:class:`DecodeLog`) so that the caller can name a damaged file with numbers. Used by the frame
selection (:mod:`.frame_select`) and the in-between frames (:mod:`.more_frames`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import av

from .video_probe import ProbeInfo, stream_start_s

log = logging.getLogger(__name__)

#: Decoder threads. FFmpeg's frame threading keeps about one frame in flight per thread, so
#: "auto" (cores + 1) on a 16-core machine holds ~17 decoded 4K frames (12 MiB each, plus
#: references); 4 threads keep the peak bounded and decode at about the same speed on the
#: 2-4 cores a job gets (measured: 1080p, 2 cores: auto 8.3 s / 67 MiB, 4 threads 6.2 s / 74 MiB).
DECODE_MAX_THREADS = 4


@dataclass
class DecodeLog:
    """Damage seen while decoding: packets the decoder refused (their presentation times, s),
    frames it flagged corrupt, and whether the demuxer gave up before the end of the file."""

    errors: int = 0
    error_times: list[float] = field(default_factory=list)
    last_error: str | None = None
    corrupt_frames: int = 0
    demux_stopped: bool = False


def decoded_frames(container: av.container.InputContainer, stream: av.VideoStream,
                   damage: DecodeLog) -> Iterator[av.VideoFrame]:
    """Frames of ``stream`` in decode order. A packet that fails to decode is counted in
    ``damage`` and skipped (the decoder resumes at the next packet it can use); an error of the
    demuxer itself ends the iteration (``damage.demux_stopped``)."""
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except (av.FFmpegError, EOFError) as exc:
                damage.errors += 1
                damage.last_error = str(exc)
                if packet.pts is not None and packet.time_base is not None:
                    damage.error_times.append(float(packet.pts * packet.time_base))
                continue
            for frame in frames:
                if frame.is_corrupt:
                    damage.corrupt_frames += 1
                yield frame
    except (av.FFmpegError, EOFError) as exc:
        damage.errors += 1
        damage.last_error = str(exc)
        damage.demux_stopped = True
        log.warning("demuxing stopped: %s", exc)


def open_stream(container: av.container.InputContainer, info: ProbeInfo) -> av.VideoStream:
    """The probed video stream of ``container``, set up for threaded decoding."""
    stream = container.streams[info["stream_index"]]
    assert isinstance(stream, av.VideoStream)
    stream.thread_type = "AUTO"
    stream.thread_count = DECODE_MAX_THREADS
    return stream


def time_range(container: av.container.InputContainer, stream: av.VideoStream,
               info: ProbeInfo) -> tuple[float, float]:
    """(start, end) presentation time in s of ``stream``; demuxes packets if metadata lacks it."""
    start = stream_start_s(stream)
    duration = info.get("duration_s")
    if start is not None and duration:
        return start, start + duration
    # Fallback (e.g. streams without duration): one demux pass over packet timestamps.
    t_min, t_max = math.inf, -math.inf
    for packet in container.demux(stream):
        if packet.pts is None or packet.time_base is None:
            continue
        t = float(packet.pts * packet.time_base)
        dt = float((packet.duration or 0) * packet.time_base)
        t_min, t_max = min(t_min, t), max(t_max, t + dt)
    container.seek(0)
    if not math.isfinite(t_min) or t_max <= t_min:
        return (start or 0.0), (start or 0.0) + (duration or 0.0)
    return t_min, t_max
