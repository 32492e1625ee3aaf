"""Metrics in process (issue 16 item 3): what :class:`MeteredStore` observes on the calls that
change a job, and who may read ``GET /metrics``. The counts after real jobs on a real server:
tests/test_webhooks_e2e.py::test_metrics_count_the_finished_jobs_and_time_every_stage."""
from __future__ import annotations

import pytest
from fakes import InMemoryJobStore
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from colmap_pipeline.jobs import Intent
from colmap_pipeline.runner import metrics as m

pytestmark = pytest.mark.asyncio


def registry() -> CollectorRegistry:
    reg = CollectorRegistry()
    for c in m.COLLECTORS:
        reg.register(c)
    return reg


def value(reg: CollectorRegistry, name: str, **labels: str) -> float:
    return reg.get_sample_value(name, labels) or 0.0


def new_job(job_id: str, **extra) -> dict:
    return {"job_id": job_id, "scan_id": "s", "project_id": "p", "scan_name": "n",
            "quality": "medium", "input_path": f"/nowhere/{job_id}", "input_bytes": 1000,
            "input_sha256": "0" * 64, **extra}


RECORD = {"attempt": 1, "outcome": "completed", "stage_wall_s": {"frames": 1.5, "mapping": 7.0}}


async def test_metered_store_observes_uploads_waits_stages_and_outcomes():
    reg, store = registry(), m.MeteredStore(InMemoryJobStore())
    up0 = value(reg, "colmap_uploaded_bytes_total", kind="images")
    wait0 = value(reg, "colmap_queue_wait_seconds_count")
    stage0 = value(reg, "colmap_stage_duration_seconds_count", stage="mapping", preset="medium")
    done0 = value(reg, "colmap_jobs_finished_total", outcome="completed", error_code="")
    bad0 = value(reg, "colmap_jobs_finished_total", outcome="failed", error_code="too_dark")
    share0 = value(reg, "colmap_registered_share_sum")

    await store.create_job(new_job("a", video_info={"kind": "images", "images": 5}))
    await store.create_job(new_job("b"))
    assert value(reg, "colmap_uploaded_bytes_total", kind="images") - up0 == 1000
    assert await store.claim_next_pending() is not None  # a: its first start
    assert await store.apply("b", Intent.CLAIM)
    assert value(reg, "colmap_queue_wait_seconds_count") - wait0 == 2
    assert await store.apply("a", Intent.COMPLETE, attempt_record=RECORD,
                             results={"registered_images": 3, "frames_used": 4})
    assert await store.apply("b", Intent.FAIL, error_code="too_dark",
                             attempt_record={**RECORD, "outcome": "failed"})
    assert not await store.apply("b", Intent.FAIL, error_code="too_dark")  # did not move
    assert value(reg, "colmap_jobs_finished_total", outcome="completed",
                 error_code="") - done0 == 1
    assert value(reg, "colmap_jobs_finished_total", outcome="failed",
                 error_code="too_dark") - bad0 == 1
    assert value(reg, "colmap_stage_duration_seconds_count", stage="mapping",
                 preset="medium") - stage0 == 2
    assert value(reg, "colmap_registered_share_sum") - share0 == pytest.approx(0.75)
    # an attempt recorded without a status change (a cancelled run) counts its stages too
    assert await store.append_attempt("b", {"attempt": 2, "stage_wall_s": {"mapping": 2.0}})
    assert value(reg, "colmap_stage_duration_seconds_count", stage="mapping",
                 preset="medium") - stage0 == 3


async def scrape(api, **headers) -> tuple[int, str]:
    r = await api.client.get("/metrics", headers=headers)
    return r.status_code, r.text


async def test_metrics_need_a_key_while_keys_are_on_unless_public(make_api):
    keyed = await make_api(api_keys="ops:k-ops-123456")
    status, _ = await scrape(keyed)
    assert status == 401
    status, text = await scrape(keyed, **{"X-API-Key": "k-ops-123456"})
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert {"colmap_jobs", "colmap_queue_depth", "colmap_jobs_finished",
            "colmap_stage_duration_seconds"} <= set(families)
    public = await make_api(api_keys="ops:k-ops-123456", metrics_public=True)
    assert (await scrape(public))[0] == 200
    open_api = await make_api()
    await open_api.store.create_job(new_job("p1"))
    status, text = await scrape(open_api)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert status == 200
    assert [s.value for s in families["colmap_queue_depth"].samples] == [1]
    by_status = {s.labels["status"]: s.value for s in families["colmap_jobs"].samples}
    assert by_status["pending"] == 1 and by_status["completed"] == 0


async def test_gpu_readings_become_gauges_by_gpu():
    from colmap_pipeline.runner.gpu import GpuDevice
    from colmap_pipeline.web.metrics import ScrapeCollector
    scrape = ScrapeCollector()
    scrape.gpus = [GpuDevice(0, "NVIDIA H200", 150 * 2**30, 3 * 2**30, 42),
                   GpuDevice(1, "NVIDIA H200", 150 * 2**30, 0, None)]  # utilisation unsupported
    reg = CollectorRegistry()
    reg.register(scrape)
    assert reg.get_sample_value("colmap_gpu_memory_used_bytes",
                                {"gpu": "0", "name": "NVIDIA H200"}) == 3 * 2**30
    assert reg.get_sample_value("colmap_gpu_memory_total_bytes",
                                {"gpu": "1", "name": "NVIDIA H200"}) == 150 * 2**30
    assert reg.get_sample_value("colmap_gpu_utilization_percent",
                                {"gpu": "0", "name": "NVIDIA H200"}) == 42
    assert reg.get_sample_value("colmap_gpu_utilization_percent",
                                {"gpu": "1", "name": "NVIDIA H200"}) is None
    scrape.gpus = []  # no GPU: no GPU family at all
    assert not [f for f in reg.collect() if f.name.startswith("colmap_gpu")]
