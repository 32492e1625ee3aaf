"""colmap_pipeline.web.rate_limit, in process: the upload limit per API key (else per client
address), its counters shared between two apps through Redis, and failing open (one warning
a minute, never the password) when the storage is down.

The Redis tests use ``redis://127.0.0.1:6379/13`` and a key name unique to the run, delete
what they counted, and are skipped (saying why) where no Redis answers.
"""
from __future__ import annotations

import logging
import threading
import uuid

import httpx
import pytest
from conftest import SAMPLE_VIDEO
from web_harness import free_port

from colmap_pipeline.web.rate_limit import (
    UploadRateLimiter,
    open_storage,
    storage_name,
)

pytestmark = pytest.mark.asyncio
REDIS_DB = 13
REDIS_URL = f"redis://127.0.0.1:6379/{REDIS_DB}"
NOT_A_VIDEO = b"not a video, but counted"


@pytest.fixture
def redis_db():
    """A client of :data:`REDIS_URL` (skip without Redis); deletes the test's counters after."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis answers at 127.0.0.1:6379 ({type(exc).__name__}: {exc})")
    marker = f"h2-{uuid.uuid4().hex[:12]}"
    yield client, marker
    keys = client.keys(f"LIMITS*{marker}*")
    if keys:
        client.delete(*keys)
    client.close()


def closed_port_uri(password: str = "") -> str:
    """A Redis URI on a local port nobody listens on (connection refused at once)."""
    auth = f":{password}@" if password else ""
    return f"redis://{auth}127.0.0.1:{free_port()}/0"


def client_at(api, address: str, **headers: str) -> httpx.AsyncClient:
    """An in-process client of ``api.app`` whose connection comes from ``address``."""
    transport = httpx.ASGITransport(app=api.app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers)


async def upload(client: httpx.AsyncClient, video: bytes = NOT_A_VIDEO,
                 **headers: str) -> httpx.Response:
    """An upload; by default a cheap one the intake refuses (415) after the limiter counted
    it (an error answer carries no ``X-RateLimit-*``: only the 202 and the 429 do)."""
    return await client.post("/upload-video", headers=headers,
                             data={"project_id": "proj-rate", "quality": "low"},
                             files={"video": ("clip.mp4", video, "video/mp4")})


async def test_two_apps_sharing_redis_share_one_count_per_key(make_api, redis_db):
    redis_client, name = redis_db
    keys = f"{name}:secret-{uuid.uuid4().hex}"
    api_a = await make_api(max_requests_per_minute=2, rate_limit_storage_uri=REDIS_URL,
                           api_keys=keys)
    api_b = await make_api(max_requests_per_minute=2, rate_limit_storage_uri=REDIS_URL,
                           api_keys=keys)
    assert api_a.app.state.upload_limiter is not api_b.app.state.upload_limiter
    key = {"X-API-Key": keys.partition(":")[2]}
    threads: list[int] = []
    count = api_a.app.state.upload_limiter._count

    def counted_in(key: str):
        threads.append(threading.get_ident())
        return count(key)
    api_a.app.state.upload_limiter._count = counted_in
    first = await upload(api_a.client, SAMPLE_VIDEO.read_bytes(), **key)
    assert first.status_code == 202, first.text
    assert (first.headers["x-ratelimit-limit"], first.headers["x-ratelimit-remaining"]) \
        == ("2", "1")
    assert (await upload(api_a.client, **key)).status_code == 415
    assert threads and threading.get_ident() not in threads  # Redis is called off the loop
    third = await upload(api_b.client, **key, **{"Idempotency-Key": "echo-me-" + name})
    assert third.status_code == 429
    assert third.json()["error"] == {
        "code": "rate_limited", "message": "Rate limit exceeded: 2 per 1 minute.",
        "hint": "Wait for the number of seconds in Retry-After and try again."}
    assert "echo-me" not in third.text and "proj-rate" not in third.text
    assert third.headers["x-ratelimit-remaining"] == "0"
    assert 1 <= int(third.headers["retry-after"]) <= 60
    stored = redis_client.keys(f"LIMITS*{name}*")
    assert [k.decode() for k in stored] == [f"LIMITS:LIMITER/key:{name}/2/1/minute"]
    assert int(redis_client.get(stored[0])) == 3  # the refused upload counted too
    assert 0 < redis_client.ttl(stored[0]) <= 60


async def test_without_a_key_each_client_address_has_its_own_count(make_api):
    api = await make_api(max_requests_per_minute=2)
    one, two = client_at(api, "198.51.100.1"), client_at(api, "198.51.100.2")
    try:
        assert [(await upload(one)).status_code for _ in range(3)] == [415, 415, 429]
        assert [(await upload(two)).status_code for _ in range(3)] == [415, 415, 429]
    finally:
        await one.aclose()
        await two.aclose()


async def test_with_a_key_its_count_follows_the_key_not_the_address(make_api):
    api = await make_api(max_requests_per_minute=2, api_keys="alice:key-a,bob:key-b")
    alice_1 = client_at(api, "198.51.100.1", **{"X-API-Key": "key-a"})
    alice_2 = client_at(api, "198.51.100.2", **{"Authorization": "Bearer key-a"})
    bob_1 = client_at(api, "198.51.100.1", **{"X-API-Key": "key-b"})
    try:
        assert (await upload(alice_1)).status_code == 415
        assert (await upload(alice_2)).status_code == 415
        assert (await upload(alice_1)).status_code == 429  # one budget from both addresses
        # same address as alice_1, another key: its own budget
        assert [(await upload(bob_1)).status_code for _ in range(3)] == [415, 415, 429]
        anonymous = await upload(client_at(api, "198.51.100.3"))
        assert anonymous.status_code == 401  # authentication first: not counted
        assert "x-ratelimit-remaining" not in anonymous.headers
    finally:
        for c in (alice_1, alice_2, bob_1):
            await c.aclose()


async def test_redis_down_fails_open_with_one_warning(make_api, caplog):
    uri = closed_port_uri(password="hunter2-pw")
    api = await make_api(max_requests_per_minute=2, rate_limit_storage_uri=uri)
    caplog.set_level(logging.WARNING, logger="colmap_worker.rate_limit")
    answers = [await upload(api.client) for _ in range(3)]
    answers.append(await upload(api.client, SAMPLE_VIDEO.read_bytes()))
    # over the limit of 2, yet let through: and no X-RateLimit-* even on the 202
    assert [r.status_code for r in answers] == [415, 415, 415, 202]
    assert not any(h.startswith("x-ratelimit") for r in answers for h in r.headers)
    warnings = [r for r in caplog.records if r.name == "colmap_worker.rate_limit"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    text = warnings[0].getMessage()
    assert storage_name(uri) in text and "unreachable" in text and "ConnectionError" in text
    assert "hunter2" not in caplog.text


async def test_storage_warning_repeats_at_most_once_a_minute(caplog):
    now = [1000.0]
    limiter = UploadRateLimiter(2, closed_port_uri(), clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="colmap_worker.rate_limit")
    seen = []
    for step in (0, 30, 29.9, 0.2, 59, 1):  # at t = 0, 30, 59.9, 60.1, 119.1, 120.1
        now[0] += step
        assert await limiter.hit("ip:198.51.100.9") is None
        seen.append(len(caplog.records))
    assert seen == [1, 1, 1, 2, 2, 3]


async def test_memory_storage_counts_on_the_loop():
    limiter = UploadRateLimiter(1)
    first, second = await limiter.hit("ip:a"), await limiter.hit("ip:a")
    assert first is not None and second is not None
    assert (first.allowed, first.remaining, second.allowed, second.remaining) == (True, 0,
                                                                                  False, 0)
    assert second.headers()["Retry-After"] in {str(s) for s in range(1, 61)}
    assert limiter.storage == "memory://" and str(limiter) == "1 per 1 minute"


@pytest.mark.parametrize("uri, says", [
    ("nosuch://:pw-secret@host:1/0", "unknown storage scheme"),
    ("async+redis://:pw-secret@127.0.0.1:6379/0", "use the synchronous scheme"),
])
async def test_a_bad_storage_uri_is_refused_without_its_password(uri, says):
    with pytest.raises(ValueError) as info:
        open_storage(uri)
    assert says in str(info.value) and "pw-secret" not in str(info.value)
    assert str(info.value).startswith(f"RATE_LIMIT_STORAGE_URI {storage_name(uri)}")


async def test_storage_name_drops_user_and_password():
    assert storage_name("redis://user:pw@cache.internal:6380/2") == "redis://cache.internal:6380/2"
    assert storage_name("rediss://:pw@[::1]:6379") == "rediss://[::1]:6379"
    assert storage_name("memory://") == "memory://"
