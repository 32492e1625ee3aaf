"""What happens to a job whose replica died (PostgreSQL mode): the retry policy of a lost run.

A replica that is SIGKILLed, preempted or scaled down stops sending its procrastinate worker
heartbeat; after ``QUEUE_STALL_TIMEOUT_S`` the periodic sweep (:mod:`.worker`) finds the
job's ticket and calls :func:`requeue_stalled`. Losing the replica is treated like a stage
child killed from outside (:data:`.attempt.OUTSIDE_SIGNAL_RETRIES`): the job goes back to
``pending`` once per run, resuming from its checkpoints on another replica; a second loss in
the same run fails it with ``pipeline_crashed``. A run starts at the job's upload or at a
client's retry (which follows a ``failed`` or ``cancelled`` attempt record).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

from ..errors import ERROR_CATALOG
from ..jobs import Intent, Job, JobStatus, JobStore
from .attempt import OUTSIDE_SIGNAL_RETRIES, AttemptState, RetryKind

log = logging.getLogger("colmap_worker.queue")

#: ``detail`` of the attempt record a lost replica leaves (also how the policy counts them)
LOST_DETAIL = "replica lost: its worker stopped heartbeating"
#: attempt outcomes after which only a client's retry runs the job again (a new run)
RUN_ENDS = frozenset({"failed", "cancelled", "completed"})


class StallAction(StrEnum):
    """What :func:`requeue_stalled` did."""

    REQUEUED = "requeued"  #: back to ``pending`` (its new ticket is queued with it)
    FAILED = "failed"      #: lost twice in one run: ``failed`` with ``pipeline_crashed``
    NONE = "none"          #: the job is not ``processing`` (or is gone): nothing to do


def losses_in_run(attempts: Sequence[Mapping[str, Any]]) -> int:
    """Lost-replica records (:data:`LOST_DETAIL`) since the run began (after the last record
    in :data:`RUN_ENDS`)."""
    n = 0
    for rec in attempts:
        if rec.get("outcome") in RUN_ENDS:
            n = 0
        elif rec.get("detail") == LOST_DETAIL:
            n += 1
    return n


def _record(job: Job, outcome: str, retry: RetryKind | None) -> dict[str, Any]:
    """The lost run's record, in the same shape as every other run's (:class:`AttemptState`)."""
    return AttemptState(job.attempt or 1, job.started_at).record(
        outcome, error_code="pipeline_crashed", retry=retry, detail=LOST_DETAIL)


async def requeue_stalled(store: JobStore, job_id: str, stall_timeout_s: float) -> StallAction:
    """Apply the lost-replica policy to ``job_id`` (module docstring): ``REQUEUE`` with a
    ``retrying`` record (``auto_retries`` + 1) or ``FAIL`` with ``pipeline_crashed``.

    The queued store queues the job's new ticket right after the requeue commits; a ticket
    lost in between is queued by the next sweep (pending rows without a ticket).
    Raises: StoreError when the store fails (the next sweep tries again).
    """
    job = await store.get_job(job_id)
    if job is None or job.status != JobStatus.PROCESSING:
        return StallAction.NONE
    await store.set_pgid(job_id, None)  # a process group on a dead machine
    where = job.current_stage or "its current stage"
    if losses_in_run(job.attempts) < OUTSIDE_SIGNAL_RETRIES:
        ok = await store.apply(
            job_id, Intent.REQUEUE, attempt_record=_record(job, "retrying",
                                                          RetryKind.OUTSIDE_SIGNAL),
            auto_retries=job.auto_retries + 1,
            message=f"Its replica stopped (no heartbeat for {stall_timeout_s:.0f} s); "
                    f"resumes at {where} on another replica")
        log.warning("job %s: replica lost at %s; requeued (%s)", job_id, where, ok)
        return StallAction.REQUEUED if ok else StallAction.NONE
    hint = ERROR_CATALOG["pipeline_crashed"][2]
    text = f"Its replica stopped twice in one run (last at {where})."
    ok = await store.apply(
        job_id, Intent.FAIL, attempt_record=_record(job, "failed", None),
        error_code="pipeline_crashed", error_message=text, error_hint=hint, message=text)
    log.error("job %s: replica lost again at %s; failed (%s)", job_id, where, ok)
    return StallAction.FAILED if ok else StallAction.NONE
