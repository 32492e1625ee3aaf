#!/usr/bin/env python3
"""Accuracy benchmark of issue 4 on Strecha's fountain-P11 (11 photos, ground-truth cameras).

Runs, in one process:

1. the service's photo-set path (``job.json`` input = the photo folder, as ``POST
   /upload-images`` creates; frames, features, matching, mapping with checks and ladder) at each
   preset given, and
2. plain pycolmap defaults on the original photos (``extract_features`` + ``match_exhaustive`` +
   ``incremental_mapping``, every option at its default),

then aligns each model's camera centres to the ground truth with a similarity transform
(Umeyama, PAMI 1991: least squares over rotation, translation, scale) and prints the median and
maximum camera-centre error in metres, the registered count and the wall time.

Usage::

    python scripts/bench_fountain.py [--qualities low,medium,high] [--skip-defaults]

Ground truth: ``../shared/data/strecha_fountain_p11/gt/NNNN.jpg.camera`` (row 8 = camera centre
C in metres, see ``../shared/data/README.md``).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
FOUNTAIN = REPO.parent / "shared" / "data" / "strecha_fountain_p11"


def gt_centres(root: Path = FOUNTAIN) -> dict[str, np.ndarray]:
    """``{"0000.jpg": C (3,)}`` from the Strecha ``.camera`` files."""
    out = {}
    for f in sorted((root / "gt").glob("*.jpg.camera")):
        rows = [[float(v) for v in ln.split()] for ln in f.read_text().splitlines() if ln.strip()]
        out[f.name[:-len(".camera")]] = np.array(rows[7][:3])
    return out


def umeyama(src: np.ndarray, dst: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) minimising sum |s R src_i + t - dst_i|^2 (Umeyama 1991)."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    a, b = src - mu_s, dst - mu_d
    cov = b.T @ a / len(src)
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1
    r = u @ sign @ vt
    var = (a ** 2).sum() / len(src)
    s = float(np.trace(np.diag(d) @ sign) / var)
    return s, r, mu_d - s * r @ mu_s


def centre_errors(model_dir: Path, name_of: dict[str, str], gt: dict[str, np.ndarray]) -> dict:
    """Register the model's camera centres to ``gt`` and measure (metres)."""
    import pycolmap

    rec = pycolmap.Reconstruction(str(model_dir))
    pairs = []
    for i in rec.reg_image_ids():
        im = rec.images[i]
        src = name_of.get(im.name, im.name)
        if src in gt:
            pairs.append((np.asarray(im.projection_center()), gt[src]))
    if len(pairs) < 3:
        return {"registered": int(rec.num_reg_images()), "median_m": None, "max_m": None}
    a = np.array([p[0] for p in pairs])
    b = np.array([p[1] for p in pairs])
    s, r, t = umeyama(a, b)
    err = np.linalg.norm((s * (r @ a.T)).T + t - b, axis=1)
    return {"registered": int(rec.num_reg_images()), "median_m": round(float(np.median(err)), 5),
            "max_m": round(float(err.max()), 5)}


def run_service(quality: str, work: Path, gt: dict) -> dict:
    """The photo-set pipeline (all five stages) at ``quality``."""
    from colmap_pipeline.core import pipeline
    from colmap_pipeline.presets import default_preset

    ws = work / f"svc_{quality}"
    pipeline.write_job(ws, FOUNTAIN / "images", default_preset(quality))
    t0 = time.monotonic()
    for stage in pipeline.STAGE_ORDER:
        pipeline.run_stage(stage, ws)
    wall = time.monotonic() - t0
    frames = json.loads((ws / "frames.json").read_text())
    name_of = {f["file"]: f["source"] for f in frames["frames"]}
    res = json.loads((ws / "result.json").read_text())
    out = centre_errors(ws / "sparse" / str(res["chosen_model"]), name_of, gt)
    out.update({"run": f"service {quality}", "wall_s": round(wall, 1),
                "steps": [a["step"] + ":" + a["outcome"]
                          for a in res.get("mapping_attempts") or []],
                "reproj_px": res["mean_reprojection_error_px"],
                "artifacts": [a["name"] for a in res["artifacts"]]})
    return out


def run_defaults(work: Path, gt: dict) -> dict:
    """Plain pycolmap defaults on the original 3072x2048 photos."""
    import pycolmap

    d = work / "defaults"
    d.mkdir()
    t0 = time.monotonic()
    pycolmap.extract_features(d / "db.db", FOUNTAIN / "images")
    pycolmap.match_exhaustive(d / "db.db")
    recs = pycolmap.incremental_mapping(d / "db.db", FOUNTAIN / "images", d / "sparse")
    wall = time.monotonic() - t0
    best = max(recs, key=lambda k: recs[k].num_reg_images())
    out = centre_errors(d / "sparse" / str(best), {}, gt)
    out.update({"run": "plain pycolmap defaults", "wall_s": round(wall, 1),
                "reproj_px": round(float(recs[best].compute_mean_reprojection_error()), 4)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--qualities", default="low,medium,high")
    ap.add_argument("--skip-defaults", action="store_true")
    args = ap.parse_args()
    if not FOUNTAIN.exists():
        print(f"{FOUNTAIN} is absent")
        return 2
    gt = gt_centres()
    rows = []
    work = Path(tempfile.mkdtemp(prefix="fountain_"))
    try:
        if not args.skip_defaults:
            rows.append(run_defaults(work, gt))
            print(json.dumps(rows[-1]), flush=True)
        for q in args.qualities.split(","):
            rows.append(run_service(q, work, gt))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ref = next((r["median_m"] for r in rows if r["run"].startswith("plain")), None)
    print("\n| run | registered | median centre error (m) | max (m) | vs defaults | wall s |")
    print("|---|---|---|---|---|---|")
    ok = True
    for r in rows:
        ratio = (r["median_m"] / ref) if (ref and r["median_m"] is not None) else None
        print(f"| {r['run']} | {r['registered']}/11 | {r['median_m']} | {r['max_m']} | "
              f"{'' if ratio is None else f'{ratio:.2f}x'} | {r['wall_s']} |")
        if r["run"].startswith("service"):
            ok &= (r["registered"] == 11 and r["median_m"] is not None and r["median_m"] <= 0.01
                   and (ratio is None or ratio <= 1.1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
