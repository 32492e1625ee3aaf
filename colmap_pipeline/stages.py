"""Stage metadata shared by the runner (API process) and the pipeline children.

Light on purpose: importing it pulls in no pycolmap, OpenCV or PyAV.
"""
from __future__ import annotations

#: (stage id, human name shown as ``current_stage``, share of overall progress, GPU stage)
#: Shares are the measured CPU time shares of the sample clip at ``low`` (see BENCHMARKS.md).
STAGE_TABLE: tuple[tuple[str, str, float, bool], ...] = (
    ("frames", "Frame Extraction", 0.08, False),
    ("features", "Feature Detection", 0.42, True),
    ("matching", "Feature Matching", 0.20, True),
    ("mapping", "Sparse Reconstruction", 0.25, False),
    ("export", "Exporting", 0.05, False),
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
            return int(100 * (done + STAGE_WEIGHTS[s] * min(1.0, max(0.0, fraction))))
        done += STAGE_WEIGHTS[s]
    raise KeyError(stage)
