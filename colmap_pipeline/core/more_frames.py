"""In-between frames for the recovery ladder's ``more_frames`` rung (:mod:`.ladder`): one new
frame in the middle of each gap between the selected frames, which halves the baseline between
neighbours for clips whose frames at the preset's cap are too far apart to match.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import av
import numpy as np

from .frame_colour import LumaLut
from .frame_scores import (
    BLUR_ABSOLUTE,
    analysis_gray,
    exposure_reason,
    frame_scores,
    output_image,
    write_jpeg,
)
from .frame_select import KeptFrame
from .video_decode import DecodeLog, decoded_frames, open_stream, time_range
from .video_probe import ProbeInfo, probe_video

log = logging.getLogger(__name__)

#: :func:`extract_between` looks for an in-between frame only in the middle of each gap (from
#: this fraction of the gap to 1 minus it), so the new frame halves the baseline.
BETWEEN_MARGIN = 0.25


class AddedFrame(TypedDict):
    """A frame written by :func:`extract_between` (``after``: the kept frame it follows)."""

    file: str
    timestamp_s: float
    sharpness: float
    after: str


@dataclass
class _Gap:
    """The middle of the gap after kept frame ``after`` (times in s) and its best frame."""

    lo: float
    hi: float
    name: str
    after: str
    timestamp_s: float = 0.0
    sharpness: float = -1.0
    image: np.ndarray | None = None


def between_name(file: str) -> str:
    """Name of the frame inserted after ``file``: ``frame_00003.jpg`` -> ``frame_00003_m.jpg``.

    It sorts after ``frame_00003.jpg`` ('.' < '_') and before ``frame_00004.jpg``, so name
    order (what sequential matching follows) stays time order."""
    stem, dot, ext = file.rpartition(".")
    return f"{stem}_m.{ext}" if dot else f"{file}_m"


def _gaps(out: Path, kept: list[KeptFrame]) -> list[_Gap]:
    """The gaps still without an in-between frame (time order)."""
    gaps = []
    for a, b in zip(kept, kept[1:], strict=False):
        ta, tb = float(a["timestamp_s"]), float(b["timestamp_s"])
        name = between_name(a["file"])
        if tb - ta > 0 and not (out / name).exists():
            m = BETWEEN_MARGIN * (tb - ta)
            gaps.append(_Gap(lo=ta + m, hi=tb - m, name=name, after=a["file"]))
    return gaps


def _scan(path: str | os.PathLike, info: ProbeInfo, gaps: list[_Gap],
          max_image_size: int | None) -> None:
    """One sequential decode up to the last gap: keep each gap's sharpest usable frame."""
    luts = LumaLut()
    damage = DecodeLog()
    g = 0
    with av.open(str(path), mode="r") as container:
        stream = open_stream(container, info)
        fps = info.get("fps") or 30.0
        t0 = time_range(container, stream, info)[0]
        for i, frame in enumerate(decoded_frames(container, stream, damage)):
            t = frame.time if frame.time is not None else t0 + i / fps
            if t > gaps[-1].hi:
                break
            while g < len(gaps) and t > gaps[g].hi:
                g += 1
            if g >= len(gaps) or t < gaps[g].lo:
                continue
            sc = frame_scores(analysis_gray(frame, luts))
            if exposure_reason(sc) is not None or sc["sharpness"] < BLUR_ABSOLUTE:
                continue
            if sc["sharpness"] > gaps[g].sharpness:
                gaps[g].timestamp_s, gaps[g].sharpness = round(float(t), 6), sc["sharpness"]
                gaps[g].image = output_image(frame, max_image_size)
    if damage.errors:
        log.warning("decoding for in-between frames: %d packet(s) failed: %s", damage.errors,
                    damage.last_error)


def extract_between(path: str | os.PathLike, out_dir: str | os.PathLike, kept: list[KeptFrame],
                    max_image_size: int | None = None) -> list[AddedFrame]:
    """Add one frame in the middle of each gap between consecutive kept frames.

    One sequential decode. For each gap between ``kept[i]`` and ``kept[i + 1]`` the sharpest
    frame whose timestamp lies in the middle half of the gap (``BETWEEN_MARGIN``) and that is
    not black, overexposed, blank (:func:`.frame_scores.exposure_reason`) or blurry (sharpness
    below ``BLUR_ABSOLUTE``) is written as :func:`between_name` of ``kept[i]["file"]``, scaled
    like the kept frames. A gap whose middle holds no usable frame gets none; an existing file
    of that name is left alone (already added). Packets that fail to decode are skipped.

    Args:
        path: the video.
        out_dir: the frames folder.
        kept: frames as in ``extract_frames(...)["frames"]`` (``file``, ``timestamp_s``), in
            time order.
        max_image_size: as for :func:`.frame_select.extract_frames`.

    Returns:
        ``[{"file", "timestamp_s", "sharpness", "after"}]`` of the frames written, time order.

    Raises:
        PipelineError("no_video_stream"): see :func:`.video_probe.probe_video`.
    """
    out = Path(out_dir)
    info = probe_video(path)
    gaps = _gaps(out, kept)
    if not gaps:
        return []
    _scan(path, info, gaps, max_image_size)
    added: list[AddedFrame] = []
    for gap in gaps:
        if gap.image is None:
            continue
        write_jpeg(out / gap.name, gap.image)  # atomic (temporary + rename)
        added.append({"file": gap.name, "timestamp_s": gap.timestamp_s,
                      "sharpness": gap.sharpness, "after": gap.after})
    return added
