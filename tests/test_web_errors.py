"""colmap_pipeline.web.errors: every failure answers the one JSON error shape.

In process, except where a real socket matters: after a 500 the keep-alive connection must stay
usable, which only a real uvicorn can show.
"""
from __future__ import annotations

import json
import logging
import socket

import pytest
from web_harness import add_job, make_app, read_response, served, settings_for

from colmap_pipeline.jobs import JobStatus


class ExplodingStore:
    """A store whose reads raise a plain bug (not a StoreError)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def get_job(self, job_id):
        raise RuntimeError(f"boom reading {job_id}")


@pytest.mark.asyncio
async def test_unknown_route_is_404_with_a_hint_about_routes_not_ids(api):
    r = await api.client.get("/no/such/route")
    assert r.status_code == 404
    err = r.json()["error"]
    assert err == {"code": "not_found", "message": "No route answers this path.",
                   "hint": "GET /docs lists the routes of this API."}  # the path is not echoed
    assert "id" not in err["hint"]


@pytest.mark.asyncio
async def test_405_carries_allow_and_a_hint_about_methods(api):
    r = await api.client.put("/jobs")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"  # issue 10: every GET route answers HEAD
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert err["hint"] == "This path answers GET, HEAD; see /docs."
    assert "form" not in err["hint"]
    assert err["details"] == {"allow": ["GET", "HEAD"]}
    r = await api.client.get("/upload-video")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = await api.client.head("/upload-video")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = await api.client.patch("/jobs/x")
    assert r.status_code == 405
    assert r.headers["allow"] == "DELETE, GET, HEAD"


@pytest.mark.asyncio
async def test_validation_errors_name_the_field(api):
    r = await api.client.get("/jobs", params={"limit": 0, "status": "weird"})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert sorted(f["field"] for f in err["details"]["fields"]) == ["query.limit",
                                                                     "query.status"]


@pytest.mark.asyncio
async def test_validation_errors_give_limits_and_allowed_values_never_the_value(api):
    r = await api.client.get("/jobs", params={"limit": "MARK1", "offset": "-1",
                                              "status": "MARK2", "project_id": "MARK3" * 50})
    assert r.status_code == 422
    assert r.json()["error"]["details"]["fields"] == [
        {"field": "query.project_id", "problem": "String should have at most 200 characters"},
        {"field": "query.status", "problem": "Input should be 'pending', 'processing', "
         "'completed', 'failed', 'cancelled', 'expired' or 'deleted'"},
        {"field": "query.limit", "problem": "Input should be a valid integer, unable to parse "
         "string as an integer"},
        {"field": "query.offset", "problem": "Input should be greater than or equal to 0"}]
    assert "MARK" not in r.text


@pytest.mark.asyncio
async def test_a_frameworks_http_error_says_its_status_not_its_detail(api):
    from starlette.exceptions import HTTPException

    @api.app.get("/test-refusal")
    async def refuse() -> None:
        raise HTTPException(400, "parser says: MARK")

    r = await api.client.get("/test-refusal")
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "The request was refused (Bad Request)."
    assert "MARK" not in r.text


@pytest.mark.asyncio
async def test_unhandled_error_is_json_500_and_logged_once(api, caplog):
    await add_job(api.store)
    api.app.state.store = ExplodingStore(api.store)
    with caplog.at_level(logging.ERROR):
        r = await api.client.get("/jobs/job-0000")
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal_error", "message": "Internal server error.",
                                  "hint": "Retry; if it persists, contact the operator."}}
    assert "boom" not in r.text
    logged = [rec for rec in caplog.records if rec.exc_info]
    assert len(logged) == 1 and "boom reading job-0000" in str(logged[0].exc_info[1])


@pytest.mark.asyncio
async def test_store_unavailable_is_503_with_retry_after(api):
    await add_job(api.store)
    api.store.unavailable = True
    r = await api.client.get("/jobs/job-0000")
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "not_ready"
    assert r.headers["retry-after"] == "5"
    r = await api.client.get("/readiness")
    assert r.status_code == 503 and r.json()["failing"] == ["database"]


def test_connection_stays_usable_after_a_500_on_a_real_server(tmp_path, caplog):
    """Issue 10 item 3: Starlette's ServerErrorMiddleware re-raised after sending the 500, so
    uvicorn logged the error again and closed the keep-alive connection."""
    import asyncio

    from fakes import InMemoryJobStore

    store = InMemoryJobStore()
    job = asyncio.run(add_job(store, JobStatus.PENDING))
    app = make_app(settings_for(tmp_path), store=ExplodingStore(store))
    uvicorn_log = logging.getLogger("uvicorn.error")  # does not propagate to caplog's root
    with caplog.at_level(logging.ERROR), served(app) as url:
        uvicorn_log.addHandler(caplog.handler)
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(f"GET /jobs/{job.job_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, headers, body = read_response(sock)
            assert status == 500, body
            assert json.loads(body)["error"]["code"] == "internal_error"
            assert headers.get("connection") != "close"
            # the same connection answers the next request
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = read_response(sock)
            assert status == 200 and json.loads(body)["status"] == "healthy"
    uvicorn_log.removeHandler(caplog.handler)
    with_traceback = [rec for rec in caplog.records if rec.exc_info]
    assert len(with_traceback) == 1, [r.getMessage() for r in caplog.records]
    assert with_traceback[0].name == "colmap_worker.api"
