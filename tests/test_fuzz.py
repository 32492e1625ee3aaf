"""schemathesis against the real server's OpenAPI schema (issue 13 item 7), in ``.ci/run``.

One server for the module (``python main.py``, SQLite, ``MAX_CONCURRENT_JOBS=0`` so no
reconstruction runs, the upload limit raised to 100000 a minute, no pending quota, API keys on
and the fuzzer's key sent as ``X-API-Key``). Its store is prepared before it starts with jobs of
the fuzzer's key in several states (one completed, with an artifact and frames on disk) and one
of another key; generated job ids and artifact names are steered onto them half of the time, so
the 200 answers of the job routes are checked against their schemas too, not only the 404s.

Every operation runs its schema examples, the coverage phase (boundary values, negative
values, unexpected methods) and :data:`MAX_EXAMPLES` generated cases (positive and negative);
every answer must pass :data:`CHECKS`: no 5xx, and status code, content type, headers and body
as the schema declares. Deterministic (derandomized), no Hypothesis database (no files in the
repository). The schema is built in process when pytest collects (schemathesis' fixture
loader does not work with pytest 9); the first test checks the server serves the same one.

Measured on the 2-core machine: 573 cases over the 12 operations; the file takes 28 s in
pytest, 31 s wall, when the machine is quiet, 33-39 s under another job's load
(``POST /upload-video`` is half of it: each video it refuses is probed in a child first).
"""
from __future__ import annotations

import asyncio
import atexit
import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import ServerProcess
from hypothesis.configuration import set_hypothesis_home_dir
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from colmap_pipeline.config import Settings
from colmap_pipeline.jobs import Intent
from colmap_pipeline.layout import DATABASE_FILE, DataDir
from colmap_pipeline.web.app import build_app

#: generated cases per operation (fuzzing phase), on top of the schema examples and the coverage
#: phase: 573 cases in all over the 12 operations, 28-39 s for this file on 2 cores
MAX_EXAMPLES = 30
KEY_NAME, KEY = "fuzz", "fuzz-key-5e1b7c9a3d"
OTHER_NAME, OTHER_KEY = "other", "other-key-2a8d4f6c0e"
CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance,
          content_type_conformance, response_headers_conformance]
PLY = b"ply\nformat ascii 1.0\nelement vertex 0\nend_header\n"
#: the kept frame's image (the route serves the file as it is; two markers make a JPEG: SOI, EOI)
JPEG = b"\xff\xd8\xff\xd9"
#: the frames stage's output of the completed job (one frame kept, one dropped)
FRAMES_JSON = {"frames": [{"index": 0, "file": "frame_00000.jpg", "timestamp_s": 0.0}],
               "scores": [{"timestamp_s": 0.0, "window": 0, "sharpness": 120.0,
                           "brightness": 110.0, "kept": True, "file": "frame_00000.jpg"},
                          {"timestamp_s": 0.1, "window": 0, "sharpness": 80.0,
                           "brightness": 111.0, "kept": False, "reason": "not_sharpest"}],
               "selection": {"cap": 30, "dropped": {"not_sharpest": 1}}, "num_decoded": 2,
               "warnings": []}
#: prepared jobs of the fuzzer's key: one completed (with an artifact and frames.json on disk;
#: only read), one pending to cancel, one failed to retry, one failed to delete; and one
#: completed job of another key, which the fuzzer's key must never see or touch
DONE, TO_CANCEL, TO_RETRY, TO_DELETE = "fz-done", "fz-pending", "fz-failed", "fz-doomed"
FOREIGN = "fz-other"
#: where a generated ``job_id`` may be steered, by operation (method and last path part)
TARGETS = {"GET": [DONE, TO_CANCEL, TO_RETRY, FOREIGN], "cancel": [TO_CANCEL, FOREIGN],
           "retry": [TO_RETRY, FOREIGN], "DELETE": [TO_DELETE, FOREIGN],
           # a stream ends after the terminal event: only the completed jobs (the others may be
           # pending, retried by the fuzzer: their stream would run to the timeout)
           "events": [DONE, FOREIGN]}
SERVER_ENV = {"API_KEYS": f"{KEY_NAME}:{KEY},{OTHER_NAME}:{OTHER_KEY}",
              "MAX_REQUESTS_PER_MINUTE": "100000", "MAX_CONCURRENT_JOBS": "0",
              "MAX_PENDING_JOBS_PER_KEY": "0", "URL_SIGNING_SECRET": "fuzz-signing-secret"}


async def _make_jobs(data_dir: Path) -> None:
    from database import SqliteJobStore

    art = {"name": "sparse.ply", "bytes": len(PLY), "media_type": "application/octet-stream",
           "sha256": hashlib.sha256(PLY).hexdigest()}
    results = {"frames_extracted": 2, "frames_used": 1, "registered_images": 3, "points3d": 0,
               "mean_reprojection_error_px": 0.5, "mean_track_length": 3.0,
               "artifacts": [art]}
    store = await SqliteJobStore.open(data_dir / DATABASE_FILE)
    try:
        for job_id in (DONE, TO_CANCEL, TO_RETRY, TO_DELETE, FOREIGN):
            await store.create_job({
                "job_id": job_id, "scan_id": f"scan-{job_id}", "project_id": "fuzz",
                "scan_name": "Fuzz", "quality": "low", "input_path": "/nonexistent.mp4",
                "input_bytes": 1, "input_sha256": "00" * 32,
                "owner": OTHER_NAME if job_id == FOREIGN else KEY_NAME,
                "user_email": "f@example.com"})
        for job_id in (DONE, FOREIGN):
            assert await store.apply(job_id, Intent.CLAIM)
            assert await store.apply(job_id, Intent.COMPLETE, results=results)
        for job_id in (TO_RETRY, TO_DELETE):
            assert await store.apply(job_id, Intent.CLAIM)
            assert await store.apply(job_id, Intent.FAIL, error_code="too_blurry")
    finally:
        await store.close()


