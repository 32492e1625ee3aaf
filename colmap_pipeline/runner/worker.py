"""QueueRunner: the job runner of PostgreSQL mode, one per replica, fed by procrastinate.

Each replica runs two procrastinate workers inside the server process (started by the app's
lifespan, ``app.run_worker_async`` with ``install_signal_handlers=False``: uvicorn keeps
SIGTERM):

- the *job worker* on :data:`.queue.QUEUE_JOBS` with ``MAX_CONCURRENT_JOBS`` slots. Its task
  (:meth:`QueueRunner._run_ticket`) claims the named job row (``Intent.CLAIM`` on that
  ``job_id``: nothing runs when the job was cancelled or deleted meanwhile) and runs it through
  :class:`.attempt.JobRun`, the same stage children as embedded mode (PDEATHSIG, process
  groups, this replica's ``MAX_GPU_JOBS`` slots), progress written to the row;
- the *sweep worker* on :data:`.queue.QUEUE_SWEEPS` (one slot) running the periodic sweep
  every ``QUEUE_SWEEP_INTERVAL_S`` (a procrastinate periodic task with a queueing lock, so at
  most one sweep waits whatever the number of replicas): tickets of workers whose heartbeat
  (every ``QUEUE_HEARTBEAT_INTERVAL_S``) is older than ``QUEUE_STALL_TIMEOUT_S`` are retired
  and their jobs requeued under the lost-replica policy (:mod:`.stalls`); ``pending`` rows
  without a ticket get one (a safety net; the store queues tickets in its own transactions).

Cancel and delete (from any replica) move the row, then abort the job's ticket
(:meth:`.queue.JobQueue.abort`): the worker that owns it is told by NOTIFY and cancels the
task, whose stage child's process group gets SIGTERM and SIGKILL after ``KILL_GRACE_S`` (3 s).
SIGTERM drain: the job worker stops fetching, running jobs stop at their next stage boundary
(or are stopped after ``SHUTDOWN_GRACE_S``) and go back to ``pending`` with a new ticket,
resumable on any replica. Operator actions, GPU slots, housekeeping: :class:`.scheduler.JobRunner`.
Both workers are :class:`.resilient_worker.ResilientWorker` (a lost database pauses them; it
does not stop them), and a worker that ends anyway is started again.

Timings (seconds): heartbeat ``QUEUE_HEARTBEAT_INTERVAL_S`` = 5 (also the fallback poll for new
tickets and aborts; NOTIFY is the fast path), stall timeout ``QUEUE_STALL_TIMEOUT_S`` = 30 (six
missed heartbeats), sweep ``QUEUE_SWEEP_INTERVAL_S`` = 5: a dead replica's job is requeued
30-35 s after its last heartbeat (25-35 s after the death). A draining replica keeps
heartbeating (:meth:`QueueRunner._drain_heartbeat`), so ``SHUTDOWN_GRACE_S`` may exceed the
stall timeout.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
from typing import Any, cast

from procrastinate import JobContext

from ..config import Settings
from ..jobs import Intent, Job, JobStatus, JobStore
from .attempt import GONE_OUTCOMES, JobRun, StageRunner
from .executor import run_stage as run_stage_child
from .queue import (
    QUEUE_JOBS,
    QUEUE_SWEEPS,
    SWEEP_LOCK,
    TASK_RUN,
    TASK_SWEEP,
    TASK_WEBHOOKS,
    WEBHOOKS_LOCK,
    JobQueue,
    ensure_schema,
    make_defer_on,
    new_app,
)
from .queued_store import QueuedStore, TransactionalStore
from .resilient_worker import ResilientWorker
from .scheduler import ABORT_WAIT_S, JobRunner
from .stalls import requeue_stalled
from .webhooks import WebhookDispatcher

log = logging.getLogger("colmap_worker.queue")

#: seconds between checks that an aborted ticket on another replica has stopped
ABORT_POLL_S = 0.2
#: seconds before a job worker that ended on its own (lost database) is started again
WORKER_RESTART_S = 2.0
#: pending rows the sweep checks for a missing ticket per run
RECONCILE_LIMIT = 200


class QueueRunner(JobRunner):
    """Runs this replica's share of the queue (module docstring).

    Args:
        store: the queued PostgreSQL job store (it queues a ticket with every pending job).
        settings: service settings (``MAX_CONCURRENT_JOBS``, ``QUEUE_*``).
        gpu_enabled: GPU stages run on CUDA (probed at start-up).
        queue: the opened :class:`.queue.JobQueue`.
        stage_runner: runs one stage child (tests pass a fake).
    """

    def __init__(self, store: JobStore, settings: Settings, *, gpu_enabled: bool,
                 queue: JobQueue, stage_runner: StageRunner = run_stage_child) -> None:
        super().__init__(store, settings, gpu_enabled=gpu_enabled, stage_runner=stage_runner)
        self.queue = queue
        self._workers: list[asyncio.Task[None]] = []
        #: the procrastinate workers by name ("jobs", "sweeps")
        self._pworkers: dict[str, ResilientWorker] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        app = queue.app
        app.task(name=TASK_RUN, queue=QUEUE_JOBS, pass_context=True)(self._run_ticket)
        sweep = app.task(name=TASK_SWEEP, queue=QUEUE_SWEEPS, queueing_lock=SWEEP_LOCK)(
            self._sweep)
        app.periodic(cron=f"*/{settings.queue_sweep_interval_s} * * * * *",
                     queueing_lock=SWEEP_LOCK)(sweep)
        #: the webhook dispatcher whose passes run as queue tasks (:meth:`deliver_webhooks`)
        self.webhooks: WebhookDispatcher | None = None

    def deliver_webhooks(self, dispatcher: WebhookDispatcher) -> None:
        """Run ``dispatcher``'s passes through the queue (issue 16): procrastinate periodic
        task :data:`.queue.TASK_WEBHOOKS` every second on the sweep queue, with a queueing
        lock, so at most one pass waits whatever the replicas, and whichever replica's sweep
        worker is free runs it (an API-only replica too). Each pass claims the due outbox rows
        with the store's compare-and-set, as the embedded loop does. Call before
        :meth:`start`; the dispatcher's own loop is then not started.
        """
        self.webhooks = dispatcher
        app = self.queue.app
        task = app.task(name=TASK_WEBHOOKS, queue=QUEUE_SWEEPS, queueing_lock=WEBHOOKS_LOCK)(
            self._webhook_pass)
        app.periodic(cron="* * * * * *", queueing_lock=WEBHOOKS_LOCK)(task)

    async def _webhook_pass(self, timestamp: int) -> None:
        """procrastinate periodic task :data:`.queue.TASK_WEBHOOKS` (``timestamp``: the tick):
        one pass of the dispatcher over the due deliveries."""
        if self.webhooks is not None and not self._draining:
            made = await self.webhooks.run_once()
            if made:
                log.debug("webhook pass at %d: %d tries", timestamp, made)

    @property
    def running(self) -> bool:
        """Both procrastinate workers are alive."""
        return bool(self._workers) and all(not t.done() for t in self._workers)

    # ---- start, drain, stop -----------------------------------------------------------------
    async def start(self) -> None:
        """Start the job and sweep workers. Unlike embedded mode, nothing is requeued here:
        jobs of a dead replica come back through the stall sweep, never by a boot that
        cannot know whether their replica still lives."""
        s = self.settings
        common: dict[str, Any] = {
            "install_signal_handlers": False, "listen_notify": True,
            "update_heartbeat_interval": s.queue_heartbeat_interval_s,
            "stalled_worker_timeout": s.queue_stall_timeout_s,
            "fetch_job_polling_interval": s.queue_heartbeat_interval_s,
            "abort_job_polling_interval": s.queue_heartbeat_interval_s}
        jobs = {"queues": [QUEUE_JOBS], "name": "jobs", "concurrency": s.max_concurrent_jobs,
                **common}
        sweeps = {"queues": [QUEUE_SWEEPS], "name": "sweeps", "concurrency": 1,
                  "delete_jobs": "successful", **common}  # no row left per sweep
        if log.getEffectiveLevel() > logging.DEBUG:  # procrastinate logs each job at INFO
            logging.getLogger("procrastinate").setLevel(logging.WARNING)
        self._workers = [asyncio.create_task(self._supervise(sweeps), name="queue-sweeps")]
        if s.max_concurrent_jobs > 0:  # 0: an API-only replica takes no job ticket
            self._workers.append(asyncio.create_task(self._supervise(jobs), name="queue-jobs"))

    async def _supervise(self, options: dict[str, Any]) -> None:
        """Run a procrastinate worker until drain/stop; start it again when it ends on its
        own (a side task failed, e.g. the database went away)."""
        while not self._draining:
            worker = ResilientWorker(self.queue.app, **options)
            self._pworkers[options["name"]] = worker
            try:
                await worker.run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("procrastinate worker %s stopped", options["name"])
            if not self._draining:
                await asyncio.sleep(WORKER_RESTART_S)

    async def drain(self, grace_s: float) -> None:
        """Stop fetching tickets at once (the job worker stops; the sweep keeps running), then
        give running stages ``grace_s`` (see :meth:`.scheduler.JobRunner.drain`).

        A stopping procrastinate worker stops its heartbeat before it waits for its jobs;
        :meth:`_drain_heartbeat` keeps it beating meanwhile, so no other replica takes these
        jobs for stalled while they finish their stage here."""
        self._draining = True
        worker = self._pworkers.get("jobs")
        if worker is not None:
            worker.stop()
            self._heartbeat = asyncio.create_task(self._drain_heartbeat(worker),
                                                  name="drain-heartbeat")
        await super().drain(grace_s)

    async def _drain_heartbeat(self, worker: ResilientWorker) -> None:
        while worker.worker_id is not None:
            try:
                await self.queue.app.job_manager.update_heartbeat(worker.worker_id)
            except Exception:  # the database is away: the next beat may get through
                log.warning("drain heartbeat failed", exc_info=True)
            await asyncio.sleep(self.settings.queue_heartbeat_interval_s)

    async def stop(self, grace_s: float = 0.0) -> None:
        """Drain, stop what still runs (its jobs go back to ``pending`` with a new ticket),
        then stop both workers (they unregister, so no heartbeat is left behind)."""
        await super().stop(grace_s)
        for w in self._pworkers.values():
            w.stop()
        if self._workers:
            _, late = await asyncio.wait(self._workers, timeout=ABORT_WAIT_S)
            for t in late:
                t.cancel()
            await asyncio.gather(*self._workers, return_exceptions=True)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        await self.queue.close()

    # ---- the job task -----------------------------------------------------------------------
    async def _run_ticket(self, context: JobContext, job_id: str) -> None:
        """procrastinate task :data:`.queue.TASK_RUN`: claim ``job_id`` and run it here."""
        if self._draining:  # fetched while the drain began: hand the ticket back
            await self.queue.defer(job_id)
            return
        if not await self.store.apply(job_id, Intent.CLAIM):
            log.info("ticket for job %s: the job is no longer pending; nothing to run", job_id)
            return
        job = await self.store.get_job(job_id)
        task = asyncio.current_task()
        if job is None or task is None:
            return
        self._tasks[job_id] = task
        try:
            await self._run_claimed(job)
        finally:
            if self._tasks.get(job_id) is task:
                del self._tasks[job_id]
                self._pgids.pop(job_id, None)
            self._cancel_reasons.pop(task, None)

    async def _run_claimed(self, job: Job) -> None:
        run = JobRun(self._ctx, job)
        try:
            await run.run()
        except asyncio.CancelledError:
            reason = await self._stop_reason(job.job_id)
            await run.stopped(reason)
            if reason == "deleted":  # deleted on another replica: this one's copy goes too
                await asyncio.shield(asyncio.to_thread(
                    shutil.rmtree, self.data.job(job.job_id).root, True))
            raise

    async def _stop_reason(self, job_id: str) -> str | None:
        """Why the job's task was cancelled: an operator here (``_cancel_reasons``) or on
        another replica (the row is ``cancelled``/``deleted`` already), else ``None``
        (shutdown or drain: the job goes back to ``pending``)."""
        task = asyncio.current_task()
        reason = self._cancel_reasons.get(task) if task is not None else None
        if reason is not None:
            return reason
        try:
            current = await asyncio.shield(self.store.get_job(job_id))
        except Exception:  # the store is gone: treat as a shutdown
            return None
        if current is not None and current.status in GONE_OUTCOMES:
            return GONE_OUTCOMES[JobStatus(current.status)]
        return None

    # ---- operator actions -------------------------------------------------------------------
    async def _abort_task(self, job_id: str, reason: str) -> None:
        """Abort the job's ticket wherever it runs (NOTIFY to its worker), stop the task here
        if it runs here, and wait up to :data:`.scheduler.ABORT_WAIT_S` for a ticket on
        another replica to end (its child is gone by then)."""
        try:
            await self.queue.abort(job_id)
        except Exception:  # the row has moved: the owner stops at its next stage anyway
            log.exception("job %s: could not abort its ticket", job_id)
        await super()._abort_task(job_id, reason)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ABORT_WAIT_S
        while loop.time() < deadline:
            try:
                if not await self.queue.running_elsewhere(job_id):
                    return
            except Exception:
                return
            await asyncio.sleep(ABORT_POLL_S)

    # ---- the periodic sweep -----------------------------------------------------------------
    async def _sweep(self, timestamp: int) -> None:
        """procrastinate periodic task :data:`.queue.TASK_SWEEP` (``timestamp``: the tick, s
        since the epoch): requeue the jobs of dead workers, and queue a ticket for every
        ``pending`` row that has none."""
        stall_s = self.settings.queue_stall_timeout_s
        for st in await self.queue.stalled(stall_s):
            if st.job_id is not None:
                await requeue_stalled(self.store, st.job_id, stall_s)  # + its new ticket
            await self.queue.retire(st.ticket_id)
        pending, _ = await self.store.list_jobs(status=JobStatus.PENDING.value,
                                                limit=RECONCILE_LIMIT)
        for job in pending:
            if not await self.queue.tickets(job.job_id) and await self.queue.defer(job.job_id):
                log.warning("job %s was pending without a ticket; queued one", job.job_id)


async def open_queue_mode(store: JobStore, settings: Settings, *, gpu_enabled: bool,
                          stage_runner: StageRunner = run_stage_child,
                          ) -> tuple[QueuedStore, QueueRunner]:
    """PostgreSQL mode's composition: install procrastinate's schema if missing, open the
    queue on ``DATABASE_URL``, and return the store every caller uses (:class:`.queued_store.
    QueuedStore`) with this replica's runner (not started yet).

    Raises: psycopg.Error / procrastinate's ConnectorException when the database cannot be
    reached; ValueError when ``DATABASE_URL`` is not set.
    """
    dsn = settings.database_url
    if not dsn:
        raise ValueError("PostgreSQL mode needs DATABASE_URL")
    await ensure_schema(dsn)
    queue = JobQueue(new_app(dsn))
    await queue.open()
    # database.open_store gave a PostgresJobStore (DATABASE_URL set): it takes in_transaction
    queued = QueuedStore(cast(TransactionalStore, store), queue, make_defer_on(queue.app))
    runner = QueueRunner(queued, settings, gpu_enabled=gpu_enabled, queue=queue,
                         stage_runner=stage_runner)
    return queued, runner
