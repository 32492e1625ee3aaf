"""Probing an uploaded file: which stream is the video, its size, rotation, rate and length,
and a clear name for the files that are not a usable video (still images, MP4s without their
index, clips too short to hold any camera motion).

Everything here uses PyAV (FFmpeg); nothing imports pycolmap or any web/database framework, so
``python -m colmap_pipeline probe`` stays fast.

Facts this module relies on (checked with PyAV 18.1 / OpenCV 5.0):

* A container can hold audio, data (GoPro GPMF/timecode) and attached-picture (cover art)
  streams beside the real video; the video stream is chosen explicitly (:func:`pick_video_stream`).
* PyAV exposes the display-matrix rotation as ``VideoFrame.rotation`` (degrees,
  counter-clockwise, FFmpeg's ``av_display_rotation_get`` convention) but does not rotate the
  pixels; OpenCV's ``VideoCapture`` does. :func:`rotate` applies it the way OpenCV / ``ffmpeg``'s
  autorotate display it (the tests check this against ``cv2.VideoCapture``).
* FFmpeg opens a JPEG or PNG whatever its name (demuxers ``jpeg_pipe``, ``png_pipe``, ...) as a
  one-frame "video"; it refuses an MP4/MOV whose ``moov`` box (the index) is missing, as after an
  interrupted transfer of a file that stores it at the end (the GoPro sample does: ``ftyp``,
  ``mdat``, then ``moov`` at byte 3,638,610 of 3,680,760).
"""
from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, TypedDict

import av
import cv2
import numpy as np

from ..errors import PipelineError
from .frame_colour import HDR_TRANSFER_NAMES, frame_trc

#: FFmpeg "video" decoders that render text (ANSI art etc.): FFmpeg's ``tty`` demuxer opens any
#: ``.txt`` file as a 640x400 video of its text. Such streams are not camera footage.
TEXT_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})
#: Packets demuxed while probing before a stream is declared undecodable.
PROBE_MAX_PACKETS = 600
#: Fewer selected frames than this cannot give a reconstruction (two views + one to verify).
MIN_FRAMES = 3
#: Shortest clip (s) accepted: a camera moved by hand or by drone covers a few cm in 0.1 s, far
#: too little baseline for SfM; the shortest clips in the tests that reconstruct or pass the
#: motion check last 1.2 s (12 frames at 10 fps, sideways motion of 3-6 px per frame).
MIN_CLIP_S = 1.0
#: Still-image signatures (first bytes): JPEG (ITU T.81), PNG (RFC 2083 3.1), TIFF 6.0 (both
#: byte orders). WebP (RIFF....WEBP) and HEIF/AVIF (ISO BMFF brands) are tested separately.
STILL_IMAGE_MAGIC = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"),
                     (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"))
#: ``ftyp`` major brands of still-image files in the ISO base media format (ISO/IEC 23008-12
#: HEIF: iPhone photos; AV1 image file format AVIF).
STILL_IMAGE_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"heim": "HEIC", b"heis": "HEIC",
                      b"mif1": "HEIF", b"avif": "AVIF"}
#: Box types that may open an ISO BMFF file (MP4, MOV, 3GP): ISO/IEC 14496-12 and QuickTime.
ISO_FIRST_BOXES = frozenset({b"ftyp", b"wide", b"free", b"skip", b"mdat", b"moov", b"pnot"})


class StreamInfo(TypedDict):
    """One stream of the container."""

    index: int
    type: str
    codec: str | None


class ProbeInfo(TypedDict):
    """What :func:`probe_video` returns (JSON-ready: the ``video`` object of a job)."""

    container: str
    codec: str
    width: int
    height: int
    rotation: int
    fps: float | None
    duration_s: float | None
    num_frames: int | None
    pix_fmt: str | None
    stream_index: int
    streams: list[StreamInfo]
    tone_mapped: str | None


def _probe_error(path: str | os.PathLike, reason: str) -> PipelineError:
    return PipelineError("no_video_stream", details={"file": Path(path).name, "reason": reason})


def pick_video_stream(container: av.container.InputContainer) -> av.VideoStream | None:
    """Return the main video stream or ``None``.

    Skips attached pictures (cover art), timed thumbnails and still images (by
    ``disposition``), streams without a decoder and text renderers (``TEXT_CODECS``); prefers
    the largest resolution, then the ``default`` disposition, then the lowest index.
    """
    skip = (av.stream.Disposition.attached_pic | av.stream.Disposition.timed_thumbnails
            | av.stream.Disposition.still_image)
    candidates = []
    for s in container.streams.video:
        if s.disposition & skip:
            continue
        cc = s.codec_context
        if cc is None or not cc.name or cc.name in TEXT_CODECS:
            continue
        area = int(cc.width or 0) * int(cc.height or 0)
        is_default = bool(s.disposition & av.stream.Disposition.default)
        candidates.append((-area, not is_default, s.index, s))
    if not candidates:
        return None
    candidates.sort(key=lambda c: c[:3])
    return candidates[0][3]


