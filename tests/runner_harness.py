"""Test helpers for the runner (``colmap_pipeline/runner``): settings for a temporary DATA_DIR,
jobs in the in-memory store, a JobRunner started in this process, a scripted stand-in for the
stage children, and ``/proc`` probes of real stage children.

Real children with fake bodies: set ``COLMAP_TEST_FAKE_STAGES`` (see
``colmap_pipeline/core/fake_stage.py``, TEST ONLY) with :func:`use_fake_stages`; the runner's
children inherit the environment.
"""
from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from fakes import InMemoryJobStore

from colmap_pipeline.config import Settings
from colmap_pipeline.jobs import Job
from colmap_pipeline.layout import DataDir, Workspace, write_json_atomic
from colmap_pipeline.protocol import STAGES, ErrorEvent
from colmap_pipeline.runner.executor import StageOutcome
from colmap_pipeline.runner.scheduler import JobRunner

#: seconds each fake stage body takes (real children: ~0.15 s start-up each on top)
FAKE_STAGE_S = 0.05
#: ``result.json`` the scripted export writes (a valid JobResult)
SCRIPTED_RESULT = {"frames_extracted": 5, "frames_used": 5, "registered_images": 4,
                   "points3d": 120, "mean_reprojection_error_px": 0.5,
                   "mean_track_length": 3.0,
                   "artifacts": [{"name": "sparse.ply", "bytes": 10,
                                  "media_type": "application/octet-stream",
                                  "sha256": "0" * 64}]}


def use_fake_stages(monkeypatch: pytest.MonkeyPatch, seconds: float = FAKE_STAGE_S) -> None:
    """Make every stage child started from now on run its fake body (TEST ONLY switch)."""
    monkeypatch.setenv("COLMAP_TEST_FAKE_STAGES", str(seconds))
    monkeypatch.delenv("COLMAP_TEST_FAULT", raising=False)


def runner_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Settings on ``tmp_path/data``, ignoring ``.env`` and the environment's values of the
    fields given; no free-disk floor, no drain grace."""
    values: dict[str, Any] = {"data_dir": tmp_path / "data", "min_free_disk_bytes": 0,
                              "shutdown_grace_s": 0.0, **overrides}
    return Settings(_env_file=None, **values)


class RecordingStore(InMemoryJobStore):
    """The in-memory store, remembering every progress write ``(progress, stage, message)``."""

    def __init__(self) -> None:
        super().__init__()
        self.progress_log: list[tuple[str, int, str, str]] = []

    async def update_progress(self, job_id: str, progress: int, current_stage: str,
                              message: str) -> bool:
        self.progress_log.append((job_id, progress, current_stage, message))
        return await super().update_progress(job_id, progress, current_stage, message)


async def add_job(store: InMemoryJobStore, settings: Settings, job_id: str = "job-1",
                  quality: str = "low") -> Job:
    """A pending job with a (tiny, unread) input file in its job folder."""
    jd = DataDir(settings.data_dir).job(job_id)
    video = jd.input_video("mp4")
    video.parent.mkdir(parents=True, exist_ok=True)
    video.write_bytes(b"not read by fake stages")
    return await store.create_job({
        "job_id": job_id, "scan_id": f"scan-{job_id}", "project_id": "p", "scan_name": "s",
        "quality": quality, "input_path": str(video), "input_bytes": video.stat().st_size,
        "input_sha256": "0" * 64})


def workspace(settings: Settings, job_id: str = "job-1") -> Workspace:
    return DataDir(settings.data_dir).job(job_id).work


@asynccontextmanager
async def started(store: InMemoryJobStore, settings: Settings,
                  **kwargs: Any) -> AsyncIterator[JobRunner]:
    """A started :class:`JobRunner` (recovery, loop), stopped on exit."""
    runner = JobRunner(store, settings, gpu_enabled=kwargs.pop("gpu_enabled", False), **kwargs)
    await runner.start()
    try:
        yield runner
    finally:
        await runner.stop()


async def until(pred: Callable[[], Any], timeout_s: float, what: str,
                step_s: float = 0.02) -> Any:
    """Poll ``pred`` (sync or async) until truthy; its value. Fails the test at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(step_s)


