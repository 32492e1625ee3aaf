"""Issue 13 item 6: no error answer echoes request bytes, and none carries a stack trace.

Every request below carries the marker ``ECHO7f3q`` in each place a client controls that the
case is not about (a header of its own, ``User-Agent``, an unknown query parameter), and in the
one place the case is about: a path segment, a query value, a header value, a multipart field
name or value, a file name, a zip entry name, a file's content. Each answer must be the
expected 4xx with the one JSON error shape, hold the marker nowhere (body or headers, any
case), and hold no ``Traceback`` or ``File "``. In process (``make_api``: the in-memory store,
a fake runner), except the video cases, whose probe runs in its real child.
"""
from __future__ import annotations

import stat
import struct
import zipfile
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from factories import bomb_zip, jpeg_bytes, make_zip, zip_with
from web_harness import BOUNDARY, CTYPE, add_job

from colmap_pipeline.intake.problems import validation_problems
from colmap_pipeline.jobs import JobStatus

MARK = "ECHO7f3q"
#: a 4-character marker for an MP4 box type (box types have 4 characters)
BOX_MARK = b"E7fQ"
#: the marker in every request's own header, User-Agent and an unknown query parameter
MARK_HEADERS = {"User-Agent": f"client/{MARK}", f"X-{MARK}": MARK, "Accept-Language": MARK}
PHOTOS = [(f"p{i}.jpg", jpeg_bytes(seed=i)) for i in range(3)]
KEYS = {"api_keys": "a:key-1"}

Send = Callable[[Any], Awaitable[httpx.Response]]
#: case name -> (expected status, expected code, settings of the app, the request)
CASES: dict[str, tuple[int, str, dict[str, Any], Send]] = {}


def case(name: str, status: int, code: str, **settings: Any) -> Callable[[Send], Send]:
    def register(send: Send) -> Send:
        CASES[name] = (status, code, settings, send)
        return send
    return register


def part(name: bytes | str, value: bytes | str, filename: bytes | str | None = None,
         headers: bytes = b"") -> bytes:
    """One multipart part, every byte as given (names may be any bytes)."""
    def b(v: bytes | str) -> bytes:
        return v.encode() if isinstance(v, str) else v
    disposition = b'Content-Disposition: form-data; name="' + b(name) + b'"'
    if filename is not None:
        disposition += b'; filename="' + b(filename) + b'"'
    return (b"--" + BOUNDARY.encode() + b"\r\n" + disposition + b"\r\n" + headers + b"\r\n"
            + b(value) + b"\r\n")


def form(*parts: bytes, project_id: bool = True) -> bytes:
    """A multipart body: a valid ``project_id`` (unless told), ``parts``, the closing line."""
    head = part("project_id", "p") if project_id else b""
    return head + b"".join(parts) + b"--" + BOUNDARY.encode() + b"--\r\n"


def photos(*extra: tuple[str, bytes], field: str = "images") -> bytes:
    return form(*(part(field, data, name) for name, data in [*PHOTOS, *extra]))


def one_zip(data: bytes) -> bytes:
    return form(part("zip", data, f"{MARK}.zip"))


async def send(api: Any, method: str, path: str, *, body: bytes | None = None,
               headers: dict[str, str] | None = None) -> httpx.Response:
    """``method path`` with the marker in a header, User-Agent and an unknown query name."""
    sep = "&" if "?" in path else "?"
    all_headers = {**MARK_HEADERS, **({"Content-Type": CTYPE} if body is not None else {}),
                   **(headers or {})}
    return await api.client.request(method, f"{path}{sep}{MARK}={MARK}", content=body,
                                    headers=all_headers)


def upload(path: str, body: bytes, **headers: str) -> Send:
    return lambda api: send(api, "POST", path, body=body, headers=headers)


# -- path segments ----------------------------------------------------------------------------
for _method, _path in [("GET", "/jobs/{m}"), ("DELETE", "/jobs/{m}"), ("GET", "/jobs/{m}/frames"),
                       ("POST", "/jobs/{m}/cancel"), ("POST", "/jobs/{m}/retry"),
                       ("GET", "/jobs/{m}/artifacts/{m}"), ("HEAD", "/jobs/{m}/artifacts/{m}")]:
    case(f"path {_method} {_path}", 404, "not_found")(
        lambda api, m=_method, p=_path: send(api, m, p.format(m=MARK)))
case("unknown route", 404, "not_found")(lambda api: send(api, "GET", f"/{MARK}/%3Cb%3E{MARK}"))
case("method not allowed", 405, "invalid_request")(
    lambda api: send(api, "PATCH", f"/jobs/{MARK}"))