def _first_frame(container: av.container.InputContainer,
                 stream: av.VideoStream) -> av.VideoFrame | None:
    """Decode until the first frame of ``stream``; ``None`` if none within the packet budget."""
    n = 0
    for packet in container.demux(stream):
        n += 1
        try:
            frames = packet.decode()
        except av.FFmpegError:
            frames = []
        if frames:
            return frames[0]
        if n >= PROBE_MAX_PACKETS:
            return None
    return None


def stream_fps(stream: av.VideoStream) -> float | None:
    """Frame rate (Hz): average, else guessed, else base rate; ``None`` when none is known."""
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate:
            return float(rate)
    return None


def stream_duration_s(container: av.container.InputContainer,
                      stream: av.VideoStream) -> float | None:
    """Duration (s) of the stream, else of the container; ``None`` when neither is known."""
    if stream.duration is not None and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def stream_start_s(stream: av.VideoStream) -> float | None:
    """Presentation time (s) of the stream's first frame, when the container says."""
    if stream.start_time is not None and stream.time_base:
        return float(stream.start_time * stream.time_base)
    return None


def norm_rotation(deg: float | int | None) -> int:
    """Rotation in {0, 90, 180, 270} (counter-clockwise); other angles snap to the nearest 90."""
    if not deg:
        return 0
    return int(round(float(deg) / 90.0)) * 90 % 360


def rotate(img: np.ndarray, rotation_ccw: int) -> np.ndarray:
    """Rotate ``img`` (H x W [x C]) counter-clockwise by ``rotation_ccw`` in {0,90,180,270}.

    ``VideoFrame.rotation`` is the counter-clockwise angle by which the stored picture must be
    turned for display (``av_display_rotation_get``); ``ffmpeg`` autorotate and OpenCV do the
    same, e.g. a phone's portrait clip tagged ``rotate=90`` reads back as -90 (= 270) and is
    turned 90 degrees clockwise.
    """
    if rotation_ccw == 90:
        return cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)
    if rotation_ccw == 180:
        return cv2.rotate(img, cv2.ROTATE_180)
    if rotation_ccw == 270:
        return cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)
    return img


# --- files that are not a usable video ------------------------------------------------------

def still_image_kind(head: bytes) -> str | None:
    """``"JPEG"``, ``"PNG"``, ``"TIFF"``, ``"WebP"``, ``"HEIC"``, ``"HEIF"`` or ``"AVIF"``
    when the first bytes of a file are those of a still image; else ``None``."""
    for magic, kind in STILL_IMAGE_MAGIC:
        if head.startswith(magic):
            return kind
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[4:8] == b"ftyp":
        return STILL_IMAGE_BRANDS.get(head[8:12])
    return None


def _still_image_error(path: str | os.PathLike, kind: str) -> PipelineError:
    return PipelineError(
        "still_image", message=f"The file is a still image ({kind}), not a video.",
        details={"file": Path(path).name, "image_format": kind})


def iso_boxes(path: str | os.PathLike, max_boxes: int = 1000) -> list[tuple[str, int, int]]:
    """Top-level boxes ``(type, offset, declared size)`` of an ISO BMFF file (MP4/MOV/3GP),
    walking the 8- or 16-byte box headers (ISO/IEC 14496-12, 4.2); ``[]`` when the file does not
    start like one. A declared size may run past the end of a cut file."""
    total = os.path.getsize(path)
    boxes: list[tuple[str, int, int]] = []
    with open(path, "rb") as fh:
        off = 0
        while off + 8 <= total and len(boxes) < max_boxes:
            fh.seek(off)
            head = fh.read(16)
            size, kind = struct.unpack(">I4s", head[:8])
            if not boxes and kind not in ISO_FIRST_BOXES:
                return []
            if size == 1 and len(head) == 16:
                size = struct.unpack(">Q", head[8:16])[0]
            elif size == 0:  # the box runs to the end of the file
                size = total - off
            if size < 8 or not kind.isascii():
                break
            boxes.append((kind.decode("latin-1"), off, int(size)))
            off += size
    return boxes


def _incomplete_error(path: str | os.PathLike) -> PipelineError | None:
    """``video_incomplete`` for an MP4/MOV without its ``moov`` box, else ``None``."""
    boxes = iso_boxes(path)
    if not boxes or any(kind == "moov" for kind, _, _ in boxes):
        return None
    total = os.path.getsize(path)
    details: dict = {"file": Path(path).name, "bytes": total,
                     "boxes": [kind for kind, _, _ in boxes][:20]}
    media = next(((off, size) for kind, off, size in boxes if kind == "mdat"), None)
    message = ("The MP4/MOV file is incomplete: its index (the 'moov' box) is missing, so it "
               "cannot be played.")
    if media is not None:
        present = min(media[1], total - media[0])
        details.update(media_bytes_declared=media[1], media_bytes_present=present)
        message += (f" {present} of the {media[1]} bytes of its media data are present: the "
                    f"upload or the recording was interrupted.")
    return PipelineError("video_incomplete", message=message, details=details)


