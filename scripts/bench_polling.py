"""Polling under load (issue 10 item 12): latency of ``GET /jobs/{id}`` with 50 clients at once.

    .venv/bin/python scripts/bench_polling.py [--clients 50] [--seconds 20] [--quality low]
        [--interval S] [--profile FILE] [--store-only]

Starts a real server (``python main.py`` on a free port, a temporary ``DATA_DIR``,
``COLMAP_CPU_ONLY=true``), uploads ``samples/max-heromode.mp4``, then runs ``--clients``
concurrent pollers (a minimal asyncio HTTP/1.1 client, one keep-alive connection per poller, each
sending its next request as soon as the last one answered, or all at once every
``--interval`` s) for ``--seconds``:

- phase ``during``: while the job runs (stops early if it ends; ``processing_share`` says how
  many answers still said ``processing``);
- phase ``after``: once the job is ``completed`` (its ``results`` and ``attempts`` are served).

Prints, per phase, requests, errors, requests/s, p50/p95/p99/max latency (ms), the 1-minute
load average (``os.getloadavg``) at the end of the phase and the server process's CPU time per
request (all its threads; the stage children not included), as a table and as one JSON line. The
machine is shared: record the load average with the numbers. Exit status 1 when a request
failed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "max-heromode.mp4"


#: ``python -c`` launcher for ``--profile``: cProfile around ``main.py``, stats written when
#: uvicorn re-raises the SIGTERM it handled (uvicorn >= 0.29 does, so ``-m cProfile`` never
#: gets to write them)
PROFILE_LAUNCHER = """
import cProfile, os, runpy, signal, sys
out, script = sys.argv[1], sys.argv[2]
prof = cProfile.Profile()
def dump(*_):
    prof.disable(); prof.dump_stats(out); os._exit(0)
signal.signal(signal.SIGTERM, dump)
sys.argv = [script]
sys.path.insert(0, os.path.dirname(script))
prof.enable()
try:
    runpy.run_path(script, run_name="__main__")
finally:
    dump()
