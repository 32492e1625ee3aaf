"""Lifecycle building blocks without a server: workspace lock, checkpoint validity, backoff,
orphan sweep, recorded-group kill, and the store's lifecycle queries (real SQLite)."""
from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import REPO

import database
from colmap_pipeline.config import default_preset
from colmap_pipeline.core.workspace_lock import is_locked, workspace_lock
from colmap_pipeline.errors import PipelineError
from colmap_pipeline.layout import DataDir, next_stage, prepare_workspace, write_json_atomic
from colmap_pipeline.runner.executor import kill_recorded_group
from colmap_pipeline.runner.scheduler import backoff_delay, sweep_orphans


def test_workspace_lock_excludes_another_process_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from colmap_pipeline.core.workspace_lock import "
         "workspace_lock\nwith workspace_lock(sys.argv[1]):\n print('held', flush=True); "
         "time.sleep(60)", str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
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


def test_backoff_is_exponential_bounded_and_jittered():
    for n, bound in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 30.0), (20, 30.0)):
        samples = [backoff_delay(n) for _ in range(200)]
        assert all(0.1 * bound <= d <= bound for d in samples)
        assert max(samples) - min(samples) > 0.3 * bound  # jitter spreads the retries


def test_sweep_orphans_respects_live_rows_and_age(tmp_path):
    jobs, uploads = tmp_path / "jobs", tmp_path / "uploads"
    for name in ("live", "orphan-old", "orphan-new"):
        (jobs / name / "work").mkdir(parents=True)
    uploads.mkdir()
    (uploads / "old.part").write_bytes(b"x")
    (uploads / "new.part").write_bytes(b"x")
    old = time.time() - 7200
    for p in (jobs / "orphan-old", jobs / "live", uploads / "old.part"):
        os.utime(p, (old, old))
    assert sweep_orphans(DataDir(tmp_path), {"live"}, min_age_s=3600) == (1, 1)
    assert sorted(p.name for p in jobs.iterdir()) == ["live", "orphan-new"]
    assert [p.name for p in uploads.iterdir()] == ["new.part"]
    assert sweep_orphans(DataDir(tmp_path), {"live"}, min_age_s=0) == (1, 1)  # start-up: all of them


def test_kill_recorded_group_only_kills_our_child_of_that_workspace(tmp_path):
    ws = tmp_path / "jobs" / "j1" / "work"
    code = "import time; time.sleep(60)"
    ours = subprocess.Popen([sys.executable, "-c", code, "colmap_pipeline", "stage", "frames",
                             "--workspace", str(ws)], start_new_session=True)
    other_ws = subprocess.Popen([sys.executable, "-c", code, "colmap_pipeline", "stage",
                                 "frames", "--workspace", str(tmp_path / "elsewhere")],
                                start_new_session=True)
    try:
        time.sleep(0.2)
        assert kill_recorded_group(other_ws.pid, ws) is False
        assert kill_recorded_group(ours.pid, ws) is True
        assert ours.wait(2) == -signal.SIGKILL
        assert other_ws.poll() is None
        assert kill_recorded_group(ours.pid, ws) is False  # gone: nothing to kill
    finally:
        for p in (ours, other_ws):
            p.kill()
            p.wait()


def _job(i: int, **extra) -> dict:
    return {"job_id": f"job-{i}", "scan_id": f"scan-{i}", "project_id": "p",
            "scan_name": "s", "quality": "low", "input_path": "/x", "input_bytes": 1,
            "input_sha256": "0" * 64, **extra}


def test_store_lifecycle_queries(tmp_path):
    async def go():
        s = await database.JobStore.open(tmp_path / "j.db")
        try:
            await s.create_job(_job(1, idempotency_key="k1"))
            with pytest.raises(sqlite3.IntegrityError):
                await s.create_job(_job(2, idempotency_key="k1"))
            await s.create_job(_job(2))
            assert (await s.find_by_idempotency_key("k1"))["job_id"] == "job-1"
            assert await s.find_by_idempotency_key("nope") is None
            claimed = await s.claim_next_pending()
            await s.set_pgid(claimed["job_id"], 4242)
            assert await s.recorded_pgids() == [("job-1", 4242)]
            assert await s.bump_attempt("job-1", auto_retry=True) == 2
            assert await s.bump_attempt("job-2", auto_retry=True) == 0  # not processing
            assert (await s.get_job("job-1"))["auto_retries"] == 1
            assert await s.transition("job-1", ["processing"], "failed",
                                      finished_at="2020-01-01T00:00:00.000000+00:00",
                                      error_code="pipeline_error", pgid=None)
            assert await s.recorded_pgids() == []
            assert await s.finished_before("2021-01-01") == ["job-1"]
            assert await s.finished_before("2019-01-01") == []
            assert await s.requeue_for_retry("job-1", ["failed", "cancelled"], "again")
            row = await s.get_job("job-1")
            assert row["status"] == "pending" and row["error_code"] is None
            assert row["finished_at"] is None
            assert not await s.requeue_for_retry("job-1", ["failed", "cancelled"], "again")
            assert await s.job_ids_with_files() == {"job-1", "job-2"}
            assert await s.transition("job-1", ["pending"], "deleted", idempotency_key=None)
            assert await s.find_by_idempotency_key("k1") is None
            assert await s.job_ids_with_files() == {"job-2"}
            assert await s.schema_version() == len(database.MIGRATIONS)
        finally:
            await s.close()
    asyncio.run(go())
