"""The job-folder sync (``colmap_pipeline/storage/sync.py``) against the GCS emulator: one tar
per stage plus its checkpoint as commit mark, artifacts as their own objects, a fresh DATA_DIR
rebuilt from the bucket, failed uploads never committed, and nothing at all in the embedded
mode."""
from __future__ import annotations

import io
import json
import tarfile
import time

import pytest
from storage_harness import FlakyStorage, emulator_storage, tree, write_stage

from colmap_pipeline.layout import DataDir
from colmap_pipeline.presets import Preset
from colmap_pipeline.protocol import STAGES
from colmap_pipeline.storage import JobSync, LocalStorage, StorageError
from colmap_pipeline.storage.sync import sweep_orphan_objects

JOB = "3f2b8c1e-0000-4000-8000-000000000001"
PRESET = Preset("low", 30, 1000, 2048)


@pytest.fixture
def bucket(gcs_emulator):
    return emulator_storage(gcs_emulator)


def _sync(storage, root, job_id=JOB) -> JobSync:
    return JobSync(storage, DataDir(root).job(job_id))


def _members(storage, key) -> dict[str, bytes]:
    data = storage.read_bytes(key)
    assert data is not None, key
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _keys(storage) -> list[str]:
    return [o.key.removeprefix(f"jobs/{JOB}/") for o in storage.list_objects(f"jobs/{JOB}/")]


def test_each_stage_goes_up_as_one_delta_tar_then_its_checkpoint(bucket, tmp_path):
    sync = _sync(bucket, tmp_path / "a")
    for stage in ("frames", "features"):
        write_stage(sync.ws, stage)
        assert sync.push() == [stage]
    assert sync.push() == []  # nothing new: no request but the manifest read
    assert _keys(bucket) == ["stages/features.tar", "stages/frames.tar",
                             "work/checkpoints/features.json", "work/checkpoints/frames.json",
                             "work/frames.json"]
    frames = _members(bucket, f"jobs/{JOB}/stages/frames.tar")
    assert sorted(frames) == [".removed.json", "frames.json", "frames/f_00001.jpg",
                              "frames/f_00002.jpg"]
    assert frames["frames/f_00001.jpg"] == b"jpeg-1" * 100
    features = _members(bucket, f"jobs/{JOB}/stages/features.tar")
    assert sorted(features) == [".removed.json", "database.db"]  # a delta: no frames again
    assert json.loads(bucket.read_bytes(f"jobs/{JOB}/work/checkpoints/features.json"))[
        "stage"] == "features"
    assert bucket.read_bytes(f"jobs/{JOB}/work/frames.json") == (sync.ws.frames_json
                                                               .read_bytes())  # GET /frames


def test_artifacts_are_their_own_objects_not_in_the_tar(bucket, tmp_path):
    sync = _sync(bucket, tmp_path / "a")
    for stage in STAGES:
        write_stage(sync.ws, stage)
    assert sync.push() == list(STAGES)  # a catch-up of every stage at once
    assert bucket.read_bytes(f"jobs/{JOB}/work/artifacts/sparse.ply") == b"ply\n" + b"0" * 500
    assert bucket.read_bytes(f"jobs/{JOB}/work/artifacts/model.zip") == b"PK" * 60
    everything = _members(bucket, f"jobs/{JOB}/stages/frames.tar")
    assert "result.json" in everything and not any(k.startswith("artifacts/") for k in everything)
    assert sorted(_members(bucket, f"jobs/{JOB}/stages/export.tar")) == [".removed.json"]


def test_a_fresh_data_dir_is_rebuilt_from_the_bucket(bucket, tmp_path):
    a = _sync(bucket, tmp_path / "a")
    for stage in ("frames", "features", "matching", "mapping"):
        write_stage(a.ws, stage)
        a.push()
    b = _sync(bucket, tmp_path / "b")  # another replica, or a redeploy with an empty disk
    assert b.restore() == ["frames", "features", "matching", "mapping"]
    assert tree(b.ws.root) == tree(a.ws.root)
    assert "frames/f_00002.jpg" not in tree(b.ws.root)  # mapping's removal travelled too
    assert tree(b.ws.root)["database.db"] == b"sqlite-with-matches" * 80  # the latest version
    assert b.restore() == []  # current now: nothing downloaded again
    write_stage(b.ws, "dense")  # B goes on; A's disk is now behind the bucket
    assert b.push() == ["dense"]
    assert a.restore() == ["frames", "features", "matching", "mapping", "dense"]


def test_an_upload_that_fails_never_commits_the_stage(bucket, tmp_path):
    broken = FlakyStorage(bucket, lambda op, key: op == "upload" and "matching" in key)
    sync = _sync(broken, tmp_path / "a")
    write_stage(sync.ws, "frames")
    sync.push()
    write_stage(sync.ws, "features")
    sync.push()
    write_stage(sync.ws, "matching")
    with pytest.raises(StorageError):
        sync.push()
    assert sync.remote_stages() == ["frames", "features"]  # no checkpoint object: not done
    other = _sync(bucket, tmp_path / "b")
    other.restore()
    assert not other.ws.checkpoint("matching").exists()
    broken.fail = lambda op, key: False  # the bucket is back: the next attempt catches up
    assert sync.push() == ["matching"]
    assert sync.remote_stages() == ["frames", "features", "matching"]


