"""Test helpers for PostgreSQL mode with several replicas: ``python main.py`` processes on free
ports, one PostgreSQL database (``tests/pg.py``), each replica its own ``DATA_DIR``.

Each replica runs in its own session (``start_new_session``), so a test can SIGKILL the whole
process group of one replica (the server and its stage children) the way a node dies.
Fast tests set ``COLMAP_TEST_FAKE_STAGES`` (core/fake_stage.py, TEST ONLY): every stage child
runs a trivial body.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import runner_harness
from conftest import REPO, SAMPLE_VIDEO, free_port, wait_until  # noqa: F401 - re-exported

from colmap_pipeline.layout import DataDir

#: queue timings of the fast tests (s): heartbeat, stall timeout, sweep interval
FAST_QUEUE = {"QUEUE_HEARTBEAT_INTERVAL_S": "0.5", "QUEUE_STALL_TIMEOUT_S": "3",
              "QUEUE_SWEEP_INTERVAL_S": "1"}


class Replica:
    """One ``python main.py`` in PostgreSQL mode (``DATABASE_URL``) on a free port."""

    def __init__(self, root: Path, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.dir = root / name
        self.data_dir = self.dir / "data"
        (self.dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1",
                    "DATA_DIR": str(self.data_dir), "TMPDIR": str(self.dir / "tmp"),
                    "COLMAP_CPU_ONLY": "true", "LOG_LEVEL": "warning",
                    "SHUTDOWN_GRACE_S": "0", **env}
        self.log_path = self.dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> Replica:
        """Start the server (again) and wait for ``/health``."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, str(REPO / "main.py")], cwd=self.dir,
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not start in {timeout_s} s")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kw: Any) -> httpx.Client:
        kw.setdefault("limits", httpx.Limits(keepalive_expiry=2.0))
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)

    def get_job(self, job_id: str) -> dict[str, Any]:
        with self.client() as c:
            return c.get(f"/jobs/{job_id}").json()

    def kill_group(self) -> None:
        """SIGKILL the replica's whole process group (server and stage children)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL of the group after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.kill_group()

    def workspace(self, job_id: str) -> Path:
        return DataDir(self.data_dir).job(job_id).work.root


def upload(replica: Replica, **fields: str) -> str:
    """Upload the sample video to ``replica`` at ``low``; the job id (asserts 202)."""
    with replica.client() as c:
        r = c.post("/upload-video",
                   files={"video": ("clip.mp4", SAMPLE_VIDEO.read_bytes(), "video/mp4")},
                   data={"project_id": "replicas", "quality": "low", **fields})
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def stage_children(replica: Replica, job_id: str) -> dict[int, str]:
    """``{pid: start time}`` of the replica's live stage children of ``job_id`` (found in
    ``/proc`` by the workspace path in their command line; runner_harness.stage_children)."""
    return runner_harness.stage_children(replica.workspace(job_id))
