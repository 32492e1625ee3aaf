"""Lifecycle building blocks of the child's side, without a server: the workspace lock and
checkpoint validity across attempts.

Moved to the files that mirror their modules: backoff (``test_attempt.py``), the orphan sweep
(``test_housekeeping.py``), the recorded-group kill (``test_executor.py``), the store's
lifecycle queries (``test_database.py``)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from colmap_pipeline.core.workspace_lock import is_locked, workspace_lock
from colmap_pipeline.errors import PipelineError
from colmap_pipeline.layout import next_stage, prepare_workspace, write_json_atomic
from colmap_pipeline.presets import default_preset


def test_workspace_lock_excludes_another_process_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from colmap_pipeline.core.workspace_lock import "
         "workspace_lock\nwith workspace_lock(sys.argv[1]):\n print('held', flush=True); "
         "time.sleep(60)", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert is_locked(tmp_path)
        t0 = time.monotonic()
        with pytest.raises(PipelineError) as err:
            with workspace_lock(tmp_path, wait_s=0.3):
                pass
        assert err.value.code == "workspace_busy" and time.monotonic() - t0 >= 0.3
        holder.send_signal(signal.SIGKILL)  # the kernel releases the lock with the process
        holder.wait()
        with workspace_lock(tmp_path, wait_s=1.0):
            assert (tmp_path / ".lock").read_text() == str(os.getpid())
        assert not is_locked(tmp_path)
    finally:
        holder.kill()
        holder.wait()


def test_checkpoints_survive_a_retry_unless_the_preset_changed(tmp_path):
    video = str(tmp_path / "v.mp4")
    low = default_preset("low")
    assert prepare_workspace(tmp_path, video, low, use_gpu=False, test_fault="") is False
    for stage in ("frames", "features"):
        write_json_atomic(tmp_path / "checkpoints" / f"{stage}.json", {"stage": stage})
    assert next_stage(tmp_path) == "matching"
    # same input and preset (a test fault or GPU flag may change): checkpoints are kept
    assert prepare_workspace(tmp_path, video, low, use_gpu=True, test_fault="pause:x") is False
    assert next_stage(tmp_path) == "matching"
    assert prepare_workspace(tmp_path, video, default_preset("medium"), use_gpu=False,
                             test_fault="") is True
    assert next_stage(tmp_path) == "frames"
