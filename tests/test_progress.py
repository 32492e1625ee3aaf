"""The shared progress callback type and its no-op."""
from __future__ import annotations

from colmap_pipeline.core.progress import Progress, no_progress


def test_no_progress_accepts_any_report_and_does_nothing():
    cb: Progress = no_progress
    assert cb(0.0, "start") is None and cb(1.0, "done") is None
