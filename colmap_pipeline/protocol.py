"""Stage metadata shared by the runner (API process) and the pipeline children.

Light on purpose: importing it pulls in no pycolmap, OpenCV or PyAV.
"""
from __future__ import annotations

import math

#: (stage id, human name shown as ``current_stage``, share of overall progress, GPU stage)
#: Shares were measured on the sample clip at ``low`` (30 frames, 2 CPU cores, three runs):
#: frames 1.6-1.7 s, features 11.4-12.2 s, matching 5.0-5.8 s, mapping 3.5-6.2 s, export
#: 0.5-0.6 s. (A clip that needs the wide-baseline retry spends far longer in mapping.)
STAGE_TABLE: tuple[tuple[str, str, float, bool], ...] = (
    ("frames", "Frame Extraction", 0.07, False),
    ("features", "Feature Detection", 0.48, True),
    ("matching", "Feature Matching", 0.22, True),
    ("mapping", "Sparse Reconstruction", 0.21, False),
    # Dense stages (issue 6): PatchMatch/fusion and Poisson meshing on a CUDA GPU; on a CPU
    # machine each is skipped in about a second (child start-up), so their share of the CPU
    # progress bar is zero. GPU shares are to be measured by scripts/gpu_check.sh.
    ("dense", "Dense Reconstruction", 0.0, True),
    ("meshing", "Meshing", 0.0, False),  # Poisson runs on the CPU: holds no GPU slot
    ("export", "Exporting", 0.02, False),
)
STAGES: tuple[str, ...] = tuple(s for s, *_ in STAGE_TABLE)
STAGE_NAMES: dict[str, str] = {s: name for s, name, *_ in STAGE_TABLE}
STAGE_WEIGHTS: dict[str, float] = {s: w for s, _, w, _ in STAGE_TABLE}
GPU_STAGES: frozenset[str] = frozenset(s for s, _, _, gpu in STAGE_TABLE if gpu)


def overall_progress(stage: str, fraction: float) -> int:
    """Overall job progress 0-100 when ``stage`` is ``fraction`` (0-1) done.

    Raises: KeyError for an unknown stage.
    """
    done = 0.0
    for s in STAGES:
        if s == stage:
            share = done + STAGE_WEIGHTS[s] * min(1.0, max(0.0, fraction))
            return min(100, math.floor(100 * share + 1e-6))  # floor: never ahead of the work
        done += STAGE_WEIGHTS[s]
    raise KeyError(stage)
