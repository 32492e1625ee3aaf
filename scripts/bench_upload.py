#!/usr/bin/env python3
"""Issue 14 item 4: one large upload over loopback — throughput (MB/s) and the server's memory.

Starts ``python main.py`` (embedded mode, ``MAX_CONCURRENT_JOBS=0`` so no job runs, its own
DATA_DIR in a temporary folder), then POSTs ``--size-mib`` MiB (default 1024) to
``/upload-video`` as one multipart file streamed from disk by curl (``-X POST --upload-file``
streams the file without loading it; argv, no shell; curl is a separate process, so the
client's cost is not the server's). The file is the sample video followed by zero padding
inside an MP4 ``free`` box, so the probe still finds the video and the upload is accepted (202)
like a real long clip.

Reported: wall time of the request (curl's ``time_total``) and MB/s (10^6 bytes/s of the
request body), the server's RSS before and after and its peak (``VmHWM`` of ``/proc/PID/status``,
the high-water mark since start), and the 1-minute load average before and after. Run with the
machine otherwise idle; the numbers go in BENCHMARKS.md.

    .venv/bin/python scripts/bench_upload.py --size-mib 1024 --runs 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "max-heromode.mp4"
BOUNDARY = "bench-upload-boundary-3f1c"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def make_body(path: Path, size_mib: int) -> int:
    """Write a multipart body of about ``size_mib`` MiB to ``path``: the form fields and one
    file part holding the sample video plus a ``free`` box of zeros. Returns its size (bytes)."""
    video = SAMPLE.read_bytes()
    pad = max(0, size_mib * 1024 * 1024 - len(video) - 8)
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"project_id\"\r\n\r\n"
            f"bench\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"quality\"\r\n\r\n"
            f"low\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"video\"; "
            f"filename=\"big.mp4\"\r\nContent-Type: video/mp4\r\n\r\n").encode()
    with path.open("wb") as f:
        f.write(head)
        f.write(video)
        f.write(struct.pack(">I4s", 1, b"free"))  # size 1: a 64-bit size follows
        f.write(struct.pack(">Q", pad + 8))
        block = bytes(8 * 1024 * 1024)
        left = pad - 8
        while left > 0:
            n = min(left, len(block))
            f.write(block[:n])
            left -= n
        f.write(f"\r\n--{BOUNDARY}--\r\n".encode())
    return path.stat().st_size


def _load() -> float:
    return os.getloadavg()[0]


def run_once(url: str, body: Path, size: int, pid: int) -> dict[str, float]:
    """One upload; the server's RSS before/after and the numbers curl reports."""
    rss0 = _status_kib(pid, "VmRSS")
    load0 = _load()
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}",
         "-H", f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
         "-H", "Expect:", "-X", "POST", "--upload-file", str(body), f"{url}/upload-video"],
        check=True, capture_output=True, text=True).stdout.split()
    code, total = int(out[0]), float(out[1])
    rss1 = _status_kib(pid, "VmRSS")
    return {"status": code, "seconds": total, "mb_per_s": size / 1e6 / total,
            "rss_before_mib": rss0 / 1024, "rss_after_mib": rss1 / 1024,
            "rss_growth_mib": (rss1 - rss0) / 1024, "load_before": load0, "load_after": _load()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if shutil.which("curl") is None:
        print("curl is required", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        body = Path(tmp) / "body.bin"
        size = make_body(body, args.size_mib)
        port = _free_port()
        env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1",
               "DATA_DIR": str(Path(tmp) / "data"), "MAX_CONCURRENT_JOBS": "0",
               "MAX_REQUESTS_PER_MINUTE": "1000", "MAX_PENDING_JOBS_PER_KEY": "0",
               "LOG_LEVEL": "warning", "MIN_FREE_DISK_BYTES": "0"}
        server = subprocess.Popen([sys.executable, str(REPO / "main.py")], env=env, cwd=tmp)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(url + "/health", timeout=1)
                    break
                except OSError:
                    time.sleep(0.1)
            start_rss = _status_kib(server.pid, "VmRSS") / 1024
            runs = [run_once(url, body, size, server.pid) for _ in range(args.runs)]
            peak = _status_kib(server.pid, "VmHWM") / 1024
        finally:
            server.terminate()
            server.wait(30)
    summary = {"body_bytes": size, "server_rss_at_start_mib": round(start_rss, 1),
               "server_peak_rss_mib": round(peak, 1),
               "peak_growth_over_start_mib": round(peak - start_rss, 1),
               "median_mb_per_s": round(statistics.median(r["mb_per_s"] for r in runs), 1),
               "runs": runs}
    print(json.dumps(summary, indent=2))
    return 0 if all(r["status"] == 202 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
