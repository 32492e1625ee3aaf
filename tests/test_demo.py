"""scripts/demo.py: stopping the demo with SIGTERM stops the server it started (issue 10 item
11: the server kept running on the port)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
from conftest import REPO
from web_harness import free_port


def test_sigterm_to_the_demo_stops_its_server(tmp_path):
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "TMPDIR": str(tmp_path),
           "COLMAP_CPU_ONLY": "true", "SHUTDOWN_GRACE_S": "0", "TEST_FAULT": "pause:frames"}
    demo = subprocess.Popen([sys.executable, str(REPO / "scripts" / "demo.py"), "--port",
                             str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # the demo's server answers, and its job is under way
            assert demo.poll() is None and time.monotonic() < deadline, demo.stdout.read()
            try:
                if httpx.get(url + "/jobs", timeout=1).json()["total"] == 1:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(40) == 128 + signal.SIGTERM
        try:
            httpx.get(url + "/health", timeout=2)
            raise AssertionError("the demo's server still answers after the demo stopped")
        except httpx.ConnectError:
            pass
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
