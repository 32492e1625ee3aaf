"""Rendered 3D scenes for the fail-fast and moving-content tests (a helper module, not a test file).

A scene is a set of textured rectangles ("cards") in 3D, rendered exactly by projective warps:
a card with corner ``P0`` and edge vectors ``ex``, ``ey`` (m per texture px) maps texture pixel
``(u, v)`` to the image through the homography ``K R [ex | ey | P0 - C]`` (camera centre ``C``,
world-to-camera rotation ``R``; Hartley & Zisserman, *Multiple View Geometry*, 2nd ed.,
sec. 13.1). Cards are painted far to near. Textures come from
:func:`factories.scene_texture` with fixed seeds, so frames are the same every run.

* :func:`walk_frames`: a camera sliding sideways past a back wall and cards at 3-8 m (parallax);
  ``moving=True`` adds a near card that moves by itself (up and down, and turning), like a
  person or a toy in front of the camera;
* :func:`pan_frames`: a camera turning on the spot (pure rotation, no parallax);
* :func:`two_scenes_frames`: two unrelated scenes cut together (first half one, second half
  the other).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from factories import scene_texture
from PIL import Image

#: frame size (px) and focal length (px) of the rendered camera
W, H = 480, 360
F = 420.0


@dataclass(frozen=True)
class Card:
    """A textured rectangle: corner ``p0`` (m), edges ``ex``/``ey`` (m per texture pixel)."""

    texture: np.ndarray
    p0: np.ndarray
    ex: np.ndarray
    ey: np.ndarray

    def depth(self, c: np.ndarray) -> float:
        """Distance (m) from ``c`` to the card's centre (painter's order)."""
        h, w = self.texture.shape[:2]
        return float(np.linalg.norm(self.p0 + self.ex * w / 2 + self.ey * h / 2 - c))


def _card(texture: np.ndarray, centre: tuple[float, float, float], width_m: float,
          yaw_deg: float = 0.0) -> Card:
    """A vertical card of ``width_m`` metres centred at ``centre``, turned by ``yaw_deg``."""
    h, w = texture.shape[:2]
    s = width_m / w
    a = math.radians(yaw_deg)
    ex = np.array([math.cos(a), 0.0, math.sin(a)]) * s
    ey = np.array([0.0, 1.0, 0.0]) * s
    p0 = np.asarray(centre, float) - ex * w / 2 - ey * h / 2
    return Card(texture, p0, ex, ey)


def _yaw(deg: float) -> np.ndarray:
    """World-to-camera rotation of a camera turned ``deg`` to the right (about +y)."""
    a = math.radians(deg)
    return np.array([[math.cos(a), 0, -math.sin(a)], [0, 1, 0], [math.sin(a), 0, math.cos(a)]])


def render(cards: list[Card], r: np.ndarray, c: np.ndarray, size=(W, H), f: float = F,
           background: int = 90) -> np.ndarray:
    """The BGR image of ``cards`` seen by a camera (world-to-camera ``r``, centre ``c`` (m))."""
    w, h = size
    k = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]])
    img = np.full((h, w, 3), background, np.uint8)
    for card in sorted(cards, key=lambda cd: -cd.depth(c)):
        corners = [card.p0, card.p0 + card.ex * card.texture.shape[1],
                   card.p0 + card.ey * card.texture.shape[0],
                   card.p0 + card.ex * card.texture.shape[1] + card.ey * card.texture.shape[0]]
        if any((r @ (p - c))[2] <= 0.1 for p in corners):
            continue  # behind (or too near) the camera
        hom = k @ r @ np.column_stack([card.ex, card.ey, card.p0 - c])
        warped = cv2.warpPerspective(card.texture, hom, (w, h), flags=cv2.INTER_LINEAR)
        mask = cv2.warpPerspective(np.full(card.texture.shape[:2], 255, np.uint8), hom, (w, h),
                                   flags=cv2.INTER_NEAREST)
        img[mask > 0] = warped[mask > 0]
    return img


def static_cards(seed: int = 0) -> list[Card]:
    """A back wall 9 m away and five cards 3-7 m away, each with its own texture."""
    cards = [_card(scene_texture(seed, 480, 240), (0.0, 0.0, 9.0), 16.0)]
    rng = np.random.default_rng(seed + 100)
    for i in range(5):
        tex = scene_texture(seed + 1 + i, 120, 120)
        x, y = -3.0 + 1.5 * i + rng.uniform(-0.3, 0.3), rng.uniform(-0.8, 0.8)
        cards.append(_card(tex, (x, y, rng.uniform(3.0, 7.0)), rng.uniform(1.2, 1.8),
                           rng.uniform(-25, 25)))
    return cards


def walk_frames(n: int = 24, moving: bool = False, seed: int = 0,
                sideways_m: float = 2.4) -> Iterator[np.ndarray]:
    """A camera sliding ``sideways_m`` metres to the right past :func:`static_cards`, turning
    slightly towards the scene centre. ``moving``: a textured card 1.6 m in front of the camera
    track moves by itself, up and down by +-0.6 m and turning +-35 degrees, so its image motion
    fits no single rigid motion with the background."""
    cards = static_cards(seed)
    tex = scene_texture(seed + 50, 120, 120)
    for i in range(n):
        t = i / max(1, n - 1)
        c = np.array([-sideways_m / 2 + sideways_m * t, 0.0, -1.0])
        r = _yaw(-6.0 * (t - 0.5))
        extra = []
        if moving:
            phase = 2 * math.pi * 1.5 * t
            extra = [_card(tex, (c[0] * 0.6 + 0.1, 0.6 * math.sin(phase), 1.6), 1.1,
                           35.0 * math.sin(phase * 0.7 + 0.5))]
        yield render(cards + extra, r, c)


def pan_frames(n: int = 24, total_deg: float = 40.0, seed: int = 0) -> Iterator[np.ndarray]:
    """A camera turning ``total_deg`` on the spot (pure rotation) before
    :func:`static_cards`."""
    cards = static_cards(seed)
    c = np.array([0.0, 0.0, -1.0])
    for i in range(n):
        yield render(cards, _yaw(total_deg * (i / max(1, n - 1) - 0.5)), c)


def two_scenes_frames(n: int = 24, seed: int = 0) -> Iterator[np.ndarray]:
    """Two unrelated scenes cut together: ``n // 2`` frames of :func:`walk_frames` of one
    scene, then the rest of another (different textures and layout)."""
    yield from walk_frames(n // 2, seed=seed)
    yield from walk_frames(n - n // 2, seed=seed + 1000)


def write_frames(frames: Iterator[np.ndarray], folder: Path) -> list[str]:
    """Write ``frame_00000.jpg``... (JPEG quality 95, through Pillow: OpenCV writes in a
    process that has loaded pycolmap aborted once, tests/test_dense.py) into ``folder``;
    returns the names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(frames):
        name = f"frame_{i:05d}.jpg"
        Image.fromarray(np.ascontiguousarray(img[:, :, ::-1])).save(folder / name, quality=95)
        names.append(name)
    return names
