"""``GET /`` (identity), ``GET /health`` (liveness) and ``GET /readiness`` (readiness): the
service's own routes, cheap and never rate-limited."""
from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from .. import __version__
from .artifacts import request_storage
from .deps import GpuDep, RunnerDep, SettingsDep, StoreDep, is_draining
from .schemas import HealthResponse, ReadinessResponse, RootResponse
from .ui import browser_redirect

router = APIRouter(tags=["service"])


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (blocking)."""
    return shutil.disk_usage(path).free


def writable(path: Path) -> bool:
    """Whether a small file can be written and removed in ``path`` (blocking)."""
    probe = path / f".write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
        return True
    except OSError:
        return False


@router.get("/", response_model=RootResponse, summary="Service identity",
            responses={307: {"description": "a browser (Accept prefers text/html): to /ui"}})
async def root(request: Request, gpu: GpuDep) -> RootResponse | Response:
    """Identity of the service: name, status, version and whether a GPU is used; a browser
    (``Accept`` prefers ``text/html``) is sent on to the web page ``/ui`` (307)."""
    if (to_page := browser_redirect(request)) is not None:
        return to_page
    return RootResponse(version=__version__, gpu_enabled=gpu.enabled,
                        pycolmap_version=gpu.pycolmap_version,
                        gpu=await asyncio.to_thread(gpu.public))


@router.get("/health", response_model=HealthResponse, summary="Liveness probe")
async def health(request: Request, gpu: GpuDep, runner: RunnerDep,
                 settings: SettingsDep) -> HealthResponse:
    """Liveness: cheap, no I/O, never rate-limited, no key needed; GPU slots in use, jobs
    running, and whether API keys are required (``auth``)."""
    return HealthResponse(gpu_status=gpu.enabled, active_gpu_jobs=runner.active_gpu_jobs,
                          max_gpu_jobs=runner.max_gpu_jobs, active_jobs=runner.active_jobs,
                          max_concurrent_jobs=settings.max_concurrent_jobs,
                          auth="on" if request.app.state.keyring.enabled else "off",
                          gpu=await asyncio.to_thread(gpu.public))


@router.get("/readiness", response_model=ReadinessResponse, summary="Readiness probe",
            responses={503: {"model": ReadinessResponse}})
async def readiness(request: Request, store: StoreDep, runner: RunnerDep,
                    settings: SettingsDep) -> JSONResponse:
    """200 when the store answers, DATA_DIR is writable with ``MIN_FREE_DISK_BYTES`` free, the
    runner runs and the server is not draining (and, in bucket mode, the bucket exists and
    may be used: ``storage``); else 503 naming the failing checks."""
    data_dir = Path(settings.data_dir)
    free = await asyncio.to_thread(free_disk_bytes, data_dir)
    checks = {
        "database": await store.ping(),
        "data_dir_writable": await asyncio.to_thread(writable, data_dir),
        "free_disk": free >= settings.min_free_disk_bytes,
        "runner": runner.running,
        "not_draining": not is_draining(request),
    }
    storage = request_storage(request, settings)
    if storage.remote:  # bucket mode: missing bucket or refused access -> 503 "storage"
        checks["storage"] = await asyncio.to_thread(storage.ready)
    failing = [k for k, ok in checks.items() if not ok]
    body = ReadinessResponse(status="not_ready" if failing else "ready", checks=checks,
                             failing=failing, free_disk_bytes=free)
    return JSONResponse(body.model_dump(), status_code=503 if failing else 200)
