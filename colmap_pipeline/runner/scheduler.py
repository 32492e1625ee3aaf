"""JobRunner: takes pending jobs from the store and runs each in a task (:mod:`.attempt`).

Started and stopped by the app's lifespan. At most ``MAX_CONCURRENT_JOBS`` jobs run at once;
GPU stages (when a GPU is in use) also take one of ``MAX_GPU_JOBS`` slots, held by this process
around the stage's child, so a dead child frees its slot as soon as it is reaped.

Operator actions (cancel, retry, delete) are compare-and-set transitions of the store
(:class:`~..jobs.Intent`), followed by stopping the job's child. At start-up the runner kills
every stage child a previous server left (by the process group recorded in the row) and sends
the jobs it left ``processing`` back to ``pending``; on shutdown it drains (no new job or stage
starts, running stages get a grace period) and then stops what still runs, leaving those jobs
``pending``. Housekeeping (retention, sweeps) is :mod:`.housekeeping`'s.
"""
from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ..config import Settings
from ..errors import PipelineError
from ..jobs import Intent, Job, JobStore, allowed
from ..layout import DataDir
from ..protocol import GPU_STAGES
from ..storage import remove_job_files
from .attempt import JobRun, RunContext, StageRunner
from .executor import kill_process_group, kill_recorded_group
from .executor import run_stage as run_stage_child
from .housekeeping import Housekeeper, SweepCounts

log = logging.getLogger("colmap_worker.runner")

#: seconds between polls of the store when nothing woke the runner
POLL_INTERVAL_S = 2.0
#: seconds an operator action waits for the job's task to stop its child (SIGTERM, then
#: SIGKILL after :data:`.executor.KILL_GRACE_S`)
ABORT_WAIT_S = 10.0
#: seconds a retry waits for a cancelled or failed job's task that is still unwinding
RETRY_UNWIND_WAIT_S = 5.0


def manual_retries(job: Job) -> int:
    """Runs of ``job`` after its first that the automatic retry policy did not start: the
    client's retries (a resume after a server restart counts as one too, which errs on the
    side of the cap)."""
    return max(0, job.attempt - 1 - job.auto_retries)


