"""The main job, end to end: start the service on its embedded defaults (SQLite, local disk,
CPU), send a video through the HTTP API, show progress, print where the results are.

Usage: ``python scripts/demo.py [VIDEO] [--quality low|medium|high] [--port 8080]``
(VIDEO defaults to the bundled sample ``samples/max-heromode.mp4``). The server keeps running
afterwards until Ctrl-C unless ``--exit`` is given.
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

import httpx

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    """Run the demo; returns the process exit status (0 when the job completed)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("video", nargs="?", default=str(REPO / "samples" / "max-heromode.mp4"))
    ap.add_argument("--quality", default="low", choices=["low", "medium", "high"])
    ap.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8080)))
    ap.add_argument("--exit", action="store_true", help="stop the server when the job ends")
    args = ap.parse_args()
    url = f"http://127.0.0.1:{args.port}"

    # the demo prints its own progress; keep the server's request log out of the way
    env = {"LOG_LEVEL": "warning", **os.environ, "PORT": str(args.port)}
    print(f"Starting the service: {sys.executable} main.py  (PORT={args.port})", flush=True)
    server = subprocess.Popen([sys.executable, str(REPO / "main.py")], cwd=REPO, env=env)
    try:
        with httpx.Client(base_url=url, timeout=120) as c:
            for _ in range(600):
                if server.poll() is not None:
                    print("The server exited; is the port in use? Try --port 8090.")
                    return 1
                try:
                    if c.get("/readiness").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            print("GET /health ->", c.get("/health").json())
            print(f"POST /upload-video  video=@{args.video} quality={args.quality}", flush=True)
            with open(args.video, "rb") as f:
                r = c.post("/upload-video",
                           files={"video": (Path(args.video).name, f, "video/mp4")},
                           data={"project_id": "demo", "scan_name": Path(args.video).stem,
                                 "quality": args.quality})
            print(r.status_code, r.json())
            if r.status_code != 202:
                return 1
            job_id = r.json()["job_id"]
            last = None
            while True:
                job = c.get(f"/jobs/{job_id}").json()
                line = f"  {job['status']:<10} {job['progress']:>3}%  {job['current_stage']}: " \
                       f"{job['message']}"
                if line != last:
                    print(line, flush=True)
                    last = line
                if job["status"] in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.5)
            if job["status"] != "completed":
                print(json.dumps(job.get("error"), indent=2))
                return 1
            res = job["results"]
            print(json.dumps({k: res[k] for k in (
                "frames_extracted", "registered_images", "points3d",
                "mean_reprojection_error_px", "mean_track_length", "camera", "timings_s")},
                indent=2))
            data_dir = (REPO / os.environ.get("DATA_DIR", "data")).resolve()
            art_dir = data_dir / "jobs" / job_id / "work" / "artifacts"
            print(f"\nResults on disk: {art_dir}")
            for a in job["artifacts"]:
                print(f"  {url}{a['url']}  ({a['bytes']} bytes)")
            print(f"Job JSON: {url}/jobs/{job_id}   API docs: {url}/docs")
        if args.exit:
            return 0
        print("\nThe service keeps running; press Ctrl-C to stop it.", flush=True)
        server.wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            server.wait(30)


if __name__ == "__main__":
    sys.exit(main())
