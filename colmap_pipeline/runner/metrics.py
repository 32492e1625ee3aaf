"""Prometheus metrics the server's own work produces (issue 16), and :class:`MeteredStore`, the
one place that observes them: every status change, attempt record and new job passes through
the job store, so wrapping it sees each exactly once, whoever made it (the runner, a client's
cancel, the lost-replica sweep, the intake).

- ``colmap_jobs_finished_total{outcome, error_code}``: jobs that reached ``completed``,
  ``failed`` (with its error code) or ``cancelled``;
- ``colmap_queue_wait_seconds``: from upload to the first start of a job;
- ``colmap_stage_duration_seconds{stage, preset}``: wall time of each stage child, from the
  attempt records (``stage_wall_s``) as each attempt ends;
- ``colmap_registered_share``: registered images / frames given to SfM of each completed job;
- ``colmap_uploaded_bytes_total{kind}``: bytes of accepted uploads (``video``/``images``).

The collectors are registered in no registry here; :mod:`..web.metrics` adds them
(:data:`COLLECTORS`) to the app's registry. Counters are per process: each replica reports its
own (Prometheus sums them). No pycolmap, no web framework.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.registry import Collector

from ..jobs import TERMINAL, TRANSITIONS, Intent, Job, JobStatus, JobStore

log = logging.getLogger("colmap_worker.metrics")

#: histogram buckets of a stage's wall time (s): a fake stage's 0.1 s to a dense hour
STAGE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
#: histogram buckets of the queue wait (s)
WAIT_BUCKETS = (0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
#: histogram buckets of the registered share (0-1)
SHARE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)

JOBS_FINISHED = Counter(
    "colmap_jobs_finished", "Jobs that reached completed, failed or cancelled, by outcome and "
    "error code (empty unless failed)", ["outcome", "error_code"], registry=None)
QUEUE_WAIT = Histogram(
    "colmap_queue_wait_seconds", "Seconds from upload to a job's first start",
    buckets=WAIT_BUCKETS, registry=None)
STAGE_DURATION = Histogram(
    "colmap_stage_duration_seconds", "Wall time of one stage child (s), by stage and preset",
    ["stage", "preset"], buckets=STAGE_BUCKETS, registry=None)
REGISTERED_SHARE = Histogram(
    "colmap_registered_share", "Registered images / frames given to SfM, per completed job",
    buckets=SHARE_BUCKETS, registry=None)
UPLOADED_BYTES = Counter(
    "colmap_uploaded_bytes", "Bytes of accepted uploads, by input kind", ["kind"],
    registry=None)

#: every collector of this module (for the app's registry)
COLLECTORS: tuple[Collector, ...] = (JOBS_FINISHED, QUEUE_WAIT, STAGE_DURATION,
                                     REGISTERED_SHARE, UPLOADED_BYTES)


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return None


def observe_record(record: Mapping[str, Any], preset: str) -> None:
    """Each stage's wall time in an attempt record (``stage_wall_s``) into
    ``colmap_stage_duration_seconds``."""
    walls = record.get("stage_wall_s")
    if not isinstance(walls, Mapping):
        return
    for stage, seconds in walls.items():
        if isinstance(seconds, int | float) and seconds >= 0:
            STAGE_DURATION.labels(stage=str(stage), preset=preset).observe(float(seconds))


def observe_finished(job: Job, status: JobStatus) -> None:
    """``job`` just moved to the terminal ``status`` (read back after the move: its error
    code, results): ``colmap_jobs_finished_total`` and, when completed with results,
    ``colmap_registered_share``."""
    if status not in TERMINAL:
        return
    code = (job.error_code or "") if status == JobStatus.FAILED else ""
    JOBS_FINISHED.labels(outcome=status.value, error_code=code).inc()
    results = job.results or {}
    used = results.get("frames_used") or results.get("frames_extracted")
    registered = results.get("registered_images")
    if status == JobStatus.COMPLETED and isinstance(registered, int) and used:
        REGISTERED_SHARE.observe(min(1.0, registered / float(used)))


def observe_claimed(job: Job) -> None:
    """A job just claimed: its first start's wait since upload into
    ``colmap_queue_wait_seconds`` (later attempts are not queue waits of the upload)."""
    wait = _seconds_between(job.created_at, job.started_at)
    if job.attempt == 1 and wait is not None and wait >= 0:
        QUEUE_WAIT.observe(wait)


class MeteredStore:
    """A :class:`~..jobs.JobStore` that observes the metrics of this module on the calls that
    changed something; every call (and attribute) goes to ``inner`` unchanged.

    Observation never fails a call: a metrics error is logged.
    """

    def __init__(self, inner: JobStore) -> None:
        self.inner = inner

    async def create_job(self, job: Mapping[str, Any], **kwargs: Any) -> Job:
        """The store's insert; its input's bytes into ``colmap_uploaded_bytes_total``."""
        created = await self.inner.create_job(job, **kwargs)
        kind = "images" if (created.video_info or {}).get("kind") == "images" else "video"
        UPLOADED_BYTES.labels(kind=kind).inc(max(0, created.input_bytes))
        return created

    async def apply(self, job_id: str, intent: Intent, *,
                    attempt_record: Mapping[str, Any] | None = None, **fields: Any) -> bool:
        """The store's compare-and-set; when the job moved: its attempt record's stage times,
        a terminal status, the queue wait of a claim."""
        moved = await self.inner.apply(job_id, intent, attempt_record=attempt_record, **fields)
        target = TRANSITIONS[Intent(intent)].target
        if moved and (attempt_record is not None or target in TERMINAL
                      or Intent(intent) == Intent.CLAIM):
            await self._observe(job_id, attempt_record, Intent(intent))
        return moved

    async def claim_next_pending(self) -> Job | None:
        """The store's claim; the claimed job's queue wait."""
        job = await self.inner.claim_next_pending()
        if job is not None:
            observe_claimed(job)
        return job

    async def append_attempt(self, job_id: str, record: Mapping[str, Any]) -> bool:
        """The store's attempt record; its stage times."""
        ok = await self.inner.append_attempt(job_id, record)
        if ok:
            await self._observe(job_id, record, None)
        return ok

    async def _observe(self, job_id: str, record: Mapping[str, Any] | None,
                       intent: Intent | None) -> None:
        try:
            job = await self.inner.get_job(job_id)
            if job is None:
                return
            if record is not None:
                observe_record(record, job.quality)
            if intent == Intent.CLAIM:
                observe_claimed(job)
            elif intent is not None and TRANSITIONS[intent].target in TERMINAL:
                observe_finished(job, TRANSITIONS[intent].target)
        except Exception:  # metrics never fail a store call
            log.exception("job %s: could not observe metrics", job_id)

    def __getattr__(self, name: str) -> Any:
        """Every other call and attribute of the store (reads, progress, events, webhooks)."""
        return getattr(self.inner, name)