def _open(path: str | os.PathLike) -> av.container.InputContainer:
    """Open ``path`` with FFmpeg; name a still image or an MP4 without index on the way."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
    except OSError as exc:
        raise _probe_error(path, f"not a readable file: {exc}") from None
    kind = still_image_kind(head)
    if kind is not None:
        raise _still_image_error(path, kind)
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise (_incomplete_error(path)
               or _probe_error(path, f"not a readable media file: {exc}")) from None
    fmt = container.format.name
    if fmt == "image2" or fmt.endswith("_pipe"):  # FFmpeg's still-image demuxers
        container.close()
        raise _still_image_error(path, fmt.removesuffix("_pipe").upper())
    return container


def probe_video(path: str | os.PathLike) -> ProbeInfo:
    """Describe the main video stream of ``path`` and prove that it decodes.

    Returns:
        :class:`ProbeInfo`: ``container`` (FFmpeg format name), ``codec``, ``width`` and
        ``height`` (px, after applying rotation), ``rotation`` (deg counter-clockwise,
        0/90/180/270), ``fps`` (Hz or None), ``duration_s`` (s or None), ``num_frames``
        (container count, else duration x fps, or None), ``pix_fmt``, ``stream_index``,
        ``streams`` ([{index, type, codec}]) and ``tone_mapped``: the HDR transfer of the first
        frame that the frames are tone-mapped from (FFmpeg's name, ``"smpte2084"`` = PQ or
        ``"arib-std-b67"`` = HLG), ``None`` for SDR.

    Raises:
        PipelineError("still_image"): a JPEG/PNG/TIFF/WebP/HEIF photo, whatever its name.
        PipelineError("video_incomplete"): an MP4/MOV whose index (``moov`` box) is missing.
        PipelineError("no_video_stream"): the file cannot be opened by FFmpeg (not a media file,
            empty, missing), holds no video stream other than cover art, or its video stream
            yields no frame within the first ``PROBE_MAX_PACKETS`` packets.
        PipelineError("video_truncated"): the stream declares frames or a duration but none
            decodes (a file cut short, e.g. an interrupted upload or recording).
    """
    with _open(path) as container:
        streams: list[StreamInfo] = [
            {"index": s.index, "type": s.type,
             "codec": (s.codec_context.name if s.codec_context is not None else None)}
            for s in container.streams]
        stream = pick_video_stream(container)
        if stream is None:
            raise _probe_error(path, "no video stream")
        frame = _first_frame(container, stream)
        if frame is None:
            if stream.frames or stream.duration:  # declared content that does not decode
                raise PipelineError("video_truncated", details={
                    "file": Path(path).name, "frames_decoded": 0,
                    "declared_frames": int(stream.frames or 0),
                    "reason": "the video stream declares frames but none decodes"})
            raise _probe_error(path, "the video stream yields no decodable frame")
        rotation = norm_rotation(frame.rotation)
        width, height = frame.width, frame.height
        if rotation in (90, 270):
            width, height = height, width
        fps = stream_fps(stream)
        duration = stream_duration_s(container, stream)
        num_frames = stream.frames or None
        if num_frames is None and fps and duration:
            num_frames = int(round(fps * duration))
        return {
            "container": container.format.name,
            "codec": stream.codec_context.name,
            "width": int(width),
            "height": int(height),
            "rotation": rotation,
            "fps": fps,
            "duration_s": duration,
            "num_frames": num_frames,
            "pix_fmt": stream.codec_context.pix_fmt,
            "stream_index": stream.index,
            "streams": streams,
            "tone_mapped": HDR_TRANSFER_NAMES.get(frame_trc(frame)),
        }


def clip_length_error(duration_s: float | None, num_frames: int | None) -> PipelineError | None:
    """``clip_too_short`` when the clip lasts less than ``MIN_CLIP_S`` or holds fewer than
    ``MIN_FRAMES`` frames (unknown values pass), else ``None``. The message gives both."""
    short = duration_s is not None and duration_s < MIN_CLIP_S
    few = num_frames is not None and num_frames < MIN_FRAMES
    if not (short or few):
        return None
    dur = "an unknown time" if duration_s is None else f"{duration_s:.2f} s"
    frames = "an unknown number of" if num_frames is None else str(num_frames)
    return PipelineError(
        "clip_too_short",
        message=f"The clip is too short: it lasts {dur} and holds {frames} frames; at least "
                f"{MIN_CLIP_S:.1f} s and {MIN_FRAMES} frames are needed.",
        details={"duration_s": None if duration_s is None else round(duration_s, 3),
                 "num_frames": num_frames, "min_duration_s": MIN_CLIP_S,
                 "min_frames": MIN_FRAMES})


def probe_upload(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`probe_video`, then refuse a clip too short to reconstruct (what the upload's probe
    child runs: ``python -m colmap_pipeline probe FILE``; the :class:`ProbeInfo` as a plain
    dict, its JSON output).

    Raises:
        PipelineError: as :func:`probe_video`, and ``clip_too_short`` (see
            :func:`clip_length_error`).
    """
    info = probe_video(path)
    err = clip_length_error(info["duration_s"], info["num_frames"])
    if err is not None:
        raise err
    return dict(info)
