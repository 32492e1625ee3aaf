"""The client behind a proxy (``main.server_config``: uvicorn's proxy headers with
``FORWARDED_ALLOW_IPS``) as the upload limiter sees it, on a real server; and the access-log
filter that keeps signed links' tokens out of the log.

Uploads here are cheap refused ones (a tiny non-video body: 415), counted all the same, and
``MAX_CONCURRENT_JOBS=0``: no reconstruction runs.
"""
from __future__ import annotations

import logging
import socket

import httpx
import pytest
from conftest import ServerProcess, wait_until
from web_harness import (
    BOUNDARY,
    make_app,
    multipart_head,
    raw_request,
    read_response,
    settings_for,
)

from main import redact_access_log, redact_query_tokens, server_config

#: the second loopback address: a source the server does not trust as a proxy
UNTRUSTED_SOURCE = "127.0.0.2"


def upload(client: httpx.Client, forwarded_for: str | None = None) -> int:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    r = client.post("/upload-video", headers=headers, data={"project_id": "proxy"},
                    files={"video": ("clip.mp4", b"not a video", "video/mp4")})
    assert r.status_code in (415, 429), r.text
    if r.status_code == 429:
        assert r.json()["error"]["code"] == "rate_limited"
    return r.status_code


def refused_before_body(port: int, forwarded_for: str) -> int:
    """An upload announcing a 50 MB body and sending none of it: the status it gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        head = multipart_head({"project_id": "proxy"})
        sock.sendall(raw_request(port, "/upload-video", len(head) + 50_000_000,
                                 f"X-Forwarded-For: {forwarded_for}\r\n") + head)
        status, _, body = read_response(sock)
        assert BOUNDARY.encode() not in body
        return status


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """One real server for the module (the tests use separate clients and paths): trusts
    127.0.0.1 as a proxy, 2 uploads a minute, no job runs, access log on, no API keys."""
    env = {"FORWARDED_ALLOW_IPS": "127.0.0.1", "MAX_REQUESTS_PER_MINUTE": "2",
           "MAX_CONCURRENT_JOBS": "0", "RATE_LIMIT_STORAGE_URI": "memory://", "API_KEYS": "",
           "ADMIN_API_KEYS": "", "LOG_LEVEL": "info"}
    server = ServerProcess(tmp_path_factory.mktemp("proxy"), env)
    yield server
    server.stop()


def test_forwarded_clients_have_their_own_limits_only_from_a_trusted_proxy(srv):
    untrusted = httpx.HTTPTransport(local_address=UNTRUSTED_SOURCE)
    with srv.client() as proxy, srv.client(transport=untrusted) as direct:
        # behind the trusted proxy (127.0.0.1): one budget per X-Forwarded-For client
        assert [upload(proxy, "203.0.113.5") for _ in range(3)] == [415, 415, 429]
        assert upload(proxy, "203.0.113.6") == 415
        assert upload(proxy, "198.51.100.1, 203.0.113.6") == 415  # the last hop counts
        assert upload(proxy, "203.0.113.6") == 429
        assert upload(proxy) == 415  # the proxy's own address: another budget still
        # counted before the body is read: the 429 comes while 50 MB are still unsent
        assert refused_before_body(srv.port, "203.0.113.5") == 429
        # the same header from an address not in FORWARDED_ALLOW_IPS is ignored: the client
        # is 127.0.0.2, whatever it claims
        assert upload(direct, "203.0.113.7") == 415  # not 203.0.113.5's spent budget either
        assert upload(direct, "203.0.113.8") == 415
        assert upload(direct, "203.0.113.9") == 429
        assert upload(direct) == 429
        assert upload(proxy, "203.0.113.10") == 415
    log = wait_until(lambda: (t := srv.log_path.read_text()).count("/upload-video") >= 12
                     and t, 10, "the access log of the uploads")
    assert '203.0.113.5:0 - "POST /upload-video HTTP/1.1" 429' in log
    assert f'{UNTRUSTED_SOURCE}:' in log and "203.0.113.7:0" not in log


def test_the_access_log_shows_no_link_token(srv):
    with srv.client() as c:
        assert c.get("/health?token=s3cr3t-HMAC-abc&x=1").status_code == 200
        assert c.get("/health?x=2&TOKEN=s3cr3t-HMAC-def").status_code == 200
        assert c.get("/health?x=3&to%6Ben=s3cr3t-HMAC-ghi").status_code == 200
    log = wait_until(lambda: (t := srv.log_path.read_text()).count("GET /health?") >= 3 and t,
                     10, "three access log lines")
    assert "s3cr3t" not in log
    assert "GET /health?token=***&x=1 HTTP/1.1" in log
    assert "GET /health?x=2&TOKEN=*** HTTP/1.1" in log
    assert "GET /health?x=3&to%6Ben=*** HTTP/1.1" in log


def test_redact_query_tokens():
    assert redact_query_tokens("/jobs/j1/artifacts/sparse.zip?token=abc.def-123") \
        == "/jobs/j1/artifacts/sparse.zip?token=***"
    assert redact_query_tokens("/a?x=1&token=abc&y=token=2") == "/a?x=1&token=***&y=token=2"
    assert redact_query_tokens("/a?tokens=1&mytoken=2&x=token&page=3") \
        == "/a?tokens=***&mytoken=***&x=token&page=3"  # any name holding a secret word
    assert redact_query_tokens("/jobs?api_key=K1&apiKey=K2&access_token=K3&pass=4") \
        == "/jobs?api_key=***&apiKey=***&access_token=***&pass=4"
    assert redact_query_tokens("/a?token=&x=1") == "/a?token=***&x=1"
    assert redact_query_tokens("/a?Token=abc;token=def") == "/a?Token=***;token=***"
    assert redact_query_tokens("/token=abc/x") == "/token=abc/x"  # a path, not a query
    assert redact_query_tokens("no query at all") == "no query at all"


def test_the_access_filter_redacts_the_request_line_and_keeps_the_record():
    # the record uvicorn.access logs: (client, method, path with query, HTTP version, status)
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d', ("203.0.113.5:0", "GET",
                                                           "/jobs/j/events?token=SECRET", "1.1",
                                                           200), None)
    assert redact_access_log(record) is True
    assert record.getMessage() == '203.0.113.5:0 - "GET /jobs/j/events?token=*** HTTP/1.1" 200'
    plain = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                              "GET /x?token=SECRET", None, None)
    assert redact_access_log(plain) and plain.getMessage() == "GET /x?token=***"


def test_server_config_trusts_the_configured_proxies_and_installs_the_filter(tmp_path):
    settings = settings_for(tmp_path, forwarded_allow_ips="10.0.0.0/8,192.0.2.7")
    app = make_app(settings)
    config = server_config(app, settings)
    assert config.proxy_headers is True and config.forwarded_allow_ips == "10.0.0.0/8,192.0.2.7"
    server_config(app, settings)  # twice: one filter still
    assert logging.getLogger("uvicorn.access").filters.count(redact_access_log) == 1
