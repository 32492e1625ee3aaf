#!/usr/bin/env python3
"""Issue 14: where a ``reconstruct`` run spends its time, and what each speed lever changes.

Each run is a fresh child process (this script with ``--child``) that does what
``python -m colmap_pipeline reconstruct VIDEO OUT --quality Q`` does (``pipeline.run_stage`` for
every stage, CPU only, in one process), after applying the variant's patches, and reports:

* ``imports_s``: importing the stage modules (pycolmap, PyAV, OpenCV, pydantic) at the start;
* per stage: wall seconds and CPU seconds (user + system of every thread of the child,
  ``getrusage(RUSAGE_SELF)``): CPU time moves much less than wall time when other work shares
  the machine, so both are kept;
* registered / selected frames, 3D points, mean reprojection error (px), focal length (px and
  x width), SIFT keypoints per image, verified pairs, the chosen mapper;
* peak RSS of the child (``ru_maxrss`` from ``wait4``) and the 1-minute load average before and
  after.

Variants run ALTERNATING (round 1: A, B, C; round 2: A, B, C; ...), so the load of a shared
machine hits every variant alike. A variant is ``NAME=PATCHES`` where PATCHES is a JSON object
``{"module.ATTR": value}`` set with ``setattr`` in the child before the run, e.g.::

    --variant base={}
    --variant oct0='{"colmap_pipeline.presets.VIDEO_SIFT_OPTIONS": {"low": {"first_octave": 0}}}'

The key ``"_repo"`` runs the child of another checkout holding this script (``DIR/scripts/``),
e.g. ``--variant before='{"_repo": "/tmp/head"}'`` for the last commit
(``git archive HEAD colmap_pipeline scripts samples | tar -x -C /tmp/head``).

``--startup`` instead measures the start-up of one stage child (interpreter + the imports of
that stage) for every stage, alternating, ``--runs`` times.

Usage::

    nice -n 5 .venv/bin/python scripts/bench_speed_levers.py --clips sample --rounds 2 \\
        --variant base={} --variant oct0='{...}' --json /tmp/levers.json
    nice -n 5 .venv/bin/python scripts/bench_speed_levers.py --startup --runs 3

Clips: ``sample`` = ``samples/max-heromode.mp4`` (the GoPro walk), ``karma`` =
``../shared/data/gopro_karma_drone/karma.mp4``, ``fountain`` = the Strecha fountain photos
(``../shared/data/strecha_fountain_p11/images``; its camera-centre error is
``scripts/bench_fountain.py``'s job).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
CLIPS = {"sample": REPO / "samples" / "max-heromode.mp4",
         "karma": DATA / "gopro_karma_drone" / "karma.mp4",
         "fountain": DATA / "strecha_fountain_p11" / "images"}
#: Modules each stage child imports (``python -m colmap_pipeline stage NAME``).
STAGE_IMPORTS = {
    "frames": ["colmap_pipeline.core.frame_select", "colmap_pipeline.core.clip_checks"],
    "features": ["colmap_pipeline.core.sfm_features"],
    "matching": ["colmap_pipeline.core.sfm_matching"],
    "mapping": ["colmap_pipeline.core.ladder"],
    "dense": ["colmap_pipeline.core.dense"],
    "meshing": ["colmap_pipeline.core.dense"],
    "export": ["colmap_pipeline.core.export", "colmap_pipeline.core.job_result"],
}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _apply_patches(patches: dict[str, Any]) -> None:
    for target, value in patches.items():
        mod_name, _, attr = target.rpartition(".")
        mod = importlib.import_module(mod_name)
        if not hasattr(mod, attr):
            raise SystemExit(f"no attribute {attr!r} in {mod_name}")
        setattr(mod, attr, value)


def _metrics(ws: Path) -> dict[str, Any]:
    res = json.loads((ws / "result.json").read_text())
    cam = res["camera"]
    f = [v for k, v in cam["params"].items() if k in ("f", "fx", "fy")]
    focal = sum(f) / len(f)
    return {"registered": res["registered_images"],
            "frames": res.get("frames_used") or res["frames_extracted"],
            "points": res["points3d"], "reproj_px": res["mean_reprojection_error_px"],
            "focal_px": round(focal, 1), "focal_ratio": round(focal / cam["width"], 3),
            "kp_per_image": (res.get("features") or {}).get("mean_keypoints_per_image"),
            "verified_pairs": (res.get("matching") or {}).get("verified_pairs"),
            "mapper": res.get("mapper"),
            "attempts": [a["step"] for a in res.get("mapping_attempts") or []]}


def child(clip: str, quality: str, ws: Path, patches: dict[str, Any]) -> dict[str, Any]:
    """One reconstruction in this process (the CLI's ``run_all`` split by stage)."""
    t0, c0 = time.monotonic(), _cpu()
    from colmap_pipeline.core import pipeline
    for mods in STAGE_IMPORTS.values():
        for m in mods:
            importlib.import_module(m)
    _apply_patches(patches)
    from colmap_pipeline.presets import default_preset  # after the patches: reads the tables
    out: dict[str, Any] = {"imports_s": round(time.monotonic() - t0, 3),
                           "imports_cpu_s": round(_cpu() - c0, 3), "stages": {}}
    pipeline.write_job(ws, CLIPS[clip], default_preset(quality), use_gpu=False)
    try:
        for stage in pipeline.STAGE_ORDER:
            t, c = time.monotonic(), _cpu()
            pipeline.run_stage(stage, ws)
            out["stages"][stage] = {"wall_s": round(time.monotonic() - t, 3),
                                    "cpu_s": round(_cpu() - c, 3)}
    except Exception as exc:  # noqa: BLE001 - a failed run is a result too
        out["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        return out
    out.update(_metrics(ws))
    return out


def run_child(clip: str, quality: str, patches: dict[str, Any], keep: Path | None) -> dict:
    """Run :func:`child` in a fresh interpreter; wall time and peak RSS from the parent."""
    ws = Path(tempfile.mkdtemp(prefix="lever_", dir=keep))
    patches = dict(patches)
    repo = Path(patches.pop("_repo", REPO))  # another checkout (e.g. the last commit's)
    argv = [sys.executable, str(repo / "scripts" / Path(__file__).name), "--child", clip,
            quality, str(ws), json.dumps(patches)]
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    with open(ws.parent / f"{ws.name}.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=repo, stdout=subprocess.PIPE, stderr=log)
        stdout = proc.stdout.read() if proc.stdout else b""
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    try:
        res = json.loads(stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        res = {"error": f"child exit {os.waitstatus_to_exitcode(status)}"}
    res.update(wall_s=round(wall, 2), peak_rss_mib=round(usage.ru_maxrss / 1024, 1),
               load=[round(load0, 2), round(os.getloadavg()[0], 2)])
    if "error" in res:
        res["log_tail"] = (ws.parent / f"{ws.name}.log").read_text(errors="replace")[-600:]
    if keep is None:
        shutil.rmtree(ws, ignore_errors=True)
        (ws.parent / f"{ws.name}.log").unlink(missing_ok=True)
    return res


def startup(runs: int) -> list[dict]:
    """Start-up of a stage child per stage: interpreter, ``colmap_pipeline.core.cli`` and the
    stage's modules (what ``python -m colmap_pipeline stage NAME`` imports before working)."""
    rows = []
    for r in range(runs):
        for stage, mods in [("bare python", []), *STAGE_IMPORTS.items()]:
            code = "import colmap_pipeline.core.cli, colmap_pipeline.core.pipeline; " if mods \
                else "pass; "
            code += "; ".join(f"import {m}" for m in mods)
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
            rows.append({"round": r, "stage": stage, "wall_s": round(time.monotonic() - t0, 3),
                         "load": round(os.getloadavg()[0], 2)})
    return rows


def _table(rows: list[dict]) -> str:
    stages = ["frames", "features", "matching", "mapping", "dense", "meshing", "export"]
    head = ("| clip | variant | wall s | imports s | " + " | ".join(stages)
            + " | CPU s total | reg/frames | points | reproj px | f/w | kp/img | pairs | "
              "RSS MiB | load |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['clip']} | {r['variant']} | {r.get('wall_s')} | error: "
                         f"{r['error']} |")
            continue
        st = r["stages"]
        cells = [f"{st[s]['wall_s']:.2f} ({st[s]['cpu_s']:.1f})" for s in stages]
        cpu = r["imports_cpu_s"] + sum(st[s]["cpu_s"] for s in stages)
        lines.append(
            f"| {r['clip']} | {r['variant']} | {r['wall_s']} | {r['imports_s']} | "
            + " | ".join(cells)
            + f" | {cpu:.1f} | {r['registered']}/{r['frames']} | {r['points']} | "
              f"{r['reproj_px']:.3f} | {r['focal_ratio']} | {r['kp_per_image']} | "
              f"{r['verified_pairs']} | {r['peak_rss_mib']} | {r['load'][0]}-{r['load'][1]} |")
    return "\n".join(lines)


def _medians(rows: list[dict]) -> str:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["clip"], r["variant"]), []).append(r)
    out = ["| clip | variant | runs | wall s median (min-max) | CPU s median | reg | points |"
           " reproj px |", "|---|---|---|---|---|---|---|---|"]
    for (clip, var), rs in groups.items():
        walls = [r["wall_s"] for r in rs]
        cpus = [r["imports_cpu_s"] + sum(s["cpu_s"] for s in r["stages"].values()) for r in rs]
        out.append(f"| {clip} | {var} | {len(rs)} | {statistics.median(walls):.2f} "
                   f"({min(walls):.2f}-{max(walls):.2f}) | {statistics.median(cpus):.1f} | "
                   f"{'/'.join(str(r['registered']) for r in rs)} | "
                   f"{'/'.join(str(r['points']) for r in rs)} | "
                   f"{'/'.join(format(r['reproj_px'], '.3f') for r in rs)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run (see the module docstring)."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--child", nargs=4, metavar=("CLIP", "QUALITY", "WS", "PATCHES"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--clips", default="sample,karma")
    ap.add_argument("--quality", default="low")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[], help="NAME=JSON patches")
    ap.add_argument("--startup", action="store_true", help="measure stage-child start-up")
    ap.add_argument("--runs", type=int, default=3, help="--startup rounds")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--keep", type=Path, default=None, help="keep workspaces under this folder")
    args = ap.parse_args(argv)
    if args.child:
        clip, quality, ws, patches = args.child
        res = child(clip, quality, Path(ws), json.loads(patches))
        print(json.dumps(res), flush=True)
        return 0
    if args.startup:
        rows = startup(args.runs)
        for stage in ["bare python", *STAGE_IMPORTS]:
            walls = [r["wall_s"] for r in rows if r["stage"] == stage]
            print(f"{stage:12s} median {statistics.median(walls):.3f} s  "
                  f"({min(walls):.3f}-{max(walls):.3f})")
        print("load", [r["load"] for r in rows][::8])
        return 0
    variants = [(v.partition("=")[0], json.loads(v.partition("=")[2] or "{}"))
                for v in (args.variant or ["base={}"])]
    rows = []
    for rnd in range(args.rounds):
        for clip in args.clips.split(","):
            for name, patches in variants:
                res = run_child(clip, args.quality, patches, args.keep)
                res.update(clip=clip, variant=name, round=rnd)
                rows.append(res)
                print(json.dumps(res), flush=True)
    print(_table(rows))
    print()
    print(_medians(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
