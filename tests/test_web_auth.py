"""colmap_pipeline.web.auth (and its use by the routes), in process on the in-memory store:
keys, 401s, per-key isolation, admin keys, user_email, docs gating, CORS refusal, quotas.

The same rules on a real server, with signed links and the logs, are in tests/test_auth_e2e.py.
"""
from __future__ import annotations

import hashlib

import pytest
import pytest_asyncio
from web_harness import CTYPE, TAIL, add_job

from colmap_pipeline.jobs import JobStatus
from colmap_pipeline.layout import DataDir
from colmap_pipeline.web.app import build_app
from colmap_pipeline.web.auth import CHALLENGE, ConfigError, KeyRing, parse_keys

KEYS = "alice:alice-key-0123456789,bob:bob-key-9876543210"
ADMIN = "ops:ops-key-5555555555"
ALICE = {"X-API-Key": "alice-key-0123456789"}
BOB = {"Authorization": "Bearer bob-key-9876543210"}
OPS = {"X-API-Key": "ops-key-5555555555"}


@pytest_asyncio.fixture
async def keyed(make_api):
    return await make_api(api_keys=KEYS, admin_api_keys=ADMIN)


def test_keys_parse_and_malformed_ones_are_named_without_the_key():
    assert parse_keys(" a:k1 , b:k:2,", "API_KEYS") == [("a", "k1"), ("b", "k:2")]
    for bad in ("nokey", "a:", ":secret-value"):
        with pytest.raises(ConfigError) as err:
            parse_keys(f"ok:x,{bad}", "API_KEYS")
        assert "API_KEYS: entry 2" in str(err.value) and "secret-value" not in str(err.value)
    with pytest.raises(ConfigError, match="names used twice"):
        KeyRing([("a", "k1")], [("a", "k2")])
    with pytest.raises(ConfigError, match=r"several names \['a', 'root'\]") as err:
        KeyRing([("a", "same-key"), ("b", "k2")], [("root", "same-key")])
    assert "same-key" not in str(err.value)


def test_identify_finds_the_holder_and_nothing_else():
    ring = KeyRing([("a", "k1"), ("b", "k2")], [("root", "k3")])
    assert ring.enabled and ring.names == ["a", "b", "root"]
    found = ring.identify("k2")
    assert found is not None and (found.name, found.admin) == ("b", False)
    root = ring.identify("k3")
    assert root is not None and root.admin
    for wrong in ("", "k", "k1 ", "K1", "x" * 5000):
        assert ring.identify(wrong) is None
    assert not KeyRing([], []).enabled


def test_cors_star_with_credentials_is_refused_at_start_only_with_keys(tmp_path):
    from web_harness import settings_for

    with pytest.raises(ConfigError, match="CORS_ORIGINS"):
        build_app(settings_for(tmp_path, api_keys="a:k", cors_origins="*",
                               cors_allow_credentials=True))
    build_app(settings_for(tmp_path, cors_origins="*", cors_allow_credentials=True))
    build_app(settings_for(tmp_path, api_keys="a:k", cors_origins="https://app.example",
                           cors_allow_credentials=True))
    with pytest.raises(ConfigError, match="API_KEYS: entry 1"):
        build_app(settings_for(tmp_path, api_keys="just-a-key"))


