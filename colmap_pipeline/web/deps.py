"""What the routes get from the app: typed dependency aliases (``StoreDep``, ``RunnerDep``,
``SettingsDep``, ``GpuDep``) over ``app.state``, the interfaces the routes need of the runner
and of the GPU probe, and the draining guard.

``main.create_app`` fills ``app.state`` in its lifespan (the job store of
``database.open_store``, the real
``JobRunner``, the GPU probe); tests fill it with fakes (``tests/fakes.py``), so the routes
never know which.
"""
from __future__ import annotations

from typing import Annotated, Any, Protocol

from fastapi import Depends, Request

from ..config import Settings
from ..errors import PipelineError
from ..jobs import JobStore
from .errors import ApiError

#: seconds a client is told to wait (Retry-After) when it asks a draining server for work
DRAINING_RETRY_AFTER_S = 30


class RunnerControl(Protocol):
    """What the web layer asks of the job runner (``runner.scheduler.JobRunner``)."""

    @property
    def running(self) -> bool:
        """The scheduling loop is alive."""

    @property
    def draining(self) -> bool:
        """No new job or stage starts (SIGTERM received)."""

    @property
    def active_jobs(self) -> int:
        """Jobs processing now."""

    @property
    def active_gpu_jobs(self) -> int:
        """Jobs holding a GPU slot now."""

    @property
    def max_gpu_jobs(self) -> int:
        """GPU slots."""

    async def cancel(self, job_id: str) -> bool:
        """Cancel a pending/processing job; False when it is in another state."""

    async def retry(self, job_id: str) -> bool:
        """Queue a failed/cancelled job again; False when it is in another state."""

    async def delete(self, job_id: str) -> bool:
        """Delete a job and its files; False when unknown or already deleted."""

    def wake(self) -> None:
        """A job may be waiting."""


class GpuView(Protocol):
    """What the web layer shows of the GPU probe (``runner.gpu.GpuInfo``)."""

    @property
    def enabled(self) -> bool:
        """GPU stages run on CUDA."""

    @property
    def pycolmap_version(self) -> str | None:
        """pycolmap in the children."""

    def public(self) -> dict[str, Any]:
        """JSON form with live NVML readings (blocking: call in a thread)."""


# The dependency functions are ``async`` on purpose: FastAPI runs a plain ``def`` dependency
# in its thread pool, one hop per dependency per request, which cost about 20% of the server's
# CPU per poll under 50 concurrent pollers (BENCHMARKS.md, issue 10 item 12).
async def _store(request: Request) -> JobStore:
    store: JobStore = request.app.state.store
    return store


async def _runner(request: Request) -> RunnerControl:
    runner: RunnerControl = request.app.state.runner
    return runner


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def _gpu(request: Request) -> GpuView:
    gpu: GpuView = request.app.state.gpu
    return gpu


StoreDep = Annotated[JobStore, Depends(_store)]
RunnerDep = Annotated[RunnerControl, Depends(_runner)]
SettingsDep = Annotated[Settings, Depends(_settings)]
GpuDep = Annotated[GpuView, Depends(_gpu)]


def is_draining(request: Request) -> bool:
    """The server is shutting down (the first SIGTERM sets ``app.state.draining`` at once)."""
    runner = getattr(request.app.state, "runner", None)
    return bool(request.app.state.draining or (runner is not None and runner.draining))


async def refuse_while_draining(request: Request) -> None:
    """Dependency of the routes that start work (uploads, retry).

    Raises: ApiError 503 ``not_ready`` with ``Retry-After`` while draining.
    """
    if is_draining(request):
        raise ApiError(PipelineError("not_ready", "The service is shutting down."),
                       headers={"Retry-After": str(DRAINING_RETRY_AFTER_S)})


NotDraining = Depends(refuse_while_draining)
