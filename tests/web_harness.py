"""Test helpers for the web and intake tests: the app in process on the in-memory store with a
small fake runner, the same app behind a real uvicorn (in a thread, on a free port) when a real
socket matters, jobs in a given state, multipart bodies and a raw-socket response reader."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fakes import InMemoryJobStore
from fastapi import FastAPI

from colmap_pipeline.config import Settings
from colmap_pipeline.jobs import Intent, Job, JobStatus, JobStore
from colmap_pipeline.runner.gpu import GpuInfo
from colmap_pipeline.web.app import build_app

BOUNDARY = "test-boundary-7d8f2a"
CTYPE = f"multipart/form-data; boundary={BOUNDARY}"
TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


@dataclass
class Api:
    """The app in process and what it runs on."""

    client: httpx.AsyncClient
    app: FastAPI
    store: InMemoryJobStore
    runner: FakeRunner
    settings: Settings

    @property
    def data_dir(self) -> Path:
        return Path(self.settings.data_dir)


class FakeRunner:
    """The runner's web-facing side (``web.deps.RunnerControl``) acting on a store at once:
    no children, no scheduling (jobs stay pending until a test moves them)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.running = True
        self.draining = False
        self.active_jobs = 0
        self.active_gpu_jobs = 0
        self.max_gpu_jobs = 4
        self.wakes = 0

    async def cancel(self, job_id: str) -> bool:
        return await self.store.apply(job_id, Intent.CANCEL)

    async def retry(self, job_id: str) -> bool:
        ok = await self.store.apply(job_id, Intent.RETRY)
        if ok:
            self.wake()
        return ok

    async def delete(self, job_id: str) -> bool:
        return await self.store.apply(job_id, Intent.DELETE)

    def wake(self) -> None:
        self.wakes += 1


def settings_for(tmp: Path, **overrides: Any) -> Settings:
    """Settings with DATA_DIR under ``tmp`` and nothing from the environment or ``.env``."""
    data = tmp / "data"
    data.mkdir(parents=True, exist_ok=True)
    return Settings(_env_file=None, data_dir=data, **overrides)


def make_app(settings: Settings, store: JobStore | None = None,
             runner: Any = None) -> FastAPI:
    """``build_app`` with ``app.state`` filled as the lifespan would: store, runner, a CPU-only
    GPU probe."""
    app = build_app(settings)
    app.state.store = store if store is not None else InMemoryJobStore()
    app.state.runner = runner if runner is not None else FakeRunner(app.state.store)
    app.state.gpu = GpuInfo(cpu_only_forced=True)
    return app


def async_client(app: FastAPI) -> httpx.AsyncClient:
    """An httpx client calling ``app`` in process (no socket, no lifespan)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test",
                             timeout=60)


async def add_job(store: JobStore, status: JobStatus = JobStatus.PENDING, *,
                  project_id: str = "p", owner: str | None = None,
                  user_email: str | None = None, **fields: Any) -> Job:
    """A job created in ``store`` (by the API key named ``owner``) and moved to ``status``
    along the transition table; ``fields`` are set by the last transition (e.g. ``results=…``
    for completed, ``error_code=…`` for failed)."""
    n = sum((await store.count_by_status()).values())  # deleted ones too: ids stay unique
    job = await store.create_job({
        "job_id": f"job-{n:04d}", "scan_id": f"scan-{n:04d}", "project_id": project_id,
        "scan_name": "Scan", "quality": "low", "input_path": "/nonexistent/video.mp4",
        "input_bytes": 1234, "input_sha256": "ab" * 32, "owner": owner, "user_email": user_email,
        "video_info": {"kind": "video", "width": 848, "height": 480}})
    path = {JobStatus.PENDING: [], JobStatus.PROCESSING: [Intent.CLAIM],
            JobStatus.COMPLETED: [Intent.CLAIM, Intent.COMPLETE],
            JobStatus.FAILED: [Intent.CLAIM, Intent.FAIL],
            JobStatus.CANCELLED: [Intent.CANCEL], JobStatus.DELETED: [Intent.DELETE],
            JobStatus.EXPIRED: [Intent.CLAIM, Intent.FAIL, Intent.EXPIRE]}[status]
    for i, intent in enumerate(path):
        assert await store.apply(job.job_id, intent, **(fields if i == len(path) - 1 else {}))
    out = await store.get_job(job.job_id)
    assert out is not None and out.status == status
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(app: FastAPI, **config: Any) -> Iterator[str]:
    """``app`` behind a real uvicorn (the server's own config, ``main.server_config``) in a
    thread on a free port, without its lifespan; yields the base URL."""
    from main import server_config

    settings: Settings = app.state.settings
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(server_config(app, settings, host="127.0.0.1", port=port,
                                          lifespan="off", log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def multipart_head(fields: dict[str, str], file_field: str = "video",
                   filename: str = "clip.mp4") -> bytes:
    """Everything of a multipart body up to (and including) the blank line before the file's
    bytes."""
    out = []
    for name, value in fields.items():
        out.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
                   f"{value}\r\n")
    out.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{file_field}"; '
               f'filename="{filename}"\r\nContent-Type: video/mp4\r\n\r\n')
    return "".join(out).encode()


def raw_request(port: int, path: str, content_length: int | None, extra: str = "",
                method: str = "POST") -> bytes:
    """Request line and headers of a multipart request, for a raw socket."""
    length = f"Content-Length: {content_length}\r\n" if content_length is not None else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {CTYPE}\r\n"
            f"{length}{extra}\r\n").encode()


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (status, lower-cased headers, body) from a raw socket."""
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


def files_under(root: Path) -> list[str]:
    """Every file under ``root``, relative, sorted (the job store's files excluded)."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not p.name.startswith("colmap_app.db"))
