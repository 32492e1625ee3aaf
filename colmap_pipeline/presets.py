"""Every per-quality knob of the pipeline: frame cap, SIFT size/features, the first mapper and
the recovery ladder's time budget (the dense presets live with the dense code, ``core/dense.py``).

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
#: Wall-clock budget (s) of the ladder after the first attempt, per preset (the job timeout is
#: 3600 s). Measured on 2 CPU cores shared 5x (BENCHMARKS.md, issue 4): one Karma mapping
#: attempt at low takes 100-370 s there, so 300 s allowed a single rung.
LADDER_BUDGET_S = {"low": 600.0, "medium": 900.0, "high": 1800.0}
#: Mapper of the first attempt per preset, from the incremental-vs-global measurements in
#: BENCHMARKS.md (issue 4, ``scripts/bench_reconstruction.py --mapper ...``, idle 2-core
#: machine): global SfM registered every frame of the Karma clip on its first attempt in 6 of 6
#: runs (mapping 19-53 s) where incremental mapping passed its checks first time in 1 of 6 and
#: needed the ladder for up to 526 s; on the GoPro walk both register everything in about the
#: same time.
MAPPER_BY_QUALITY = {"low": "global", "medium": "global", "high": "global"}


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


def default_preset(quality: str) -> Preset:
    """Preset with the default frame caps (for the CLI, which has no Settings)."""
    size, feats = PRESET_SIFT[quality]
    return Preset(quality, DEFAULT_FRAME_CAPS[quality], size, feats)
