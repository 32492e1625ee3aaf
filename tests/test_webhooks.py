"""Webhooks in process (issue 16 item 2): the SSRF guard, the outbox rows the stores write with
a terminal transition, the claim's compare-and-set, the dispatcher's signing, retries and
give-up (on a real SQLite store and ``httpx.MockTransport``), and the upload's 422s. The same
on a real server with a real receiver: tests/test_webhooks_e2e.py."""
from __future__ import annotations

import asyncio
import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from standardwebhooks import Webhook

from colmap_pipeline.config import Settings
from colmap_pipeline.jobs import Intent, JobStatus, utc_iso
from colmap_pipeline.runner.webhook_targets import TargetRefused, check_target
from colmap_pipeline.runner.webhooks import WebhookDispatcher, retry_wait
from colmap_pipeline.stores.sqlite import SqliteJobStore
from colmap_pipeline.webhook_outbox import DeliveryState

pytestmark = pytest.mark.asyncio

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()
#: an instant far after any try's due time (claims see every pending row as due)
LATER = datetime.now(UTC) + timedelta(days=1)


def resolver(*addresses: str):
    async def resolve(host: str, port: int) -> list[str]:
        return list(addresses)
    return resolve


# --- the SSRF guard ------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "addresses", "why"), [
    ("http://127.0.0.1/hook", (), "loopback"),
    ("http://[::1]:8080/", (), "loopback"),
    ("http://[::ffff:10.1.2.3]/", (), "private"),
    ("http://hooks.example/", ("192.168.1.20",), "private"),
    ("http://hooks.example/", ("93.184.216.34", "10.0.0.7"), "private"),  # any one refuses
    ("http://metadata.example/", ("169.254.169.254",), "link-local"),
    ("http://hooks.example/", ("224.0.0.1",), "multicast"),
    ("http://0.0.0.0/", (), "unspecified"),
    ("http://hooks.example/", ("240.0.0.1",), "reserved"),
    ("http://hooks.example/", ("100.64.0.9",), "not globally routable"),
])
async def test_non_public_targets_are_refused_naming_the_rule(url, addresses, why):
    with pytest.raises(TargetRefused) as err:
        await check_target(url, allow_private=False, resolve=resolver(*addresses))
    assert f"({why})" in err.value.reason
    assert url not in err.value.reason


@pytest.mark.parametrize(("url", "rule"), [
    ("ftp://hooks.example/x", "only http and https"),
    ("file:///etc/passwd", "only http and https"),
    ("http:///path-only", "no host"),
    ("http://hooks.example:99999/", "port"),
    ("http://hooks.example/a b", "whitespace"),
    ("http://[::1", "cannot be parsed"),  # was a 500 (urlsplit's ValueError)
])
async def test_malformed_targets_are_refused(url, rule):
    with pytest.raises(TargetRefused, match=rule):
        await check_target(url, allow_private=True, resolve=resolver("93.184.216.34"))


async def test_a_host_name_that_is_not_valid_idna_is_refused_not_raised():
    """A label over 63 characters makes getaddrinfo's IDNA encoding raise UnicodeError (was a
    500 at upload); the system resolver's refusal, without any DNS query."""
    with pytest.raises(TargetRefused, match="does not resolve"):
        await check_target(f"http://{'a' * 64}.com/", allow_private=False)


async def test_public_targets_pass_and_private_ones_pass_when_allowed():
    got = await check_target("https://hooks.example/x", allow_private=False,
                             resolve=resolver("93.184.216.34"))
    assert [str(a) for a in got] == ["93.184.216.34"]
    got = await check_target("http://127.0.0.1:9/x", allow_private=True)
    assert [str(a) for a in got] == ["127.0.0.1"]


async def test_a_host_that_does_not_resolve_is_refused():
    async def fail(host: str, port: int) -> list[str]:
        raise OSError("no such host")
    with pytest.raises(TargetRefused, match="does not resolve"):
        await check_target("http://nowhere.example/", allow_private=True, resolve=fail)


async def test_retry_waits_are_full_jitter_within_each_bound():
    schedule = (10.0, 60.0)
    assert retry_wait(1, schedule, rand=lambda lo, hi: lo) == pytest.approx(1.0)
    assert retry_wait(2, schedule, rand=lambda lo, hi: hi) == 60.0
    with pytest.raises(IndexError):
        retry_wait(3, schedule)


# --- the outbox in the store ---------------------------------------------------------------

def job_fields(job_id: str, tmp: Path, **extra) -> dict:
    return {"job_id": job_id, "scan_id": f"s-{job_id}", "project_id": "p", "scan_name": "n",
            "quality": "low", "input_path": str(tmp / job_id), "input_bytes": 10,
            "input_sha256": "0" * 64, **extra}


