"""Measure the job-lifecycle latencies of a real server (issue 5) and print them as JSON.

    .venv/bin/python scripts/bench_lifecycle.py [--repeats 5] [--full]

For each repeat, on a fresh server (``TEST_FAULT=pause:frames``, so no reconstruction runs):
- ``cancel_to_child_gone_s``: ``POST /jobs/{id}/cancel`` until the stage child has exited;
- ``sigterm_to_readiness_503_s``: SIGTERM until ``/readiness`` first answers 503;
- ``sigkill_restart_to_processing_s``: server SIGKILLed, restarted; from ``python main.py``
  until the job is ``processing`` again (recovery + requeue + claim).
``--full`` also times the sample at ``low`` undisturbed and resumed after a SIGKILL at each
stage (wall time from the restart to completion), which is what resuming saves.
Report p50 / max of each; the machine is shared, so record ``uptime`` with the numbers.
"""
from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from conftest import SAMPLE_VIDEO, ServerProcess  # noqa: E402

sys.path.insert(0, str(REPO))
from colmap_pipeline.layout import DataDir, Workspace  # noqa: E402
from colmap_pipeline.protocol import STAGES  # noqa: E402


def _upload(srv: ServerProcess) -> str:
    with srv.client() as c:
        r = c.post("/upload-video", data={"project_id": "bench", "quality": "low"},
                   files={"video": ("clip.mp4", SAMPLE_VIDEO.read_bytes(), "video/mp4")})
        r.raise_for_status()
        return r.json()["job_id"]


def _wait(pred, timeout_s: float = 300.0, step: float = 0.005):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise TimeoutError


def _children(ws: Path) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if b"stage" in cmd and str(ws).encode() in cmd and state != "Z":
                out.append(int(proc.name))
    return out


def _paused(srv: ServerProcess, stage: str = "frames") -> tuple[str, Path]:
    job_id = _upload(srv)
    ws = DataDir(srv.data_dir).job(job_id).work.root
    _wait(Workspace(ws).test_pause_file(stage).exists, 120, 0.05)
    return job_id, ws


def _status(srv: ServerProcess, job_id: str) -> str:
    with srv.client() as c:
        return c.get(f"/jobs/{job_id}").json()["status"]


def one_repeat(tmp: Path) -> dict:
    out = {}
    srv = ServerProcess(tmp / "cancel", {"TEST_FAULT": "pause:frames"})
    try:
        job_id, ws = _paused(srv)
        with srv.client() as c:
            t0 = time.perf_counter()
            c.post(f"/jobs/{job_id}/cancel").raise_for_status()
        _wait(lambda: not _children(ws))
        out["cancel_to_child_gone_s"] = time.perf_counter() - t0
    finally:
        srv.stop()

    srv = ServerProcess(tmp / "term", {"TEST_FAULT": "pause:frames", "SHUTDOWN_GRACE_S": "2"})
    try:
        _paused(srv)
        with srv.client() as c:
            t0 = time.perf_counter()
            srv.proc.send_signal(signal.SIGTERM)
            _wait(lambda: c.get("/readiness").status_code == 503, 10, 0.0)
            out["sigterm_to_readiness_503_s"] = time.perf_counter() - t0
    finally:
        srv.stop()

    srv = ServerProcess(tmp / "kill", {"TEST_FAULT": "pause:frames"})
    job_id, _ = _paused(srv)
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()
    t0 = time.perf_counter()
    srv2 = ServerProcess(tmp / "kill", {"TEST_FAULT": "pause:frames"})
    try:
        _wait(lambda: _status(srv2, job_id) == "processing", 60, 0.01)
        out["sigkill_restart_to_processing_s"] = time.perf_counter() - t0
    finally:
        srv2.stop()
    return out


def full_runs(tmp: Path) -> dict:
    env = {"PIPELINE_RANDOM_SEED": "0"}
    srv = ServerProcess(tmp / "undisturbed", env)
    try:
        t0 = time.perf_counter()
        job = srv.wait_for_job(_upload(srv))
        res = {"undisturbed_s": time.perf_counter() - t0, "points3d": job["results"]["points3d"]}
    finally:
        srv.stop()
    for stage in STAGES:
        d = tmp / f"resume-{stage}"
        srv = ServerProcess(d, {**env, "TEST_FAULT": f"pause:{stage}"})
        job_id, _ = _paused(srv, stage)
        paused_at = time.perf_counter()
        srv.proc.send_signal(signal.SIGKILL)
        srv.proc.wait()
        srv2 = ServerProcess(d, env)
        try:
            job = srv2.wait_for_job(job_id)
            res[f"resume_at_{stage}_s"] = time.perf_counter() - paused_at
            res[f"resume_at_{stage}_points3d"] = job["results"]["points3d"]
        finally:
            srv2.stop()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--full", action="store_true")
    args = ap.parse_args()
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for k, v in one_repeat(Path(tmp) / str(i)).items():
                samples.setdefault(k, []).append(v)
        report = {k: {"n": len(v), "p50_s": round(statistics.median(v), 3),
                      "max_s": round(max(v), 3)} for k, v in samples.items()}
        if args.full:
            report["full"] = {k: round(v, 2) if isinstance(v, float) else v
                              for k, v in full_runs(Path(tmp) / "full").items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
