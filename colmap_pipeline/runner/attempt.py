"""One claimed job, run to an end: its stages in order, the automatic retry policy, the attempt
records, and the mapping of a stage child's exit to an error code.

A *run* of a job starts when the scheduler claims it and ends ``completed``, ``failed``, back
to ``pending`` (shutdown) or stopped by a client. Within a run, automatic retries happen in
place, each one a new *attempt* (``attempt`` + 1) with its own record in the job's
``attempts`` (:class:`~..results.AttemptRecord`), resuming at the first stage without a
checkpoint (:func:`..layout.next_stage`):

- a stage child ended by SIGKILL/SIGTERM/SIGINT/SIGHUP/SIGQUIT that this runner did not send
  (OOM killer, operator) is retried once per run (:data:`OUTSIDE_SIGNAL_RETRIES`);
- storage trouble (a database error, ``OSError``, ``workspace_busy``, too little free disk
  before a stage) is retried :data:`STORAGE_RETRIES` times with exponential backoff and full
  jitter (:func:`backoff_delay`); the failure that follows is written once the store answers;
- nothing else: timeouts, invalid input, failed reconstructions, SIGABRT/SIGSEGV (a pycolmap
  crash would crash again).
"""
from __future__ import annotations

import asyncio
import logging
import random
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..config import Settings
from ..errors import ERROR_CATALOG
from ..jobs import Intent, Job, JobStatus, JobStore, StoreError, utcnow
from ..layout import DataDir, next_stage, read_json
from ..protocol import (
    EXIT_PIPELINE_ERROR,
    EXIT_STAGE_PIPELINE_ERROR,
    STAGE_NAMES,
    STAGES,
    overall_progress,
)
from ..results import AttemptRecord, JobResult
from ..storage import job_sync
from .executor import StageOutcome, describe_exit
from .executor import run_stage as run_stage_child

log = logging.getLogger("colmap_worker.runner")

#: signals that end a stage child from outside (OOM killer, operator); retried once per run
OUTSIDE_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                             signal.SIGQUIT})
#: automatic retries per run after a child was killed from outside
OUTSIDE_SIGNAL_RETRIES = 1
#: exception names a stage child reports (``details.exception``) that mean storage trouble
STORAGE_EXCEPTIONS = frozenset({"OSError", "IOError", "DatabaseError", "OperationalError"})
#: automatic retries per run after database/storage errors, and the backoff bounds (s)
STORAGE_RETRIES = 3
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 30.0


class RetryKind(StrEnum):
    """Why a failed stage is retried automatically (an attempt record's ``retry``)."""

    OUTSIDE_SIGNAL = "outside_signal"  #: the child was killed from outside
    STORAGE = "storage"                #: database or disk trouble


class AttemptEnd(StrEnum):
    """How one attempt (the job's unfinished stages, run once) ended."""

    COMPLETED = "completed"  #: every stage ran
    FAILED = "failed"        #: a stage failed (:attr:`AttemptResult.outcome` says how)
    DRAINED = "drained"      #: the server began shutting down between two stages
    GONE = "gone"            #: the job left ``processing`` meanwhile (cancelled, deleted)


@dataclass(frozen=True)
class AttemptResult:
    """What :meth:`JobRun.attempt` returns: how it ended; the stage that failed (or the next
    one, when drained or gone); the failed child's ``outcome``; the job's status when gone
    (``left_as``; ``None``: the row disappeared)."""

    end: AttemptEnd
    stage: str | None = None
    outcome: StageOutcome | None = None
    left_as: JobStatus | None = None


class StorageFailure(Exception):
    """A stage failed for a storage reason (retried with backoff)."""


class DiskFull(StorageFailure):
    """Free disk in DATA_DIR is below ``MIN_FREE_DISK_BYTES`` (checked before each stage)."""


def backoff_delay(failures: int, base_s: float = BACKOFF_BASE_S,
                  cap_s: float = BACKOFF_CAP_S) -> float:
    """Seconds to wait before retry number ``failures`` (1-based): "full jitter",
    ``uniform(0, min(cap, base * 2**(failures-1)))``, after M. Brooker, "Exponential Backoff
    And Jitter", AWS Architecture Blog (2015). Never below 10 % of the bound."""
    bound = min(cap_s, base_s * 2 ** max(0, failures - 1))
    return random.uniform(0.1 * bound, bound)


