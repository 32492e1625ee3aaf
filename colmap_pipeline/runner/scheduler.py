"""JobRunner: takes pending jobs from the store and runs their stages as child processes.

Started and stopped by the app's lifespan. At most ``MAX_CONCURRENT_JOBS`` jobs run at once;
GPU stages (when a GPU is in use) also take one of ``MAX_GPU_JOBS`` slots, held by this
process around the stage's child, so a dead child frees its slot as soon as it is reaped.
Progress events from the children are written to the job row (never backwards).

Job lifecycle (issue 5): a job resumes from its first stage without a checkpoint (at boot,
after a retry, after an automatic retry); the process group of each stage child is stored in
the row so that a restarted server kills a child that outlived it; cancel/retry/delete are
compare-and-set transitions followed by stopping the child; transient failures are retried
automatically (a child killed by an outside signal once; storage/database errors with bounded
exponential backoff and full jitter); graceful drain on shutdown; retention and orphan sweeps.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import shutil
import signal
import sqlite3
import time
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import ERROR_CATALOG
from ..layout import DataDir, Workspace, next_stage, prepare_workspace
from ..protocol import GPU_STAGES, STAGE_NAMES, STAGES, overall_progress
from .executor import (
    StageOutcome,
    describe_exit,
    kill_process_group,
    kill_recorded_group,
    run_stage,
)

log = logging.getLogger("colmap_worker.runner")

#: seconds between polls of the store when nothing woke the runner
POLL_INTERVAL_S = 2.0
#: signals that end a stage child from outside (OOM killer, operator); retried once
OUTSIDE_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                             signal.SIGQUIT})
#: exception names a stage child reports that mean storage trouble (retried with backoff)
STORAGE_EXCEPTIONS = frozenset({"OSError", "IOError", "DatabaseError", "OperationalError"})
#: automatic retries after database/storage errors, and the backoff bounds (s)
STORAGE_RETRIES = 3
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 30.0
#: statuses a job can be deleted from
JOB_STATUSES_LIVE = ("pending", "processing", "completed", "failed", "cancelled", "expired")


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


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (blocking: call in a thread)."""
    return shutil.disk_usage(path).free


