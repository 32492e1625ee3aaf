"""Housekeeping (``runner/housekeeping.py``): retention, orphan and partial-upload sweeps, on
the in-memory store and a temporary DATA_DIR."""
from __future__ import annotations

import os
import time

import pytest
from runner_harness import (
    RecordingStore,
    add_job,
    get,
    runner_settings,
    started,
    until,
    use_fake_stages,
    wait_done,
)

from colmap_pipeline.jobs import Intent
from colmap_pipeline.layout import DataDir
from colmap_pipeline.runner.housekeeping import (
    Housekeeper,
    SweepCounts,
    sweep_orphans,
    sweep_partial_uploads,
)


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
    # at start-up: all of them
    assert sweep_orphans(DataDir(tmp_path), {"live"}, min_age_s=0) == (1, 1)


def test_sweep_partial_uploads_removes_files_only(tmp_path):
    (tmp_path / "a.part").write_bytes(b"x")
    (tmp_path / "b.upload").write_bytes(b"y")
    (tmp_path / "folder").mkdir()
    assert sweep_partial_uploads(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["folder"]


@pytest.mark.asyncio
async def test_retention_expires_files_and_keeps_rows(tmp_path, monkeypatch):
    use_fake_stages(monkeypatch)
    settings = runner_settings(tmp_path, test_fault="fail:frames", retention_hours=1 / 3600,
                               housekeeping_interval_s=0.2)
    data = DataDir(settings.data_dir)
    orphan = data.job("not-a-job").work.root
    orphan.mkdir(parents=True)
    (orphan / "frames.json").write_text("{}")
    data.uploads.mkdir(parents=True)
    (data.uploads / "upload-partial.part").write_bytes(b"x" * 100)
    store = RecordingStore()
    async with started(store, settings) as runner:
        assert await runner.housekeeping(startup=True) == SweepCounts(0, 1, 1)
        assert not data.job("not-a-job").root.exists()
        assert list(data.uploads.iterdir()) == []
        await add_job(store, settings)
        runner.wake()
        job = await wait_done(store)
        assert job.status == "failed"
        assert data.job("job-1").input_dir.is_dir()
        runner.start_housekeeping()
        job = await until(lambda: _expired(store), 10, "expiry")
        assert job.error_code == "pipeline_error"  # the row keeps its history
        assert job.message == "Files removed by retention"
        # the row turns expired first (so no retry can race the removal), then files go
        await until(lambda: not data.job("job-1").root.exists(), 5, "file removal")
        assert not await runner.retry("job-1")
        assert (await store.list_jobs(status="expired"))[1] == 1
        assert await runner.delete("job-1")
        assert (await get(store, "job-1")).status == "deleted"
        assert not await runner.delete("job-1")


async def _expired(store):
    job = await get(store, "job-1")
    return job if job.status == "expired" else None


@pytest.mark.asyncio
async def test_retention_spares_running_and_recent_jobs(tmp_path):
    settings = runner_settings(tmp_path, retention_hours=1.0)
    store = RecordingStore()
    data = DataDir(settings.data_dir)
    for jid in ("old", "recent", "busy"):
        await add_job(store, settings, jid)
        await store.claim_next_pending()
    await store.apply("old", Intent.FAIL, finished_at="2000-01-01T00:00:00.000000+00:00")
    await store.apply("recent", Intent.FAIL)
    await store.apply("busy", Intent.FAIL, finished_at="2000-01-01T00:00:00.000000+00:00")
    keeper = Housekeeper(store, settings, data, busy=lambda: {"busy"})
    assert await keeper.run(startup=False) == SweepCounts(expired=1)
    assert [(await get(store, j)).status for j in ("old", "recent", "busy")] == [
        "expired", "failed", "failed"]
    assert not data.job("old").root.exists() and data.job("recent").root.exists()
    no_retention = Housekeeper(store, runner_settings(tmp_path, retention_hours=0), data,
                               busy=set)
    assert await no_retention.run(startup=True) == SweepCounts()
