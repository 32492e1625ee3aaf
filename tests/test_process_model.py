"""Process model: import boundaries, and pipeline children that die with the server."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, SAMPLE_VIDEO


def test_api_process_never_imports_pycolmap_av_or_opencv():
    code = ("import sys, json, main; main.create_app(); "
            "print(json.dumps(sorted(m for m in ('pycolmap','av','cv2') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, env={**os.environ, "DATA_DIR": "/nonexistent-unused"})
    assert json.loads(out.stdout) == []


def test_pipeline_core_imports_no_web_or_database_framework():
    code = ("import sys, json, colmap_pipeline.core.pipeline, colmap_pipeline.core.video, "
            "colmap_pipeline.core.reconstruction, colmap_pipeline.core.export; "
            "print(json.dumps(sorted(m for m in ('fastapi','starlette','aiosqlite','database',"
            "'uvicorn','slowapi') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == []


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
    srv = start_server(TEST_FAULT="sleep:features")
    with srv.client() as c, open(SAMPLE_VIDEO, "rb") as f:
        r = c.post("/upload-video", files={"video": ("a.mp4", f, "video/mp4")},
                   data={"project_id": "p", "quality": "low"})
        assert r.status_code == 202
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 60
        while c.get(f"/jobs/{job_id}").json()["current_stage"] != "Feature Detection":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    jobs_root = srv.data_dir / "jobs"
    children = _stage_children(jobs_root)
    assert len(children) == 1
    child = children[0]
    assert os.getpgid(child) == child  # own process group

    def nice() -> int:  # field 19 of /proc/PID/stat
        return int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[16])

    deadline = time.monotonic() + 10  # the child lowers its priority once its imports finish
    while nice() != 10:
        assert time.monotonic() < deadline, f"child nice is {nice()}"
        time.sleep(0.05)
    srv.proc.send_signal(signal.SIGKILL)  # no chance to clean up: the kernel must do it
    srv.proc.wait()
    deadline = time.monotonic() + 5
    while _stage_children(jobs_root):
        assert time.monotonic() < deadline, "stage child outlived the server"
        time.sleep(0.05)