def sweep_orphans(data_dir: DataDir, keep: set[str], min_age_s: float) -> tuple[int, int]:
    """Remove ``DATA_DIR/jobs/<id>`` folders whose id is not in ``keep`` and files in
    ``DATA_DIR/uploads`` (partial uploads), each only if untouched for ``min_age_s`` seconds.
    Blocking: call in a thread. Returns ``(folders removed, uploads removed)``."""
    now = time.time()
    orphans = uploads = 0
    jobs = data_dir.jobs
    for d in (jobs.iterdir() if jobs.is_dir() else ()):
        try:
            old = now - d.stat().st_mtime >= min_age_s
        except OSError:
            continue
        if d.name not in keep and old:
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
            orphans += 1
    up = data_dir.uploads
    for f in (up.iterdir() if up.is_dir() else ()):
        try:
            if f.is_file() and now - f.stat().st_mtime >= min_age_s:
                f.unlink(missing_ok=True)
                uploads += 1
        except OSError:
            continue
    return orphans, uploads


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class JobRunner:
    """Runs jobs from a :class:`database.JobStore`.

    Args:
        store: the job store (any object with the JobStore methods).
        settings: service settings.
        gpu_enabled: GPU stages run on CUDA (probed at start-up).
    """

    def __init__(self, store: Any, settings: Settings, *, gpu_enabled: bool) -> None:
        self.store = store
        self.settings = settings
        self.data = DataDir(settings.data_dir)
        self.gpu_enabled = gpu_enabled
        self.max_gpu_jobs = settings.max_gpu_jobs
        self.active_gpu_jobs = 0
        self._gpu_sem = asyncio.Semaphore(settings.max_gpu_jobs)
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}
        self._pgids: dict[str, int] = {}
        self._loop_task: asyncio.Task | None = None
        self._housekeeping_task: asyncio.Task | None = None
        self._cancel_reasons: dict[str, str] = {}
        self._stopping = False
        self._draining = False

    @property
    def active_jobs(self) -> int:
        """Jobs being processed by this runner now."""
        return len(self._tasks)

    @property
    def running(self) -> bool:
        """The scheduling loop is alive."""
        return self._loop_task is not None and not self._loop_task.done()

    async def start(self) -> None:
        """Recover from a previous server, then start scheduling.

        Kills every stage child's process group the previous server recorded (if it is still
        a pipeline child of that job's workspace), then sends jobs it left ``processing`` back
        to ``pending``; they resume from their first unfinished stage.
        """
        await self.recover()
        self._loop_task = asyncio.create_task(self._loop(), name="job-runner")

    async def recover(self) -> list[str]:
        """Kill recorded process groups and requeue jobs left ``processing``; returns their ids."""
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
        """Tell the loop a job may be waiting (called after an upload)."""
        self._wake.set()

    @property
    def draining(self) -> bool:
        """True once :meth:`drain` began: no new job or stage starts."""
        return self._draining

    async def drain(self, grace_s: float) -> None:
        """Graceful shutdown, step 1: start no new job or stage; give running stages
        ``grace_s`` seconds to finish (each then stops at its checkpoint and goes back to
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
        if self._loop_task:
            self._loop_task.cancel()
        if self._housekeeping_task:
            self._housekeeping_task.cancel()
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for t in (self._loop_task, self._housekeeping_task):
            if t:
                await asyncio.gather(t, return_exceptions=True)

    # ---- operator actions -------------------------------------------------------------------
    async def cancel(self, job_id: str) -> bool:
        """Cancel a ``pending`` or ``processing`` job: the row becomes ``cancelled`` (CAS),
        then the stage child's group is stopped and its GPU slot freed before this returns.
        The workspace stays (a retry reuses its checkpoints). Returns False when the job was
        in another state."""
        ok = await self.store.transition(job_id, ["pending", "processing"], "cancelled",
                                         finished_at=_now(), message="Cancelled by request")
        if ok:
            await self._abort_task(job_id, "cancelled")
            log.info("job %s cancelled", job_id)
        return ok

    async def retry(self, job_id: str) -> bool:
        """Queue a ``failed`` or ``cancelled`` job again; it resumes from its first stage
        without a valid checkpoint. Returns False when the job was in another state."""
        task = self._tasks.get(job_id)
        if task is not None:  # a cancelled attempt still unwinding
            await asyncio.wait({task}, timeout=10)
        ok = await self.store.requeue_for_retry(job_id, ["failed", "cancelled"],
                                                "Queued for retry")
        if ok:
            self.wake()
        return ok

    async def delete(self, job_id: str) -> bool:
        """Mark the job ``deleted`` (any state but ``deleted``), stop its child if it runs,
        and remove its files. Returns False for an unknown or already deleted job."""
        row = await self.store.get_job(job_id)
        if row is None or row["status"] == "deleted":
            return False
        ok = await self.store.transition(
            job_id, [s for s in JOB_STATUSES_LIVE], "deleted", finished_at=row.get(
                "finished_at") or _now(), idempotency_key=None, message="Deleted by request")
        if not ok:
            return False
        await self._abort_task(job_id, "deleted")
        await asyncio.to_thread(shutil.rmtree, self.data.job(job_id).root, True)
        return True

    async def _abort_task(self, job_id: str, reason: str) -> None:
        task = self._tasks.get(job_id)
        if task is not None and not task.done():
            self._cancel_reasons[job_id] = reason
            task.cancel()  # run_stage stops the child's group (SIGTERM, SIGKILL after 3 s)
            await asyncio.wait({task}, timeout=10)

    # ---- housekeeping -----------------------------------------------------------------------
    def start_housekeeping(self) -> None:
        """Run :meth:`housekeeping` every ``HOUSEKEEPING_INTERVAL_S`` in the background."""
        async def loop() -> None:
            while not self._stopping:
                await asyncio.sleep(self.settings.housekeeping_interval_s)
                try:
                    await self.housekeeping(startup=False)
                except Exception:  # noqa: BLE001 - keep sweeping next time
                    log.exception("housekeeping failed")
        self._housekeeping_task = asyncio.create_task(loop(), name="housekeeping")

    async def housekeeping(self, *, startup: bool) -> dict[str, int]:
        """Retention and orphan sweep.

        - jobs ``completed``/``failed``/``cancelled`` whose ``finished_at`` is older than
          ``RETENTION_HOURS`` become ``expired`` (row kept) and their folder is removed;
        - job folders without a live row and partial uploads are removed: all of them at
          start-up (no request is in flight), those untouched for ``HOUSEKEEPING_INTERVAL_S``
          (at least 1 h) later, so an upload being moved into place is never swept.

        Returns counts ``{"expired", "orphans", "uploads"}``.
        """
        counts = {"expired": 0, "orphans": 0, "uploads": 0}
        if self.settings.retention_hours > 0:
            cutoff = (datetime.now(UTC)
                      - timedelta(hours=self.settings.retention_hours)).isoformat(
                          timespec="microseconds")
            for job_id in await self.store.finished_before(cutoff):
                if job_id in self._tasks:
                    continue
                if await self.store.transition(job_id, ["completed", "failed", "cancelled"],
                                               "expired", message="Files removed by retention"):
                    await asyncio.to_thread(shutil.rmtree, self.data.job(job_id).root, True)
                    counts["expired"] += 1
        min_age = 0.0 if startup else max(3600.0, self.settings.housekeeping_interval_s)
        keep = await self.store.job_ids_with_files()
        orphans, uploads = await asyncio.to_thread(
            sweep_orphans, self.data, keep | set(self._tasks), min_age)
        counts["orphans"], counts["uploads"] = orphans, uploads
        if any(counts.values()):
            log.warning("housekeeping: %s", counts)
        return counts

    # ---- scheduling -------------------------------------------------------------------------
    async def _loop(self) -> None:
        while not self._stopping:
            try:
                while (not self._draining
                       and len(self._tasks) < self.settings.max_concurrent_jobs):
                    job = await self.store.claim_next_pending()
                    if job is None:
                        break
                    task = asyncio.create_task(self._run_job(job), name=f"job-{job['job_id']}")
                    self._tasks[job["job_id"]] = task
                    task.add_done_callback(lambda _t, jid=job["job_id"]: self._job_done(jid))
            except Exception:  # database hiccup: log, retry on the next tick
                log.exception("scheduling failed")
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL_S)
            except TimeoutError:
                pass
            self._wake.clear()

    def _job_done(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._pgids.pop(job_id, None)
        self._cancel_reasons.pop(job_id, None)
        self._wake.set()

    async def _run_job(self, job: dict) -> None:
        """Run one claimed job to an end: completed, failed, cancelled, or back to pending
        (shutdown). Automatic retries happen in place, each recorded as an attempt."""
        job_id = job["job_id"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.job_timeout_s
        started = time.monotonic()
        attempt = {"n": job.get("attempt", 1), "started_at": job.get("started_at")}
        signal_retries = 0
        storage_failures = 0
        while True:
            timings: dict[str, float] = {}
            info: dict[str, Any] = {}
            try:
                kind, stage, outcome = await self._attempt(job, deadline, timings, info)
                if kind == "completed":
                    rec = await self._attempt_record(job_id, attempt, timings, "completed",
                                                     None, info)
                    await self._complete(job_id, started, rec)
                    return
                if kind in ("gone", "drained"):
                    if kind == "drained":
                        await self.store.transition(
                            job_id, ["processing"], "pending", current_stage="Queued",
                            message=f"Paused by a server shutdown; resumes at "
                                    f"{STAGE_NAMES[stage]}")
                    await self._record_attempt(job_id, attempt, timings,
                                               "interrupted" if kind == "drained" else "stopped",
                                               stage, info)
                    return
                if outcome is None or stage is None:
                    raise RuntimeError(f"attempt ended {kind!r} without a stage outcome")
                retry = self._transient(outcome)
                if retry == "outside_signal" and signal_retries < 1 and not self._draining:
                    signal_retries += 1
                    await self._record_attempt(job_id, attempt, timings, "retrying", stage,
                                               info, retry=retry, error_code="pipeline_crashed",
                                               detail=describe_exit(outcome.returncode))
                    log.warning("job %s: %s child killed by %s from outside; retrying once",
                                job_id, stage, describe_exit(outcome.returncode))
                    await self._next_attempt(job_id, attempt)
                    continue
                if retry == "storage":
                    raise StorageFailure(f"{stage}: {(outcome.error or {}).get('code')} "
                                         f"{(outcome.error or {}).get('details')}")
                await self._fail(job_id, stage, outcome)
                await self._record_attempt(job_id, attempt, timings, "failed", stage, info)
                return
            except asyncio.CancelledError:
                reason = self._cancel_reasons.get(job_id)
                await self._after_cancel(job_id, attempt, timings, info, reason)
                if reason and not self._stopping:
                    return  # cancelled or deleted by an operator: this task ends normally
                raise
            except (sqlite3.Error, OSError, StorageFailure) as exc:
                storage_failures += 1
                code = "insufficient_storage" if isinstance(exc, DiskFull) else "storage_error"
                if storage_failures > STORAGE_RETRIES or loop.time() >= deadline:
                    log.error("job %s: giving up after %d storage error(s): %s", job_id,
                              storage_failures, exc)
                    await self._guarded(self._set_failed(job_id, code, str(exc), None))
                    await self._guarded(self._record_attempt(
                        job_id, attempt, timings, "failed", info.get("stage"), info))
                    return
                delay = backoff_delay(storage_failures)
                log.warning("job %s: storage error (%s); retry %d/%d in %.1f s", job_id, exc,
                            storage_failures, STORAGE_RETRIES, delay)
                await self._guarded(self._record_attempt(
                    job_id, attempt, timings, "retrying", info.get("stage"), info,
                    retry="storage", error_code=code, detail=str(exc)[:300]))
                await asyncio.sleep(delay)
                await self._guarded(self._next_attempt(job_id, attempt))
            except Exception as exc:  # our own bug: fail the job, keep serving
                log.exception("job %s failed in the runner", job_id)
                await self._guarded(self._set_failed(job_id, "pipeline_error",
                                                     f"Runner error: {exc}", None))
                return

    async def _guarded(self, coro: Awaitable[Any]) -> None:
        """Await ``coro``, logging (not raising) a database/storage error."""
        try:
            await coro
        except (sqlite3.Error, OSError) as exc:
            log.error("bookkeeping failed: %s", exc)

    async def _next_attempt(self, job_id: str, attempt: dict) -> None:
        n = await self.store.bump_attempt(job_id, auto_retry=True)
        attempt["n"], attempt["started_at"] = n or attempt["n"] + 1, _now()

    async def _after_cancel(self, job_id: str, attempt: dict, timings: dict, info: dict,
                            reason: str | None) -> None:
        """Bookkeeping when the job task is cancelled (operator cancel/delete or shutdown)."""
        outcome = reason or "interrupted"
        stage = info.get("stage")
        try:
            await asyncio.shield(self._bookkeep_cancel(job_id, attempt, timings, info, outcome,
                                                       stage, reason))
        except (asyncio.CancelledError, sqlite3.Error, OSError, ValueError) as exc:
            log.error("job %s: could not record the %s attempt: %s", job_id, outcome, exc)

    async def _bookkeep_cancel(self, job_id, attempt, timings, info, outcome, stage, reason):
        await self.store.set_pgid(job_id, None)
        if reason is None:  # shutdown: back to pending, resumes at its first unfinished stage
            where = f" at {STAGE_NAMES[stage]}" if stage else ""
            await self.store.transition(
                job_id, ["processing"], "pending", current_stage="Queued",
                message=f"Interrupted by a server shutdown; resumes{where}")
        await self._record_attempt(job_id, attempt, timings, outcome, stage, info)

    @staticmethod
    def _transient(outcome: StageOutcome) -> str | None:
        """``"outside_signal"``, ``"storage"`` or ``None`` (never retried) for a failed stage.

        A stage child is never signalled by this runner without the job task being cancelled
        or timed out, so a child ended by SIGKILL/SIGTERM/SIGINT/SIGHUP/SIGQUIT was killed from
        outside (OOM killer, operator). SIGABRT/SIGSEGV come from the child itself (pycolmap
        crash): retrying would crash again. Timeouts and pipeline error codes (invalid input,
        failed reconstruction) are never retried; ``workspace_busy`` and an ``OSError`` in
        the child are storage errors.
        """
        if outcome.timed_out:
            return None
        if outcome.returncode < 0:
            return "outside_signal" if -outcome.returncode in OUTSIDE_SIGNALS else None
        err = outcome.error or {}
        if err.get("code") == "workspace_busy":
            return "storage"
        if (err.get("code") == "pipeline_error"
                and (err.get("details") or {}).get("exception") in STORAGE_EXCEPTIONS):
            return "storage"
        return None

    async def _attempt(self, job: dict, deadline: float, timings: dict[str, float],
                       info: dict[str, Any]) -> tuple[str, str | None, StageOutcome | None]:
        """Run the job's unfinished stages once. Returns ``(kind, stage, outcome)``, kind one
        of ``completed``, ``failed`` (stage + outcome), ``drained`` (shutdown between stages),
        ``gone`` (cancelled/deleted meanwhile)."""
        job_id = job["job_id"]
        ws = self.data.job(job_id).work.root
        preset = self.settings.preset(job["quality"])
        await asyncio.to_thread(prepare_workspace, ws, job["input_path"], preset,
                                use_gpu=self.gpu_enabled, test_fault=self.settings.test_fault,
                                random_seed=self.settings.pipeline_random_seed)
        first = await asyncio.to_thread(next_stage, ws)
        todo = STAGES[STAGES.index(first):] if first else ()
        info["resumed_from"] = first
        info["skipped_stages"] = [s for s in STAGES if s not in todo]
        for stage in todo:
            info["stage"] = stage
            row = await self.store.get_job(job_id)
            if row is None or row["status"] != "processing":
                return "gone", stage, None
            if self._draining:
                return "drained", stage, None
            await self._check_disk()
            t0 = time.monotonic()
            outcome = await self._run_stage(job_id, stage, ws, deadline)
            timings[stage] = round(time.monotonic() - t0, 3)
            if not outcome.ok:
                return "failed", stage, outcome
        info["stage"] = None
        return "completed", None, None

    async def _check_disk(self) -> None:
        free = await asyncio.to_thread(free_disk_bytes, Path(self.settings.data_dir))
        if free < self.settings.min_free_disk_bytes:
            raise DiskFull(f"only {free} bytes free in DATA_DIR; MIN_FREE_DISK_BYTES is "
                           f"{self.settings.min_free_disk_bytes}")

    async def _complete(self, job_id: str, started: float, attempt_record: dict) -> None:
        """Store the results and the completed attempt's record with the ``completed`` status,
        in one statement (a client polling never sees ``completed`` without its attempt)."""
        ws = self.data.job(job_id).work.root
        result = await asyncio.to_thread(_read_json, Workspace(ws).result_json)
        for art in result.get("artifacts", []):
            art["url"] = f"/jobs/{job_id}/artifacts/{art['name']}"
        result["job_wall_time_s"] = round(time.monotonic() - started, 3)
        await self.store.update_progress(job_id, 100, "Completed", "Reconstruction complete")
        await self.store.transition(
            job_id, ["processing"], "completed", attempt_record=attempt_record,
            results=result, progress=100,
            current_stage="Completed", finished_at=_now(),
            message=(f"Registered {result.get('registered_images')} of "
                     f"{result.get('frames_used') or result.get('frames_extracted')} frames; "
                     f"{result.get('points3d')} 3D points"))
        log.info("job %s completed in %.1f s", job_id, time.monotonic() - started)

    async def _record_attempt(self, job_id: str, attempt: dict, timings: dict[str, float],
                              outcome: str, failed_stage: str | None, info: dict | None = None,
                              *, retry: str | None = None, error_code: str | None = None,
                              detail: str | None = None) -> None:
        """Append one attempt record (:meth:`_attempt_record`) to the job row."""
        await self.store.append_attempt(job_id, await self._attempt_record(
            job_id, attempt, timings, outcome, failed_stage, info, retry=retry,
            error_code=error_code, detail=detail))

    async def _attempt_record(self, job_id: str, attempt: dict, timings: dict[str, float],
                              outcome: str, failed_stage: str | None, info: dict | None = None,
                              *, retry: str | None = None, error_code: str | None = None,
                              detail: str | None = None) -> dict:
        """One attempt record::

            {"attempt", "outcome", "failed_stage", "error_code", "started_at", "finished_at",
             "stage_wall_s", "resumed_from", "skipped_stages", "retry"?, "detail"?}

        ``outcome`` is completed | failed | retrying | cancelled | deleted | interrupted |
        stopped; ``stage_wall_s`` is the wall time (s) of each stage child run in this attempt,
        start-up included (stages reused from checkpoints are in ``skipped_stages``).
        """
        if error_code is None and outcome == "failed":
            row = await self.store.get_job(job_id)
            error_code = (row or {}).get("error_code")
        rec = {"attempt": attempt["n"], "outcome": outcome, "failed_stage": failed_stage,
               "error_code": error_code, "started_at": attempt["started_at"],
               "finished_at": _now(), "stage_wall_s": dict(timings),
               "resumed_from": (info or {}).get("resumed_from"),
               "skipped_stages": (info or {}).get("skipped_stages", [])}
        if retry:
            rec["retry"] = retry
        if detail:
            rec["detail"] = detail
        return rec

    async def _run_stage(self, job_id: str, stage: str, ws: Path, deadline: float) -> StageOutcome:
        name = STAGE_NAMES[stage]
        await self.store.update_progress(job_id, overall_progress(stage, 0.0), name,
                                         f"{name} started")
        last = [-1, ""]

        async def on_progress(fraction: float, message: str) -> None:
            pct = overall_progress(stage, fraction)
            if pct != last[0] or message != last[1]:
                last[0], last[1] = pct, message
                await self.store.update_progress(job_id, pct, name, message or name)

        async def on_spawn(pid: int) -> None:
            self._pgids[job_id] = pid
            await self.store.set_pgid(job_id, pid)  # a restarted server kills it if it lives

        kwargs = dict(on_progress=on_progress, deadline=deadline, nice=self.settings.child_nice,
                      on_spawn=on_spawn)
        try:
            if stage in GPU_STAGES and self.gpu_enabled:
                async with self._gpu_sem:
                    self.active_gpu_jobs += 1
                    try:
                        return await run_stage(stage, ws, **kwargs)
                    finally:
                        self.active_gpu_jobs -= 1
            return await run_stage(stage, ws, **kwargs)
        finally:
            self._pgids.pop(job_id, None)
            if not asyncio.current_task().cancelling():
                await self.store.set_pgid(job_id, None)

    async def _fail(self, job_id: str, stage: str, outcome: StageOutcome) -> None:
        name = STAGE_NAMES[stage]
        if outcome.timed_out:
            code = "job_timeout"
            msg = (f"The job exceeded JOB_TIMEOUT_S={self.settings.job_timeout_s:.0f} s "
                   f"during {name}.")
            hint = None
        elif outcome.error and outcome.returncode in (2, 3):
            code = outcome.error.get("code") or "pipeline_error"
            msg, hint = outcome.error.get("message"), outcome.error.get("hint")
        elif outcome.returncode < 0:
            code = "pipeline_crashed"
            msg = (f"The {name} process was killed by {describe_exit(outcome.returncode)}.")
            hint = None
        else:
            code = "pipeline_error"
            detail = (outcome.error or {}).get("message")
            msg = (f"The {name} process ended with {describe_exit(outcome.returncode)}"
                   + (f": {detail}" if detail else "."))
            hint = None
        if code not in ERROR_CATALOG:
            code = "pipeline_error"
        log.warning("job %s failed at %s: %s (%s)", job_id, stage, code, msg)
        await self._set_failed(job_id, code, msg, hint, stage=name)

    async def _set_failed(self, job_id: str, code: str, message: str | None, hint: str | None,
                          stage: str | None = None) -> None:
        _, default_msg, default_hint = ERROR_CATALOG[code]
        fields: dict[str, Any] = dict(
            error_code=code, error_message=message or default_msg,
            error_hint=hint or default_hint, finished_at=_now(),
            message=message or default_msg)
        if stage:
            fields["current_stage"] = stage
        await self.store.transition(job_id, ["processing"], "failed", **fields)

    def kill_all(self) -> None:
        """SIGKILL every child process group this runner started (last resort at exit)."""
        for pgid in list(self._pgids.values()):
            kill_process_group(pgid)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")
