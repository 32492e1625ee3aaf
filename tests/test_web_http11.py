"""colmap_pipeline.web.http11: a request h11 cannot parse gets the JSON error shape, on a real
uvicorn started with the server's own config (``main.server_config``)."""
from __future__ import annotations

import json
import socket

import pytest
from web_harness import make_app, read_response, served, settings_for


@pytest.mark.parametrize("head", [
    "POST /upload-video HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n",
    "POST /upload-video HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    "GET /health HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n",
], ids=["content-length-not-a-number", "negative-content-length", "broken-header"])
def test_malformed_request_gets_json_400_and_close(tmp_path, head):
    """Issue 11 item 8: uvicorn answered these with a plain-text 400."""
    app = make_app(settings_for(tmp_path))
    with served(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(head.encode())
            status, headers, body = read_response(sock)
            assert status == 400
            assert headers["content-type"] == "application/json"
            assert headers["connection"] == "close"
            err = json.loads(body)["error"]
            assert err["code"] == "invalid_request"
            assert "malformed" in err["message"] and err["hint"]
            sock.settimeout(5)
            assert sock.recv(1) == b""  # closed: the connection's framing is lost
        # the server itself is fine
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock)[0] == 200
