"""``GET /metrics``: Prometheus metrics in the text format (issue 16), through prometheus-client
and prometheus-fastapi-instrumentator.

Each app has its own registry (:func:`install_metrics`, called by ``build_app``) holding:

- HTTP latency and counts by route template, method and status class (the instrumentator's
  ``http_request_duration_seconds``, ``http_requests_total`` …; ``/metrics`` itself left out);
- the runner's and intake's metrics (:mod:`..runner.metrics`: jobs finished by outcome and
  error code, queue wait, stage durations by stage and preset, registered share, uploaded
  bytes);
- read from the job store at each scrape: ``colmap_jobs{status}`` (every status, zeros
  included; the store's whole table, so the same on every replica) and
  ``colmap_queue_depth`` (pending jobs);
- read from NVML at each scrape when there is an NVIDIA GPU (:func:`..runner.gpu.nvml_devices`):
  ``colmap_gpu_memory_used_bytes``, ``colmap_gpu_memory_total_bytes`` and
  ``colmap_gpu_utilization_percent`` by ``gpu`` (index) and ``name``;
- the process's CPU, memory and open files (prometheus-client's process collector).

With API keys on, ``/metrics`` needs a key (any key) unless ``METRICS_PUBLIC=true``.
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from prometheus_client import generate_latest as render_text
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator import metrics as instr_metrics

from ..jobs import JobStatus, JobStore
from ..runner import metrics as runner_metrics
from ..runner.gpu import GpuDevice, nvml_devices
from .auth import AUTH_RESPONSES, _api_key, _bearer, caller
from .deps import StoreDep

router = APIRouter(tags=["service"])

#: the path of the metrics route (left out of the HTTP metrics)
METRICS_PATH = "/metrics"


class ScrapeCollector(Collector):
    """The metrics read at scrape time (:meth:`refresh` before each render): jobs by status,
    queue depth and the GPUs."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.gpus: list[GpuDevice] = []

    async def refresh(self, store: JobStore) -> None:
        """Read the store's counts and NVML (in a thread: blocking calls)."""
        self.counts = await store.count_by_status()
        self.gpus = await asyncio.to_thread(nvml_devices)

    def collect(self) -> Iterable[Metric]:
        """The families from the last :meth:`refresh`."""
        jobs = GaugeMetricFamily("colmap_jobs", "Jobs by status (the job store, all replicas)",
                                 labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status.value], self.counts.get(status.value, 0))
        yield jobs
        yield GaugeMetricFamily("colmap_queue_depth", "Jobs waiting for a worker (pending)",
                                value=self.counts.get(JobStatus.PENDING.value, 0))
        yield from self._gpu_families()

    def _gpu_families(self) -> Iterator[Metric]:
        if not self.gpus:
            return
        used = GaugeMetricFamily("colmap_gpu_memory_used_bytes", "GPU memory in use (NVML)",
                                 labels=["gpu", "name"])
        total = GaugeMetricFamily("colmap_gpu_memory_total_bytes", "GPU memory (NVML)",
                                  labels=["gpu", "name"])
        util = GaugeMetricFamily("colmap_gpu_utilization_percent", "Percent of the last "
                                 "sample period the GPU was busy (NVML)", labels=["gpu", "name"])
        for d in self.gpus:
            labels = [str(d.index), d.name]
            used.add_metric(labels, d.memory_used_bytes)
            total.add_metric(labels, d.memory_total_bytes)
            if d.utilization_gpu_percent is not None:
                util.add_metric(labels, d.utilization_gpu_percent)
        yield from (used, total, util)


def install_metrics(app: FastAPI) -> None:
    """Give ``app`` its registry (``app.state.metrics_registry``), the HTTP instrumentation
    middleware and the scrape-time collector (``app.state.metrics_scrape``). Call before the
    app starts (it adds a middleware); the route is :data:`router`."""
    registry = CollectorRegistry()
    for collector in runner_metrics.COLLECTORS:
        registry.register(collector)
    scrape = ScrapeCollector()
    registry.register(scrape)
    ProcessCollector(registry=registry)
    # Not the instrumentator's default set: its request-size summary parses Content-Length
    # with int(), so a junk header was a 500 (tests/test_no_echo.py); latency and counts are
    # what the README promises. A stream's latency is to its first byte (an events stream
    # lasts as long as its job).
    Instrumentator(excluded_handlers=[METRICS_PATH], registry=registry).add(
        instr_metrics.latency(registry=registry, should_exclude_streaming_duration=True),
        instr_metrics.requests(registry=registry)).instrument(app)
    app.state.metrics_registry = registry
    app.state.metrics_scrape = scrape


async def metrics_access(
        request: Request,
        api_key: Annotated[str | None, Depends(_api_key)] = None,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> None:
    """Dependency: any valid API key while keys are on, unless ``METRICS_PUBLIC``.

    Raises: ApiError 401 ``unauthorized`` as :func:`.auth.caller`.
    """
    if not request.app.state.settings.metrics_public:
        await caller(request, api_key, bearer)


_TEXT: dict[int | str, dict[str, Any]] = {200: {
    "description": "the metrics in the Prometheus text format 0.0.4",
    "content": {"text/plain": {"schema": {"type": "string"}}}}}


@router.get(METRICS_PATH, summary="Prometheus metrics", response_class=Response,
            responses={**_TEXT, **AUTH_RESPONSES}, dependencies=[Depends(metrics_access)])
async def metrics(request: Request, store: StoreDep) -> Response:
    """Every metric of this replica in the Prometheus text format (module docstring): jobs
    by status and queue depth from the job store, jobs finished by outcome and error code,
    queue wait, stage durations by stage and preset, registered share, uploaded bytes, HTTP
    latency by route, and GPU memory and utilisation from NVML when there is a GPU. With API
    keys on it needs a key unless ``METRICS_PUBLIC=true``."""
    scrape: ScrapeCollector = request.app.state.metrics_scrape
    await scrape.refresh(store)
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(render_text(registry), media_type=CONTENT_TYPE_LATEST)
