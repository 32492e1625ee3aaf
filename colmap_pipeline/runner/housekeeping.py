"""Housekeeping of ``DATA_DIR``: retention of finished jobs' files, and sweeps of job folders
and uploads that no job owns.

- At start-up, before the store opens, :func:`sweep_partial_uploads` removes every upload a
  dead server left half-received (no request is in flight yet).
- :class:`Housekeeper` runs at start-up and then every ``HOUSEKEEPING_INTERVAL_S``: jobs
  ``completed``/``failed``/``cancelled`` longer than ``RETENTION_HOURS`` ago become ``expired``
  (row kept) and lose their folder (and, in bucket mode, their objects); job folders without
  a job that keeps files, and partial uploads, are removed (all of them at start-up; later
  only those untouched for at least an hour, so an upload being moved into place is never
  swept); in bucket mode, so are the objects of jobs that keep no files, when an hour old.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from ..config import Settings
from ..jobs import Intent, JobStore, utc_iso
from ..layout import DataDir
from ..storage import StorageError, open_storage, remove_job_files
from ..storage.sync import sweep_orphan_objects

log = logging.getLogger("colmap_worker.housekeeping")

#: the youngest a folder or upload may be to be swept after start-up (s)
MIN_SWEEP_AGE_S = 3600.0


def sweep_partial_uploads(upload_dir: Path) -> int:
    """Remove every file in ``upload_dir`` (``DATA_DIR/uploads``), left by a server that died
    mid-upload. Call only at start-up, when no request owns a file there. Blocking.

    Returns: the number of files removed.
    """
    n = 0
    for p in upload_dir.iterdir():
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _older_than(path: Path, now: float, min_age_s: float) -> bool:
    try:
        return now - path.stat().st_mtime >= min_age_s
    except OSError:
        return False


def sweep_orphans(data_dir: DataDir, keep: set[str], min_age_s: float) -> tuple[int, int]:
    """Remove ``DATA_DIR/jobs/<id>`` entries whose id is not in ``keep``, and files in
    ``DATA_DIR/uploads`` (partial uploads), each only if untouched for ``min_age_s`` seconds.
    Blocking: call in a thread.

    Returns: ``(job folders removed, uploads removed)``.
    """
    now = time.time()
    orphans = uploads = 0
    jobs = data_dir.jobs
    for d in (jobs.iterdir() if jobs.is_dir() else ()):
        if d.name not in keep and _older_than(d, now, min_age_s):
            _remove(d)
            orphans += 1
    up = data_dir.uploads
    for f in (up.iterdir() if up.is_dir() else ()):
        if f.is_file() and _older_than(f, now, min_age_s):
            f.unlink(missing_ok=True)
            uploads += 1
    return orphans, uploads


@dataclass(frozen=True)
class SweepCounts:
    """What one housekeeping pass removed."""

    expired: int = 0  #: jobs whose files retention removed (rows now ``expired``)
    orphans: int = 0  #: job folders without a job that keeps files
    uploads: int = 0  #: partial uploads
    bucket_orphans: int = 0  #: jobs whose leftover objects left the bucket (bucket mode)


class Housekeeper:
    """Retention and orphan sweeps over one ``DATA_DIR``.

    Args:
        store: the job store.
        settings: ``RETENTION_HOURS`` (0 keeps files forever), ``HOUSEKEEPING_INTERVAL_S``.
        data: ``DATA_DIR``.
        busy: ids of the jobs running in this process now (never expired or swept).
    """

    def __init__(self, store: JobStore, settings: Settings, data: DataDir,
                 busy: Callable[[], set[str]]) -> None:
        self.store = store
        self.settings = settings
        self.data = data
        self.busy = busy

    async def run(self, *, startup: bool) -> SweepCounts:
        """One pass: retention, then the sweep (every orphan at start-up, only those untouched
        for ``max(1 h, HOUSEKEEPING_INTERVAL_S)`` later). Raises :class:`~..jobs.StoreError`
        when the store fails."""
        expired = await self._expire() if self.settings.retention_hours > 0 else 0
        min_age = 0.0 if startup else max(MIN_SWEEP_AGE_S, self.settings.housekeeping_interval_s)
        keep = await self.store.job_ids_with_files() | self.busy()
        orphans, uploads = await asyncio.to_thread(sweep_orphans, self.data, keep, min_age)
        counts = SweepCounts(expired, orphans, uploads, await self._sweep_bucket(keep))
        if expired or orphans or uploads or counts.bucket_orphans:
            log.warning("housekeeping: %s", asdict(counts))
        return counts

    async def _sweep_bucket(self, keep: set[str]) -> int:
        """Bucket mode: remove the objects of jobs that keep no files (a failed delete's
        leftovers), never younger than ``max(1 h, HOUSEKEEPING_INTERVAL_S)`` even at start-up:
        the bucket is shared, and another replica may be between an upload and its row. A
        bucket error is logged (the next pass tries again)."""
        min_age = max(MIN_SWEEP_AGE_S, self.settings.housekeeping_interval_s)
        try:
            return await asyncio.to_thread(sweep_orphan_objects, open_storage(self.settings),
                                           keep, min_age)
        except StorageError as exc:
            log.error("housekeeping: bucket sweep failed: %s", exc)
            return 0

    async def _expire(self) -> int:
        """Expire jobs finished before the retention cutoff: the row turns ``expired`` first
        (so no retry can race the removal), then the folder goes."""
        cutoff = utc_iso(datetime.now(UTC) - timedelta(hours=self.settings.retention_hours))
        busy = self.busy()
        n = 0
        for job_id in await self.store.finished_before(cutoff):
            if job_id in busy:
                continue
            if await self.store.apply(job_id, Intent.EXPIRE):
                await remove_job_files(self.settings, job_id)  # folder and bucket objects
                n += 1
        return n

    async def loop(self, stopping: Callable[[], bool]) -> None:
        """Run :meth:`run` every ``HOUSEKEEPING_INTERVAL_S`` until ``stopping()`` or
        cancelled; a failed pass is logged and the next one runs on time."""
        while not stopping():
            await asyncio.sleep(self.settings.housekeeping_interval_s)
            try:
                await self.run(startup=False)
            except Exception:  # noqa: BLE001 - keep sweeping next time
                log.exception("housekeeping failed")
