"""The progress callback every stage body and pipeline step takes, and the one that ignores it.

``progress(fraction, message)``: ``fraction`` in [0, 1] of the caller's own work (a stage maps it
onto the job's bar with :func:`colmap_pipeline.protocol.overall_progress`), ``message`` a short
human sentence ("Matching image pairs (30/119)..."). Callbacks are cheap and never raise.
"""
from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[float, str], None]


def no_progress(fraction: float, message: str) -> None:
    """A :data:`Progress` that ignores every report (the default of optional callbacks)."""