async def _completed(api: Any, owner: str | None = None) -> str:
    art = {"name": "sparse.ply", "bytes": 3, "media_type": "application/octet-stream"}
    job = await add_job(api.store, JobStatus.COMPLETED, owner=owner,
                        results={"artifacts": [art]})
    return job.job_id


@case("artifact name", 404, "artifact_not_found")
async def _artifact_name(api: Any) -> httpx.Response:
    return await send(api, "GET", f"/jobs/{await _completed(api)}/artifacts/{MARK}.ply")


@case("artifact of a pending job", 409, "job_not_completed")
async def _artifact_pending(api: Any) -> httpx.Response:
    job = await add_job(api.store, JobStatus.PENDING)
    return await send(api, "GET", f"/jobs/{job.job_id}/artifacts/{MARK}")


# -- query values -----------------------------------------------------------------------------
case("query values", 422, "invalid_request")(lambda api: send(
    api, "GET", f"/jobs?status={MARK}&limit={MARK}&offset={MARK}&project_id={MARK * 30}"))
case("query owner too long", 422, "invalid_request")(
    lambda api: send(api, "GET", f"/jobs?owner={MARK * 30}"))

# -- keys and signed links --------------------------------------------------------------------
case("wrong X-API-Key", 401, "unauthorized", **KEYS)(
    lambda api: send(api, "GET", "/jobs", headers={"X-API-Key": MARK}))
case("wrong bearer key", 401, "unauthorized", **KEYS)(
    lambda api: send(api, "GET", f"/jobs/{MARK}", headers={"Authorization": f"Bearer {MARK}"}))
case("wrong key on an upload", 401, "unauthorized", **KEYS)(
    upload("/upload-images", photos(), **{"X-API-Key": MARK * 70}))  # longer than any key


@case("altered link token", 401, "link_expired", **KEYS)
async def _link(api: Any) -> httpx.Response:
    job_id = await _completed(api, owner="a")
    return await send(api, "GET", f"/jobs/{job_id}/artifacts/sparse.ply?token=1.{MARK}")


# -- header values ----------------------------------------------------------------------------
case("Content-Type", 422, "invalid_request")(
    upload("/upload-video", form(part("video", MARK, "a.mp4")), **{"Content-Type": MARK}))
case("boundary", 422, "invalid_request")(upload(
    "/upload-video", form(part("video", MARK, "a.mp4")),
    **{"Content-Type": f"multipart/form-data; boundary={MARK}"}))
case("Idempotency-Key too long", 422, "invalid_request")(
    upload("/upload-images", photos(), **{"Idempotency-Key": MARK * 30}))
case("Content-Length junk", 422, "invalid_request")(
    upload("/upload-video", form(part("video", MARK, "a.mp4")), **{"Content-Length": MARK}))
case("Content-Length over the limit", 413, "upload_too_large", max_upload_bytes=1)(
    upload("/upload-video", form(part("video", MARK * 10000, f"{MARK}.mp4"))))


@case("Idempotency-Key reused", 422, "idempotency_key_reused")
async def _reused(api: Any) -> httpx.Response:
    first = await send(api, "POST", "/upload-images", body=photos(),
                       headers={"Idempotency-Key": MARK})
    assert first.status_code == 202, first.text
    return await send(api, "POST", "/upload-images", body=photos(("p3.jpg", jpeg_bytes(seed=3))),
                      headers={"Idempotency-Key": MARK})


@case("rate limited", 429, "rate_limited", max_requests_per_minute=1)
async def _limited(api: Any) -> httpx.Response:
    assert (await send(api, "POST", "/upload-images", body=photos())).status_code == 202
    return await send(api, "POST", "/upload-images", body=photos())


@case("pending quota", 429, "quota_exceeded", max_pending_jobs_per_key=1, **KEYS)
async def _quota(api: Any) -> httpx.Response:
    await add_job(api.store, owner="a")
    return await send(api, "POST", "/upload-images", body=photos(),
                      headers={"X-API-Key": "key-1"})


# -- multipart field names --------------------------------------------------------------------
case("file in an unknown field", 422, "invalid_request")(
    upload("/upload-video", form(part("video", b"v", "a.mp4"), part(MARK, b"x", f"{MARK}.mp4"))))
case("unknown field twice", 422, "invalid_request")(
    upload("/upload-video", form(part(MARK, MARK), part(MARK, MARK), part("video", b"v", "a"))))
case("unknown field too long", 422, "invalid_request")(
    upload("/upload-video", form(part(MARK, MARK * 9000), part("video", b"v", "a.mp4"))))
