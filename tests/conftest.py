"""Shared fixtures: paths to real data, a real server in a subprocess on a free port
(``start_server``), and the app in process on the in-memory store (``api``, ``make_api``)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SAMPLE_VIDEO = REPO / "samples" / "max-heromode.mp4"
EUROC_VIDEO = SHARED_DATA / "euroc_static" / "euroc_v101_cam0_20fps.mp4"


def shared_file(rel: str) -> Path:
    """A file under ../shared/data, or skip the test saying why."""
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared/data is not beside this checkout)")
    return path


def wait_until(pred: Any, timeout_s: float, what: str) -> Any:
    """Poll ``pred()`` every 50 ms until it is truthy and return its value; fail the test
    (AssertionError naming ``what``) after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python main.py`` on a free port with its own DATA_DIR and TMPDIR."""

    def __init__(self, tmp: Path, env: dict[str, str], prepare=None):
        self.data_dir = tmp / "data"
        self.tmp_dir = tmp / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        if prepare is not None:  # e.g. rows written into the store before the server opens it
            self.data_dir.mkdir(parents=True, exist_ok=True)
            prepare(self.data_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1",
                    "DATA_DIR": str(self.data_dir), "TMPDIR": str(self.tmp_dir),
                    "COLMAP_CPU_ONLY": "true", "LOG_LEVEL": "warning",
                    "SHUTDOWN_GRACE_S": "0", **env}  # tests that test the grace set it
        self.log_path = tmp / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, str(REPO / "main.py")], cwd=tmp,
                                     env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start in 60 s")

    def client(self, **kw) -> httpx.Client:
        # Idle keep-alive connections are dropped after 2 s, before uvicorn closes them (5 s):
        # reusing one the server is closing raced into RemoteProtocolError ("Server
        # disconnected without sending a response") after a ~5 s job.
        kw.setdefault("limits", httpx.Limits(keepalive_expiry=2.0))
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)

    def wait_for_job(self, job_id: str, timeout_s: float = 600,
                     statuses=("completed", "failed", "cancelled")) -> dict:
        deadline = time.monotonic() + timeout_s
        with self.client() as c:
            while time.monotonic() < deadline:
                job = c.get(f"/jobs/{job_id}").json()
                if job["status"] in statuses:
                    return job
                time.sleep(0.25)
        raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_server(tmp_path):
    """Call ``start_server(**env)`` to get a running :class:`ServerProcess`; ``prepare``
    (keyword) is called with its DATA_DIR before the server starts."""
    servers: list[ServerProcess] = []

    def _start(prepare=None, **env: str) -> ServerProcess:
        srv = ServerProcess(tmp_path / f"srv{len(servers)}", {k: str(v) for k, v in env.items()},
                            prepare)
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        srv.stop()


@pytest_asyncio.fixture
async def make_api(tmp_path):
    """``await make_api(**settings)``: the app in process (:class:`web_harness.Api`) on the
    in-memory store and a fake runner, with DATA_DIR in ``tmp_path``."""
    from web_harness import Api, async_client, make_app, settings_for

    made: list[Api] = []

    async def _make(**overrides) -> Api:
        settings = settings_for(tmp_path / f"api{len(made)}", **overrides)
        app = make_app(settings)
        made.append(Api(async_client(app), app, app.state.store, app.state.runner, settings))
        return made[-1]

    yield _make
    for api in made:
        await api.client.aclose()


@pytest_asyncio.fixture
async def api(make_api):
    """The app in process with default settings (see :func:`make_api`)."""
    return await make_api()


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for this test (dropped after): its ``postgresql://`` URL.
    Skipped without PostgreSQL on a developer machine, failed in CI (``tests/pg.py``)."""
    import pg

    pg.require_postgres()
    name = pg.create_database()
    try:
        yield pg.url_for(name)
    finally:
        pg.drop_database(name)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """``gcp-storage-emulator`` running for the whole session (:class:`gcs_emulator.Emulator`:
    ``url``, ``new_bucket()``, ``client()``). Started here, never skipped."""
    from gcs_emulator import Emulator

    emu = Emulator(tmp_path_factory.mktemp("gcs") / "emulator.log")
    yield emu
    emu.stop()


@pytest.fixture
def gcs_bucket(gcs_emulator, monkeypatch):
    """A fresh, empty bucket of the emulator: the settings that select it
    (``{"storage_bucket": name, "storage_emulator_host": url}``); ``STORAGE_EMULATOR_HOST`` is
    set in the environment too (for servers started by the test)."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator.url)
    return {"storage_bucket": gcs_emulator.new_bucket(), "storage_emulator_host": gcs_emulator.url}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give schemathesis' per-operation items (``tests/test_fuzz.py``) their own node ids.

    schemathesis 4.32 names each item ``test_x[GET /health]`` but leaves every node id at
    ``...::test_x``; pytest-xdist schedules items by node id, so with ``-n 2`` it ran only the
    first operation. The id is made from the item's own name (``...::test_x[GET /health]``).
    """
    for item in items:
        head, _, last = item.nodeid.rpartition("::")
        if head and last != item.name and item.name.startswith(last + "["):
            item._id = item.parent.id.child(item.name)  # what pytest computes for others
