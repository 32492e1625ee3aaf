#!/usr/bin/env python3
"""Issue 14 item 3: how the cost of a reconstruction grows with the number of frames.

Runs ``python -m colmap_pipeline reconstruct CLIP OUT --quality Q --max-frames N`` (the CLI's
flag that raises the preset's frame cap, as ``MAX_FRAMES_LOW`` does for the server) for each N,
one fresh child process and workspace each, and prints per N: wall time (parent's clock,
interpreter start included), the stage split (``timings_s`` of ``result.json``), peak RSS
(``ru_maxrss`` of the child from ``wait4``), registered / selected frames, points, verified
pairs, the seconds of each global-SfM phase (from its log), the 1-minute load average before
and after, and the growth factor of each stage per doubling of N.

Usage::

    nice -n 5 .venv/bin/python scripts/bench_frames_growth.py                # walk, 30..240
    .venv/bin/python scripts/bench_frames_growth.py --frames 30,60 --clip karma --json out.json

Clips: ``walk`` = ``samples/max-heromode.mp4`` (the GoPro walk, 315 frames), ``karma`` =
``../shared/data/gopro_karma_drone/karma.mp4`` (362 frames).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLIPS = {"walk": REPO / "samples" / "max-heromode.mp4",
         "karma": REPO.parent / "shared" / "data" / "gopro_karma_drone" / "karma.mp4"}
STAGES = ("frames", "features", "matching", "mapping", "export")
#: Phases of global SfM as its log names them ("... done in X seconds").
GLOBAL_PHASES = {"rotation averaging": "Rotation averaging done in",
                 "tracks": "Track establishment done in",
                 "positioning": "Global positioning done in",
                 "bundle adjustment": "Iterative bundle adjustment done in",
                 "retriangulation": "Iterative retriangulation and refinement done in"}


def global_phases(log: str) -> dict[str, float]:
    """Seconds per global-SfM phase, summed over the log's mapping attempts."""
    out: dict[str, float] = {}
    for line in log.splitlines():
        for name, marker in GLOBAL_PHASES.items():
            if marker in line:
                sec = float(line.split(marker)[1].split()[0])
                out[name] = round(out.get(name, 0.0) + sec, 3)
    return out


def run(clip: Path, quality: str, n: int) -> dict:
    """One CLI run at cap ``n``; the row of the table."""
    out = Path(tempfile.mkdtemp(prefix=f"growth_{n}_"))
    argv = [sys.executable, "-m", "colmap_pipeline", "reconstruct", str(clip), str(out / "ws"),
            "--quality", quality, "--max-frames", str(n), "--device", "cpu"]
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    with open(out / "log.txt", "wb") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=log)
        stdout = proc.stdout.read() if proc.stdout else b""
        _, status, usage = os.wait4(proc.pid, 0)
    row: dict = {"cap": n, "wall_s": round(time.monotonic() - t0, 2),
                 "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
                 "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
                 "exit": os.waitstatus_to_exitcode(status)}
    try:
        res = json.loads(stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        res = {"error": (out / "log.txt").read_text(errors="replace")[-500:]}
    if "error" in res:
        row["error"] = res["error"]
    else:
        row.update(selected=res.get("frames_used") or res["frames_extracted"],
                   registered=res["registered_images"], points=res["points3d"],
                   reproj_px=res["mean_reprojection_error_px"],
                   pairs=(res.get("matching") or {}).get("verified_pairs"),
                   stages={s: res["timings_s"].get(s) for s in STAGES},
                   global_sfm=global_phases((out / "log.txt").read_text(errors="replace")))
    shutil.rmtree(out, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    """Markdown: one row per cap, then the growth per doubling (time at 2N / time at N)."""
    head = ("| frames cap | selected | registered | points | wall s | "
            + " | ".join(f"{s} s" for s in STAGES) + " | peak RSS MiB | load 1-min |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['cap']} | error: {str(r['error'])[:200]} |")
            continue
        lines.append(f"| {r['cap']} | {r['selected']} | {r['registered']} "
                     f"({r['registered'] / r['selected']:.0%}) | {r['points']} | {r['wall_s']} | "
                     + " | ".join(str(r["stages"][s]) for s in STAGES)
                     + f" | {r['peak_rss_mib']} | {r['load'][0]}-{r['load'][1]} |")
    ok = [r for r in rows if "error" not in r]
    lines += ["", "| doubling | wall | " + " | ".join(STAGES) + " |",
              "|" + "---|" * (len(STAGES) + 2)]
    for a, b in zip(ok, ok[1:], strict=False):
        growth = [f"{b['stages'][s] / a['stages'][s]:.2f}x" if a["stages"][s] else "-"
                  for s in STAGES]
        lines.append(f"| {a['cap']} -> {b['cap']} | {b['wall_s'] / a['wall_s']:.2f}x | "
                     + " | ".join(growth) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every cap, print JSON lines and the tables."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--clip", default="walk", choices=sorted(CLIPS))
    ap.add_argument("--quality", default="low")
    ap.add_argument("--frames", default="30,60,120,240")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.frames.split(",")):
        rows.append(run(CLIPS[args.clip], args.quality, n))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