case("field name not UTF-8", 422, "invalid_request")(
    upload("/upload-video", form(part(MARK.encode() + b"\xff", b"x"), part("video", b"v", "a"))))
case("unknown field value not UTF-8", 422, "invalid_request")(
    upload("/upload-video", form(part(MARK, MARK.encode() + b"\xff"), part("video", b"v", "a"))))
case("part without a name", 422, "invalid_request")(upload("/upload-video", form(
    b"--" + BOUNDARY.encode() + f"\r\nContent-Disposition: {MARK}\r\n\r\nx\r\n".encode())))
case("malformed part header", 422, "invalid_request")(upload("/upload-video", form(
    b"--" + BOUNDARY.encode() + f"\r\n{MARK}\x01: x\r\n\r\nx\r\n".encode())))
case("garbage after the boundary", 422, "invalid_request")(
    upload("/upload-video", f"--{BOUNDARY}{MARK}\r\n".encode()))
case("no closing boundary", 422, "invalid_request")(
    upload("/upload-video", part("video", MARK, f"{MARK}.mp4")))

# -- multipart field values -------------------------------------------------------------------
for _field, _value in [("project_id", MARK * 30), ("user_email", MARK), ("quality", MARK),
                       ("scan_name", f"{MARK}\x07"), ("scan_name", "")]:
    case(f"form value {_field}={_value[:12]!r}", 422, "invalid_request")(upload(
        "/upload-images", form(part(_field, _value), *(part("images", d, n) for n, d in PHOTOS),
                               project_id=_field != "project_id")))
case("no project_id", 422, "invalid_request")(upload("/upload-images", form(
    *(part("images", d, n) for n, d in PHOTOS), part(MARK, MARK), project_id=False)))

# -- file names and contents ------------------------------------------------------------------
case("empty video", 400, "empty_file")(upload("/upload-video", form(part("video", b"", MARK))))
case("no video file", 422, "invalid_request")(upload("/upload-video", form(part(MARK, MARK))))
case("a photo that is not one", 415, "unsupported_image")(
    upload("/upload-images", photos((f"{MARK}.jpg", MARK.encode() * 4))))
case("too few photos", 422, "too_few_frames")(
    upload("/upload-images", form(part("images", jpeg_bytes(), f"{MARK}.jpg"))))
case("a zip among photos", 422, "invalid_request")(
    upload("/upload-images", photos((f"{MARK}.zip", make_zip(PHOTOS)))))
case("a video that is not one", 415, "no_video_stream")(
    upload("/upload-video", form(part("video", MARK.encode() * 100, f"{MARK}.mp4"))))


def _mp4_without_index() -> bytes:
    """``ftyp``, a box whose type is :data:`BOX_MARK`, and a cut ``mdat``: no ``moov``."""
    ftyp = struct.pack(">I4s4sI", 16, b"ftyp", b"isom", 0x200)
    odd = struct.pack(">I4s", 16, BOX_MARK) + MARK.encode()
    return ftyp + odd + struct.pack(">I4s", 4096, b"mdat") + bytes(512)


case("an MP4 without its index", 422, "video_incomplete")(
    upload("/upload-video", form(part("video", _mp4_without_index(), f"{MARK}.mp4"))))

# -- zip entries ------------------------------------------------------------------------------


def _zip_with(info: zipfile.ZipInfo, data: bytes) -> bytes:
    return zip_with(PHOTOS, info, data)


def _symlink() -> bytes:
    info = zipfile.ZipInfo(f"{MARK}.jpg")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return _zip_with(info, f"/{MARK}".encode())


def _encrypted() -> bytes:
    data = bytearray(_zip_with(zipfile.ZipInfo(f"{MARK}.jpg"), jpeg_bytes()))
    data[data.rindex(b"PK\x01\x02") + 8] |= 0x1  # central directory: flag bit 0, encrypted
    return bytes(data)


def _bad_crc() -> bytes:
    photo = jpeg_bytes(seed=9)
    data = bytearray(_zip_with(zipfile.ZipInfo(f"{MARK}.jpg"), photo))
    data[data.rindex(photo) + 100] ^= 0xFF
    return bytes(data)


def _bomb() -> bytes:
    return bomb_zip().replace(b"bomb.png", b"ECHO.png")  # the marker's first half, same length


