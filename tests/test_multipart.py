"""Tests for colmap_pipeline.intake.multipart against a real uvicorn server on a real socket.

A TestClient would hand the whole body to the app in one piece; these tests need a socket so
that the server can answer 413 while the client has sent only part of the body, so that a
client can disconnect mid-upload, and so that a body can stall.
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
from web_harness import BOUNDARY, CTYPE, TAIL, multipart_head, read_response
from web_harness import raw_request as raw_headers

from colmap_pipeline.errors import PipelineError
from colmap_pipeline.intake.multipart import (
    MULTIPART_OVERHEAD_BYTES,
    PARTIAL_SUFFIX,
    UPLOAD_SUFFIX,
    receive_files,
)
from colmap_pipeline.intake.upload_body import UploadBody

KIB = 1024
MIB = 1024 * KIB

# -- the app under test ---------------------------------------------------------------------
# Per-test settings; tests run one at a time, the server thread reads these.
STATE = SimpleNamespace(dest_dir=Path("/nonexistent"), outcomes=queue.Queue())

app = FastAPI()


@app.post("/upload")
async def upload(request: Request, max_bytes: int = MIB, chunk_write_bytes: int = MIB,
                 close: bool = False, max_files: int = 1, read_timeout_s: float = 60.0,
                 fields: str = "video", text_fields: str = "") -> Response:
    body = UploadBody(request.headers.get("content-type"), request.headers.get("content-length"),
                      request.stream())
    try:
        received = await receive_files(body, STATE.dest_dir, max_bytes=max_bytes,
                                       chunk_write_bytes=chunk_write_bytes, max_files=max_files,
                                       file_fields=frozenset(fields.split(",")),
                                       text_fields=frozenset(text_fields.split(",")) - {""},
                                       read_timeout_s=read_timeout_s)
    except PipelineError as exc:
        STATE.outcomes.put(exc.code)
        headers = {"Connection": "close"} if close else None
        return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=headers)
    except ClientDisconnect:
        STATE.outcomes.put("client_disconnect")
        return Response(status_code=400)  # nobody is listening any more
    STATE.outcomes.put("ok")
    first = received.files[0]
    return JSONResponse({
        "fields": received.fields,
        "file_field": first.file_field,
        "path": str(first.path),
        "size_bytes": first.size_bytes,
        "sha256": first.sha256,
        "client_filename": first.client_filename,
        "client_content_type": first.client_content_type,
        "files": [{"field": f.file_field, "path": str(f.path), "size_bytes": f.size_bytes,
                   "sha256": f.sha256, "client_filename": f.client_filename}
                  for f in received.files],
        "total_bytes": received.total_bytes,
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
        assert err["details"] == {"max_bytes": limit}  # the client's header is not echoed
        assert err["message"] == ("The upload's Content-Length is larger than the limit of "
                                  f"{limit} bytes.")
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
    assert json.loads(resp)["details"] == {"max_bytes": MIB}
    assert str(body_len).encode() not in resp
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
    got = "has no Content-Type" if not headers else "has another Content-Type"
    assert err["message"] == f"The request must be multipart/form-data with a boundary; it {got}."
    assert err["details"] == {"expected": "multipart/form-data"}
    assert "json" not in r.text  # the header sent is not echoed


@pytest.mark.parametrize("files,message_part", [
    ({"video": ("a.mp4", b"abc"), "image": ("b.jpg", b"def")},
     "Part 2 of the form carries a file, but this form takes files only in 'video'."),
    ([("video", ("a.mp4", b"abc")), ("video", ("b.mp4", b"def"))], "More than one file"),
    ({"video": ("a.mp4", b"abc"), "scan_name": (None, "n" * (64 * KIB + 1))}, "longer than"),
], ids=["unknown-file-field", "second-file", "text-field-too-long"])
def test_form_shape_errors(env, files, message_part):
    r = httpx.post(env.url, files=files)
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "invalid_request"
    assert message_part in r.json()["message"]
    assert listing(env.dest) == []


@pytest.mark.parametrize("text,files,message,details", [
    ("project_id", [("project_id", (None, "a")), ("project_id", (None, "b"))],
     "Form field 'project_id' repeats the name of an earlier field; send each field once.",
     {"field": "project_id"}),
    ("", [("MARK-x", (None, "a")), ("MARK-x", (None, "b"))],
     "Part 2 of the form repeats the name of an earlier field; send each field once.",
     {"part_index": 1}),
    ("", [("MARK-x", (None, "n" * (64 * KIB + 1)))],
     "Part 1 of the form is longer than 65536 bytes.",
     {"part_index": 0, "max_field_bytes": 64 * KIB}),
    ("scan_name", [("scan_name", (None, "n" * (64 * KIB + 1)))],
     "Form field 'scan_name' is longer than 65536 bytes.",
     {"field": "scan_name", "max_field_bytes": 64 * KIB}),
    ("", [("MARK-x", (None, b"MARK-\xff"))], "Part 1 of the form is not valid UTF-8.",
     {"part_index": 0}),
    ("", [("video", ("a.mp4", b"abc")), ("MARK-x", ("MARK.mp4", b"def"))],
     "Part 2 of the form carries a file, but this form takes files only in 'video'.",
     {"part_index": 1}),
], ids=["known-twice", "unknown-twice", "unknown-too-long", "known-too-long", "not-utf8",
        "file-in-unknown-field"])
def test_errors_name_the_forms_own_fields_and_others_by_position(env, text, files, message,
                                                                   details):
    """Issue 13: no error echoes request bytes. A field the form defines is named; a part
    of any other name (the client's words) is named by its position in the form."""
    r = httpx.post(env.url, params={"text_fields": text}, files=files)
    assert r.status_code == 422, r.text
    err = r.json()
    assert (err["code"], err["message"], err["details"]) == ("invalid_request", message, details)
    assert "MARK" not in r.text
    assert listing(env.dest) == []


@pytest.mark.parametrize("body", [
    f"--{BOUNDARY}\r\nMARK\x01: x\r\n\r\n".encode(),  # a control character in a header
    f"--{BOUNDARY}MARK\r\n".encode(),  # no CRLF after the boundary
    b"MARK" * 4,  # no boundary at the start
], ids=["header-char", "boundary-tail", "no-boundary"])
def test_a_malformed_body_is_refused_without_the_parsers_words(env, body):
    """python-multipart's messages quote the body ("Expected boundary character 45, got 77"):
    none is passed on."""
    r = httpx.post(env.url, content=body, headers={"Content-Type": CTYPE})
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["message"] == "The multipart body is malformed."
    assert err["details"] == {"received_bytes": len(body)}
    assert "MARK" not in r.text and "character" not in r.text


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


def test_stalled_body_gets_408_and_its_partial_file_is_removed(env):
    """Issue 10 item 9: a body that stopped arriving held its connection and file forever."""
    body = multipart_head({"quality": "low"}) + payload(512 * KIB) + TAIL
    path = f"/upload?read_timeout_s=0.5&chunk_write_bytes={16 * KIB}"
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as sock:
        sock.sendall(raw_headers(env.port, path, len(body)))
        sock.sendall(body[:len(body) // 2])  # then nothing more
        assert wait_until(lambda: list(env.dest.glob(f"*{PARTIAL_SUFFIX}"))), listing(env.dest)
        started = time.monotonic()
        status, _, resp = read_response(sock, timeout=10)
        waited = time.monotonic() - started
    assert status == 408
    err = json.loads(resp)
    assert err["code"] == "upload_timeout"
    assert err["details"]["read_timeout_s"] == 0.5
    assert 0 < err["details"]["received_bytes"] < len(body)
    assert waited < 5
    assert outcome() == "upload_timeout"
    assert listing(env.dest) == []


def test_several_files_stream_to_their_own_names(env):
    parts = [payload(100 * KIB + i, seed=i) for i in range(3)]
    files = [("images", (f"p{i}.jpg", p, "image/jpeg")) for i, p in enumerate(parts)]
    r = httpx.post(env.url, params={"max_files": 3, "fields": "images,zip",
                                    "chunk_write_bytes": 8 * KIB},
                   data={"project_id": "p"}, files=files, timeout=10)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["fields"] == {"project_id": "p"}
    assert [f["client_filename"] for f in got["files"]] == ["p0.jpg", "p1.jpg", "p2.jpg"]
    assert [Path(f["path"]).read_bytes() for f in got["files"]] == parts
    assert [f["sha256"] for f in got["files"]] == [hashlib.sha256(p).hexdigest() for p in parts]
    assert got["total_bytes"] == sum(map(len, parts))
    assert len({f["path"] for f in got["files"]}) == 3
    assert not list(env.dest.glob(f"*{PARTIAL_SUFFIX}"))


@pytest.mark.parametrize("params,files,status,code,message_part", [
    ({"max_files": 2, "fields": "images"},
     [("images", ("a.jpg", b"a")), ("images", ("b.jpg", b"b")), ("images", ("c.jpg", b"c"))],
     422, "invalid_request", "Too many files (at most 2)"),
    ({"max_files": 3, "fields": "images", "max_bytes": 150 * KIB},
     [("images", ("a.jpg", payload(100 * KIB))), ("images", ("b.jpg", payload(100 * KIB)))],
     413, "upload_too_large", "in total"),
    ({"max_files": 3, "fields": "images"},
     [("images", ("a.jpg", b"a")), ("images", ("b.jpg", b""))], 400, "empty_file", "empty"),
], ids=["too-many-files", "total-too-large", "one-empty"])
def test_several_files_limits_leave_nothing(env, params, files, status, code, message_part):
    r = httpx.post(env.url, params=params, files=files, timeout=10)
    assert r.status_code == status, r.text
    assert r.json()["code"] == code and message_part in r.json()["message"]
    if code == "empty_file":
        assert r.json()["details"] == {"field": "images", "file_index": 1}
    assert listing(env.dest) == []


def test_content_length_that_is_not_a_number_is_refused_before_reading(tmp_path):
    """The receiver's own check (uvicorn/h11 refuses such a request before the app: see
    test_web_http11.py for what the server answers)."""
    import asyncio

    async def never():
        raise AssertionError("the body must not be read")
        yield b""  # pragma: no cover

    for raw in ("12abc", "1_000", "-5", "١٢"):  # int() takes the last three; HTTP does not
        body = UploadBody(CTYPE, raw, never())
        with pytest.raises(PipelineError) as ei:
            asyncio.run(receive_files(body, tmp_path, max_bytes=MIB))
        assert ei.value.code == "invalid_request"
        assert ei.value.message == "The Content-Length header is not an integer."
        assert ei.value.details is None
    assert list(tmp_path.iterdir()) == []