@pytest.mark.asyncio
async def test_no_key_or_a_wrong_key_is_401_with_a_challenge(keyed):
    for headers in ({}, {"X-API-Key": "nope"}, {"Authorization": "Bearer nope"},
                    {"Authorization": "Basic YWxpY2U6eA=="}):
        r = await keyed.client.get("/jobs", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == CHALLENGE
        assert r.json()["error"]["code"] == "unauthorized"
        assert "nope" not in r.text
    assert (await keyed.client.get("/jobs", headers=ALICE)).status_code == 200
    assert (await keyed.client.get("/jobs", headers=BOB)).status_code == 200
    both = {**ALICE, **BOB}  # two different keys in one request: neither is believed
    r = await keyed.client.get("/jobs", headers=both)
    assert r.status_code == 401 and "different keys" in r.json()["error"]["message"]
    same = {**ALICE, "Authorization": f"Bearer {ALICE['X-API-Key']}"}
    assert (await keyed.client.get("/jobs", headers=same)).status_code == 200
    r = await keyed.client.get("/jobs/", headers=ALICE)  # no redirect built from Host
    assert r.status_code == 404 and "location" not in r.headers
    r = await keyed.client.post("/upload-video", headers={"Content-Type": CTYPE}, content=TAIL)
    assert r.status_code == 401


@pytest.mark.asyncio
async def test_health_readiness_root_and_docs_stay_open(keyed, make_api):
    for path in ("/health", "/readiness", "/", "/docs", "/openapi.json"):
        r = await keyed.client.get(path)
        assert r.status_code == 200, path
    assert (await keyed.client.get("/health")).json()["auth"] == "on"
    closed = await make_api(api_keys=KEYS, docs_public=False)
    for path in ("/docs", "/openapi.json"):
        assert (await closed.client.get(path)).status_code == 401
        assert (await closed.client.get(path, headers=ALICE)).status_code == 200
    open_api = await make_api()
    assert (await open_api.client.get("/health")).json()["auth"] == "off"
    assert (await open_api.client.get("/jobs")).status_code == 200


@pytest.mark.asyncio
async def test_another_keys_job_is_404_on_every_route(keyed):
    job = await add_job(keyed.store, JobStatus.FAILED, owner="alice")
    done = await add_job(keyed.store, JobStatus.COMPLETED, owner="alice",
                         results={"artifacts": []})
    routes = [("GET", f"/jobs/{job.job_id}"), ("GET", f"/jobs/{job.job_id}/frames"),
              ("GET", f"/jobs/{done.job_id}/artifacts/sparse.ply"),
              ("POST", f"/jobs/{job.job_id}/cancel"), ("POST", f"/jobs/{job.job_id}/retry"),
              ("DELETE", f"/jobs/{job.job_id}")]
    unknown = await keyed.client.get("/jobs/no-such-job", headers=BOB)
    for method, path in routes:
        r = await keyed.client.request(method, path, headers=BOB)
        assert r.status_code == 404, (method, path)
        assert r.json() == unknown.json()  # the same answer as for a job that never existed
    assert (await keyed.store.get_job(job.job_id)).status == JobStatus.FAILED  # untouched
    r = await keyed.client.get(f"/jobs/{job.job_id}", headers=ALICE)
    assert r.status_code == 200 and r.json()["owner"] == "alice"
    r = await keyed.client.post(f"/jobs/{job.job_id}/retry", headers=OPS)  # an admin may act
    assert r.status_code == 200 and r.json()["status"] == "pending"


@pytest.mark.asyncio
async def test_list_shows_own_jobs_admin_sees_all_and_filters_by_owner(keyed):
    a1 = await add_job(keyed.store, owner="alice")
    a2 = await add_job(keyed.store, JobStatus.FAILED, owner="alice")
    b1 = await add_job(keyed.store, owner="bob")

    async def ids(headers, **params):
        body = (await keyed.client.get("/jobs", headers=headers, params=params)).json()
        return sorted(j["job_id"] for j in body["jobs"]), body["total"]

    assert await ids(ALICE) == (sorted([a1.job_id, a2.job_id]), 2)
    assert await ids(BOB) == ([b1.job_id], 1)
    assert await ids(BOB, owner="alice") == ([], 0)  # a plain key cannot look at another's
    assert await ids(OPS) == (sorted([a1.job_id, a2.job_id, b1.job_id]), 3)
    assert await ids(OPS, owner="bob") == ([b1.job_id], 1)
    assert await ids(OPS, owner="alice", status="failed") == ([a2.job_id], 1)


@pytest.mark.asyncio
async def test_user_email_is_shown_to_its_owner_only(keyed, make_api):
    job = await add_job(keyed.store, owner="alice", user_email="a@example.com")
    mine = (await keyed.client.get(f"/jobs/{job.job_id}", headers=ALICE)).json()
    assert mine["user_email"] == "a@example.com"
    admin = (await keyed.client.get(f"/jobs/{job.job_id}", headers=OPS)).json()
    assert admin["user_email"] is None and admin["owner"] == "alice"
    listed = (await keyed.client.get("/jobs", headers=OPS)).json()["jobs"]
    assert [j["user_email"] for j in listed] == [None]
    assert (await keyed.client.delete(f"/jobs/{job.job_id}", headers=ALICE)).status_code == 200
    assert (await keyed.store.get_job(job.job_id)).user_email is None  # gone with the job
    laptop = await make_api()
    own = await add_job(laptop.store, user_email="me@example.com")
    body = (await laptop.client.get(f"/jobs/{own.job_id}")).json()
    assert body["user_email"] == "me@example.com" and body["owner"] is None


@pytest.mark.asyncio
async def test_pending_quota_is_429_naming_the_count_without_retry_after(make_api):
    api = await make_api(api_keys=KEYS, max_pending_jobs_per_key=2)
    await add_job(api.store, owner="alice")
    await add_job(api.store, JobStatus.PROCESSING, owner="alice")  # running: not waiting
    headers = {**ALICE, "Content-Type": CTYPE}
    r = await api.client.post("/upload-video", headers=headers, content=TAIL)
    assert r.status_code == 422  # under the quota: the (empty) body is read and refused
    await add_job(api.store, owner="alice")
    r = await api.client.post("/upload-video", headers=headers, content=TAIL)
    assert r.status_code == 429 and "retry-after" not in r.headers
    err = r.json()["error"]
    assert err["code"] == "quota_exceeded" and err["details"] == {"pending": 2, "limit": 2}
    assert "2 jobs waiting" in err["message"]
    r = await api.client.post("/upload-images", headers=headers, content=TAIL)
    assert r.status_code == 429
    r = await api.client.post("/upload-video", headers={**BOB, "Content-Type": CTYPE},
                              content=TAIL)
    assert r.status_code == 422  # bob's quota is his own


@pytest.mark.asyncio
async def test_artifact_is_an_attachment_with_a_safe_type_and_nosniff(keyed):
    body = b"<html><script>alert(1)</script></html>"
    job = await add_job(keyed.store, owner="alice")
    path = DataDir(keyed.data_dir).job(job.job_id).work.artifact("page.html")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    art = {"name": "page.html", "bytes": len(body), "media_type": "text/html",
           "sha256": hashlib.sha256(body).hexdigest()}
    await keyed.store.apply(job.job_id, "claim")
    await keyed.store.apply(job.job_id, "complete", results={"artifacts": [art]})
    r = await keyed.client.get(f"/jobs/{job.job_id}/artifacts/page.html", headers=ALICE)
    assert r.status_code == 200 and r.content == body
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"].startswith("attachment;")
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["referrer-policy"] == "no-referrer"