for _name, _data, _status, _code in [
        ("absolute entry", make_zip(PHOTOS + [(f"/tmp/{MARK}.jpg", jpeg_bytes())]), 422,
         "unsafe_archive"),
        ("'..' entry", make_zip(PHOTOS + [(f"../{MARK}.jpg", jpeg_bytes())]), 422,
         "unsafe_archive"),
        ("symlink entry", _symlink(), 422, "unsafe_archive"),
        ("encrypted entry", _encrypted(), 422, "unsafe_archive"),
        ("damaged entry", _bad_crc(), 422, "unsafe_archive"),
        ("zip bomb entry", _bomb(), 422, "unsafe_archive"),
        ("non-photo entry", make_zip(PHOTOS + [(f"{MARK}.txt", b"hi")]), 415,
         "unsupported_image"),
        ("non-photo content", make_zip(PHOTOS + [(f"{MARK}.jpg", MARK.encode())]), 415,
         "unsupported_image"),
        ("not a zip", b"PK\x03\x04" + MARK.encode() * 50, 422, "unsafe_archive"),
        ("too few in a zip", make_zip([(f"{MARK}.jpg", jpeg_bytes())]), 422, "too_few_frames")]:
    case(f"zip: {_name}", _status, _code)(upload("/upload-images", one_zip(_data)))


def assert_clean(r: httpx.Response, status: int) -> dict[str, Any]:
    """The answer is ``status`` with the one JSON error shape and echoes nothing."""
    assert r.status_code == status, r.text
    text = r.text.lower()
    assert MARK.lower() not in text and "echo" not in text, r.text
    assert BOX_MARK.decode().lower() not in text, r.text
    assert "traceback" not in text and 'file "' not in text, r.text
    for name, value in r.headers.items():
        assert MARK.lower() not in f"{name}: {value}".lower(), (name, value)
    if r.request.method == "HEAD":
        return {}
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"code", "message", "hint"} <= set(err) <= {"code", "message", "hint", "details"}
    assert all(isinstance(err[k], str) and err[k] for k in ("code", "message", "hint"))
    return err


@pytest.mark.asyncio
@pytest.mark.parametrize("name", list(CASES))
async def test_no_error_answer_echoes_request_bytes(make_api, name):
    status, code, settings, request = CASES[name]
    api = await make_api(**settings)
    err = assert_clean(await request(api), status)
    if err:
        assert err["code"] == code


@pytest.mark.asyncio
async def test_the_refusals_still_say_where_the_problem_is(make_api):
    """Positions, limits and allowed values replace the client's words."""
    api = await make_api()
    r = await CASES["zip: symlink entry"][3](api)
    assert r.json()["error"]["details"] == {"entry_index": 3, "entries": 4}
    assert r.json()["error"]["message"] == "Entry 4 of the 4 in the zip is a symbolic link."
    r = await CASES["a photo that is not one"][3](api)
    assert r.json()["error"]["details"] == {"file_index": 3, "files": 4}
    r = await CASES["file in an unknown field"][3](api)
    assert r.json()["error"]["details"] == {"part_index": 2}
    r = await CASES["an MP4 without its index"][3](api)
    assert r.json()["error"]["details"]["boxes"] == ["ftyp", "(other)", "mdat"]
    r = await CASES["form value quality='ECHO7f3q'"][3](api)
    assert r.json()["error"]["details"]["fields"] == [
        {"field": "quality", "problem": "Input should be 'low', 'medium' or 'high'"}]
    r = await CASES["form value project_id='ECHO7f3qECHO'"][3](api)
    assert r.json()["error"]["details"]["fields"] == [
        {"field": "project_id", "problem": "String should have at most 200 characters"}]


def test_validation_problems_keep_only_the_models_words():
    """Pydantic messages that fill in input (a UUID's bad character, an e-mail checker's or a
    JSON decoder's reason, a union tag) and an undeclared field's name are replaced."""
    errors = [
        {"type": "uuid_parsing", "loc": ("query", "id"), "msg": f"Input should be a valid UUID,"
         f" invalid character: found `{MARK[0]}` at 1", "input": MARK},
        {"type": "value_error", "loc": ("body", "email"),
         "msg": f"value is not a valid email address: '{MARK}'", "input": MARK},
        {"type": "extra_forbidden", "loc": ("body", MARK), "msg": "Extra inputs are not "
         "permitted", "input": MARK},
        {"type": "string_too_long", "loc": ("query", "owner"),
         "msg": "String should have at most 200 characters", "input": MARK}]
    assert validation_problems(errors) == [
        {"field": "query.id", "problem": "Invalid value (uuid_parsing)."},
        {"field": "body.email", "problem": "Invalid value (value_error)."},
        {"field": "body.(a field not defined here)", "problem": "Extra inputs are not permitted"},
        {"field": "query.owner", "problem": "String should have at most 200 characters"}]
    own = validation_problems(errors[1:2], own_messages=True)
    assert own == [{"field": "body.email", "problem": errors[1]["msg"]}]
