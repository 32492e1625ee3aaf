#!/usr/bin/env python3
"""Benchmark of issue 4: do the real clips register >= 90% of their frames with plausible
intrinsics, run after run, at each preset? And incremental vs global mapping.

For every clip x preset x run it runs the five stages in-process (``pipeline.run_stage``) in a
fresh workspace and prints one JSON line per run plus a Markdown table at the end:
registered/frames, camera model, focal length / image width, the checks, the ladder's steps
taken and the wall time.

Usage::

    python scripts/bench_reconstruction.py                      # karma + walk, low + medium, 3 runs
    python scripts/bench_reconstruction.py --runs 1 --qualities low --mapper global

Clips come from ``../shared/data`` (absent: the clip is reported as skipped).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from colmap_pipeline.core import pipeline  # noqa: E402
from colmap_pipeline.errors import PipelineError  # noqa: E402
from colmap_pipeline.presets import default_preset  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CLIPS = {"karma": DATA / "gopro_karma_drone" / "karma.mp4",
         "walk": DATA / "gopro_max_walk" / "max-heromode.mp4"}


def run_once(clip: Path, quality: str, ws: Path, mapper: str | None) -> dict:
    """All stages on ``clip`` at ``quality`` in workspace ``ws``; returns the row."""
    from colmap_pipeline.core import ladder

    if mapper:
        ladder.MAPPER_BY_QUALITY[quality] = mapper
    pipeline.write_job(ws, clip, default_preset(quality))
    t0 = time.monotonic()
    try:
        for stage in pipeline.STAGE_ORDER:
            pipeline.run_stage(stage, ws)
    except PipelineError as exc:
        return {"ok": False, "error": exc.code, "wall_s": round(time.monotonic() - t0, 1),
                "steps": [a["step"] + ":" + a["outcome"]
                          for a in (exc.details or {}).get("mapping_attempts", [])]}
    res = json.loads((ws / "result.json").read_text())
    cam = res["camera"]
    f = [v for k, v in cam["params"].items() if k in ("f", "fx", "fy")]
    focal_ratio = sum(f) / len(f) / cam["width"]
    used = res.get("frames_used") or res["frames_extracted"]  # more after ``more_frames``
    return {"ok": True, "registered": res["registered_images"], "frames": used,
            "share": round(res["registered_images"] / used, 3),
            "camera_model": cam["model"], "focal_ratio": round(focal_ratio, 3),
            "plausible": bool((res.get("checks") or {}).get("passed")),
            "points3d": res["points3d"], "reproj_px": res["mean_reprojection_error_px"],
            "partial": res.get("partial"),
            "steps": [a["step"] + ":" + a["outcome"] for a in res.get("mapping_attempts") or []],
            "mapping_s": res["timings_s"].get("mapping"),
            "wall_s": round(time.monotonic() - t0, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", default="karma,walk")
    ap.add_argument("--qualities", default="low,medium")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mapper", choices=["incremental", "global"], default=None)
    args = ap.parse_args()
    rows = []
    for name in args.clips.split(","):
        clip = CLIPS[name]
        if not clip.exists():
            print(json.dumps({"clip": name, "skipped": f"{clip} absent"}), flush=True)
            continue
        for quality in args.qualities.split(","):
            for run in range(1, args.runs + 1):
                ws = Path(tempfile.mkdtemp(prefix=f"bench_{name}_{quality}_"))
                try:
                    row = {"clip": name, "quality": quality, "run": run,
                           "mapper": args.mapper or "default",
                           **run_once(clip, quality, ws, args.mapper)}
                finally:
                    shutil.rmtree(ws, ignore_errors=True)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| clip | quality | run | registered | plausible | model | f/width | points | "
          "reproj px | ladder steps | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("ok"):
            print(f"| {r['clip']} | {r['quality']} | {r['run']} | {r['registered']}/{r['frames']}"
                  f" | {r['plausible']} | {r['camera_model']} | {r['focal_ratio']} | "
                  f"{r['points3d']} | {r['reproj_px']} | {', '.join(r['steps'])} | "
                  f"{r['wall_s']} |")
        else:
            print(f"| {r['clip']} | {r['quality']} | {r['run']} | FAILED {r['error']} | | | | | |"
                  f" {', '.join(r['steps'])} | {r['wall_s']} |")
    ok = [r for r in rows if r.get("ok") and r["share"] >= 0.9 and r["plausible"]]
    print(f"\n{len(ok)}/{len(rows)} runs registered >= 90% with plausible intrinsics")
    return 0 if len(ok) == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
