"""The storage interface (``colmap_pipeline/storage``): one contract run against both
implementations, the local folder and a bucket of the GCS emulator (real HTTP), and the choice
:func:`open_storage` makes from the settings."""
from __future__ import annotations

import hashlib
import time

import pytest
from runner_harness import runner_settings

from colmap_pipeline.storage import (
    BucketUnavailable,
    LocalStorage,
    ObjectInfo,
    Storage,
    job_sync,
    open_storage,
)
from colmap_pipeline.storage.gcs import GcsStorage


@pytest.fixture(params=["local", "gcs"])
def store(request, tmp_path) -> Storage:
    if request.param == "local":
        (tmp_path / "objects").mkdir()
        return LocalStorage(tmp_path / "objects")
    emu = request.getfixturevalue("gcs_emulator")
    return GcsStorage(emu.new_bucket(), emulator_host=emu.url, retry_deadline_s=5)


def test_objects_round_trip(store, tmp_path):
    src = tmp_path / "in.bin"
    payload = bytes(range(256)) * 5000  # 1.28 MB: more than one stream chunk of 1 MiB
    src.write_bytes(payload)
    store.upload_file("jobs/a/input/video.mp4", src, "video/mp4")
    store.write_bytes("jobs/a/work/checkpoints/frames.json", b'{"stage": "frames"}')
    store.write_bytes("jobs/b/x", b"other job")

    dest = tmp_path / "deep" / "out.bin"
    assert store.download_file("jobs/a/input/video.mp4", dest)
    assert hashlib.sha256(dest.read_bytes()).digest() == hashlib.sha256(payload).digest()
    assert store.read_bytes("jobs/a/work/checkpoints/frames.json") == b'{"stage": "frames"}'
    assert [o.key for o in store.list_objects("jobs/a/")] == [
        "jobs/a/input/video.mp4", "jobs/a/work/checkpoints/frames.json"]
    info = store.info("jobs/a/input/video.mp4")
    assert info is not None and info.size == len(payload)
    chunks = list(store.stream("jobs/a/input/video.mp4", chunk_bytes=1024 * 1024))
    assert b"".join(chunks) == payload and len(chunks) == 2

    assert store.list_dirs("jobs/") == ["a", "b"]
    assert all(o.updated is not None and abs(o.updated - time.time()) < 300
               for o in store.list_objects("jobs/"))
    assert store.delete_prefix("jobs/a/") == 2
    assert store.list_objects("jobs/a/") == []
    assert [o.key for o in store.list_objects("jobs/")] == ["jobs/b/x"]


def test_missing_objects_are_none_or_false(store, tmp_path):
    assert store.read_bytes("jobs/none/x") is None
    assert store.info("jobs/none/x") is None
    assert store.download_file("jobs/none/x", tmp_path / "x") is False
    assert not (tmp_path / "x").exists()
    assert store.delete_prefix("jobs/none/") == 0
    assert store.list_objects("jobs/none/") == []
    assert store.list_dirs("jobs/") == []
    store.check()
    assert store.ready()


def test_the_local_store_signs_nothing_and_refuses_keys_outside_its_root(tmp_path):
    local = LocalStorage(tmp_path)
    assert local.signed_url("jobs/a/x", 60, filename="x", media_type=None) is None
    for key in ("../x", "/etc/passwd", "jobs//x", "jobs/./x", ""):
        with pytest.raises(ValueError):
            local.read_bytes(key)
    with pytest.raises(BucketUnavailable) as err:
        LocalStorage(tmp_path / "absent").check()
    assert err.value.reason == "missing"


def test_a_missing_bucket_is_named_missing(gcs_emulator):
    gone = GcsStorage("no-such-bucket-x1", emulator_host=gcs_emulator.url)
    with pytest.raises(BucketUnavailable) as err:
        gone.check()
    assert err.value.reason == "missing"
    assert gone.ready() is False


def test_open_storage_is_local_without_a_bucket_and_gcs_with_one(tmp_path, gcs_bucket):
    local = open_storage(runner_settings(tmp_path))
    assert isinstance(local, LocalStorage) and local.remote is False
    assert local.root == tmp_path / "data"
    assert job_sync(runner_settings(tmp_path), "j").active is False
    gcs = open_storage(runner_settings(tmp_path, **gcs_bucket))
    assert isinstance(gcs, GcsStorage) and gcs.remote is True
    assert gcs.bucket_name == gcs_bucket["storage_bucket"]
    assert open_storage(runner_settings(tmp_path, **gcs_bucket)) is gcs  # one client per bucket
    assert ObjectInfo("k", 1) == ObjectInfo("k", 1, None)
