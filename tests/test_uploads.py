"""Tests for colmap_pipeline.intake.multipart against a real uvicorn server on a real socket.

A TestClient would hand the whole body to the app in one piece; these tests need a socket so
that the server can answer 413 while the client has sent only part of the body, and so that a
client can disconnect mid-upload.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import random
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from colmap_pipeline.errors import PipelineError
from colmap_pipeline.intake.multipart import (
    MULTIPART_OVERHEAD_BYTES,
    PARTIAL_SUFFIX,
    UPLOAD_SUFFIX,
    receive_upload,
)

KIB = 1024
MIB = 1024 * KIB
BOUNDARY = "test-boundary-7d8f2a"

# -- the app under test ---------------------------------------------------------------------
# Per-test settings; tests run one at a time, the server thread reads these.
STATE = SimpleNamespace(dest_dir=Path("/nonexistent"), outcomes=queue.Queue())

app = FastAPI()


@app.post("/upload")
async def upload(request: Request, max_bytes: int = MIB, chunk_write_bytes: int = MIB,
                 close: bool = False) -> Response:
    try:
        received = await receive_upload(request, STATE.dest_dir, max_bytes=max_bytes,
                                        chunk_write_bytes=chunk_write_bytes)
    except PipelineError as exc:
        STATE.outcomes.put(exc.code)
        headers = {"Connection": "close"} if close else None
        return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=headers)
    except ClientDisconnect:
        STATE.outcomes.put("client_disconnect")
        return Response(status_code=400)  # nobody is listening any more
    STATE.outcomes.put("ok")
    return JSONResponse({
        "fields": received.fields,
        "file_field": received.file_field,
        "path": str(received.path),
        "size_bytes": received.size_bytes,
        "sha256": received.sha256,
        "client_filename": received.client_filename,
        "client_content_type": received.client_content_type,
    })


@pytest.fixture(scope="module")
def server() -> Iterator[SimpleNamespace]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield SimpleNamespace(port=port, url=f"http://127.0.0.1:{port}/upload")
    srv.should_exit = True
    thread.join(timeout=5)
    sock.close()


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server) -> SimpleNamespace:
    """A fresh dest_dir and a fresh, empty system temp dir (tempfile.gettempdir()) per test."""
    dest = tmp_path / "uploads"
    dest.mkdir()
    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    STATE.dest_dir = dest
    STATE.outcomes = queue.Queue()
    return SimpleNamespace(dest=dest, systmp=systmp, root=tmp_path, port=server.port,
                           url=server.url)


# -- helpers --------------------------------------------------------------------------------
def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def multipart_head(fields: dict[str, str], file_field: str = "video",
                   filename: str = "clip.mp4") -> bytes:
    """Everything up to (and including) the blank line before the file's bytes."""
    out = []
    for name, value in fields.items():
        out.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                   f"{value}\r\n")
    out.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{file_field}"; '
               f'filename="{filename}"\r\nContent-Type: video/mp4\r\n\r\n')
    return "".join(out).encode()


TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"