@pytest_asyncio.fixture
async def store(tmp_path):
    s = await SqliteJobStore.open(tmp_path / "jobs.db")
    yield s
    await s.close()


async def finish(store, job_id: str, intent: Intent, **fields) -> None:
    if intent != Intent.CANCEL:
        assert await store.apply(job_id, Intent.CLAIM)
    assert await store.apply(job_id, intent, **fields)


async def test_a_terminal_transition_writes_one_delivery_with_the_job_as_it_was(store, tmp_path):
    await store.create_job(job_fields("a", tmp_path, webhook_url="http://r.example/h"))
    await store.create_job(job_fields("quiet", tmp_path))  # no target: no delivery
    await finish(store, "a", Intent.FAIL, error_code="too_dark", error_message="dark")
    await finish(store, "quiet", Intent.COMPLETE)
    [d] = await store.webhook_deliveries("a")
    assert (d.event_type, d.url, d.state, d.tries) == (
        "job.failed", "http://r.example/h", DeliveryState.PENDING, 0)
    assert d.delivery_id.startswith("msg_") and d.attempts == []
    assert (d.payload["status"], d.payload["error_code"]) == ("failed", "too_dark")
    assert await store.webhook_deliveries("quiet") == []
    # a retry, then a cancel: a second event, a second delivery; the first is unchanged
    assert await store.apply("a", Intent.RETRY)
    assert await store.apply("a", Intent.CANCEL)
    first, second = await store.webhook_deliveries("a")
    assert first == d
    assert (second.event_type, second.payload["status"]) == ("job.cancelled", "cancelled")


async def test_expiring_a_job_removes_its_finished_deliveries_and_keeps_pending_ones(store,
                                                                                   tmp_path):
    """Retention (EXPIRE) and DELETE take the job's delivered or failed deliveries with its
    files; a delivery still trying stays until it ends."""
    await store.create_job(job_fields("a", tmp_path, webhook_url="http://r.example/h"))
    await finish(store, "a", Intent.FAIL, error_code="too_dark", error_message="dark")
    assert await store.apply("a", Intent.RETRY)
    assert await store.apply("a", Intent.CANCEL)
    first, second = await store.webhook_deliveries("a")
    claimed = await store.claim_webhook_delivery("9999-12-31T00:00:00", "9999-12-31T00:00:01")
    assert claimed is not None and claimed.delivery_id == first.delivery_id
    assert await store.record_webhook_try(first.delivery_id, 1, {"status": 200},
                                          state="delivered", next_try_at=None)
    assert await store.apply("a", Intent.EXPIRE)
    [left] = await store.webhook_deliveries("a")
    assert (left.delivery_id, left.state) == (second.delivery_id, DeliveryState.PENDING)


async def test_claims_take_each_try_once_and_a_stale_claim_records_nothing(store, tmp_path):
    await store.create_job(job_fields("a", tmp_path, webhook_url="http://r.example/h"))
    await finish(store, "a", Intent.CANCEL)
    now, lease = utc_iso(LATER), utc_iso(LATER + timedelta(seconds=120))
    got = await asyncio.gather(*(store.claim_webhook_delivery(now, lease) for _ in range(4)))
    claimed = [g for g in got if g is not None]
    assert len(claimed) == 1 and claimed[0].tries == 1 and claimed[0].next_try_at == lease
    # the lease ran out (its process died): claimed again as try 2; try 1 can no longer record
    again = await store.claim_webhook_delivery(utc_iso(LATER + timedelta(seconds=121)),
                                               utc_iso(LATER + timedelta(seconds=240)))
    assert again is not None and again.tries == 2
    attempt = {"try": 1, "at": now, "http_status": 200, "error": None, "duration_ms": 1.0}
    assert not await store.record_webhook_try(again.delivery_id, 1, attempt,
                                              state="delivered", next_try_at=None)
    assert await store.record_webhook_try(again.delivery_id, 2, {**attempt, "try": 2},
                                          state="delivered", next_try_at=None)
    [d] = await store.webhook_deliveries("a")
    assert (d.state, d.tries, [a["try"] for a in d.attempts]) == (DeliveryState.DELIVERED, 2, [2])


# --- the dispatcher ------------------------------------------------------------------------

