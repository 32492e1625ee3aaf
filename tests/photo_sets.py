"""Rendered photo sets for the camera-grouping tests (a helper module, not a test file; issue 15).

Photos of one static scene (:func:`scenes_moving.static_cards`: a back wall and five textured
cards 3-9 m away, rendered exactly by projective warps) taken from an arc of viewpoints that
all look at the scene centre, by pinhole cameras of known size and focal length, written as
JPEGs with Pillow and the EXIF a camera would write: Make, Model, FocalLength,
FocalLengthIn35mmFilm, optionally DateTimeOriginal and the Orientation tag.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scenes_moving import render, static_cards

from colmap_pipeline.core import photos

#: where every viewpoint looks (m; the cards stand at 3-7 m, the wall at 9 m)
TARGET = np.array([0.0, 0.0, 6.0])


@dataclass(frozen=True)
class Cam:
    """A pinhole camera: upright image size (px), focal length (px), EXIF make and model."""

    width: int
    height: int
    focal_px: float
    make: str = "Acme"
    model: str = "A1"

    @property
    def focal_35mm(self) -> int:
        """FocalLengthIn35mmFilm (whole mm, as cameras write it) of this focal length."""
        return round(self.focal_px * photos.FULL_FRAME_DIAGONAL_MM
                     / math.hypot(self.width, self.height))


def look_at(c: np.ndarray, target: np.ndarray = TARGET) -> np.ndarray:
    """World-to-camera rotation (OpenCV axes, world y down) of a camera at ``c`` looking at
    ``target`` with no roll."""
    z = (target - c) / np.linalg.norm(target - c)
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    return np.stack([x, np.cross(z, x), z])


def viewpoints(n: int) -> list[np.ndarray]:
    """``n`` camera centres (m) on an arc 3.6 m wide in front of the scene, at varying
    heights, so the views differ in rotation as well as position (focal length observable)."""
    out = []
    for i in range(n):
        t = i / max(1, n - 1)
        a = math.radians(-24.0 + 48.0 * t)
        out.append(np.array([7.0 * math.sin(a), 0.5 * math.sin(3.0 * a), 6.0 - 7.0 * math.cos(a)]))
    return out


def photo(cam: Cam, c: np.ndarray, seed: int = 0) -> np.ndarray:
    """The upright BGR photo ``cam`` takes from ``c``."""
    return render(static_cards(seed), look_at(c), c, size=(cam.width, cam.height),
                  f=cam.focal_px)


def write_photo(path: Path, img: np.ndarray, cam: Cam, orientation: int = 1,
                time: str | None = None) -> None:
    """Write ``img`` (upright BGR) as a JPEG with ``cam``'s EXIF. ``orientation`` 6: stored
    turned 90 degrees counter-clockwise and tagged 6 (display: turn clockwise), as a phone held
    upright writes it. ``time``: DateTimeOriginal ("YYYY:MM:DD HH:MM:SS")."""
    from PIL import Image
    from PIL.TiffImagePlugin import IFDRational

    stored = np.rot90(img, k=1) if orientation == 6 else img
    im = Image.fromarray(np.ascontiguousarray(stored[:, :, ::-1]))
    exif = Image.Exif()
    exif[photos.TAG_MAKE] = cam.make
    exif[photos.TAG_MODEL] = cam.model
    if orientation != 1:
        exif[0x0112] = orientation
    sub = exif.get_ifd(photos.EXIF_IFD)
    sub[photos.TAG_FOCAL_LENGTH] = IFDRational(round(cam.focal_35mm / 6.0 * 100), 100)
    sub[photos.TAG_FOCAL_35MM] = cam.focal_35mm
    if time:
        sub[photos.TAG_DATETIME_ORIGINAL] = time
    im.save(path, exif=exif, quality=95)
