"""The main job, end to end: start the service on its embedded defaults (SQLite, local disk,
CPU), send a video through the HTTP API, show progress, print where the results are, and end
with the address of the job's web page (``http://127.0.0.1:PORT/ui#/jobs/ID``).

Usage: ``python scripts/demo.py [VIDEO] [--quality low|medium|high] [--port 8080]``
(VIDEO defaults to the bundled sample ``samples/max-heromode.mp4``). The server keeps running
afterwards until Ctrl-C unless ``--exit`` is given. Stopping the demo with Ctrl-C or SIGTERM
stops its server too (SIGTERM, then SIGKILL after 30 s).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from colmap_pipeline.layout import DataDir  # noqa: E402 - after the path set-up above

#: seconds the server gets to drain after the demo's SIGTERM before it is killed
SERVER_STOP_S = 30
SUMMARY_KEYS = ("frames_extracted", "registered_images", "points3d",
                "mean_reprojection_error_px", "mean_track_length", "camera", "timings_s")


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through main()'s finally, which stops the server


def start_server(port: int) -> subprocess.Popen[bytes]:
    """``python main.py`` on ``port`` (the demo prints its own progress, so the server logs
    only warnings unless LOG_LEVEL says otherwise)."""
    env = {"LOG_LEVEL": "warning", **os.environ, "PORT": str(port)}
    print(f"Starting the service: {sys.executable} main.py  (PORT={port})", flush=True)
    return subprocess.Popen([sys.executable, str(REPO / "main.py")], cwd=REPO, env=env)


def stop_server(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains), then SIGKILL if it is still there after
    :data:`SERVER_STOP_S`."""
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(SERVER_STOP_S)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def wait_ready(c: httpx.Client, server: subprocess.Popen[bytes]) -> bool:
    """Poll ``/readiness`` for up to 60 s; False when the server exited."""
    for _ in range(600):
        if server.poll() is not None:
            print("The server exited; is the port in use? Try --port 8090.")
            return False
        try:
            if c.get("/readiness").status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return True


def run_job(c: httpx.Client, video: str, quality: str) -> dict | None:
    """Upload ``video`` and follow its job to the end; the final job, or None if refused."""
    print(f"POST /upload-video  video=@{video} quality={quality}", flush=True)
    with open(video, "rb") as f:
        r = c.post("/upload-video", files={"video": (Path(video).name, f, "video/mp4")},
                   data={"project_id": "demo", "scan_name": Path(video).stem,
                         "quality": quality})
    print(r.status_code, r.json())
    if r.status_code != 202:
        return None
    last = None
    while True:
        job: dict = c.get(f"/jobs/{r.json()['job_id']}").json()
        line = f"  {job['status']:<10} {job['progress']:>3}%  {job['current_stage']}: " \
               f"{job['message']}"
        if line != last:
            print(line, flush=True)
            last = line
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.5)


def job_page_url(url: str, job_id: str) -> str:
    """The web page of job ``job_id`` on the service at ``url`` (``/ui#/jobs/ID``)."""
    return f"{url}/ui#/jobs/{job_id}"


def print_results(job: dict, url: str) -> None:
    """The job's main numbers, where its artifacts are on disk and at which URLs."""
    res = job["results"]
    print(json.dumps({k: res.get(k) for k in SUMMARY_KEYS}, indent=2))
    data_dir = (REPO / os.environ.get("DATA_DIR", "data")).resolve()
    print(f"\nResults on disk: {DataDir(data_dir).job(job['job_id']).work.artifacts_dir}")
    for a in job["artifacts"]:
        print(f"  {url}{a['url']}  ({a['bytes']} bytes)")
    print(f"Job JSON: {url}/jobs/{job['job_id']}   API docs: {url}/docs")


def main() -> int:
    """Run the demo; returns the process exit status (0 when the job completed)."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("video", nargs="?", default=str(REPO / "samples" / "max-heromode.mp4"))
    ap.add_argument("--quality", default="low", choices=["low", "medium", "high"])
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8080)))
    ap.add_argument("--exit", action="store_true", help="stop the server when the job ends")
    args = ap.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    server = start_server(args.port)
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            if not wait_ready(c, server):
                return 1
            print("GET /health ->", c.get("/health").json())
            job = run_job(c, args.video, args.quality)
        if job is None or job["status"] != "completed":
            print(json.dumps(job and job.get("error"), indent=2))
            return 1
        print_results(job, url)
        if args.exit:
            print(f"\nJob page (run without --exit to keep the service up): "
                  f"{job_page_url(url, job['job_id'])}", flush=True)
            return 0
        print("\nThe service keeps running; press Ctrl-C to stop it. Open the job's page:\n"
              f"{job_page_url(url, job['job_id'])}", flush=True)
        server.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(server)


if __name__ == "__main__":
    sys.exit(main())
