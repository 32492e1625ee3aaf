"""What the runner (API process) and the pipeline children agree on: the stage table, and the
stage child's protocol (exit statuses and the JSON-lines events on its stdout).

Light on purpose: importing it pulls in no pycolmap, OpenCV or PyAV.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

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


# --- the stage child's protocol ----------------------------------------------------------------
# ``python -m colmap_pipeline stage NAME --workspace WS`` (core/cli.py writes it, runner/executor.py
# reads it): stdout carries one JSON object per line, flushed per line, nothing else.

#: exit status: success (``stage``: after a ``done`` event)
EXIT_OK = 0
#: exit status of ``reconstruct`` / ``probe`` after a :class:`~.errors.PipelineError`
EXIT_PIPELINE_ERROR = 2
#: exit status of ``stage`` after a :class:`~.errors.PipelineError` (its ``error`` event names a
#: catalog code, with the error's ``details``)
EXIT_STAGE_PIPELINE_ERROR = 3
#: exit status of any command after any other exception (``error`` event with code
#: ``pipeline_error`` and ``details = {"exception": type name, "detail": text}``)
EXIT_STAGE_CRASH = 4
#: a native crash ends the child by a signal instead (e.g. SIGABRT: return code -6), without a
#: final event

#: ``event`` value of each line kind
EVENT_PROGRESS = "progress"
EVENT_DONE = "done"
EVENT_ERROR = "error"


@dataclass(frozen=True)
class ProgressEvent:
    """``{"event": "progress", "stage", "fraction": 0-1 (never decreases), "message"}``."""

    fraction: float
    message: str


@dataclass(frozen=True)
class DoneEvent:
    """``{"event": "done", "stage", "summary": {...}}``: the stage ended and wrote its
    checkpoint; ``summary`` is the checkpoint's summary."""

    summary: dict[str, Any]


@dataclass(frozen=True)
class ErrorEvent:
    """``{"event": "error", "stage", "code", "message", "hint", "details": {...}}``: the stage
    failed with a catalog ``code`` (:data:`~.errors.ERROR_CATALOG`); ``details`` holds its
    numbers (e.g. frames used, verified pairs), ``{}`` when it has none."""

    code: str
    message: str | None = None
    hint: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


StageEvent = ProgressEvent | DoneEvent | ErrorEvent


def parse_event(line: bytes | str) -> StageEvent | None:
    """One stdout line of a stage child as its event; ``None`` for a line that is not a JSON
    object with a known ``event`` (ignored by the reader, never fatal)."""
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    kind = obj.get("event")
    if kind == EVENT_PROGRESS:
        try:
            fraction = float(obj.get("fraction", 0.0))
        except (TypeError, ValueError):
            fraction = 0.0
        return ProgressEvent(fraction, str(obj.get("message") or ""))
    if kind == EVENT_DONE:
        summary = obj.get("summary")
        return DoneEvent(summary if isinstance(summary, dict) else {})
    if kind == EVENT_ERROR:
        details = obj.get("details")
        return ErrorEvent(str(obj.get("code") or "pipeline_error"), _opt_str(obj.get("message")),
                          _opt_str(obj.get("hint")), details if isinstance(details, dict) else {})
    return None


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)