class Receiver:
    """A scripted receiver on httpx.MockTransport: answers ``statuses`` in turn, then 200."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.statuses.pop(0) if self.statuses else 200)


async def render(job) -> dict:
    return {"job_id": job.job_id, "status": job.status.value}


def dispatcher(store, tmp_path: Path, receiver: Receiver, **settings) -> WebhookDispatcher:
    values = {"webhook_secret": SECRET, "webhook_retry_schedule_s": "5,5",
              "webhook_allow_private": False, **settings}
    s = Settings(_env_file=None, data_dir=tmp_path / "data", **values)
    client = httpx.AsyncClient(transport=httpx.MockTransport(receiver))
    d = WebhookDispatcher(store, s, render, client=client, resolve=resolver("93.184.216.34"))
    d.client_requests = receiver.requests  # type: ignore[attr-defined]  # for the tests
    return d


async def test_a_receiver_answering_500_twice_gets_the_third_try_signed(store, tmp_path):
    await store.create_job(job_fields("a", tmp_path, webhook_url="https://r.example/h"))
    await finish(store, "a", Intent.COMPLETE)
    receiver = Receiver(500, 500)
    d = dispatcher(store, tmp_path, receiver)
    assert await d.run_once() == 1  # due at once
    assert await d.run_once() == 0  # the retry waits 0.5-5 s
    assert await d.run_once(LATER) == 2  # tries 2 and 3: each due before LATER
    assert await d.run_once(LATER) == 0  # delivered: nothing more
    [row] = await store.webhook_deliveries("a")
    assert row.state == DeliveryState.DELIVERED
    assert [a["http_status"] for a in row.attempts] == [500, 500, 200]
    assert [a["error"] for a in row.attempts] == ["HTTP 500", "HTTP 500", None]
    ids = {r.headers["webhook-id"] for r in receiver.requests}
    assert ids == {row.delivery_id}  # one message id on every try
    # sent to the address the SSRF check approved, for the URL's own host (no second lookup)
    assert {(r.url.host, r.headers["host"], r.url.path) for r in receiver.requests} == {
        ("93.184.216.34", "r.example", "/h")}
    assert receiver.requests[0].extensions["sni_hostname"] == "r.example"
    last = receiver.requests[-1]
    body = Webhook(SECRET).verify(last.content, dict(last.headers))
    assert body["type"] == "job.completed"
    assert body["data"] == {"job_id": "a", "status": "completed"}
    with pytest.raises(Exception, match="signature"):
        Webhook("whsec_" + base64.b64encode(b"x" * 32).decode()).verify(
            last.content, dict(last.headers))


async def test_the_delivery_fails_after_the_last_try(store, tmp_path):
    await store.create_job(job_fields("a", tmp_path, webhook_url="https://r.example/h"))
    await finish(store, "a", Intent.CANCEL)
    d = dispatcher(store, tmp_path, Receiver(503, 503, 503, 503))
    for _ in range(5):
        await d.run_once(LATER)
    [row] = await store.webhook_deliveries("a")
    assert (row.state, row.tries, len(row.attempts)) == (DeliveryState.FAILED, 3, 3)


async def test_a_target_resolving_to_a_private_address_at_delivery_is_not_called(store,
                                                                                   tmp_path):
    await store.create_job(job_fields("a", tmp_path, webhook_url="https://r.example/h"))
    await finish(store, "a", Intent.CANCEL)
    receiver = Receiver()
    d = dispatcher(store, tmp_path, receiver)
    d.resolve = resolver("10.0.0.5")  # DNS changed since the upload (rebinding)
    await d.run_once()
    [row] = await store.webhook_deliveries("a")
    assert receiver.requests == []
    assert row.state == DeliveryState.FAILED and row.attempts[0]["http_status"] is None
    assert "non-public address (private)" in row.attempts[0]["error"]


async def test_a_connection_error_is_recorded_and_retried(store, tmp_path):
    await store.create_job(job_fields("a", tmp_path, webhook_url="https://r.example/h"))
    await finish(store, "a", Intent.CANCEL)

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)
    d = dispatcher(store, tmp_path, Receiver())
    d.client = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
    await d.run_once()
    [row] = await store.webhook_deliveries("a")
    assert row.state == DeliveryState.PENDING and row.next_try_at is not None
    assert row.attempts[0]["http_status"] is None
    assert row.attempts[0]["error"].startswith("ConnectError")


async def test_without_a_secret_nothing_is_sent(store, tmp_path):
    await store.create_job(job_fields("a", tmp_path, webhook_url="https://r.example/h"))
    await finish(store, "a", Intent.CANCEL)
    d = dispatcher(store, tmp_path, Receiver(), webhook_secret="")
    assert await d.run_once() == 0
    [row] = await store.webhook_deliveries("a")
    assert row.tries == 0


async def test_postgres_claims_skip_locked_rows(pg_url, tmp_path):
    from colmap_pipeline.stores.postgres import PostgresJobStore
    pg = await PostgresJobStore.open(pg_url)
    try:
        for i in range(3):
            await pg.create_job(job_fields(f"j{i}", tmp_path, webhook_url="http://r.example/"))
            assert await pg.apply(f"j{i}", Intent.CANCEL)
        now, lease = utc_iso(LATER), utc_iso(LATER + timedelta(seconds=120))
        got = await asyncio.gather(*(pg.claim_webhook_delivery(now, lease) for _ in range(5)))
        claimed = sorted(g.job_id for g in got if g is not None)
        assert claimed == ["j0", "j1", "j2"]  # each row once, whoever asked
        [d] = await pg.webhook_deliveries("j1")
        assert (d.tries, d.payload["status"]) == (1, JobStatus.CANCELLED.value)
        attempt = {"try": 1, "at": now, "http_status": 204, "error": None, "duration_ms": 2.0}
        assert await pg.record_webhook_try(d.delivery_id, 1, attempt, state="delivered",
                                           next_try_at=None)
        [d] = await pg.webhook_deliveries("j1")
        assert d.state == DeliveryState.DELIVERED and d.attempts == [attempt]
    finally:
        await pg.close()


# --- the upload's checks -------------------------------------------------------------------

async def post_video(api, **fields):
    data = {"project_id": "p", **fields}
    return await api.client.post("/upload-video", data=data,
                                 files={"video": ("clip.mp4", b"not probed", "video/mp4")})


async def test_a_loopback_webhook_url_gets_422_with_its_code(make_api):
    api = await make_api(webhook_secret=SECRET)
    r = await post_video(api, webhook_url="http://127.0.0.1/hook")
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "webhook_url_not_allowed"
    assert "loopback" in err["message"] and "127.0.0.1" not in json.dumps(err)
    assert err["hint"]
    r = await post_video(api, webhook_url="gopher://example.com/")
    assert (r.status_code, r.json()["error"]["code"]) == (422, "webhook_url_not_allowed")
    assert (await api.store.list_jobs())[1] == 0


async def test_a_webhook_url_without_a_secret_gets_422_webhooks_not_configured(make_api):
    api = await make_api()
    r = await post_video(api, webhook_url="https://example.com/hook")
    assert (r.status_code, r.json()["error"]["code"]) == (422, "webhooks_not_configured")


# --- GET /jobs/{id}/webhooks and the body's view -----------------------------------------

async def test_the_webhooks_route_lists_tries_to_the_owner_only(store, tmp_path):
    from web_harness import async_client, make_app, settings_for

    from colmap_pipeline.web.routes_webhooks import webhook_renderer
    settings = settings_for(tmp_path / "api", api_keys="alice:alice-key-0123456789,"
                            "bob:bob-key-9876543210", webhook_secret=SECRET,
                            public_base_url="https://colmap.example/")
    app = make_app(settings, store=store)
    await store.create_job(job_fields("a", tmp_path, owner="alice", user_email="a@x.example",
                                      webhook_url="https://r.example/h"))
    await finish(store, "a", Intent.COMPLETE, results={
        "frames_extracted": 4, "frames_used": 4, "registered_images": 4, "points3d": 9,
        "mean_reprojection_error_px": 0.5, "mean_track_length": 3.0,
        "artifacts": [{"name": "sparse.ply", "bytes": 10,
                       "media_type": "application/octet-stream", "sha256": "0" * 64}]})
    d = dispatcher(store, tmp_path, Receiver(502))
    d.render = webhook_renderer(app)
    await d.run_once()
    async with async_client(app) as client:
        other = await client.get("/jobs/a/webhooks", headers={"X-API-Key": "bob-key-9876543210"})
        mine = await client.get("/jobs/a/webhooks",
                                headers={"X-API-Key": "alice-key-0123456789"})
    assert (other.status_code, other.json()["error"]["code"]) == (404, "not_found")
    assert mine.status_code == 200
    [listed] = mine.json()["deliveries"]
    assert (listed["event_type"], listed["state"], listed["tries"]) == (
        "job.completed", "pending", 1)
    assert listed["next_try_at"] is not None
    assert listed["attempts"] == [{**listed["attempts"][0], "try": 1, "http_status": 502,
                                   "error": "HTTP 502"}]
    # the body's data: the public view, artifact links signed (keys on) and absolute
    body = Webhook(SECRET).verify(d.client_requests[0].content,
                                  dict(d.client_requests[0].headers))
    [art] = body["data"]["artifacts"]
    assert art["url"].startswith("https://colmap.example/jobs/a/artifacts/sparse.ply?token=")
    assert body["data"]["status"] == "completed"
    assert body["data"].get("user_email") is None  # never sent to a URL
