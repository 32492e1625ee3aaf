"""Where a job's files live: the local disk (embedded mode) or a Google Cloud Storage bucket
(``STORAGE_BUCKET`` set), behind one interface (:class:`.base.Storage`), and the sync of a job
folder with it (:class:`.sync.JobSync`).

Imported by the server's parts (runner, intake, web, main), never by the stage children: the
children work on the local workspace only, and the runner copies between the workspace and
the bucket around them (issue 12).
"""
from __future__ import annotations

import asyncio
import functools
import logging
import shutil
from pathlib import Path

from ..config import Settings
from ..errors import PipelineError
from ..layout import DataDir, JobDir
from .base import BucketUnavailable, ObjectInfo, Storage, StorageError
from .local import LocalStorage
from .sync import JobSync

__all__ = ["BucketUnavailable", "JobSync", "LocalStorage", "ObjectInfo", "Storage",
           "StorageError", "job_sync", "open_storage", "remove_job_files", "store_input"]

log = logging.getLogger("colmap_worker.storage")


@functools.lru_cache(maxsize=8)
def _open(data_dir: str, bucket: str, project: str, emulator_host: str) -> Storage:
    if not bucket:
        return LocalStorage(data_dir)
    from .gcs import GcsStorage  # google-cloud-storage loads only in bucket mode

    return GcsStorage(bucket, project=project, emulator_host=emulator_host)


def open_storage(settings: Settings) -> Storage:
    """The store of these settings: :class:`.gcs.GcsStorage` of ``STORAGE_BUCKET`` when set
    (``GCS_PROJECT_ID``, ``STORAGE_EMULATOR_HOST``), else :class:`.local.LocalStorage` over
    ``DATA_DIR``. One instance per distinct setting (cached): the GCS client holds a
    connection pool."""
    return _open(str(settings.data_dir), settings.storage_bucket, settings.gcs_project_id,
                 settings.storage_emulator_host)


def job_sync(settings: Settings, job_id: str) -> JobSync:
    """The :class:`.sync.JobSync` of job ``job_id`` under ``DATA_DIR``."""
    return JobSync(open_storage(settings), DataDir(settings.data_dir).job(job_id))


async def store_input(settings: Settings, jdir: JobDir, path: Path) -> None:
    """Upload a new job's input before the upload is acknowledged (bucket mode; nothing in
    the embedded mode).

    Raises: PipelineError("not_ready") (503) naming ``storage`` in ``details.failing`` when
        the bucket refuses it after the retries.
    """
    sync = JobSync(open_storage(settings), jdir)
    if not sync.active:
        return
    try:
        await asyncio.to_thread(sync.upload_input, path)
    except StorageError as exc:
        log.error("upload of job %s's input to the bucket failed: %s", jdir.root.name, exc)
        raise PipelineError("not_ready", "The file store is unavailable; the upload was not "
                            "kept.", "Retry in a minute.", details={"failing": ["storage"]}
                            ) from exc


async def remove_job_files(settings: Settings, job_id: str) -> bool:
    """Remove job ``job_id``'s folder and, in bucket mode, its objects (``jobs/JOB_ID/``;
    retention and delete). Returns False when the bucket refused (logged: the row has moved
    already, and the objects stay until a later removal)."""
    sync = job_sync(settings, job_id)
    await asyncio.to_thread(shutil.rmtree, sync.jdir.root, True)
    try:
        removed = await asyncio.to_thread(sync.delete)
    except StorageError as exc:
        log.error("job %s: could not remove its objects from the bucket: %s", job_id, exc)
        return False
    if removed:
        log.info("job %s: removed %d object(s) from the bucket", job_id, removed)
    return True
