"""Every per-quality knob of the pipeline: frame cap and SIFT size/features.

The presets follow COLMAP's automatic reconstructor
(``colmap/src/colmap/controllers/automatic_reconstruction.cc``: low 1000 px / 2048 features,
medium 1600 / 4096, high 2400 / 8192), with frame caps from the deployment guide
(``MAX_FRAMES_LOW/MEDIUM/HIGH`` = 30/50/100). A light leaf: the child processes import it without
pulling in pydantic-settings.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

Quality = Literal["low", "medium", "high"]

#: quality -> (SIFT ``max_image_size`` px, ``max_num_features``)
PRESET_SIFT = {"low": (1000, 2048), "medium": (1600, 4096), "high": (2400, 8192)}
#: quality -> frame cap (the deployment guide's MAX_FRAMES_LOW/MEDIUM/HIGH defaults)
DEFAULT_FRAME_CAPS = {"low": 30, "medium": 50, "high": 100}


@dataclass(frozen=True)
class Preset:
    """Per-quality pipeline parameters.

    Attributes:
        quality: preset name.
        max_frames: frames selected from the video (cap).
        max_image_size: longest image side in px given to SIFT (COLMAP ``max_image_size``).
        max_num_features: SIFT features per image (COLMAP ``max_num_features``).
    """

    quality: str
    max_frames: int
    max_image_size: int
    max_num_features: int

    def to_dict(self) -> dict:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)


PRESET_SIFT = {"low": (1000, 2048), "medium": (1600, 4096), "high": (2400, 8192)}


def default_preset(quality: str) -> Preset:
    """Preset with the default frame caps (for the CLI, which has no Settings)."""
    size, feats = PRESET_SIFT[quality]
    return Preset(quality, DEFAULT_FRAME_CAPS[quality], size, feats)