class JobRunner:
    """Schedules jobs from a :class:`~..jobs.JobStore`.

    Args:
        store: the job store.
        settings: service settings.
        gpu_enabled: GPU stages run on CUDA (probed at start-up).
        stage_runner: runs one stage child (default :func:`.executor.run_stage`; tests pass a
            fake).
    """

    def __init__(self, store: JobStore, settings: Settings, *, gpu_enabled: bool,
                 stage_runner: StageRunner = run_stage_child) -> None:
        self.store = store
        self.settings = settings
        self.data = DataDir(settings.data_dir)
        self.gpu_enabled = gpu_enabled
        self.max_gpu_jobs = settings.max_gpu_jobs
        #: jobs inside a GPU stage now
        self.active_gpu_jobs = 0
        self._gpu_sem = asyncio.Semaphore(settings.max_gpu_jobs)
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._pgids: dict[str, int] = {}
        #: why a job task was cancelled by an operator (absent: shutdown), per task
        self._cancel_reasons: dict[asyncio.Task[None], str] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._housekeeping_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._draining = False
        self._ctx = RunContext(store, settings, self.data, gpu_enabled, self._gpu_slot,
                               lambda: self._draining, self._track_child, stage_runner)
        self._housekeeper = Housekeeper(store, settings, self.data, busy=lambda: set(self._tasks))

    @property
    def active_jobs(self) -> int:
        """Jobs being processed by this runner now."""
        return len(self._tasks)

    @property
    def running(self) -> bool:
        """The scheduling loop is alive."""
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` began: no new job or stage starts."""
        return self._draining

    # ---- start, drain, stop -----------------------------------------------------------------
    async def start(self) -> None:
        """Recover from a previous server (:meth:`recover`), then start scheduling."""
        await self.recover()
        self._loop_task = asyncio.create_task(self._loop(), name="job-runner")

    async def recover(self) -> list[str]:
        """Kill every stage child's process group a previous server recorded (if it is still
        a pipeline child of that job's workspace), then send the jobs it left ``processing``
        back to ``pending``; they resume from their first unfinished stage. Returns their
        ids."""
        for job_id, pgid in await self.store.recorded_pgids():
            killed = await asyncio.to_thread(kill_recorded_group, pgid,
                                             self.data.job(job_id).work.root)
            if killed:
                log.warning("killed process group %d left by a previous server (job %s)",
                            pgid, job_id)
            await self.store.set_pgid(job_id, None)
        requeued = await self.store.requeue_processing()
        if requeued:
            log.warning("requeued %d job(s) left processing: %s", len(requeued), requeued)
        return requeued

    def wake(self) -> None:
        """Tell the loop a job may be waiting (called after an upload or a retry)."""
        self._wake.set()

    async def drain(self, grace_s: float) -> None:
        """Graceful shutdown, step 1: start no new job or stage; give running stages
        ``grace_s`` seconds to finish (each job then stops at its checkpoint and goes back to
        ``pending``). Jobs still running afterwards are stopped by :meth:`stop`."""
        self._draining = True
        tasks = [t for t in self._tasks.values() if not t.done()]
        if tasks and grace_s > 0:
            log.warning("draining: %d job(s) get %.0f s to finish their stage", len(tasks),
                        grace_s)
            await asyncio.wait(tasks, timeout=grace_s)

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop scheduling and stop running children after ``grace_s`` (see :meth:`drain`);
        their jobs go back to ``pending`` (or stay ``processing`` if the store is gone) and
        resume from their checkpoints at the next start."""
        if grace_s > 0 and not self._draining:
            await self.drain(grace_s)
        self._draining = True
        self._stopping = True
        self._wake.set()
        for t in (self._loop_task, self._housekeeping_task):
            if t:
                t.cancel()
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in (self._loop_task, self._housekeeping_task):
            if t:
                await asyncio.gather(t, return_exceptions=True)

    def kill_all(self) -> None:
        """SIGKILL every child process group this runner started (last resort at exit)."""
        for pgid in list(self._pgids.values()):
            kill_process_group(pgid)

    # ---- operator actions -------------------------------------------------------------------
    async def cancel(self, job_id: str) -> bool:
        """Cancel a ``pending`` or ``processing`` job (:attr:`~..jobs.Intent.CANCEL`), then stop
        its stage child's group and free its GPU slot before returning. The workspace stays (a
        retry reuses its checkpoints). Returns False when the job was in another state."""
        ok = await self.store.apply(job_id, Intent.CANCEL)
        if ok:
            await self._abort_task(job_id, "cancelled")
            log.info("job %s cancelled", job_id)
        return ok

    async def retry(self, job_id: str) -> bool:
        """Queue a ``failed`` or ``cancelled`` job again (:attr:`~..jobs.Intent.RETRY`); it
        resumes from its first stage without a valid checkpoint.

        Answers at once for a job in another state (issue 10: it used to wait 10 s for a
        running job's task first); waits up to :data:`RETRY_UNWIND_WAIT_S` only for the task of
        a cancelled job that is still stopping its child.

        Returns: False when the job is unknown or in another state.
        Raises: PipelineError("retry_limit_reached") after ``MAX_MANUAL_RETRIES`` retries.
        """
        job = await self.store.get_job(job_id)
        if job is None or not allowed(Intent.RETRY, job.status):
            return False
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=RETRY_UNWIND_WAIT_S)
        self._check_retry_limit(job)
        ok = await self.store.apply(job_id, Intent.RETRY)
        if ok:
            self.wake()
        return ok

    def _check_retry_limit(self, job: Job) -> None:
        done, cap = manual_retries(job), self.settings.max_manual_retries
        if done >= cap:
            raise PipelineError(
                "retry_limit_reached",
                f"Job {job.job_id} has been retried {done} times; the limit is {cap}.",
                details={"manual_retries": done, "max_manual_retries": cap,
                         "attempt": job.attempt, "auto_retries": job.auto_retries})

    async def delete(self, job_id: str) -> bool:
        """Mark the job ``deleted`` (:attr:`~..jobs.Intent.DELETE`: any state but
        ``deleted``), stop its child if it runs, and remove its files. Returns False for an
        unknown or already deleted job."""
        if not await self.store.apply(job_id, Intent.DELETE):
            return False
        await self._abort_task(job_id, "deleted")
        await remove_job_files(self.settings, job_id)  # folder and bucket objects
        return True

    async def _abort_task(self, job_id: str, reason: str) -> None:
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            self._cancel_reasons[task] = reason
            task.cancel()  # run_stage stops the child's group (SIGTERM, SIGKILL after 3 s)
            await asyncio.wait({task}, timeout=ABORT_WAIT_S)

    # ---- housekeeping -----------------------------------------------------------------------
    def start_housekeeping(self) -> None:
        """Run :meth:`housekeeping` every ``HOUSEKEEPING_INTERVAL_S`` in the background."""
        self._housekeeping_task = asyncio.create_task(
            self._housekeeper.loop(lambda: self._stopping), name="housekeeping")

    async def housekeeping(self, *, startup: bool) -> SweepCounts:
        """One retention and orphan sweep (:meth:`.housekeeping.Housekeeper.run`); jobs
        running here are never touched."""
        return await self._housekeeper.run(startup=startup)

    # ---- scheduling -------------------------------------------------------------------------
    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await self._claim_jobs()
            except Exception:  # store hiccup: log, retry on the next tick
                log.exception("scheduling failed")
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL_S)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _claim_jobs(self) -> None:
        """Claim pending jobs while a worker slot is free."""
        while not self._draining and len(self._tasks) < self.settings.max_concurrent_jobs:
            job = await self.store.claim_next_pending()
            if job is None:
                return
            previous = self._tasks.get(job.job_id)
            task = asyncio.create_task(self._run_job(job, previous), name=f"job-{job.job_id}")
            self._tasks[job.job_id] = task
            task.add_done_callback(functools.partial(self._job_done, job.job_id))

    def _job_done(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._cancel_reasons.pop(task, None)
        if self._tasks.get(job_id) is task:  # not a newer run's task of the same job
            del self._tasks[job_id]
            self._pgids.pop(job_id, None)
        self._wake.set()

    async def _run_job(self, job: Job, previous: asyncio.Task[None] | None) -> None:
        """Run one claimed job to an end (:class:`.attempt.JobRun`); on cancellation, record
        why (operator cancel/delete, or shutdown: back to ``pending``)."""
        if previous is not None and not previous.done():  # a stopped run still unwinding
            await asyncio.wait({previous})
        run = JobRun(self._ctx, job)
        try:
            await run.run()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            reason = self._cancel_reasons.get(task) if task is not None else None
            await run.stopped(reason)
            if reason and not self._stopping:
                return  # cancelled or deleted by an operator: this task ends normally
            raise

    @asynccontextmanager
    async def _gpu_slot(self, stage: str) -> AsyncIterator[None]:
        """One of ``MAX_GPU_JOBS`` slots around a GPU stage when the GPU is used; nothing for
        the other stages."""
        if stage not in GPU_STAGES or not self.gpu_enabled:
            yield
            return
        async with self._gpu_sem:
            self.active_gpu_jobs += 1
            try:
                yield
            finally:
                self.active_gpu_jobs -= 1

    def _track_child(self, job_id: str, pgid: int | None) -> None:
        if pgid is None:
            self._pgids.pop(job_id, None)
        else:
            self._pgids[job_id] = pgid
