"""colmap_pipeline.web.head: HEAD on the JSON GET routes answered like GET without a body
(issue 10, fresh-user trial: they answered 405)."""
from __future__ import annotations

import pytest
from web_harness import add_job

from colmap_pipeline.jobs import JobStatus
from colmap_pipeline.layout import DataDir, write_json_atomic
from colmap_pipeline.web.head import with_head

pytestmark = pytest.mark.asyncio


async def test_head_on_json_get_routes_is_get_without_a_body(api):
    job = await add_job(api.store, JobStatus.PROCESSING)
    write_json_atomic(DataDir(api.data_dir).job(job.job_id).work.frames_json, {
        "frames": [], "scores": [], "num_decoded": 0, "selection": {"cap": 30}})
    for path in ("/health", "/readiness", "/jobs", f"/jobs/{job.job_id}",
                 f"/jobs/{job.job_id}/frames", "/jobs?status=processing"):
        get = await api.client.get(path)
        head = await api.client.head(path)
        assert head.status_code == get.status_code, (path, head.text)
        assert head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"] == \
            "application/json", path
        assert head.headers["content-length"] == str(len(get.content)), path


async def test_head_keeps_errors_and_unknown_routes(api):
    r = await api.client.head("/jobs/nope")
    assert r.status_code == 404 and r.content == b""
    assert r.headers["content-type"] == "application/json"
    assert (await api.client.head("/no/such/route")).status_code == 404
    assert (await api.client.head("/jobs", params={"limit": 0})).status_code == 422


async def test_with_head_adds_head_only_to_get():
    assert with_head({"GET"}) == {"GET", "HEAD"}
    assert with_head({"POST"}) == {"POST"}
    assert with_head(["DELETE"]) == {"DELETE"}
