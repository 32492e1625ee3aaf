"""The GCS emulator for the bucket-mode tests: ``gcp-storage-emulator`` (PyPI, pinned in
requirements-dev.txt) started in a subprocess on a free port, in memory. The tests start it
themselves (``gcs_emulator`` / ``gcs_bucket`` fixtures in conftest.py), so CI needs nothing
running beforehand, and they never skip: an emulator that does not start fails the test."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

#: seconds the emulator may take to accept connections
START_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Emulator:
    """A running ``gcp-storage-emulator start --in-memory`` on ``127.0.0.1:<free port>``."""

    def __init__(self, log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        exe = Path(sys.executable).parent / "gcp-storage-emulator"
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(exe), "start", "--host=127.0.0.1", f"--port={self.port}", "--in-memory"],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gcp-storage-emulator exited: {log_path.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("gcp-storage-emulator did not start") from None
                time.sleep(0.05)

    def client(self):  # noqa: ANN201 - google.cloud.storage.Client
        """A client of the emulator (anonymous)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project="test", credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.url})

    def new_bucket(self) -> str:
        """Create a bucket with a fresh name; returns the name."""
        name = f"test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(name)
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