"""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Phase:
    """Latencies (s) of one polling phase."""

    name: str
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    load1: float = 0.0
    server_cpu_s: float = 0.0

    def summary(self) -> dict[str, float | int | str | dict[str, int]]:
        """Requests, errors, req/s, p50/p95/p99/max (ms), load average, job statuses seen."""
        lat = sorted(self.latencies)
        if not lat:
            return {"phase": self.name, "requests": 0, "errors": self.errors}

        def pct(p: float) -> float:
            return round(1000 * lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 1)
        return {"phase": self.name, "requests": len(lat), "errors": self.errors,
                "req_per_s": round(len(lat) / self.wall_s, 1), "p50_ms": pct(50),
                "p95_ms": pct(95), "p99_ms": pct(99), "max_ms": round(1000 * lat[-1], 1),
                "mean_ms": round(1000 * statistics.fmean(lat), 1), "load1": round(self.load1, 2),
                "server_cpu_ms_per_req": round(1000 * self.server_cpu_s / len(lat), 2),
                "statuses": self.statuses}


class Server:
    """``python main.py`` on a free port with its own DATA_DIR; stopped with SIGTERM."""

    def __init__(self, data_dir: Path, log_path: Path, profile: Path | None = None) -> None:
        self.port = free_port()
        env = {**os.environ, "PORT": str(self.port), "HOST": "127.0.0.1",
               "DATA_DIR": str(data_dir), "COLMAP_CPU_ONLY": "true", "LOG_LEVEL": "warning",
               "MAX_REQUESTS_PER_MINUTE": "1000000", "PYTHONUNBUFFERED": "1"}
        self._log = log_path.open("wb")
        main_py = str(REPO / "main.py")
        cmd = ([sys.executable, "-c", PROFILE_LAUNCHER, str(profile), main_py] if profile
               else [sys.executable, main_py])
        self.proc = subprocess.Popen(cmd, cwd=data_dir,
                                     env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Poll ``/health`` until it answers 200. Raises RuntimeError if the server died."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready")

    def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL after 30 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()
        self._log.close()


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client for ``GET`` (a few µs of CPU per request, so the
    poller's own cost does not hide the server's on a 2-core machine; httpx costs about a
    millisecond)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._r: asyncio.StreamReader | None = None
        self._w: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> tuple[int, bytes]:
        """``(status code, body)``. Raises OSError/ValueError on a broken answer."""
        if self._w is None or self._r is None:
            self._r, self._w = await asyncio.open_connection(self.host, self.port)
        self._w.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n\r\n".encode())
        try:
            head = await self._r.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            code = int(lines[0].split()[1])
            length = next(int(v) for k, _, v in (x.partition(":") for x in lines[1:])
                          if k.lower() == "content-length")
            return code, await self._r.readexactly(length)
        except (OSError, ValueError, StopIteration, asyncio.IncompleteReadError) as exc:
            await self.close()
            raise OSError(f"broken answer: {exc}") from exc

    async def close(self) -> None:
        """Close the connection (the next ``get`` opens a new one)."""
        if self._w is not None:
            self._w.close()
        self._r = self._w = None


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def poll(srv: Server, job_id: str, clients: int, seconds: float, phase: Phase,
               stop_when_done: bool, interval_s: float) -> str:
    """Run ``clients`` pollers, one connection each, for ``seconds``; the last status seen.

    ``interval_s`` 0: closed loop (each poller asks again as soon as it has its answer: the
    server's saturation; mean latency = clients / throughput). ``interval_s`` > 0: every
    ``interval_s`` all pollers ask at the same instant (a burst of ``clients`` requests) and
    wait for the next tick.
    """
    last = {"status": ""}
    t_start = time.monotonic()
    deadline = t_start + seconds
    conns = [RawConnection("127.0.0.1", srv.port) for _ in range(clients)]

    async def one(conn: RawConnection) -> None:
        tick = 0
        while time.monotonic() < deadline:
            if interval_s > 0:
                await asyncio.sleep(max(0.0, t_start + tick * interval_s - time.monotonic()))
                tick += 1
            t = time.perf_counter()
            try:
                code, body = await conn.get(f"/jobs/{job_id}")
            except OSError:
                phase.errors += 1
                continue
            dt = time.perf_counter() - t
            if code != 200:
                phase.errors += 1
                continue
            phase.latencies.append(dt)
            status = str(json.loads(body)["status"])
            phase.statuses[status] = phase.statuses.get(status, 0) + 1
            last["status"] = status
            if stop_when_done and status not in ("pending", "processing"):
                return

    cpu0, t0 = _cpu_s(srv.proc.pid), time.perf_counter()
    await asyncio.gather(*(one(c) for c in conns))
    phase.wall_s = time.perf_counter() - t0
    phase.server_cpu_s = _cpu_s(srv.proc.pid) - cpu0
    for c in conns:
        await c.close()
    phase.load1 = os.getloadavg()[0]
    return last["status"]


def upload(url: str, quality: str) -> str:
    """Upload the sample; the job id."""
    with SAMPLE.open("rb") as f:
        r = httpx.post(f"{url}/upload-video", timeout=120,
                       data={"project_id": "bench-polling", "quality": quality},
                       files={"video": (SAMPLE.name, f, "video/mp4")})
    r.raise_for_status()
    return str(r.json()["job_id"])


def wait_done(url: str, job_id: str, timeout_s: float = 1800.0) -> str:
    """Poll once a second until the job leaves pending/processing; its status."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = str(httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()["status"])
        if status not in ("pending", "processing"):
            return status
        time.sleep(1)
    raise TimeoutError(job_id)


#: a completed job's results, the size of the sample's (artifacts, ladder attempts, cameras)
STORE_RESULTS = {
    "registered_images": 30, "points3d": 5000,
    "artifacts": [{"name": f"a{i}.ply", "bytes": 1000, "media_type": "application/x",
                   "sha256": "ab" * 32, "url": f"/jobs/x/artifacts/a{i}"} for i in range(8)],
    "mapping_attempts": [{"rung": f"r{i}", "outcome": "ok", "registered": i, "seconds": 1.5,
                          "notes": "x" * 200} for i in range(8)]}


async def bench_store(clients: int, seconds: float) -> dict[str, object]:
    """The store alone: ``clients`` coroutines each reading ``get_job`` + ``queue_position``
    (what ``GET /jobs/{id}`` asks) of a completed and a processing job, in a closed loop, while
    a writer records progress every 20 ms. Latency per poll (both calls)."""
    sys.path.insert(0, str(REPO))
    from colmap_pipeline.jobs import Intent
    from database import SqliteJobStore
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        store = await SqliteJobStore.open(Path(tmp) / "jobs.db")
        for i in range(3):
            await store.create_job({
                "job_id": f"job-{i}", "scan_id": f"s{i}", "project_id": "p", "scan_name": "n",
                "quality": "low", "input_path": "/x", "input_bytes": 1, "input_sha256": "0" * 64,
                "video_info": {"width": 848, "height": 480, "fps": 30.0}})
        for _ in range(2):
            await store.claim_next_pending()
        timings = {f"s{i}": 1.0 for i in range(9)}
        await store.apply("job-0", Intent.COMPLETE, results=STORE_RESULTS,
                          attempt_record={"attempt": 1, "timings": timings})
        phase = Phase("store")
        stop = time.monotonic() + seconds

        async def writer() -> None:
            n = 0
            while time.monotonic() < stop:
                n += 1
                await store.update_progress("job-1", n % 100, "Feature Matching", f"{n}")
                await asyncio.sleep(0.02)

        async def poller(k: int) -> None:
            job_id = "job-0" if k % 2 else "job-1"
            while time.monotonic() < stop:
                t = time.perf_counter()
                await store.get_job(job_id)
                await store.queue_position(job_id)
                phase.latencies.append(time.perf_counter() - t)
        t0 = time.perf_counter()
        await asyncio.gather(writer(), *(poller(k) for k in range(clients)))
        phase.wall_s = time.perf_counter() - t0
        phase.load1 = os.getloadavg()[0]
        await store.close()
    out: dict[str, object] = dict(phase.summary())
    out.pop("server_cpu_ms_per_req", None)
    out.pop("statuses", None)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--quality", default="low")
    ap.add_argument("--interval", type=float, default=0.0,
                    help="s between bursts of all clients; 0 = closed loop (default)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="run the server under cProfile, writing its stats here")
    ap.add_argument("--store-only", action="store_true",
                    help="no server: the SQLite store alone under the same polling load")
    args = ap.parse_args()
    if args.store_only:
        print(json.dumps(asyncio.run(bench_store(args.clients, args.seconds))))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-polling-") as tmp:
        srv = Server(Path(tmp), Path(tmp) / "server.log", args.profile)
        try:
            srv.wait_ready()
            job_id = upload(srv.url, args.quality)
            during, after = Phase("during"), Phase("after")
            asyncio.run(poll(srv, job_id, args.clients, args.seconds, during, True,
                             args.interval))
            final = wait_done(srv.url, job_id)
            asyncio.run(poll(srv, job_id, args.clients, args.seconds, after, False,
                             args.interval))
        except BaseException:
            sys.stderr.write((Path(tmp) / "server.log").read_text(errors="replace")[-4000:])
            raise
        finally:
            srv.stop()
    rows = [during.summary(), after.summary()]
    mode = f"bursts every {args.interval:g} s" if args.interval > 0 else "closed loop"
    print(f"job {job_id}: {final}; {args.clients} clients ({mode}), {args.seconds:.0f} s per "
          "phase")
    print(f"{'phase':7} {'requests':>8} {'errors':>6} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
          f"{'p99 ms':>7} {'max ms':>7} {'load1':>6} {'server CPU ms/req':>17}")
    for r in rows:
        print(f"{r['phase']:7} {r.get('requests', 0):>8} {r.get('errors', 0):>6} "
              f"{r.get('req_per_s', 0):>7} {r.get('p50_ms', 0):>7} {r.get('p95_ms', 0):>7} "
              f"{r.get('p99_ms', 0):>7} {r.get('max_ms', 0):>7} {r.get('load1', 0):>6} "
              f"{r.get('server_cpu_ms_per_req', 0):>17}")
    print(json.dumps({"job_status": final, "clients": args.clients, "interval_s": args.interval,
                      "phases": rows}))
    return 1 if during.errors or after.errors else 0


if __name__ == "__main__":
    sys.exit(main())
