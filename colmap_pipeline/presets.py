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
from typing import Any, Literal

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
#: quality -> overrides of pycolmap's ``SiftExtractionOptions`` for VIDEO frames (issue 14,
#: BENCHMARKS.md). COLMAP's default ``first_octave`` -1 doubles each image before the
#: difference-of-Gaussians pyramid; 0 starts at the frame's own size: on the sample's 30
#: frames of 848x480, 812 instead of 2,788 keypoints per frame for about a third of the SIFT
#: CPU time, and fewer descriptors make matching (quadratic in them) about 3x cheaper. Every
#: frame still registered on the sample and the Karma clip with a plausible focal length, at a
#: mean reprojection error of 0.5-0.9 px (the COLMAP-low preset's: 1.1-1.2 px). The price: about
#: 40-60% fewer 3D points (sample 1,000 vs 1,650 at low, 1,860 vs 3,350 at medium; Karma 1,630
#: vs 4,140 and 2,660 vs 7,000). At medium it is the only way to the issue's 0.8x of the
#: COLMAP-medium preset: with the upsampled octave SIFT alone costs more than the preset's.
#: ``high`` keeps COLMAP's defaults (the preset for density).
#: Photo sets keep COLMAP's defaults: photos are downscaled from their full size, where the
#: upsampled octave pays (Strecha fountain at ``low``: median camera-centre error 7.2 mm with
#: ``first_octave`` 0 against 6.6 mm with -1).
VIDEO_SIFT_OPTIONS: dict[str, dict[str, Any]] = {"low": {"first_octave": 0},
                                                 "medium": {"first_octave": 0}, "high": {}}


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
