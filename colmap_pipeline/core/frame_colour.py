"""Colour of decoded frames: bit depth, YUV range and HDR transfer, turned into 8-bit SDR.

Facts this module relies on (checked with PyAV 18.1 / FFmpeg 8):

* ``VideoFrame.to_ndarray(format="bgr24")`` honours ``color_range`` (full-range ``yuvj420p``
  stays full range: on the GoPro sample the BGR gray level is 0.998 * Y - 1).
* swscale converts bit depth and YUV matrix but ignores the transfer unless asked; FFmpeg 8's
  own tone mapping (``dst_color_trc``) took 4-8 s to set up per reformatter, so PQ/HLG frames
  are tone-mapped here with a documented curve (:func:`tone_map`), through lookup tables for
  the luma plane (:class:`LumaLut`) and in float for the output images (:func:`frame_to_bgr`).
"""
from __future__ import annotations

import math

import av
import cv2
import numpy as np

#: 8-bit pixel formats whose first plane is the luma (or gray) image, read without conversion.
LUMA_FIRST_FORMATS = frozenset({"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p",
                                "yuvj444p", "yuv440p", "yuvj440p", "yuv411p", "yuv410p",
                                "nv12", "nv21", "gray"})
#: 9-16-bit little-endian planar formats whose first plane is luma: name -> bits per sample.
LUMA_FIRST_HI_FORMATS = {f"{p}{b}le": int(b) for p in ("yuv420p", "yuv422p", "yuv444p", "gray")
                         for b in ("9", "10", "12", "14", "16")}
#: FFmpeg ``AVColorTransferCharacteristic`` values of the HDR transfers (ITU-T H.273).
TRC_PQ = 16   # SMPTE ST 2084 (HDR10, Dolby Vision profile 8.1)
TRC_HLG = 18  # ARIB STD-B67 / ITU-R BT.2100 HLG (iPhone "HDR" video is HLG)
#: FFmpeg's names of those transfers (``av_color_transfer_name``), as reported in the probe's
#: ``tone_mapped`` field.
HDR_TRANSFER_NAMES = {TRC_PQ: "smpte2084", TRC_HLG: "arib-std-b67"}
#: HDR Reference White in nits (ITU-R BT.2408: 203 cd/m2, the level that SDR's 100% white is
#: mapped to when SDR is put into HDR, "display referred mapping"). The tone map inverts that
#: mapping: light at this level becomes (almost) SDR white, see :func:`tone_map`.
HDR_REFERENCE_WHITE_NITS = 203.0
#: Peak luminance assumed for the tone map (nits): PQ masters are commonly graded to 1000 nits
#: and BT.2100 HLG's nominal display peak is 1000 nits.
HDR_PEAK_NITS = 1000.0
#: Knee of the tone map as a fraction of reference white: light below it keeps its SDR value
#: exactly (an SDR scene put into HDR the BT.2408 way comes back unchanged), light above it is
#: compressed so that ``HDR_PEAK_NITS`` reaches SDR white. At 0.75 reference white itself ends
#: at 87.5% of SDR white light (signal 0.946, 241/255), leaving the top for highlights.
HDR_KNEE = 0.75
#: BT.2100 HLG OOTF system gamma at a 1000-nit display.
HLG_SYSTEM_GAMMA = 1.2
#: Linear BT.2020 RGB -> linear BT.709 RGB (ITU-R BT.2087-0, section 2).
BT2020_TO_BT709 = np.array([[1.6605, -0.5876, -0.0728],
                            [-0.1246, 1.1329, -0.0083],
                            [-0.0182, -0.1006, 1.1187]], np.float32)
#: FFmpeg ``AVColorPrimaries`` value of BT.2020.
PRIMARIES_BT2020 = 9


def pq_eotf(e: np.ndarray) -> np.ndarray:
    """SMPTE ST 2084 EOTF: non-linear signal in [0, 1] -> display light in nits (0-10000)."""
    m1, m2 = 2610 / 16384, 2523 / 4096 * 128
    c1, c2, c3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
    ep = np.power(np.clip(e, 0, 1), 1 / m2)
    return 10000.0 * np.power(np.maximum(ep - c1, 0) / (c2 - c3 * ep), 1 / m1)


def hlg_eotf(e: np.ndarray) -> np.ndarray:
    """ITU-R BT.2100 HLG inverse OETF, then a per-channel OOTF ``peak * E**1.2`` (nits).

    (The standard OOTF applies the system gamma to luminance; per channel is the usual simple
    approximation and keeps this a lookup table. For grays both agree.)"""
    a = 0.17883277
    b, c = 1 - 4 * a, 0.5 - a * math.log(4 * a)
    e = np.clip(e, 0, 1)
    lin = np.where(e <= 0.5, e * e / 3, (np.exp((e - c) / a) + b) / 12)
    return HDR_PEAK_NITS * np.power(lin, HLG_SYSTEM_GAMMA)