def _prepare(data_dir: Path) -> None:
    """The prepared jobs, the artifact files of the completed ones, the frames of DONE."""
    for job_id in (DONE, FOREIGN):
        work = DataDir(data_dir).job(job_id).work
        work.artifact("sparse.ply").parent.mkdir(parents=True, exist_ok=True)
        work.artifact("sparse.ply").write_bytes(PLY)
        work.frames_json.write_text(json.dumps(FRAMES_JSON))
        work.frames_dir.mkdir(parents=True, exist_ok=True)
        (work.frames_dir / "frame_00000.jpg").write_bytes(JPEG)  # the kept frame's image
    asyncio.run(_make_jobs(data_dir))


def _steer(value: Any, choices: list[str]) -> Any:
    """Replace a generated path value by one of ``choices`` half of the time, chosen from the
    value itself (deterministic, and shrinking still works); else keep it."""
    digest = hashlib.sha256(repr(value).encode()).digest()[0]
    return choices[digest % len(choices)] if digest % 2 == 0 else value


def _targets(operation: Any) -> list[str]:
    """The prepared jobs a generated ``job_id`` of ``operation`` may be steered onto."""
    method = operation.method.upper()
    last = operation.path.rsplit("/", 1)[-1]
    return TARGETS[last if last in TARGETS else method]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The module's server (:data:`SERVER_ENV`), its store prepared (:func:`_prepare`)."""
    srv = ServerProcess(tmp_path_factory.mktemp("fuzz"), SERVER_ENV, prepare=_prepare)
    yield srv
    srv.stop()


def _load_schema() -> Any:
    """The app's OpenAPI document, built in process with the server's key settings (the
    schema is needed when pytest collects, before the server runs; ``test_the_fuzzed_schema_
    is_the_servers`` checks that the server serves the same one)."""
    app = build_app(Settings(_env_file=None, api_keys=SERVER_ENV["API_KEYS"],
                             url_signing_secret=SERVER_ENV["URL_SIGNING_SECRET"]))
    config = schemathesis.Config.from_dict({
        "headers": {"X-API-Key": KEY},
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True,
                       "database": "none"},
        "phases": {"stateful": {"enabled": False}},
    })
    loaded = schemathesis.openapi.from_dict(app.openapi(), config=config)

    @loaded.hook
    def map_path_parameters(ctx: Any, path_parameters: dict[str, Any] | None) -> Any:
        """Steer ``job_id`` and ``name`` onto the prepared jobs and artifact (:func:`_steer`)."""
        if not path_parameters:  # an operation without path parameters
            return path_parameters
        out = dict(path_parameters)
        if "job_id" in out:
            out["job_id"] = _steer(out["job_id"], _targets(ctx.operation))
        if "name" in out:
            out["name"] = _steer(out["name"], ["sparse.ply"])
        if "file" in out:
            out["file"] = _steer(out["file"], ["frame_00000.jpg"])
        return out

    return loaded


#: Hypothesis' caches (constants, unicode tables) go to a temporary folder removed at exit, not
#: to ``.hypothesis`` in the checkout (set before collection makes the tests; its example
#: database is off)
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
schema = _load_schema()
#: (operation, status code) of every case sent, for the summary test at the end
SENT: list[tuple[str, int]] = []


def test_the_fuzzed_schema_is_the_servers(server):
    served = httpx.get(f"{server.url}/openapi.json", timeout=10).json()
    assert served == schema.raw_schema


@schema.parametrize()
def test_every_operation_conforms_to_its_schema(case, server):
    response = case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=30)
    SENT.append((case.operation.label, response.status_code))


def test_every_operation_answered_2xx_and_the_other_keys_job_is_untouched(server):
    """After the fuzzing: every operation was reached with a request it accepted (so the
    schemas of the 2xx answers were checked, not only the errors; ``POST /upload-video``
    has no valid video to send and is left out), the other key's job is as prepared, and
    the server logged no traceback and no key."""
    if not SENT:
        pytest.skip("sums up test_every_operation_conforms_to_its_schema, which did not run")
    ops = {op for op, _ in SENT}
    accepted = {op for op, code in SENT if 200 <= code < 300}
    print(f"{len(SENT)} cases over {len(ops)} operations")
    assert len(ops) == len(list(schema.get_all_operations())) == 17
    assert ops - accepted == {"POST /upload-video"}
    other = httpx.get(f"{server.url}/jobs/{FOREIGN}", headers={"X-API-Key": OTHER_KEY},
                      timeout=10).json()
    assert (other["status"], other["attempt"]) == ("completed", 1)
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert KEY not in log and OTHER_KEY not in log
