"""Issue 3 benchmark: frame selection on the real clips at every preset.

For each clip in ../shared/data and each cap (30/50/100 = low/medium/high, 1000/1600/2400 px)
prints frames kept / cap, the drop reasons, whether any kept frame is black/overexposed/blank
or a near-duplicate (motion below NEAR_DUPLICATE_PX from the previous kept frame), the clip
verdict of ``clip_checks.diagnose`` and the wall times. Exit status 1 if a GoPro clip gets less than
80% of the cap or keeps a black or near-duplicate frame.

    .venv/bin/python scripts/bench_frames.py
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from colmap_pipeline.core import clip_checks, frame_scores, frame_select  # noqa: E402
from colmap_pipeline.presets import default_preset  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CLIPS = {"gopro_walk": "gopro_max_walk/max-heromode.mp4",
         "gopro_karma": "gopro_karma_drone/karma.mp4",
         "euroc_static": "euroc_static/euroc_v101_cam0_20fps.mp4"}


def main() -> int:
    bad = 0
    print(f"{'clip':13} {'preset':6} {'kept/cap':>9} {'bad':>4} {'min motion':>10} "
          f"{'verdict':20} {'extract s':>9} {'diagnose s':>10}  dropped")
    for name, rel in CLIPS.items():
        path = DATA / rel
        if not path.exists():
            print(f"{name}: {path} absent, skipped")
            continue
        for q in ("low", "medium", "high"):
            p = default_preset(q)
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                res = frame_select.extract_frames(path, d, p.max_frames,
                                                  max_image_size=p.max_image_size)
                te = time.perf_counter() - t
                t = time.perf_counter()
                diag = clip_checks.diagnose(res, d)
                td = time.perf_counter() - t
            kept = [r for r in res["scores"] if r["kept"]]
            motions = [r["motion_px"] for r in kept[1:] if r["motion_px"] is not None]
            n_bad = sum(1 for r in kept if frame_scores.exposure_reason({
                "p98": 255, "p2": 0, "contrast": r["contrast"], "texture": r["texture"]})
                or r["brightness"] < frame_scores.BLACK_P98) + sum(
                m < frame_select.NEAR_DUPLICATE_PX for m in motions)
            verdict = diag["error"]["code"] if diag["error"] else "ok"
            print(f"{name:13} {q:6} {len(kept):>4}/{p.max_frames:<4} {n_bad:>4} "
                  f"{min(motions) if motions else float('nan'):>10.2f} {verdict:20} "
                  f"{te:>9.2f} {td:>10.2f}  {res['selection']['dropped']}")
            if name.startswith("gopro") and (len(kept) < 0.8 * p.max_frames or n_bad
                                             or verdict != "ok"):
                bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
