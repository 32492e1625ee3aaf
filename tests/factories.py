"""Test inputs made on the fly (a helper module, not a test file): synthetic clips with known
camera motion, damaged and misnamed files, HDR renders of SDR frames, photos and zips.

Clips are encoded with PyAV (libx264 / libx265) from textures drawn here with fixed seeds:

* :func:`translating_frames`: a camera translating sideways over a fronto-parallel textured
  plane (pure image translation);
* :func:`parallax_frames`: a sideways-moving camera over two textured layers at different
  depths (background moves 0.4x as fast as the foreground blobs), so no homography explains
  the motion, as in real footage;
* :func:`rotation_frames`: a camera turning on a tripod, rendered exactly as ``K R K^-1``
  warps of a texture (Hartley & Zisserman, sec. 8.4.2).
"""
from __future__ import annotations

import io
import math
import struct
import zipfile
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

#: size (px) of the parallax / rotation clips
W, H = 320, 240


# --- scenes ---------------------------------------------------------------------------------

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


# --- clips ----------------------------------------------------------------------------------

def write_video(path: Path, frames, fps: int = 10, rotation: int | None = None,
                pix_fmt: str = "yuv420p", crf: int = 16, options: dict | None = None,
                container_options: dict | None = None) -> Path:
    """Encode BGR frames with libx264; ``rotation`` writes a display matrix (deg, CCW);
    ``options`` are extra libx264 options (e.g. ``{"g": "10"}``), ``container_options`` the
    muxer's (e.g. ``{"movflags": "+faststart"}``: the index before the media data)."""
    frames = list(frames)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", options=container_options or {}) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        s.options = {"crf": str(crf), "preset": "veryfast", **(options or {})}
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


def write_video_codec(path: Path, frames, codec: str, pix_fmt: str, trc: int | None = None):
    """Encode BGR frames at 10 fps with ``codec`` (libx264 / libx265) in ``pix_fmt``; ``trc``
    tags the transfer (with BT.2020 primaries and matrix)."""
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


def write_vfr_video(path: Path, times: list[float], frames) -> Path:
    """libx264 clip whose frame i is shown at ``times[i]`` s (ms time base, no B-frames)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=30)
        s.width, s.height, s.pix_fmt = W, H, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        s.options = {"crf": "16", "preset": "veryfast", "bf": "0"}
        for t, img in zip(times, frames, strict=True):
            fr = av.VideoFrame.from_ndarray(img, format="bgr24")
            fr.pts, fr.time_base = round(t * 1000), Fraction(1, 1000)
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


# --- damaged and misnamed files -------------------------------------------------------------

def cut_file(src: Path, dst: Path, fraction: float) -> Path:
    """The first ``fraction`` of ``src``'s bytes (an interrupted transfer)."""
    data = src.read_bytes()
    dst.write_bytes(data[:int(len(data) * fraction)])
    return dst


