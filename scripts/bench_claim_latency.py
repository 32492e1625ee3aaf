"""Claim latency in PostgreSQL mode (issue 12, BENCHMARKS.md): upload answered (202) -> the job
``processing``, on two idle replicas.

    .venv/bin/python scripts/bench_claim_latency.py [--uploads 20]

Creates a fresh database on the PostgreSQL server of the tests (``TEST_POSTGRES_URL``, default
``postgresql://postgres@127.0.0.1:5432/postgres``, ``tests/pg.py``; dropped at the end),
starts two ``python main.py`` replicas on free ports (own ``DATA_DIR`` each, fake stage bodies
``COLMAP_TEST_FAKE_STAGES=0.3`` so each job ends in ~2 s, production queue timings), then
uploads ``samples/max-heromode.mp4`` ``--uploads`` times, alternating between the replicas, one
job at a time, and polls the job on the OTHER replica every 5 ms until it leaves ``pending``.
Prints n, p50, p95 and max (ms) and one JSON line. The poll adds up to ~5 ms plus one HTTP round
trip to each sample.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import pg  # noqa: E402 - tests/ helpers, after the path is set
from replica_harness import Replica, upload  # noqa: E402


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))]


def measure(uploads: int) -> list[float]:
    """Seconds from each 202 to ``processing`` (seen on the other replica)."""
    name = pg.create_database("colmap_bench")
    env = {"DATABASE_URL": pg.url_for(name), "COLMAP_TEST_FAKE_STAGES": "0.3"}
    with tempfile.TemporaryDirectory() as tmp:
        replicas = [Replica(Path(tmp), n, env) for n in ("a", "b")]
        try:
            for r in replicas:
                r.start()
            latencies = []
            for i in range(uploads):
                to, other = replicas[i % 2], replicas[1 - i % 2]
                job_id = upload(to)
                t0 = time.monotonic()
                while other.get_job(job_id)["status"] == "pending":
                    time.sleep(0.005)
                latencies.append(time.monotonic() - t0)
                while other.get_job(job_id)["status"] not in ("completed", "failed"):
                    time.sleep(0.05)
            return latencies
        finally:
            for r in replicas:
                r.stop()
            pg.drop_database(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--uploads", type=int, default=20)
    args = ap.parse_args()
    lat = sorted(measure(args.uploads))
    row = {"n": len(lat), "p50_ms": round(_percentile(lat, 0.5) * 1000),
           "p95_ms": round(_percentile(lat, 0.95) * 1000), "max_ms": round(lat[-1] * 1000)}
    print(f"claim latency over {row['n']} uploads: p50 {row['p50_ms']} ms, "
          f"p95 {row['p95_ms']} ms, max {row['max_ms']} ms")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
