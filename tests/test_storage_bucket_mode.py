"""The runner and housekeeping in bucket mode (``STORAGE_BUCKET`` on the GCS emulator): every
stage's outputs and checkpoint reach the bucket, an upload is acknowledged only once its input is
in the bucket, readiness names a missing bucket, a fresh DATA_DIR resumes a job from the
bucket's checkpoints, a stage whose upload keeps failing is a storage error (never
``completed``), and retention, delete and the orphan sweep remove the job's objects.

The API part (the upload's 202, readiness) runs the app in process on the in-memory store.
Real stage children with fake bodies (``COLMAP_TEST_FAKE_STAGES``) where the children matter,
scripted stages where only the runner does."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from conftest import SAMPLE_VIDEO
from runner_harness import (
    RecordingStore,
    ScriptedStages,
    add_job,
    get,
    runner_settings,
    started,
    until,
    use_fake_stages,
    wait_done,
)
from storage_harness import FlakyStorage

import colmap_pipeline.storage as storage_mod
from colmap_pipeline.jobs import Intent
from colmap_pipeline.layout import DataDir
from colmap_pipeline.protocol import STAGES
from colmap_pipeline.runner import attempt as attempt_mod
from colmap_pipeline.runner import housekeeping as housekeeping_mod
from colmap_pipeline.storage import job_sync, open_storage

pytestmark = pytest.mark.asyncio


def _keys(settings, job_id="job-1") -> list[str]:
    return [o.key.removeprefix(f"jobs/{job_id}/")
            for o in open_storage(settings).list_objects(f"jobs/{job_id}/")]


async def test_every_stage_reaches_the_bucket_with_its_checkpoint(tmp_path, gcs_bucket,
                                                                   monkeypatch):
    use_fake_stages(monkeypatch, 0.0)
    settings = runner_settings(tmp_path, **gcs_bucket)
    store = RecordingStore()
    await add_job(store, settings)
    async with started(store, settings):
        job = await wait_done(store, timeout_s=60)
    assert job.status == "completed", job.error_message
    keys = _keys(settings)
    assert [k for k in keys if k.startswith("stages/")] == sorted(
        f"stages/{s}.tar" for s in STAGES)
    assert [k for k in keys if k.startswith("work/checkpoints/")] == sorted(
        f"work/checkpoints/{s}.json" for s in STAGES)


async def test_a_fresh_data_dir_resumes_from_the_buckets_checkpoints(tmp_path, gcs_bucket,
                                                                     monkeypatch):
    """Replica A fails the job at mapping; replica B, with its own empty DATA_DIR and the same
    store and bucket, retries it: it downloads the input and the three finished stages and
    runs mapping onwards only."""
    use_fake_stages(monkeypatch, 0.0)
    a = runner_settings(tmp_path / "a", test_fault="fail:mapping", **gcs_bucket)
    b = runner_settings(tmp_path / "b", **gcs_bucket)
    store = RecordingStore()
    job = await add_job(store, a)
    job_sync(a, job.job_id).upload_input(Path(job.input_path))  # as the intake does
    async with started(store, a):
        failed = await wait_done(store, timeout_s=60)
    assert failed.status == "failed" and failed.attempts[-1]["failed_stage"] == "mapping"
    assert job_sync(a, "job-1").remote_stages() == ["frames", "features", "matching"]

    assert await store.apply("job-1", Intent.RETRY)
    async with started(store, b):
        done = await wait_done(store, timeout_s=60)
    assert done.status == "completed", done.error_message
    last = done.attempts[-1]
    assert last["resumed_from"] == "mapping"
    assert last["skipped_stages"] == ["frames", "features", "matching"]
    assert sorted(last["stage_wall_s"]) == sorted(["mapping", "dense", "meshing", "export"])
    ws_b = job_sync(b, "job-1").ws
    assert (ws_b.root / "logs" / "frames.log").is_file()  # A's log, from the bucket
    assert job_sync(b, "job-1").jdir.input_video("mp4").read_bytes() == \
        b"not read by fake stages"


async def test_a_stage_whose_upload_keeps_failing_is_a_storage_error(tmp_path, gcs_bucket,
                                                                     monkeypatch):
    settings = runner_settings(tmp_path, **gcs_bucket)
    real = open_storage(settings)
    broken = FlakyStorage(real, lambda op, key: op == "upload" and "matching" in key)
    monkeypatch.setattr(storage_mod, "open_storage", lambda s: broken)
    monkeypatch.setattr(attempt_mod, "backoff_delay", lambda n: 0.01)
    store = RecordingStore()
    await add_job(store, settings)
    stages = ScriptedStages(settings)
    async with started(store, settings, stage_runner=stages):
        job = await wait_done(store, timeout_s=30)
    assert job.status == "failed" and job.error_code == "storage_error"
    assert job.error_message == "injected failure of upload jobs/job-1/stages/matching.tar"
    retries = [a for a in job.attempts if a.get("retry") == "storage"]
    assert len(retries) == attempt_mod.STORAGE_RETRIES
    assert job.results is None and "completed" not in [a["outcome"] for a in job.attempts]
    assert stages.calls.count("matching") == 1  # its checkpoint is local: re-pushed, not re-run
    assert job_sync(settings, "job-1").remote_stages() == ["frames", "features"]


async def test_retention_and_delete_remove_the_objects(tmp_path, gcs_bucket, monkeypatch):
    settings = runner_settings(tmp_path, retention_hours=1e-9, **gcs_bucket)
    store = RecordingStore()
    for job_id in ("job-1", "job-2"):
        job = await add_job(store, settings, job_id)
        job_sync(settings, job_id).upload_input(Path(job.input_path))  # as the intake does
    async with started(store, settings, stage_runner=ScriptedStages(settings)) as runner:
        await until(lambda: all(j.status == "completed" for j in store._jobs.values()), 30,
                    "both jobs to complete")
        assert len(_keys(settings, "job-1")) == 2 * len(STAGES) + 1  # tars, checkpoints, input
        assert "input/video.mp4" in _keys(settings, "job-1")
        assert await runner.delete("job-1")
        assert _keys(settings, "job-1") == []
        assert _keys(settings, "job-2") != []
        counts = await runner.housekeeping(startup=False)
    assert counts.expired == 1 and (await get(store, "job-2")).status == "expired"
    assert _keys(settings, "job-2") == []


async def test_housekeeping_sweeps_objects_no_job_owns(tmp_path, gcs_bucket, monkeypatch):
    settings = runner_settings(tmp_path, housekeeping_interval_s=0.001, **gcs_bucket)
    store = RecordingStore()
    await add_job(store, settings, "job-1")
    bucket = open_storage(settings)
    for job_id in ("job-1", "left-by-a-failed-delete"):
        bucket.write_bytes(f"jobs/{job_id}/input/video.mp4", b"v")
    keeper = housekeeping_mod.Housekeeper(store, settings, DataDir(settings.data_dir),
                                           busy=set)
    assert (await keeper.run(startup=True)).bucket_orphans == 0  # an hour, even at start-up
    monkeypatch.setattr(housekeeping_mod, "MIN_SWEEP_AGE_S", 0.0)
    assert (await keeper.run(startup=False)).bucket_orphans == 1
    assert bucket.list_dirs("jobs/") == ["job-1"]


async def test_the_embedded_mode_uses_the_rows_input_path_as_it_is(tmp_path):
    sync = job_sync(runner_settings(tmp_path), "j")
    assert sync.active is False
    assert sync.fetch_input("/else/where/jobs/j/input/video.mp4") == \
        "/else/where/jobs/j/input/video.mp4"


# ---- the API in bucket mode: the upload's 202, readiness ----------------------------------------

async def _upload(api):
    return await api.client.post(
        "/upload-video", data={"project_id": "p", "quality": "low"},
        files={"video": ("clip.mp4", SAMPLE_VIDEO.read_bytes(), "video/mp4")})


async def test_the_upload_is_acknowledged_only_once_the_input_is_in_the_bucket(
        make_api, gcs_bucket, monkeypatch):
    api = await make_api(**gcs_bucket)
    real = open_storage(api.settings)
    rows_when_uploaded: list[int] = []

    def watch(op: str, key: str) -> bool:
        if op == "upload":
            rows_when_uploaded.append(len(api.store._jobs))
        return False

    monkeypatch.setattr(storage_mod, "open_storage", lambda s: FlakyStorage(real, watch))
    r = await _upload(api)
    assert r.status_code == 202, r.text
    job = await get(api.store, r.json()["job_id"])
    assert rows_when_uploaded == [0]  # in the bucket before the job (and so the 202) existed
    stored = real.read_bytes(f"jobs/{job.job_id}/input/video.mp4")
    assert stored is not None and hashlib.sha256(stored).hexdigest() == job.input_sha256


async def test_an_upload_the_bucket_refuses_is_503_and_leaves_nothing(make_api, gcs_bucket,
                                                                      monkeypatch):
    api = await make_api(**gcs_bucket)
    real = open_storage(api.settings)
    monkeypatch.setattr(storage_mod, "open_storage",
                        lambda s: FlakyStorage(real, lambda op, key: op == "upload"))
    r = await _upload(api)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "not_ready"
    assert r.json()["error"]["details"] == {"failing": ["storage"]}
    assert api.store._jobs == {}
    assert list((api.data_dir / "jobs").glob("*")) == []
    assert real.list_objects("jobs/") == []


async def test_readiness_names_storage_when_the_bucket_is_missing(make_api, gcs_emulator,
                                                                  gcs_bucket):
    missing = await make_api(storage_bucket="no-such-bucket-r1", min_free_disk_bytes=0,
                             storage_emulator_host=gcs_emulator.url)
    r = await missing.client.get("/readiness")
    assert r.status_code == 503
    assert r.json()["failing"] == ["storage"] and r.json()["checks"]["storage"] is False
    present = await make_api(min_free_disk_bytes=0, **gcs_bucket)
    r = await present.client.get("/readiness")
    assert r.status_code == 200 and r.json()["checks"]["storage"] is True
    embedded = await make_api(min_free_disk_bytes=0)
    r = await embedded.client.get("/readiness")
    assert r.status_code == 200 and "storage" not in r.json()["checks"]