def packet_spans(path: Path) -> list[tuple[int, int, float]]:
    """``(byte offset, size, time s)`` of each video packet, in file order."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return [(int(p.pos), int(p.size), float(p.pts * p.time_base))
                for p in c.demux(s) if p.size and p.pos is not None and p.pts is not None]


def corrupt_packets(src: Path, dst: Path, first: int, count: int, seed: int = 0) -> Path:
    """``src`` with the bytes of video packets ``first .. first + count - 1`` (file order)
    overwritten by random bytes: a file damaged in the middle (a bad sector, a broken copy)."""
    data = bytearray(src.read_bytes())
    rng = np.random.default_rng(seed)
    for pos, size, _ in packet_spans(src)[first:first + count]:
        data[pos:pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def iso_box_offsets(path: Path) -> dict[str, int]:
    """Offset of each top-level ISO BMFF box type (first occurrence) of an MP4/MOV."""
    data = path.read_bytes()
    out: dict[str, int] = {}
    off = 0
    while off + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[off:off + 8])
        if size == 1:
            size = struct.unpack(">Q", data[off + 8:off + 16])[0]
        out.setdefault(kind.decode("latin-1"), off)
        if size < 8:
            break
        off += size
    return out


# --- HDR ------------------------------------------------------------------------------------

#: Linear BT.709 RGB -> linear BT.2020 RGB (ITU-R BT.2087-0, section 2)
BT709_TO_BT2020 = np.array([[0.6274, 0.3293, 0.0433], [0.0691, 0.9195, 0.0114],
                            [0.0164, 0.0880, 0.8956]])
#: BT.2020 / BT.2100 luma weights of R, G, B
BT2020_LUMA = np.array([0.2627, 0.6780, 0.0593])


def _hlg_oetf(e: np.ndarray) -> np.ndarray:
    """ITU-R BT.2100 HLG OETF: scene light in [0, 1] -> signal."""
    a = 0.17883277
    b, c = 1 - 4 * a, 0.5 - a * math.log(4 * a)
    e = np.clip(e, 0, 1)
    return np.where(e <= 1 / 12, np.sqrt(3 * e), a * np.log(np.maximum(12 * e - b, 1e-12)) + c)


def sdr_to_hlg_yuv(bgr: np.ndarray, ref_white: float = 203.0, peak: float = 1000.0,
                   gamma: float = 1.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An 8-bit SDR BT.709 image as 10-bit limited-range 4:2:0 HLG planes (Y, Cb, Cr).

    ITU-R BT.2408's display-referred mapping: SDR display light (BT.1886, gamma 2.4) with 100%
    at ``ref_white`` nits (HDR Reference White, 203 cd/m2), BT.709 -> BT.2020 primaries, then
    the HLG inverse EOTF at a ``peak``-nit display (inverse OOTF on luminance with system gamma
    1.2, then the OETF), BT.2020 non-constant-luminance Y'CbCr, chroma averaged 2x2."""
    ld = (bgr[..., ::-1].astype(np.float64) / 255.0) ** 2.4
    fd = ref_white * np.clip(ld @ BT709_TO_BT2020.T, 0, None)
    ys = (fd @ BT2020_LUMA / peak) ** (1 / gamma)
    ep = _hlg_oetf(fd / (peak * np.maximum(ys, 1e-9)[..., None] ** (gamma - 1)))
    y = ep @ BT2020_LUMA
    cb, cr = (ep[..., 2] - y) / 1.8814, (ep[..., 0] - y) / 1.4746

    def half(c: np.ndarray) -> np.ndarray:
        hh, ww = c.shape
        return c.reshape(hh // 2, 2, ww // 2, 2).mean(axis=(1, 3))

    return (np.round(64 + 876 * y).astype(np.uint16),
            np.round(512 + 896 * half(cb)).astype(np.uint16),
            np.round(512 + 896 * half(cr)).astype(np.uint16))


def write_hlg_video(path: Path, frames, fps: int = 10) -> Path:
    """HEVC Main 10 clip tagged HLG / BT.2020 (as phones record "HDR" video) of SDR BGR frames
    (even width and height), converted by :func:`sdr_to_hlg_yuv`."""
    frames = list(frames)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx265", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p10le"
        s.options = {"crf": "4", "preset": "ultrafast", "x265-params": "log-level=error"}
        s.codec_context.color_trc, s.codec_context.color_primaries = 18, 9
        s.codec_context.colorspace = 9
        for i, img in enumerate(frames):
            fr = av.VideoFrame(w, h, "yuv420p10le")
            for plane, data in zip(fr.planes, sdr_to_hlg_yuv(img), strict=True):
                buf = np.frombuffer(memoryview(plane), np.uint16).reshape(
                    plane.height, plane.line_size // 2)
                buf[:, :data.shape[1]] = data
            fr.pts = i
            fr.color_trc, fr.color_primaries, fr.colorspace = 18, 9, 9
            for p in s.encode(fr):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


# --- photos and zips ------------------------------------------------------------------------

def jpeg_bytes(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    """A random-noise JPEG (fixed seed)."""
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def png_bytes(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    """A random-noise PNG (fixed seed)."""
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert an APP1 Exif segment holding only the Orientation tag (0x0112, SHORT) after SOI
    (Exif 2.32 section 4.5.4; TIFF 6.0 little-endian header 'II*\\0', IFD at offset 8)."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) \
        + struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + app1 + jpeg[2:]


def exif_jpeg(path: Path, size=(400, 300), orientation: int | None = None,
              exif_ifd: int = 0x8769, **tags) -> None:
    """Write a textured JPEG with Exif sub-IFD ``tags`` (tag id -> value) using Pillow."""
    from PIL import Image

    rng = np.random.default_rng(5)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    sub = exif.get_ifd(exif_ifd)
    for tag, value in tags.items():
        sub[int(tag)] = value
    im.save(path, exif=exif, quality=90)


def make_zip(entries: list[tuple[str, bytes]], compression=zipfile.ZIP_STORED) -> bytes:
    """A zip of ``(entry name, bytes)`` (names written as given, ``..`` included)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            zf.writestr(info, data)
    return buf.getvalue()


def zip_with(entries: list[tuple[str, bytes]], info: zipfile.ZipInfo, data: bytes) -> bytes:
    """A zip of ``entries`` (plain names) followed by one entry described by ``info`` (a
    symbolic link, an odd flag, a name to test) holding ``data``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, photo in entries:
            zf.writestr(name, photo)
        zf.writestr(info, data)
    return buf.getvalue()


def bomb_zip() -> bytes:
    """One .png entry of 64 MiB of zeros: DEFLATE shrinks it ~1000x (64 KiB on the wire)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("bomb.png")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as fh:
            fh.write(b"\x89PNG\r\n\x1a\n")
            block = bytes(1 << 20)
            for _ in range(64):
                fh.write(block)
    return buf.getvalue()
