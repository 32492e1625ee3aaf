"""colmap_pipeline.web.routes_service (``/``, ``/health``, ``/readiness``), in process."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.asyncio


async def test_identity_and_health(api):
    root = (await api.client.get("/")).json()
    assert root["message"] == "COLMAP Worker API" and root["status"] == "running"
    assert root["gpu_enabled"] is False and root["version"]
    health = (await api.client.get("/health")).json()
    gpu = health.pop("gpu")
    assert gpu["enabled"] is False and gpu["cpu_only_forced"] is True and gpu["devices"] == []
    assert health == {"status": "healthy", "service": "colmap-worker", "gpu_status": False,
                      "active_gpu_jobs": 0, "max_gpu_jobs": 4, "active_jobs": 0,
                      "max_concurrent_jobs": 1, "auth": "off"}


async def test_readiness_ready_then_naming_each_failing_check(make_api):
    api = await make_api()
    ready = await api.client.get("/readiness")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready" and all(ready.json()["checks"].values())
    assert ready.json()["free_disk_bytes"] > 0
    api.app.state.draining = True
    api.runner.running = False
    r = await api.client.get("/readiness")
    assert r.status_code == 503 and r.json()["failing"] == ["runner", "not_draining"]
    low = await make_api(min_free_disk_bytes=10**18)
    r = await low.client.get("/readiness")
    assert r.status_code == 503 and r.json()["failing"] == ["free_disk"]


async def test_draining_runner_alone_makes_readiness_fail(api):
    api.runner.draining = True
    r = await api.client.get("/readiness")
    assert r.status_code == 503 and r.json()["failing"] == ["not_draining"]
