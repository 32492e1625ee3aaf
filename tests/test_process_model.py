"""Process model on a real server: pipeline children run in their own process group at a lower
priority and die with the server (PR_SET_PDEATHSIG), even when it is SIGKILLed. The stage
bodies are the TEST-ONLY fake ones (``COLMAP_TEST_FAKE_STAGES``): only the processes matter.

(The import boundaries once tested here are tests/test_architecture.py's.)"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from conftest import SAMPLE_VIDEO

from colmap_pipeline.layout import DataDir


def _stage_children(workspace_root: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"stage" in cmd and any(str(workspace_root).encode() in c for c in cmd):
            pids.append(int(proc.name))
    return pids


def test_children_die_with_the_server_and_run_niced(start_server):
    srv = start_server(TEST_FAULT="sleep:features", COLMAP_TEST_FAKE_STAGES="0.05")
    with srv.client() as c, open(SAMPLE_VIDEO, "rb") as f:
        r = c.post("/upload-video", files={"video": ("a.mp4", f, "video/mp4")},
                   data={"project_id": "p", "quality": "low"})
        assert r.status_code == 202
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 60
        while c.get(f"/jobs/{job_id}").json()["current_stage"] != "Feature Detection":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    jobs_root = DataDir(srv.data_dir).jobs
    children = _stage_children(jobs_root)
    assert len(children) == 1
    child = children[0]
    assert os.getpgid(child) == child  # own process group

    def nice(pid: int) -> int:  # field 19 of /proc/PID/stat
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])

    want = min(19, nice(srv.proc.pid) + 10)  # CHILD_NICE=10 on top of the server's own
    deadline = time.monotonic() + 10  # the child lowers its priority once its imports finish
    while nice(child) != want:
        assert time.monotonic() < deadline, f"child nice is {nice(child)}, not {want}"
        time.sleep(0.05)
    srv.proc.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel must do it
    srv.proc.wait()
    deadline = time.monotonic() + 5
    while _stage_children(jobs_root):
        assert time.monotonic() < deadline, "stage child outlived the server"
        time.sleep(0.05)