def raw_headers(port: int, path: str, content_length: int | None, extra: str = "") -> bytes:
    length = f"Content-Length: {content_length}\r\n" if content_length is not None else ""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {CTYPE}\r\n"
            f"{length}{extra}\r\n").encode()


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict, bytes]:
    """Read one HTTP/1.1 response (status, lower-cased headers, body) from a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-response"
        body += chunk
    return status, headers, body[:length]


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*"))


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def outcome() -> str:
    return STATE.outcomes.get(timeout=5)


# -- tests ----------------------------------------------------------------------------------
def test_normal_upload_streams_to_a_server_made_name(env):
    body = payload(3 * MIB + 12345)
    fields = {"project_id": "proj-1", "scan_name": "Kitchen ünïcode", "quality": "medium",
              "user_email": "a@example.com"}
    evil = "../../etc/passwd.mp4"
    r = httpx.post(env.url, params={"max_bytes": 4 * MIB, "chunk_write_bytes": 256 * KIB},
                   data=fields, files={"video": (evil, body, "video/mp4")}, timeout=10)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["fields"] == fields
    assert got["file_field"] == "video"
    assert got["size_bytes"] == len(body)
    assert got["sha256"] == hashlib.sha256(body).hexdigest()
    assert got["client_filename"] == evil
    assert got["client_content_type"] == "video/mp4"

    stored = Path(got["path"])
    assert stored.parent == env.dest
    assert stored.read_bytes() == body
    assert stored.suffix == UPLOAD_SUFFIX and len(stored.stem) == 32
    int(stored.stem, 16)  # a uuid4 hex, nothing from the client
    assert listing(env.dest) == [stored.name]
    for root in (env.root, env.root.parent):
        assert not [p for p in root.rglob("*") if "passwd" in p.name]
    assert not (env.dest / evil).resolve().exists()
    assert listing(env.systmp) == []


def test_file_of_exactly_max_bytes_is_accepted_and_one_more_byte_is_not(env):
    limit = 200 * KIB
    for size, status in ((limit, 200), (limit + 1, 413)):
        body = multipart_head({"quality": "low"}) + payload(size) + TAIL
        assert len(body) <= limit + MULTIPART_OVERHEAD_BYTES  # passes the Content-Length check
        r = httpx.post(env.url, params={"max_bytes": limit, "chunk_write_bytes": 16 * KIB},
                       content=body, headers={"Content-Type": CTYPE}, timeout=10)
        assert r.status_code == status, r.text
        if status == 413:
            err = r.json()
            assert err["code"] == "upload_too_large"
            assert err["details"]["max_bytes"] == limit
            assert err["details"]["received_bytes"] > limit
    # Only the accepted file remains; the rejected one's partial file is gone.
    assert [p.suffix for p in env.dest.iterdir()] == [UPLOAD_SUFFIX]
    assert not list(env.dest.glob(f"*{PARTIAL_SUFFIX}"))


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_honest_content_length_over_limit_gets_413_before_the_body_is_sent(env, close):
    limit = 1 * MIB
    body = multipart_head({"quality": "high"}) + payload(8 * MIB) + TAIL
    path = f"/upload?max_bytes={limit}&close={str(close).lower()}"
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as sock:
        sock.sendall(raw_headers(env.port, path, len(body)))
        sock.sendall(body[:64 * KIB])  # then stop: the other ~8 MiB are never sent
        status, headers, resp = read_response(sock)
        assert status == 413
        err = json.loads(resp)
        assert err["code"] == "upload_too_large"
        assert err["details"] == {"max_bytes": limit, "content_length": len(body)}
        if close:
            # The route asked for Connection: close, so the server hangs up instead of
            # draining the rest of the body.
            assert headers.get("connection") == "close"
            sock.settimeout(5)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass  # closed with our unread bytes still queued: also a hang-up
    assert outcome() == "upload_too_large"
    assert listing(env.dest) == []
    assert listing(env.systmp) == []


def test_expect_100_continue_gets_413_without_sending_any_body(env):
    body_len = 50 * MIB
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as sock:
        sock.sendall(raw_headers(env.port, f"/upload?max_bytes={MIB}", body_len,
                                 extra="Expect: 100-continue\r\n"))
        status, _, resp = read_response(sock)  # a "100 Continue" here would fail the parse
    assert status == 413
    assert json.loads(resp)["details"]["content_length"] == body_len
    assert listing(env.dest) == []


def test_chunked_upload_over_the_limit_is_cut_off(env):
    limit = 256 * KIB
    sent = 0

    def gen() -> Iterator[bytes]:
        nonlocal sent
        yield multipart_head({"quality": "low"})
        for i in range(64):  # 4 MiB if the server read it all
            sent += 64 * KIB
            yield payload(64 * KIB, seed=i)
        yield TAIL

    r = httpx.post(env.url, params={"max_bytes": limit, "chunk_write_bytes": 32 * KIB},
                   content=gen(), headers={"Content-Type": CTYPE}, timeout=10)
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413, r.text
    err = r.json()
    assert err["code"] == "upload_too_large" and err["details"]["max_bytes"] == limit
    assert outcome() == "upload_too_large"
    assert listing(env.dest) == []
    assert listing(env.systmp) == []


def test_chunked_raw_body_is_capped_even_when_the_file_is_small(env):
    limit = 128 * KIB

    def gen() -> Iterator[bytes]:
        yield multipart_head({"quality": "low"}) + payload(KIB) + TAIL
        for _ in range(64):  # an endless epilogue after the closing boundary
            yield b"x" * (64 * KIB)

    r = httpx.post(env.url, params={"max_bytes": limit}, content=gen(),
                   headers={"Content-Type": CTYPE}, timeout=10)
    assert r.status_code == 413, r.text
    assert r.json()["details"]["received_bytes"] > limit + MULTIPART_OVERHEAD_BYTES
    assert listing(env.dest) == []


def test_empty_file(env):
    r = httpx.post(env.url, data={"quality": "low"}, files={"video": ("a.mp4", b"")})
    assert r.status_code == 400
    assert r.json()["code"] == "empty_file"
    assert listing(env.dest) == []


def test_missing_file_field_names_the_field(env):
    r = httpx.post(env.url, data={"quality": "low"},
                   files={"notvideo_text": (None, "just text")})
    assert r.status_code == 422
    err = r.json()
    assert err["code"] == "invalid_request"
    assert err["message"] == "Missing form field 'video'"
    assert err["details"] == {"field": "video"}


@pytest.mark.parametrize("headers,content", [
    ({"Content-Type": "application/json"}, b'{"video": "x"}'),
    ({"Content-Type": "multipart/form-data"}, b"--x\r\n"),  # no boundary
    ({}, b"raw bytes"),
], ids=["json", "no-boundary", "no-content-type"])
def test_wrong_content_type(env, headers, content):
    r = httpx.post(env.url, content=content, headers=headers)
    assert r.status_code == 422
    err = r.json()
    assert err["code"] == "invalid_request"
    assert "multipart/form-data" in err["message"]


@pytest.mark.parametrize("files,message_part", [
    ({"video": ("a.mp4", b"abc"), "image": ("b.jpg", b"def")}, "Unexpected file field 'image'"),
    ([("video", ("a.mp4", b"abc")), ("video", ("b.mp4", b"def"))], "More than one file"),
    ({"video": ("a.mp4", b"abc"), "scan_name": (None, "n" * (64 * KIB + 1))}, "longer than"),
], ids=["unknown-file-field", "second-file", "text-field-too-long"])
def test_form_shape_errors(env, files, message_part):
    r = httpx.post(env.url, files=files)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_request"
    assert message_part in r.json()["message"]
    assert listing(env.dest) == []


def test_body_without_closing_boundary_is_rejected_and_cleaned_up(env):
    body = multipart_head({}) + payload(100 * KIB)  # no TAIL
    r = httpx.post(env.url, params={"chunk_write_bytes": 8 * KIB}, content=body,
                   headers={"Content-Type": CTYPE})
    assert r.status_code == 422
    assert "closing boundary" in r.json()["message"]
    assert listing(env.dest) == []


def test_client_disconnect_mid_upload_leaves_no_partial_file(env):
    body = multipart_head({"quality": "low"}) + payload(2 * MIB) + TAIL
    path = f"/upload?max_bytes={4 * MIB}&chunk_write_bytes={16 * KIB}"
    sock = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    try:
        sock.sendall(raw_headers(env.port, path, len(body)))
        sock.sendall(body[:len(body) // 2])
        # The server is writing a partial file...
        assert wait_until(lambda: list(env.dest.glob(f"*{PARTIAL_SUFFIX}"))), listing(env.dest)
    finally:
        sock.close()  # ...when the client goes away.
    assert outcome() == "client_disconnect"
    assert wait_until(lambda: listing(env.dest) == []), listing(env.dest)
    assert listing(env.systmp) == []
    assert os.listdir(env.dest) == []