async def get(store: InMemoryJobStore, job_id: str = "job-1") -> Job:
    """The job, which must exist."""
    job = await store.get_job(job_id)
    assert job is not None, f"{job_id} is not in the store"
    return job


async def status_is(store: InMemoryJobStore, job_id: str, *statuses: str) -> Job | None:
    """The job when its status is one of ``statuses``, else ``None`` (for :func:`until`)."""
    job = await store.get_job(job_id)
    return job if job is not None and job.status in statuses else None


async def wait_done(store: InMemoryJobStore, job_id: str = "job-1",
                    timeout_s: float = 30.0) -> Job:
    """The job once ``completed``, ``failed`` or ``cancelled``."""
    job: Job = await until(lambda: status_is(store, job_id, "completed", "failed", "cancelled"),
                           timeout_s, f"{job_id} to end")
    return job


def stage_children(ws: Path) -> dict[int, str]:
    """``{pid: start time}`` of live ``colmap_pipeline stage`` processes of workspace ``ws``."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[0] != "Z" and b"stage" in cmd and any(str(ws).encode() in a for a in cmd):
            out[int(proc.name)] = stat[19]  # field 22: start time (clock ticks after boot)
    return out


def still_alive(children: dict[int, str]) -> list[int]:
    """Pids of ``children`` (from :func:`stage_children`) still running (same start time)."""
    alive = []
    for pid, start in children.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat[19] == start and stat[0] != "Z":
            alive.append(pid)
    return alive


def checkpoint_mtimes(ws: Path) -> dict[str, int]:
    """``{stage: mtime_ns}`` of the checkpoints in workspace ``ws``."""
    return {p.stem: p.stat().st_mtime_ns for p in (ws / "checkpoints").glob("*.json")}


Scripted = StageOutcome | Callable[[], Awaitable[StageOutcome]]


class ScriptedStages:
    """A stand-in for :func:`colmap_pipeline.runner.executor.run_stage` that starts no child.

    Each call of stage S takes the next entry of ``script[S]`` (a :class:`StageOutcome`, or an
    async callable returning one); with none left the stage succeeds: it reports progress,
    writes its checkpoint (and ``result.json`` at export) and returns a ``done`` outcome.
    ``calls`` lists the stages run; ``on_run`` (optional) is awaited at each call's start.
    """

    def __init__(self, settings: Settings, script: dict[str, list[Scripted]] | None = None,
                 result: dict[str, Any] | None = None,
                 on_run: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.result = SCRIPTED_RESULT if result is None else result
        self.on_run = on_run
        self.calls: list[str] = []

    async def __call__(self, stage: str, workspace: Path, *, on_progress: Any, deadline: float,
                       nice: int, on_spawn: Any = None) -> StageOutcome:
        assert stage in STAGES
        self.calls.append(stage)
        if self.on_run is not None:
            await self.on_run(stage)
        await on_progress(0.5, f"scripted {stage} half way")
        queue = self.script.get(stage)
        if queue:
            entry = queue.pop(0)
            return entry if isinstance(entry, StageOutcome) else await entry()
        ws = Workspace(workspace)
        if stage == "export":
            write_json_atomic(ws.result_json, self.result)
        write_json_atomic(ws.checkpoint(stage), {"stage": stage, "elapsed_s": 0.0,
                                                 "summary": {"scripted": True}})
        return StageOutcome(returncode=0, summary={"scripted": True})


def error_outcome(code: str, rc: int = 3, **details: Any) -> StageOutcome:
    """A stage child that sent an ``error`` event and exited ``rc``."""
    return StageOutcome(returncode=rc, error=ErrorEvent(code, None, None, dict(details)))