def test_changed_settings_drop_the_buckets_checkpoints_too(bucket, tmp_path):
    sync = _sync(bucket, tmp_path / "a")
    video = sync.jdir.input_video("mp4")
    video.parent.mkdir(parents=True)
    video.write_bytes(b"video")
    sync.prepare(str(video), PRESET, use_gpu=False, test_fault="")
    write_stage(sync.ws, "frames")
    sync.push()
    assert sync.remote_stages() == ["frames"]
    other = Preset("low", 10, 1000, 2048)  # MAX_FRAMES_LOW changed between attempts
    sync.prepare(str(video), other, use_gpu=False, test_fault="")
    assert sync.remote_stages() == []
    assert not sync.ws.checkpoint("frames").exists()


def test_inputs_go_up_and_come_back_on_another_disk(bucket, tmp_path):
    a = _sync(bucket, tmp_path / "a")
    video = a.jdir.input_video("mp4")
    video.parent.mkdir(parents=True)
    video.write_bytes(b"\x00video" * 1000)
    a.upload_input(video)
    b = _sync(bucket, tmp_path / "b")
    local = b.fetch_input(str(video))  # the row holds A's path
    assert local == str(b.jdir.input_video("mp4"))
    assert b.jdir.input_video("mp4").read_bytes() == b"\x00video" * 1000

    photos = _sync(bucket, tmp_path / "a", job_id="p1")
    photos.jdir.input_images.mkdir(parents=True)
    for i in range(3):
        (photos.jdir.input_images / f"img_{i:05d}.jpg").write_bytes(b"jpg%d" % i)
    photos.upload_input(photos.jdir.input_images)
    assert bucket.info("jobs/p1/input/images.tar") is not None
    again = _sync(bucket, tmp_path / "b", job_id="p1")
    assert again.fetch_input(str(photos.jdir.input_images)) == str(again.jdir.input_images)
    assert tree(again.jdir.input_images) == tree(photos.jdir.input_images)


def test_a_missing_input_is_a_file_not_found(bucket, tmp_path):
    sync = _sync(bucket, tmp_path / "b")
    with pytest.raises(FileNotFoundError):
        sync.fetch_input(f"/elsewhere/jobs/{JOB}/input/video.mp4")


def test_delete_removes_every_object_of_the_job_only(bucket, tmp_path):
    sync = _sync(bucket, tmp_path / "a")
    write_stage(sync.ws, "frames")
    sync.push()
    bucket.write_bytes("jobs/other-job/input/video.mp4", b"v")
    assert sync.delete() == 3
    assert _keys(bucket) == []
    assert [o.key for o in bucket.list_objects("jobs/")] == ["jobs/other-job/input/video.mp4"]


def test_the_embedded_mode_copies_nothing(tmp_path):
    data = tmp_path / "data"
    local = LocalStorage(data)
    sync = _sync(local, data)
    video = sync.jdir.input_video("mp4")
    video.parent.mkdir(parents=True)
    video.write_bytes(b"video")
    assert sync.prepare(str(video), PRESET, use_gpu=False, test_fault="") == str(video)
    write_stage(sync.ws, "frames")
    assert sync.push() == [] and sync.restore() == [] and sync.delete() == 0
    sync.upload_input(video)
    assert not sync.ws.storage_manifest.exists()
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()) == [
        f"jobs/{JOB}/input/video.mp4", f"jobs/{JOB}/work/checkpoints/frames.json",
        f"jobs/{JOB}/work/frames.json", f"jobs/{JOB}/work/frames/f_00001.jpg",
        f"jobs/{JOB}/work/frames/f_00002.jpg", f"jobs/{JOB}/work/job.json"]


def test_the_orphan_sweep_takes_only_old_objects_of_jobs_without_files(bucket, tmp_path):
    for job_id in ("kept", "orphan"):
        bucket.write_bytes(f"jobs/{job_id}/input/video.mp4", b"v")
    bucket.write_bytes("jobs/orphan/work/checkpoints/frames.json", b"{}")
    now = time.time()
    assert sweep_orphan_objects(bucket, {"kept"}, 3600, now=now) == 0  # young: maybe an
    assert bucket.list_dirs("jobs/") == ["kept", "orphan"]              # upload in flight
    assert sweep_orphan_objects(bucket, {"kept"}, 3600, now=now + 3601) == 1
    assert bucket.list_dirs("jobs/") == ["kept"]
    assert sweep_orphan_objects(LocalStorage(tmp_path), set(), 0) == 0  # the disk sweep's
