"""TEST ONLY: a trivial body for every stage, so lifecycle tests exercise the real runner, the
real stage children (process groups, ``PR_SET_PDEATHSIG``, the workspace lock, checkpoints,
the test-fault hook, the JSON-lines protocol) in seconds, without pycolmap, PyAV or OpenCV.

Off unless the environment variable :data:`FAKE_STAGES_ENV` (``COLMAP_TEST_FAKE_STAGES``) is
set to a number of seconds (``0`` allowed): each stage then reports progress, sleeps that long
in two halves, and returns ``{"fake": true, "stage": NAME}`` as its summary;
:func:`.pipeline.run_stage` still cleans the stage's outputs first and writes its checkpoint
after. The ``export`` stage writes a minimal valid ``result.json``
(:class:`~colmap_pipeline.results.JobResult`, :data:`FAKE_RESULT`). The server passes its
environment on to its children, so a server started with the variable runs fake stages too.
Never set it in production: every job would "complete" with an empty model.
"""
from __future__ import annotations

import os
import time
from typing import Any

from ..layout import Workspace, write_json_atomic
from .progress import Progress

#: environment variable that turns fake stage bodies on (seconds per stage)
FAKE_STAGES_ENV = "COLMAP_TEST_FAKE_STAGES"
#: the ``result.json`` the fake export writes
FAKE_RESULT: dict[str, Any] = {
    "frames_extracted": 3, "frames_used": 3, "registered_images": 3, "points3d": 0,
    "mean_reprojection_error_px": 0.0, "mean_track_length": 0.0, "input_kind": "video",
    "artifacts": [], "fake": True,
}


def fake_stage_seconds() -> float | None:
    """Seconds each fake stage takes, or ``None`` when fake stages are off (the variable is
    unset or empty). Raises ValueError for a value that is not a number >= 0."""
    raw = os.environ.get(FAKE_STAGES_ENV, "").strip()
    if not raw:
        return None
    seconds = float(raw)
    if seconds < 0:
        raise ValueError(f"{FAKE_STAGES_ENV} must be >= 0 seconds, not {raw!r}")
    return seconds


def run_fake_stage(name: str, ws: Workspace, progress: Progress, seconds: float) -> dict[str, Any]:
    """The fake body of stage ``name`` in ``ws`` (see the module docstring); returns its
    summary."""
    progress(0.0, f"Fake {name} started (test only)")
    time.sleep(seconds / 2)
    progress(0.5, f"Fake {name} half done (test only)")
    time.sleep(seconds / 2)
    if name == "export":
        write_json_atomic(ws.result_json, FAKE_RESULT)
    progress(1.0, f"Fake {name} done (test only)")
    return {"fake": True, "stage": name}
