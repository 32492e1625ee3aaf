"""JobRunner: takes pending jobs from the store and runs their stages as child processes.

Started and stopped by the app's lifespan. At most ``MAX_CONCURRENT_JOBS`` jobs run at once;
GPU stages (when a GPU is in use) also take one of ``MAX_GPU_JOBS`` slots, held by this
process around the stage's child, so a dead child frees its slot as soon as it is reaped.
Progress events from the children are written to the job row (never backwards).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import Settings
from .errors import ERROR_CATALOG
from .pipeline import write_job
from .executor import StageOutcome, describe_exit, kill_process_group, run_stage
from .stages import GPU_STAGES, STAGE_NAMES, STAGES, overall_progress

log = logging.getLogger("colmap_worker.runner")

#: seconds between polls of the store when nothing woke the runner
POLL_INTERVAL_S = 2.0


def job_dir(settings: Settings, job_id: str) -> Path:
    """``DATA_DIR/jobs/JOB_ID``: input, workspace and artifacts of one job."""
    return Path(settings.data_dir) / "jobs" / job_id


def workspace_dir(settings: Settings, job_id: str) -> Path:
    """The pipeline workspace of a job (``job_dir/work``)."""
    return job_dir(settings, job_id) / "work"


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
        self.gpu_enabled = gpu_enabled
        self.max_gpu_jobs = settings.max_gpu_jobs
        self.active_gpu_jobs = 0
        self._gpu_sem = asyncio.Semaphore(settings.max_gpu_jobs)
        self._wake = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}
        self._pgids: dict[str, int] = {}
        self._loop_task: asyncio.Task | None = None
        self._stopping = False

    @property
    def active_jobs(self) -> int:
        """Jobs being processed by this runner now."""
        return len(self._tasks)

    @property
    def running(self) -> bool:
        """The scheduling loop is alive."""
        return self._loop_task is not None and not self._loop_task.done()

    async def start(self) -> None:
        """Requeue jobs a dead server left ``processing``, then start scheduling."""
        requeued = await self.store.requeue_processing()
        if requeued:
            log.warning("requeued %d job(s) left processing: %s", len(requeued), requeued)
        self._loop_task = asyncio.create_task(self._loop(), name="job-runner")

    def wake(self) -> None:
        """Tell the loop a job may be waiting (called after an upload)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop scheduling and kill running children; their jobs stay ``processing`` and are
        requeued at the next start."""
        self._stopping = True
        self._wake.set()
        if self._loop_task:
            self._loop_task.cancel()
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._loop_task:
            await asyncio.gather(self._loop_task, return_exceptions=True)

    async def _loop(self) -> None:
        while not self._stopping:
            try:
                while len(self._tasks) < self.settings.max_concurrent_jobs:
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
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def _job_done(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._pgids.pop(job_id, None)
        self._wake.set()

    async def _run_job(self, job: dict) -> None:
        job_id = job["job_id"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.job_timeout_s
        ws = workspace_dir(self.settings, job_id)
        preset = self.settings.preset(job["quality"])
        started = time.monotonic()
        timings: dict[str, float] = {}
        try:
            await asyncio.to_thread(write_job, ws, job["input_path"], preset,
                                    use_gpu=self.gpu_enabled, test_fault=self.settings.test_fault)
            for stage in STAGES:
                t0 = time.monotonic()
                outcome = await self._run_stage(job_id, stage, ws, deadline)
                timings[stage] = round(time.monotonic() - t0, 3)
                if not outcome.ok:
                    await self._fail(job_id, stage, outcome)
                    await self._record_attempt(job, timings, "failed", stage)
                    return
            result = await asyncio.to_thread(_read_json, ws / "result.json")
            for art in result.get("artifacts", []):
                art["url"] = f"/jobs/{job_id}/artifacts/{art['name']}"
            result["job_wall_time_s"] = round(time.monotonic() - started, 3)
            await self.store.update_progress(job_id, 100, "Completed", "Reconstruction complete")
            await self.store.transition(
                job_id, ["processing"], "completed", results=result, progress=100,
                current_stage="Completed", finished_at=_now(),
                message=(f"Registered {result.get('registered_images')} of "
                         f"{result.get('frames_extracted')} frames; "
                         f"{result.get('points3d')} 3D points"))
            await self._record_attempt(job, timings, "completed", None)
            log.info("job %s completed in %.1f s", job_id, time.monotonic() - started)
        except asyncio.CancelledError:
            raise  # shutdown: row stays processing and is requeued at next start
        except Exception as exc:  # our own bug or storage failure: fail the job, keep serving
            log.exception("job %s failed in the runner", job_id)
            await self._set_failed(job_id, "pipeline_error", f"Runner error: {exc}", None)

    async def _record_attempt(self, job: dict, timings: dict[str, float], outcome: str,
                              failed_stage: str | None) -> None:
        """Append ``{"attempt", "outcome", "failed_stage", "stage_wall_s"}`` to the job row.

        ``stage_wall_s`` is the wall time (s) of each stage child, start-up included.
        """
        row = await self.store.get_job(job["job_id"])
        await self.store.append_attempt(job["job_id"], {
            "attempt": job.get("attempt", 1), "outcome": outcome,
            "failed_stage": failed_stage, "error_code": (row or {}).get("error_code"),
            "started_at": job.get("started_at"), "finished_at": _now(),
            "stage_wall_s": timings})

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

        def on_spawn(pid: int) -> None:
            self._pgids[job_id] = pid

        kwargs = dict(on_progress=on_progress, deadline=deadline, nice=self.settings.child_nice,
                      on_spawn=on_spawn)
        if stage in GPU_STAGES and self.gpu_enabled:
            async with self._gpu_sem:
                self.active_gpu_jobs += 1
                try:
                    return await run_stage(stage, ws, **kwargs)
                finally:
                    self.active_gpu_jobs -= 1
        return await run_stage(stage, ws, **kwargs)

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
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")