def transient(outcome: StageOutcome) -> RetryKind | None:
    """The automatic retry a failed stage gets, or ``None`` (never retried).

    A stage child is never signalled by this runner without the job task being cancelled or timed
    out, so a child ended by one of :data:`OUTSIDE_SIGNALS` was killed from outside. SIGABRT/SIGSEGV
    come from the child itself (a pycolmap crash): retrying would crash again. Timeouts and pipeline
    error codes (invalid input, failed reconstruction) are never retried; ``workspace_busy`` and a
    storage exception in the child (:data:`STORAGE_EXCEPTIONS`) are storage errors.
    """
    if outcome.timed_out:
        return None
    if outcome.returncode < 0:
        return RetryKind.OUTSIDE_SIGNAL if -outcome.returncode in OUTSIDE_SIGNALS else None
    err = outcome.error
    if err is None:
        return None
    if err.code == "workspace_busy":
        return RetryKind.STORAGE
    if err.code == "pipeline_error" and err.details.get("exception") in STORAGE_EXCEPTIONS:
        return RetryKind.STORAGE
    return None


@dataclass(frozen=True)
class Failure:
    """A job's error as stored on the row (``error_code`` / ``_message`` / ``_hint`` /
    ``_details``) and shown at ``GET /jobs/{id}``."""

    code: str
    message: str
    hint: str
    details: dict[str, Any] | None = None

    @classmethod
    def of(cls, code: str, message: str | None = None, hint: str | None = None,
           details: dict[str, Any] | None = None) -> Failure:
        """A failure with ``code`` (``pipeline_error`` when not in the catalog), the catalog's
        message and hint filling in what is not given."""
        if code not in ERROR_CATALOG:
            code = "pipeline_error"
        _, default_message, default_hint = ERROR_CATALOG[code]
        return cls(code, message or default_message, hint or default_hint, details or None)


def failure_for(stage: str, outcome: StageOutcome, *, job_timeout_s: float) -> Failure:
    """The error of a failed stage, from how its child ended.

    - deadline passed: ``job_timeout``;
    - exit 3 (or 2) after an ``error`` event: the event's code, message, hint and ``details``
      (the numbers behind the failure, e.g. frames used, verified pairs);
    - killed by a signal: ``pipeline_crashed`` naming it;
    - anything else (exit 4 after an unexpected exception, or no event): ``pipeline_error``.
    """
    name = STAGE_NAMES[stage]
    rc, err = outcome.returncode, outcome.error
    if outcome.timed_out:
        return Failure.of("job_timeout",
                          f"The job exceeded JOB_TIMEOUT_S={job_timeout_s:.0f} s during {name}.")
    if err is not None and rc in (EXIT_PIPELINE_ERROR, EXIT_STAGE_PIPELINE_ERROR):
        return Failure.of(err.code, err.message, err.hint, err.details)
    if rc < 0:
        return Failure.of("pipeline_crashed", f"The {name} process was killed by "
                                              f"{describe_exit(rc)}.")
    detail = err.message if err is not None else None
    return Failure.of("pipeline_error", f"The {name} process ended with {describe_exit(rc)}"
                                        + (f": {detail}" if detail else "."))


@dataclass
class AttemptState:
    """What one attempt has done so far; becomes its :class:`~..results.AttemptRecord`.

    Attributes:
        number: the job's ``attempt`` (1-based, counts every run and automatic retry).
        started_at: ISO-8601 UTC.
        stage_wall_s: wall time (s) of each stage child run in this attempt, start-up included.
        resumed_from: first stage run (``None``: every checkpoint was valid).
        skipped_stages: stages reused from checkpoints.
        stage: the stage running now (``None`` before the first and after the last).
    """

    number: int
    started_at: str | None
    stage_wall_s: dict[str, float] = field(default_factory=dict)
    resumed_from: str | None = None
    skipped_stages: list[str] = field(default_factory=list)
    stage: str | None = None

    def record(self, outcome: str, *, error_code: str | None = None,
               retry: RetryKind | None = None, detail: str | None = None,
               failed_stage: str | None = None) -> dict[str, Any]:
        """This attempt's record (JSON form), ending now with ``outcome`` (completed, failed,
        retrying, cancelled, deleted, interrupted, stopped). ``failed_stage`` defaults to
        :attr:`stage`."""
        rec = AttemptRecord(
            attempt=self.number, outcome=outcome,
            failed_stage=failed_stage if failed_stage is not None else self.stage,
            error_code=error_code, started_at=self.started_at, finished_at=utcnow(),
            stage_wall_s=dict(self.stage_wall_s), resumed_from=self.resumed_from,
            skipped_stages=list(self.skipped_stages), retry=retry, detail=detail)
        return rec.model_dump(mode="json", exclude={k for k in ("retry", "detail")
                                                    if getattr(rec, k) is None})