def tone_map(nits: np.ndarray) -> np.ndarray:
    """HDR display light (nits) -> SDR signal in [0, 1].

    Light relative to reference white, ``x = nits / HDR_REFERENCE_WHITE_NITS``, stays as is
    up to ``HDR_KNEE``; above it the excess is compressed with extended Reinhard (Reinhard et
    al., SIGGRAPH 2002, eq. 4), scaled so the curve is continuous with slope 1 at the knee and
    ``HDR_PEAK_NITS`` lands on 1.0. Then the BT.1886 inverse EOTF (gamma 2.4) gives the SDR
    signal. This inverts BT.2408's display-referred SDR-to-HDR mapping (SDR 100% = 203 nits)
    below the knee, so an HDR clip comes out as bright and as contrasted as its SDR render
    (measured in ``tests/test_frame_colour.py``). Simple on purpose: it prepares frames for
    feature detection; it is not a grading tool."""
    x = np.maximum(nits, 0) / HDR_REFERENCE_WHITE_NITS
    room = 1.0 - HDR_KNEE
    s = np.maximum(x - HDR_KNEE, 0) / room
    sw = (HDR_PEAK_NITS / HDR_REFERENCE_WHITE_NITS - HDR_KNEE) / room
    y = np.where(x <= HDR_KNEE, x, HDR_KNEE + room * s * (1 + s / (sw * sw)) / (1 + s))
    return np.power(np.clip(y, 0, 1), 1 / 2.4)


def hdr_eotf(trc: int):
    """The EOTF of an HDR transfer (:data:`TRC_PQ` or :data:`TRC_HLG`)."""
    return pq_eotf if trc == TRC_PQ else hlg_eotf


def frame_trc(frame: av.VideoFrame) -> int:
    """The frame's transfer characteristic (H.273 code), 0 when unknown."""
    try:
        return int(frame.color_trc or 0)
    except (AttributeError, ValueError, TypeError):
        return 0


def is_hdr(trc: int) -> bool:
    """True for the transfers that are tone-mapped (PQ, HLG)."""
    return trc in (TRC_PQ, TRC_HLG)


def full_range(frame: av.VideoFrame) -> bool:
    """True for full (JPEG) range: ``yuvj*`` formats or ``color_range`` = 2 (AVCOL_RANGE_JPEG)."""
    if frame.format.name.startswith("yuvj") or frame.format.name.startswith("gray"):
        return True
    try:
        return int(frame.color_range or 0) == 2
    except (AttributeError, ValueError, TypeError):
        return False


class LumaLut:
    """Cached lookup tables: luma code value (any bit depth, limited or full range, SDR or
    HDR transfer) -> 8-bit full-range SDR luma. Limited range maps 16..235 (x 2**(bits-8)) to
    0..255 (ITU-R BT.601/709 quantisation); HDR transfers go through :func:`tone_map`."""

    def __init__(self) -> None:
        self._cache: dict[tuple[int, bool, int], np.ndarray] = {}

    def get(self, bits: int, full: bool, trc: int) -> np.ndarray | None:
        """The table for (bit depth, full range?, transfer), or ``None`` when the code values
        are already 8-bit full-range SDR (identity)."""
        hdr = is_hdr(trc)
        if bits == 8 and full and not hdr:
            return None
        key = (bits, full, trc if hdr else 0)
        lut = self._cache.get(key)
        if lut is None:
            code = np.arange(1 << bits, dtype=np.float64)
            scale = float(1 << (bits - 8))
            e = code / ((1 << bits) - 1) if full else (code - 16 * scale) / (219 * scale)
            e = np.clip(e, 0, 1)
            if hdr:
                e = tone_map(hdr_eotf(trc)(e))
            lut = np.clip(np.round(e * 255), 0, 255).astype(np.uint8)
            self._cache[key] = lut
        return lut


def luma_plane(frame: av.VideoFrame) -> tuple[np.ndarray, int] | None:
    """The luma plane (H x W, uint8 or uint16) and its bit depth, without conversion; ``None``
    for formats whose first plane is not luma."""
    name = frame.format.name
    plane = frame.planes[0]
    buffer = memoryview(plane)  # VideoPlane has the buffer protocol
    if name in LUMA_FIRST_FORMATS:
        buf = np.frombuffer(buffer, np.uint8).reshape(plane.height, plane.line_size)
        return buf[:, :frame.width], 8
    bits = LUMA_FIRST_HI_FORMATS.get(name)
    if bits is not None:
        buf16 = np.frombuffer(buffer, np.uint16).reshape(plane.height, plane.line_size // 2)
        return buf16[:, :frame.width], bits
    return None


def frame_to_bgr(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """BGR uint8 image of ``frame`` at ``width`` x ``height`` (swscale, area filter when the
    size changes), tone-mapped when the transfer is PQ/HLG (BT.2020 primaries converted to
    BT.709 in linear light). Not rotated."""
    trc = frame_trc(frame)
    interp = "AREA" if (width, height) != (frame.width, frame.height) else None
    if not is_hdr(trc):
        return frame.reformat(width=width, height=height, format="bgr24",
                              interpolation=interp).to_ndarray()
    rgb = frame.reformat(width=width, height=height, format="rgb48le",
                         interpolation=interp).to_ndarray()
    lin = hdr_eotf(trc)(rgb.astype(np.float32) / 65535.0)
    try:
        bt2020 = int(frame.color_primaries or 0) == PRIMARIES_BT2020
    except (ValueError, TypeError):
        bt2020 = True
    if bt2020:
        lin = lin @ BT2020_TO_BT709.T
    out = np.clip(np.round(tone_map(lin) * 255), 0, 255).astype(np.uint8)
    return cv2.cvtColor(out, cv2.COLOR_RGB2BGR)
