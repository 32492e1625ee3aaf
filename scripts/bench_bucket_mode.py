"""Wall time of the sample at ``low`` in bucket mode against local mode, in one run (issue 12,
BENCHMARKS.md).

    nice -n 5 .venv/bin/python scripts/bench_bucket_mode.py [--runs 2]

Two servers (``python main.py`` on free ports, each its own ``DATA_DIR``, ``tests/
replica_harness.py``), started once and used alternately, one job at a time:

- ``local``: the embedded mode (SQLite in ``DATA_DIR``, local disk, in-process runner);
- ``bucket``: the scaled-out mode on one replica: a fresh PostgreSQL database
  (``DATABASE_URL``, ``tests/pg.py``, dropped at the end), the procrastinate queue, and a fresh
  bucket of ``gcp-storage-emulator`` (``STORAGE_BUCKET``, ``STORAGE_EMULATOR_HOST``,
  ``tests/gcs_emulator.py``): the input goes to the bucket before the 202, each stage's outputs
  and checkpoint after the stage, the artifacts are served from it.

Both with ``PIPELINE_RANDOM_SEED=0`` (repeatable: one thread for matching and mapping) and
``COLMAP_CPU_ONLY=true``. For each run (``local``, ``bucket``, ``local``, ... ``--runs`` each)
it prints: the upload's wall time (request sent -> 202, s), the job's wall time (202 -> seen
``completed`` by polling every 0.2 s, s), the sum of the stage children's wall times
(``attempts[-1].stage_wall_s``, s), registered images, and the 1-minute load average before and
after; then the median job wall time per mode, and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import pg  # noqa: E402 - tests/ helpers, after the path is set
from conftest import SAMPLE_VIDEO  # noqa: E402
from gcs_emulator import Emulator  # noqa: E402
from replica_harness import Replica  # noqa: E402

#: settings both servers share (repeatable runs on the CPU)
COMMON = {"PIPELINE_RANDOM_SEED": "0", "LOG_LEVEL": "warning"}


def run_once(server: Replica) -> dict[str, Any]:
    """One upload of the sample at ``low`` to ``server``, polled until it ends; its numbers."""
    load_before = os.getloadavg()[0]
    with server.client(timeout=300) as c:
        t0 = time.monotonic()
        r = c.post("/upload-video",
                   files={"video": ("clip.mp4", SAMPLE_VIDEO.read_bytes(), "video/mp4")},
                   data={"project_id": "bench", "quality": "low"})
        accepted = time.monotonic()
        r.raise_for_status()
        job_id = r.json()["job_id"]
        while (job := c.get(f"/jobs/{job_id}").json())["status"] not in (
                "completed", "failed", "cancelled"):
            time.sleep(0.2)
        done = time.monotonic()
    if job["status"] != "completed":
        raise RuntimeError(f"{server.name}: job {job_id} ended {job['status']}: {job.get('error')}")
    stages = job["attempts"][-1]["stage_wall_s"]
    return {"mode": server.name, "upload_s": round(accepted - t0, 2),
            "job_s": round(done - accepted, 2), "stages_s": round(sum(stages.values()), 2),
            "registered_images": job["results"]["registered_images"],
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}


def measure(runs: int) -> list[dict[str, Any]]:
    """``runs`` jobs per mode, alternating local and bucket; one row per job."""
    dbname = pg.create_database("colmap_bench")
    with tempfile.TemporaryDirectory() as tmp:
        emulator = Emulator(Path(tmp) / "emulator.log")
        servers = [
            Replica(Path(tmp), "local", COMMON),
            Replica(Path(tmp), "bucket", {
                **COMMON, "DATABASE_URL": pg.url_for(dbname), "GCS_PROJECT_ID": "bench",
                "STORAGE_BUCKET": emulator.new_bucket(), "STORAGE_EMULATOR_HOST": emulator.url}),
        ]
        try:
            for s in servers:
                s.start()
            rows = []
            for i in range(2 * runs):
                rows.append(run_once(servers[i % 2]))
                print(json.dumps(rows[-1]), flush=True)
            return rows
        finally:
            for s in servers:
                s.stop()
            emulator.stop()
            pg.drop_database(dbname)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2, help="jobs per mode (alternated)")
    args = ap.parse_args()
    rows = measure(args.runs)
    summary = {mode: statistics.median(r["job_s"] for r in rows if r["mode"] == mode)
               for mode in ("local", "bucket")}
    print(f"median job wall time: local {summary['local']:.1f} s, "
          f"bucket {summary['bucket']:.1f} s "
          f"({100 * (summary['bucket'] / summary['local'] - 1):+.0f} %)")
    print(json.dumps({"median_job_s": summary, "runs": rows}))


if __name__ == "__main__":
    main()