#: the record outcome of an attempt whose job left ``processing`` under it (else "stopped")
GONE_OUTCOMES = {JobStatus.CANCELLED: "cancelled", JobStatus.DELETED: "deleted"}

#: runs one stage child: :func:`.executor.run_stage`'s signature (tests pass a fake)
StageRunner = Callable[..., Awaitable[StageOutcome]]


@dataclass
class RunContext:
    """What a job run needs from its scheduler.

    Attributes:
        gpu_slot: ``gpu_slot(stage)``: an async context manager holding what the stage needs
            (one of ``MAX_GPU_JOBS`` slots for a GPU stage when the GPU is used, else nothing).
        draining: whether the server is shutting down (no new stage starts).
        on_child: told ``(job_id, pgid)`` when a stage child starts and ``(job_id, None)``
            when it ended (the scheduler kills those left at exit).
        run_stage: the stage child runner.
    """

    store: JobStore
    settings: Settings
    data: DataDir
    gpu_enabled: bool
    gpu_slot: Callable[[str], AbstractAsyncContextManager[None]]
    draining: Callable[[], bool]
    on_child: Callable[[str, int | None], None]
    run_stage: StageRunner = run_stage_child


class JobRun:
    """One claimed job, run until it ends (:meth:`run`); the scheduler runs each in a task.

    Create it inside the task (its deadline starts then: ``JOB_TIMEOUT_S`` per run).
    """

    def __init__(self, ctx: RunContext, job: Job) -> None:
        self.ctx = ctx
        self.job = job
        self.job_id = job.job_id
        self.deadline = asyncio.get_running_loop().time() + ctx.settings.job_timeout_s
        self.started = time.monotonic()
        self.state = AttemptState(job.attempt or 1, job.started_at)
        self.signal_retries = 0
        self.storage_failures = 0
        #: the write that ends this run has begun (:meth:`_final`)
        self.ended = False

    async def run(self) -> None:
        """Run attempts until the job ends. Raises only ``asyncio.CancelledError`` (see
        :meth:`stopped`); store and runner errors fail the job or are logged."""
        while True:
            try:
                again = await self._settle(await self.attempt())
            except (StoreError, OSError, StorageFailure) as exc:
                again = await self._storage_failure(exc)
            except Exception as exc:  # our own bug: fail the job, keep serving
                log.exception("job %s failed in the runner", self.job_id)
                await self._guarded(self._fail(Failure.of("pipeline_error",
                                                          f"Runner error: {exc}")))
                return
            if not again:
                return

    async def attempt(self) -> AttemptResult:
        """Run the job's unfinished stages once, each in its own child."""
        ctx, st = self.ctx, self.state
        ws, sync = ctx.data.job(self.job_id).work, job_sync(ctx.settings, self.job_id)
        await asyncio.to_thread(  # bucket mode: input and checkpoints from the bucket if missing
            sync.prepare, self.job.input_path, ctx.settings.preset(self.job.quality),
            use_gpu=ctx.gpu_enabled, test_fault=ctx.settings.test_fault,
            random_seed=ctx.settings.pipeline_random_seed)
        first = await asyncio.to_thread(next_stage, ws.root)
        todo = STAGES[STAGES.index(first):] if first else ()
        st.resumed_from, st.skipped_stages = first, [s for s in STAGES if s not in todo]
        for stage in todo:
            st.stage = stage
            current = await ctx.store.get_job(self.job_id)
            if (current is None or current.status != JobStatus.PROCESSING  # gone, or another
                    or current.attempt != st.number):  # replica claimed it (.stalls)
                return AttemptResult(AttemptEnd.GONE, stage,
                                     left_as=current.status if current else None)
            if ctx.draining():
                return AttemptResult(AttemptEnd.DRAINED, stage)
            await self._check_disk()
            t0 = time.monotonic()
            outcome = await self._run_stage(stage, ws.root)
            st.stage_wall_s[stage] = round(time.monotonic() - t0, 3)
            if not outcome.ok:
                return AttemptResult(AttemptEnd.FAILED, stage, outcome)
            await asyncio.to_thread(sync.push)  # outputs + checkpoint to the bucket (StorageError)
        st.stage = None
        return AttemptResult(AttemptEnd.COMPLETED)

    async def stopped(self, reason: str | None) -> None:
        """Bookkeeping after the task was cancelled: by a client (``reason`` ``cancelled`` or
        ``deleted``: the row has moved already; the attempt is recorded), or by a shutdown
        (``None``: back to ``pending`` with an ``interrupted`` record, to resume at its first
        unfinished stage at the next start). Nothing more when the run's final write had
        begun. Shielded from a second cancellation; never raises."""
        if self.ended:
            return
        try:
            await asyncio.shield(self._record_stop(reason))
        except (asyncio.CancelledError, StoreError, OSError, ValueError) as exc:
            log.error("job %s: could not record the %s attempt: %s", self.job_id,
                      reason or "interrupted", exc)

    async def _record_stop(self, reason: str | None) -> None:
        store, st = self.ctx.store, self.state
        await store.set_pgid(self.job_id, None)
        if reason is None:
            where = f" at {STAGE_NAMES[st.stage]}" if st.stage else ""
            await self._requeue(f"Interrupted by a server shutdown; resumes{where}")
        else:
            await store.append_attempt(self.job_id, st.record(reason))

    async def _requeue(self, message: str) -> None:
        """Back to ``pending`` with an ``interrupted`` record (recorded even if the job moved
        meanwhile)."""
        rec = self.state.record("interrupted")
        if not await self.ctx.store.apply(self.job_id, Intent.REQUEUE, attempt_record=rec,
                                          current_stage="Queued", message=message):
            await self.ctx.store.append_attempt(self.job_id, rec)

    async def _final(self, write: Awaitable[Any]) -> Any:
        """Await the write that ends this run (its status and attempt record), shielded: a
        cancel arriving meanwhile lets it finish and records nothing more (:meth:`stopped`)."""
        self.ended = True
        try:
            return await asyncio.shield(write)
        except (StoreError, OSError):
            self.ended = False  # not written: the storage retry policy takes over
            raise

    async def _settle(self, result: AttemptResult) -> bool:
        """Act on an attempt's end; True when another attempt follows in place."""
        if result.end == AttemptEnd.COMPLETED:
            await self._complete()
            return False
        if result.end == AttemptEnd.DRAINED:
            where = STAGE_NAMES[result.stage] if result.stage else "its next stage"
            await self._final(self._requeue(f"Paused by a server shutdown; resumes at {where}"))
            return False
        if result.end == AttemptEnd.GONE:
            outcome = GONE_OUTCOMES.get(result.left_as, "stopped") if result.left_as else "stopped"
            await self._final(self.ctx.store.append_attempt(self.job_id,
                                                            self.state.record(outcome)))
            return False
        if result.outcome is None or result.stage is None:
            raise RuntimeError(f"attempt ended {result.end} without a stage outcome")
        return await self._stage_failed(result.stage, result.outcome)

    async def _stage_failed(self, stage: str, outcome: StageOutcome) -> bool:
        retry = transient(outcome)
        if (retry == RetryKind.OUTSIDE_SIGNAL and self.signal_retries < OUTSIDE_SIGNAL_RETRIES
                and not self.ctx.draining()):
            self.signal_retries += 1
            how = describe_exit(outcome.returncode)
            log.warning("job %s: %s child killed by %s from outside; retrying once",
                        self.job_id, stage, how)
            await self._next_attempt(self.state.record(
                "retrying", retry=retry, error_code="pipeline_crashed", detail=how))
            return True
        if retry == RetryKind.STORAGE:
            err = outcome.error
            raise StorageFailure(f"{stage}: {err.code if err else None} "
                                 f"{err.details if err else None}")
        failure = failure_for(stage, outcome, job_timeout_s=self.ctx.settings.job_timeout_s)
        log.warning("job %s failed at %s: %s (%s)", self.job_id, stage, failure.code,
                    failure.message)
        await self._fail(failure, stage)
        return False

    async def _storage_failure(self, exc: Exception) -> bool:
        """Retry after a storage error with backoff, or fail the job after
        :data:`STORAGE_RETRIES` (or at the deadline). True when another attempt follows."""
        self.storage_failures += 1
        code = "insufficient_storage" if isinstance(exc, DiskFull) else "storage_error"
        loop = asyncio.get_running_loop()
        if self.storage_failures > STORAGE_RETRIES or loop.time() >= self.deadline:
            log.error("job %s: giving up after %d storage error(s): %s", self.job_id,
                      self.storage_failures, exc)
            while True:  # written once the store answers: a job is never left `processing`
                if await self._guarded(self._fail(Failure.of(code, str(exc)))):
                    return False
                await asyncio.sleep(backoff_delay(self.storage_failures))
        delay = backoff_delay(self.storage_failures)
        log.warning("job %s: storage error (%s); retry %d/%d in %.1f s", self.job_id, exc,
                    self.storage_failures, STORAGE_RETRIES, delay)
        rec = self.state.record("retrying", retry=RetryKind.STORAGE, error_code=code,
                                detail=str(exc)[:300])
        await self._guarded(self.ctx.store.append_attempt(self.job_id, rec))
        await asyncio.sleep(delay)
        await self._guarded(self._next_attempt(None))
        return True

    async def _next_attempt(self, record: dict[str, Any] | None) -> None:
        """Record the attempt that ended (if ``record``) and start the next one in place."""
        store = self.ctx.store
        if record is not None:
            await store.append_attempt(self.job_id, record)
        n = await store.bump_attempt(self.job_id, auto_retry=True)
        self.state = AttemptState(n or self.state.number + 1, utcnow())

    async def _guarded(self, coro: Awaitable[Any]) -> bool:
        """Await ``coro``, logging (not raising) a store or disk error; False after one."""
        try:
            await coro
        except (StoreError, OSError) as exc:
            log.error("job %s: bookkeeping failed: %s", self.job_id, exc)
            return False
        return True

    async def _check_disk(self) -> None:
        settings = self.ctx.settings
        free = (await asyncio.to_thread(shutil.disk_usage, settings.data_dir)).free
        if free < settings.min_free_disk_bytes:
            raise DiskFull(f"only {free} bytes free in DATA_DIR; MIN_FREE_DISK_BYTES is "
                           f"{settings.min_free_disk_bytes}")

    async def _fail(self, failure: Failure, stage: str | None = None) -> None:
        """``failed`` with the error (and its details) and this attempt's record, in one write."""
        stage = stage or self.state.stage
        where = {"current_stage": STAGE_NAMES[stage]} if stage else {}
        rec = self.state.record("failed", error_code=failure.code, failed_stage=stage)
        await self._final(self.ctx.store.apply(
            self.job_id, Intent.FAIL, attempt_record=rec, error_code=failure.code,
            error_message=failure.message, error_hint=failure.hint,
            error_details=failure.details, message=failure.message, **where))

    async def _complete(self) -> None:
        """``completed`` with the results (``WS/result.json``, a :class:`~..results.JobResult`)
        and this attempt's record, in one write (a client polling never sees ``completed``
        without them)."""
        ws = self.ctx.data.job(self.job_id).work
        try:
            result = JobResult.model_validate(await asyncio.to_thread(read_json, ws.result_json))
        except ValidationError as exc:  # a bug in the export stage: say so, do not serve it
            first = exc.errors()[0]
            await self._fail(Failure.of(
                "pipeline_error", f"The export stage wrote a result.json that does not match "
                f"the results schema ({exc.error_count()} error(s), first at "
                f"{'.'.join(map(str, first['loc']))}: {first['msg']})."), "export")
            return
        for art in result.artifacts:
            art.url = f"/jobs/{self.job_id}/artifacts/{art.name}"
        result.job_wall_time_s = round(time.monotonic() - self.started, 3)
        message = (f"Registered {result.registered_images} of "
                   f"{result.frames_used or result.frames_extracted} frames; "
                   f"{result.points3d} 3D points")
        await self._final(self.ctx.store.apply(
            self.job_id, Intent.COMPLETE, attempt_record=self.state.record("completed"),
            results=result.model_dump(mode="json", exclude_unset=True), message=message))
        log.info("job %s completed in %.1f s", self.job_id, time.monotonic() - self.started)

    async def _run_stage(self, stage: str, ws: Path) -> StageOutcome:
        """One stage child, in the slot the stage needs (a GPU slot for a GPU stage on a GPU);
        progress relayed to the row (the child's messages unchanged, the fraction mapped onto
        the job's bar)."""
        ctx, name = self.ctx, STAGE_NAMES[stage]
        await ctx.store.update_progress(self.job_id, overall_progress(stage, 0.0), name,
                                        f"{name} started")
        last: list[Any] = [-1, ""]

        async def on_progress(fraction: float, message: str) -> None:
            pct = overall_progress(stage, fraction)
            if pct != last[0] or message != last[1]:
                last[0], last[1] = pct, message
                await ctx.store.update_progress(self.job_id, pct, name, message or name)

        async def on_spawn(pid: int) -> None:
            ctx.on_child(self.job_id, pid)
            await ctx.store.set_pgid(self.job_id, pid)  # a restarted server kills it if it lives

        try:
            async with ctx.gpu_slot(stage):
                return await ctx.run_stage(stage, ws, on_progress=on_progress,
                                           deadline=self.deadline, nice=ctx.settings.child_nice,
                                           on_spawn=on_spawn)
        finally:
            ctx.on_child(self.job_id, None)
            task = asyncio.current_task()
            if task is None or not task.cancelling():
                await ctx.store.set_pgid(self.job_id, None)
