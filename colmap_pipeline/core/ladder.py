"""The recovery ladder of the mapping stage: bounded, recorded attempts; the best checked model.

COLMAP's defaults are not reliable on real clips (on the Karma drone clip the same 30 frames give
30 or 2 registered images, with focal lengths from 46 px to 10,204 px). So mapping is a series of
attempts. The first uses what the matching stage produced (sequential pairs, SIMPLE_RADIAL
camera, COLMAP's mapper defaults). While no model registers ``TARGET_FRACTION`` of the frames and
passes :func:`reconstruction.check_model` (plausible intrinsics, reprojection error, points), the
ladder climbs, in this order (:data:`STEPS`):

1. ``more_overlap``: sequential pairs with ``MORE_OVERLAP`` neighbours (linear overlap), when
   exhaustive matching is not cheap;
2. ``exhaustive``: every pair, when n (n - 1) / 2 <= ``EXHAUSTIVE_MAX_PAIRS`` (cheap);
3. ``loop_closure``: retrieval pairs from a vocabulary built from the job's own descriptors
   (offline; no vocabulary-tree download), skipped after ``exhaustive`` (nothing to add);
4. ``other_mapper``: the other mapper on the same matches: global SfM (GLOMAP) when the
   preset's mapper is incremental (no initial pair to find, all views at once: on the Karma
   clip's exhaustive matches it registered every frame each time it was tried, 30/30 and
   50/50, where incremental runs on the same kind of matches gave 8/30 or failed their checks;
   BENCHMARKS.md, issue 4), incremental SfM when it is global;
5. ``init_thresholds``: relaxed initial-pair thresholds (``RELAXED_INIT``), incremental
   mapping whatever the preset's mapper: slow, distant footage (the Karma drone clip) has no
   pair with COLMAP's 16 degree triangulation angle;
6. ``focal_prior``: the focal length from the photos' metadata (EXIF, :mod:`.photos`) as a
   trusted prior, first as the initial value with ``has_prior_focal_length`` (refined by
   bundle adjustment), then, if that still fails, held fixed (``ba_refine_focal_length`` off);
   skipped without metadata (videos: containers carry no focal length). With a prior, every
   model is also checked against it (``focal_disagrees_with_metadata``,
   :data:`reconstruction.FOCAL_PRIOR_TOLERANCE`): self-calibration on low-parallax views
   drifts to a plausible-looking but wrong focal length that the other checks cannot see;
7. ``camera_model``: OPENCV (fx, fy, cx, cy, k1, k2, p1, p2), then OPENCV_FISHEYE (k1..k4) for
   wide action-camera lenses; a camera change that does not help is undone;
8. ``more_frames``: one more frame in the middle of every gap between selected frames (from
   the video, :func:`video.extract_between`, through the ``more_frames`` callback), with
   features and sequential matches for them: halves the baseline between neighbours when the
   preset's cap spreads the frames too thin to match (fast motion, long clips at a low cap).
   Last, because it costs new decoding, features and matching. No shared clip needs it at the
   presets' caps (tested on a synthetic case, ``tests/test_ladder.py``). Skipped for photo
   sets (no frame source).

Matching steps add pairs to the database (they stay for later steps). Every attempt is recorded
with its settings, outcome (size and checks of every model) and time; a step that would not fit
in the preset's time budget (``LADDER_BUDGET_S``) is recorded as skipped. The best model of all
attempts (most registered images among the models passing the checks) is the result.

The registered share of an attempt is over the frames it was given (``frames`` of the attempt:
more after ``more_frames``).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import PipelineError
from . import reconstruction as rc

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

STEPS = ("more_overlap", "exhaustive", "loop_closure", "other_mapper", "init_thresholds",
         "focal_prior", "camera_model", "more_frames")
#: Wall-clock budget (s) of the ladder after the first attempt, per preset (the job timeout is
#: 3600 s). Measured on 2 CPU cores shared 5x (BENCHMARKS.md, issue 4): one Karma mapping
#: attempt at low takes 100-370 s there, so 300 s allowed a single rung.
LADDER_BUDGET_S = {"low": 600.0, "medium": 900.0, "high": 1800.0}
#: The ladder stops once the best checked model registers this share of the frames.
TARGET_FRACTION = 0.9
#: ``more_overlap``: every image with its next ``MORE_OVERLAP`` images (linear overlap). The
#: matching stage's sequential pairs use pycolmap 4.2.1's quadratic overlap, which (measured)
#: gives only the distances 1, 2, 4, 8, 16, ... (119 pairs for 30 frames); this adds 3, 5-7,
#: 9, 10 (245 pairs for 30 frames, 445 for 50, 945 for 100). Skipped when exhaustive matching
#: is allowed and cheap (it is a superset).
MORE_OVERLAP = 10
#: ``exhaustive`` only when all pairs number at most this (50 frames -> 1225 pairs, about 35 s
#: of matching on 2 cores at 2048 features).
EXHAUSTIVE_MAX_PAIRS = 1225
#: ``init_thresholds``: COLMAP defaults are init_min_num_inliers 100, init_min_tri_angle 16 deg,
#: init_max_error 4 px, abs_pose_min_num_inliers 30; halved (error doubled) here.
RELAXED_INIT = {"init_min_num_inliers": 50, "init_min_tri_angle": 8.0, "init_max_error": 8.0,
                "abs_pose_min_num_inliers": 15}
#: ``focal_prior``: a model held to the metadata focal length is vetoed when its mean
#: reprojection error exceeds this many times that of the best free-focal model that failed
#: only the metadata check (floor ``PRIOR_ERROR_FLOOR_PX``): a wrong EXIF value (crop, digital
#: zoom) fits visibly worse (seen in a fresh-user trial: 1.08 px vs 0.25 px on fountain crops
#: labelled 26 mm whose true focal length is 41 mm equivalent), a right one fits as well
#: (0.5757 vs 0.5756 px, tests/test_ladder.py).
PRIOR_MAX_ERROR_RATIO = 1.5
PRIOR_ERROR_FLOOR_PX = 0.3
#: Camera models tried by ``camera_model`` (COLMAP ``src/colmap/sensor/models.h``).
CAMERA_MODELS = ("OPENCV", "OPENCV_FISHEYE")
#: Mapper of the first attempt per preset, from the incremental-vs-global measurements in
#: BENCHMARKS.md (issue 4, ``scripts/bench_reconstruction.py --mapper ...``, idle 2-core
#: machine): global SfM registered every frame of the Karma clip on its first attempt in 6 of 6
#: runs (mapping 19-53 s) where incremental mapping passed its checks first time in 1 of 6 and
#: needed the ladder for up to 526 s; on the GoPro walk both register everything in about the
#: same time.
MAPPER_BY_QUALITY = {"low": "global", "medium": "global", "high": "global"}


def _noop(fraction: float, message: str) -> None:  # pragma: no cover - trivial
    pass


def _key(m: dict) -> tuple:
    return (m["registered_images"], m["points3d"], -m["mean_reprojection_error_px"])


def _brief(m: dict | None) -> dict | None:
    if m is None:
        return None
    return {k: m[k] for k in ("index", "registered_images", "points3d",
                              "mean_reprojection_error_px", "mean_track_length",
                              "camera_plausible", "camera_model", "focal_px", "focal_ratio",
                              "camera_params", "checks") if k in m}


def run_ladder(database_path: str | os.PathLike, image_dir: str | os.PathLike,
               sparse_dir: str | os.PathLike, num_frames: int, quality: str = "low",
               use_gpu: bool = False, focal_prior_px: float | None = None,
               progress: Progress | None = None, steps: tuple[str, ...] | None = None,
               budget_s: float | None = None, mapper: str | None = None,
               num_threads: int = -1, random_seed: int = -1,
               target_fraction: float = TARGET_FRACTION,
               more_frames: Callable[[], dict] | None = None) -> dict:
    """Map, check, and climb the recovery ladder until a model is good enough or time is up.

    Args:
        database_path: COLMAP database with features and the matching stage's pairs.
        image_dir: the frames.
        sparse_dir: created; on return holds the chosen attempt's models as ``<k>/``.
        num_frames: frames selected for SfM.
        quality: preset name (budget and mapper).
        focal_prior_px: focal length from metadata (px at the frames' size) or ``None``; with
            it, models that disagree with it fail their checks.
        steps: ladder steps to allow (default :data:`STEPS`, in that order).
        budget_s: time budget after the first attempt (default ``LADDER_BUDGET_S[quality]``).
        mapper: ``"incremental"`` or ``"global"`` (default ``MAPPER_BY_QUALITY[quality]``).
        num_threads, random_seed: as pycolmap (-1 = all cores / random).
        target_fraction: stop once the best model registers this share of the frames.
        more_frames: frame source of the ``more_frames`` rung: called once, writes new frames
            into ``image_dir``, adds their features to the database (existing camera) and
            returns ``{"added": [file names], "frames": total frames now}``; ``None`` (photo
            sets): the rung is skipped.

    Returns:
        ``{"frames"`` (frames given to the chosen attempt), ``"frames_added": [names]`` (by
        ``more_frames``, whether or not the chosen attempt used them),
        ``"models"`` (every model of the chosen attempt with its checks),
        ``"model_sizes"`` (registered images per model of every attempt),
        ``"chosen_model", "registered_images", "points3d", "checks", "partial": bool,
        "quality_warning": {"code", "message", "hint"} | None, "attempts": [{"step",
        "settings", "elapsed_s", "outcome", "frames", "models", "best", "new_pairs"?}], "mapper",
        "budget_s", "ladder_elapsed_s"}``.

    Raises:
        PipelineError("reconstruction_failed"): no attempt gave a model that passes the checks
            (details: ``attempts``, ``frames``).
    """
    progress = progress or _noop
    steps = tuple(STEPS if steps is None else steps)
    budget = float(LADDER_BUDGET_S.get(quality, 600.0) if budget_s is None else budget_s)
    mapper = mapper or MAPPER_BY_QUALITY.get(quality, "incremental")
    sparse = Path(sparse_dir)
    work = sparse / "_attempts"
    if sparse.exists():
        shutil.rmtree(sparse)
    work.mkdir(parents=True)
    attempts: list[dict] = []
    state = {"best": None, "best_dir": None, "progress": 0.0, "frames": int(num_frames),
             "added": [], "meta_only": None, "meta_only_dir": None}
    t_first = time.monotonic()
    ladder_t0: list[float] = []

    def report(f: float, msg: str) -> None:
        state["progress"] = max(state["progress"], min(0.99, f))
        progress(state["progress"], msg)

    def good_enough() -> bool:
        b = state["best"]
        n = state["frames"]
        target = max(rc.min_registered_images(n), math.ceil(target_fraction * n))
        return b is not None and b["registered_images"] >= target

    def remaining() -> float:
        if not ladder_t0:
            return budget
        return budget - (time.monotonic() - ladder_t0[0])

    def map_attempt(step: str, settings: dict, t0: float, mapper_options: dict | None = None,
                    extra: dict | None = None, use_mapper: str | None = None,
                    veto: Callable[[dict], str | None] | None = None) -> dict | None:
        i = len(attempts)
        this_mapper = use_mapper or mapper
        out = work / str(i)
        base = state["progress"]
        span = 0.6 if i == 0 else (0.99 - base) * 0.35
        opts = dict(mapper_options or {})
        if i > 0 and this_mapper == "incremental":
            opts.setdefault("pipeline", {})["max_runtime_seconds"] = int(max(10, remaining()))
        models = rc.map_models(database_path, image_dir, out, state["frames"],
                               mapper=this_mapper, mapper_options=opts,
                               focal_prior_px=focal_prior_px,
                               progress=lambda f, m: report(base + span * f,
                                                            m if i == 0 else f"{step}: {m}"),
                               num_threads=num_threads, random_seed=random_seed)
        for m in models:  # data-driven models the metadata alone condemns (see the end)
            if m["checks"]["failures"] == ["focal_disagrees_with_metadata"] and (
                    state["meta_only"] is None or _key(m) > _key(state["meta_only"])):
                state["meta_only"], state["meta_only_dir"] = dict(m, attempt=i), out
        b = rc.best_model(models)
        rejected = veto(b) if (b is not None and veto is not None) else None
        if rejected:
            b = None
        improved = b is not None and (state["best"] is None or _key(b) > _key(state["best"]))
        if improved:
            state["best"], state["best_dir"] = dict(b, attempt=i), out
        outcome = ("no_model" if not models else "rejected" if rejected else
                   "improved" if improved else "passed" if b is not None else "failed_checks")
        if rejected:
            extra = {**(extra or {}), "reason": rejected}
        attempts.append({
            "step": step, "settings": settings, "elapsed_s": round(time.monotonic() - t0, 3),
            "outcome": outcome, "frames": state["frames"], "models": [_brief(m) for m in models],
            "model_sizes": [m["registered_images"] for m in models], "best": _brief(b),
            **(extra or {})})
        log.info("ladder attempt %d (%s): %s, sizes %s", i, step, outcome,
                 [m["registered_images"] for m in models])
        return b

    def worse_fit_than_free_focal(b: dict) -> str | None:
        """Veto of a focal-prior model that explains the data clearly worse than a model with
        a free focal length did: then the metadata is what is wrong (a crop, digital zoom)."""
        ref = state["meta_only"]
        if ref is not None and b["mean_reprojection_error_px"] > PRIOR_MAX_ERROR_RATIO * max(
                ref["mean_reprojection_error_px"], PRIOR_ERROR_FLOOR_PX):
            return "fits_worse_than_the_free_focal_length"
        return None

    def skip(step: str, reason: str, settings: dict | None = None) -> None:
        attempts.append({"step": step, "settings": settings or {}, "elapsed_s": 0.0,
                         "outcome": "skipped", "reason": reason})

    def fits(step: str) -> bool:
        # the next attempt is expected to cost about as much as the slowest one so far
        est = max((a["elapsed_s"] for a in attempts if a["outcome"] != "skipped"), default=0.0)
        if remaining() < 0.5 * est or remaining() <= 0:
            skip(step, "time_budget")
            return False
        return True

    def match_step(step: str, pairs_fn: Callable[[], list], settings: dict) -> None:
        t0 = time.monotonic()
        pairs = pairs_fn()
        base = state["progress"]
        res = rc.match_new_pairs(database_path, pairs, use_gpu=use_gpu, num_threads=num_threads,
                                 progress=lambda f, m: report(base + (0.99 - base) * 0.1 * f,
                                                              f"{step}: {m}"))
        if res["image_pairs"] == 0:
            attempts.append({"step": step, "settings": settings,
                             "elapsed_s": round(time.monotonic() - t0, 3),
                             "outcome": "skipped", "reason": "no_new_pairs", "new_pairs": 0})
            return
        map_attempt(step, settings, t0, extra={"new_pairs": res["image_pairs"],
                                               "verified_pairs": res["verified_pairs"]})

    # attempt 0: the matching stage's pairs, COLMAP defaults
    cam0 = rc.read_camera(database_path)
    map_attempt("baseline", {"mapper": mapper, "camera_model": cam0.model_name,
                             "matching": "sequential"}, t_first)
    ladder_t0.append(time.monotonic())
    exhaustive_done = False
    for step in steps:
        if good_enough():
            break
        if step not in STEPS:
            raise ValueError(f"unknown ladder step {step!r}")
        if step == "more_overlap":
            n_pairs = state["frames"] * (state["frames"] - 1) // 2
            if "exhaustive" in steps and n_pairs <= EXHAUSTIVE_MAX_PAIRS:
                skip(step, "exhaustive_matching_is_cheap", {"pairs": n_pairs})
            elif fits(step):
                match_step(step, lambda: rc.sequential_pairs(database_path, MORE_OVERLAP,
                                                             quadratic=False),
                           {"overlap": MORE_OVERLAP, "quadratic_overlap": False})
        elif step == "exhaustive":
            n_pairs = state["frames"] * (state["frames"] - 1) // 2
            if n_pairs > EXHAUSTIVE_MAX_PAIRS:
                skip(step, "too_many_pairs", {"pairs": n_pairs,
                                              "max_pairs": EXHAUSTIVE_MAX_PAIRS})
            elif fits(step):
                match_step(step, lambda: rc.all_pairs(database_path), {"pairs": n_pairs})
                exhaustive_done = True
        elif step == "loop_closure":
            if exhaustive_done:
                skip(step, "exhaustive_matching_covered_all_pairs")
            elif fits(step):
                vocab = work / "own_vocabulary.bin"
                info: dict = {}

                def pairs() -> list:
                    info.update(rc.build_own_vocabulary(database_path, vocab))
                    return rc.loop_closure_pairs(database_path, vocab)

                match_step(step, pairs, {"num_images": rc.LOOP_NUM_IMAGES,
                                         "vocabulary": "built from this job's descriptors",
                                         "vocab_words": rc.LOOP_VOCAB_WORDS})
                vocab.unlink(missing_ok=True)
        elif step == "camera_model":
            for model in CAMERA_MODELS:
                if good_enough() or not fits(step):
                    break
                t0 = time.monotonic()
                # a known focal length stays the starting point (and trusted) with any model
                saved = rc.set_camera_model(database_path, model, focal_px=focal_prior_px,
                                            prior=bool(focal_prior_px))
                b = map_attempt(step, {"camera_model": model}, t0)
                if not (b is not None and state["best"] is not None
                        and state["best"].get("attempt") == len(attempts) - 1):
                    rc.restore_cameras(database_path, saved)  # did not help: undo
                    attempts[-1]["camera_kept"] = False
                else:
                    attempts[-1]["camera_kept"] = True
        elif step == "focal_prior":
            if not focal_prior_px:
                skip(step, "no_focal_length_metadata")
                continue
            for fixed in (False, True):
                if good_enough() or not fits(step):
                    break
                t0 = time.monotonic()
                model = rc.read_camera(database_path).model_name
                saved = rc.set_camera_model(database_path, model, focal_px=focal_prior_px,
                                            prior=True)
                settings = {"focal_px": round(float(focal_prior_px), 3), "camera_model": model,
                            "focal": "fixed" if fixed else "refined", "mapper": "incremental"}
                # held fixed: incremental mapping (its bundle adjustment option is documented)
                b = map_attempt(step, settings, t0, use_mapper="incremental",
                                mapper_options={"pipeline": {"ba_refine_focal_length": False}}
                                if fixed else None, veto=worse_fit_than_free_focal)
                kept = (b is not None and state["best"] is not None
                        and state["best"].get("attempt") == len(attempts) - 1)
                attempts[-1]["camera_kept"] = kept
                if not kept:
                    rc.restore_cameras(database_path, saved)
        elif step == "other_mapper":
            if fits(step):
                other = "incremental" if mapper == "global" else "global"
                map_attempt(step, {"mapper": other}, time.monotonic(), use_mapper=other)
        elif step == "more_frames":
            if more_frames is None:
                skip(step, "no_frame_source")
            elif fits(step):
                t0 = time.monotonic()
                report(state["progress"], f"{step}: adding frames between the selected ones")
                got = more_frames()
                added = list(got.get("added") or [])
                if not added:
                    attempts.append({"step": step, "settings": {}, "outcome": "skipped",
                                     "elapsed_s": round(time.monotonic() - t0, 3),
                                     "reason": "no_usable_frames_between"})
                    continue
                state["frames"] = int(got["frames"])
                state["added"].extend(added)
                base = state["progress"]
                pairs = rc.sequential_pairs(database_path, rc.SEQUENTIAL_OVERLAP)
                if exhaustive_done and (state["frames"] * (state["frames"] - 1) // 2
                                        <= EXHAUSTIVE_MAX_PAIRS):
                    pairs = rc.all_pairs(database_path)
                res = rc.match_new_pairs(
                    database_path, pairs, use_gpu=use_gpu, num_threads=num_threads,
                    progress=lambda f, m: report(base + (0.99 - base) * 0.1 * f, f"{step}: {m}"))
                map_attempt(step, {"added_frames": len(added), "frames": state["frames"]}, t0,
                            extra={"new_pairs": res["image_pairs"],
                                   "verified_pairs": res["verified_pairs"]})
        elif step == "init_thresholds":
            if fits(step):  # initial-pair thresholds exist only in incremental mapping
                map_attempt(step, {**RELAXED_INIT, "mapper": "incremental"}, time.monotonic(),
                            mapper_options=dict(RELAXED_INIT), use_mapper="incremental")
    elapsed = round(time.monotonic() - ladder_t0[0], 3)
    best = state["best"]
    warnings: list[dict] = []
    if best is None and state["meta_only"] is not None:
        # Every model that failed ONLY the metadata check fits the data; the metadata focal
        # length, held fixed, did not do as well (or was not tried): trust the images.
        m = state["meta_only"]
        best = dict(m, checks=dict(m["checks"], passed=True, failures=[],
                                   overridden=["focal_disagrees_with_metadata"]))
        state["best"], state["best_dir"] = best, state["meta_only_dir"]
        warnings.append({
            "code": "focal_metadata_ignored",
            "message": f"The photos' metadata says the focal length is {focal_prior_px:.0f} px; "
                       f"the images say {m.get('focal_px', 0):.0f} px, and a model held to the "
                       f"metadata fitted them worse, so the metadata was ignored.",
            "hint": "Photos that were cropped, digitally zoomed or edited keep the original "
                    "focal length in their EXIF; upload the originals."})
    if best is None:
        shutil.rmtree(work, ignore_errors=True)
        raise PipelineError("reconstruction_failed", details={
            "frames": state["frames"], "frames_added": state["added"], "attempts": attempts,
            "reason": "no attempt gave a model with plausible intrinsics, low reprojection "
                      "error and enough registered images"})
    # keep only the chosen attempt's models, as sparse/<k>
    chosen_dir = state["best_dir"]
    attempt = attempts[best["attempt"]]
    for d in sorted(chosen_dir.iterdir()):
        if d.is_dir() and d.name.isdigit():
            os.replace(d, sparse / d.name)
    shutil.rmtree(work, ignore_errors=True)
    checks = best["checks"]
    used = attempt["frames"]
    if checks["partial"]:
        warnings.insert(0, {
            "code": "partial_reconstruction",
            "message": f"Only {best['registered_images']} of {used} selected frames were "
                       f"registered.",
            "hint": "Film with more overlap between views (slower sideways motion, no fast "
                    "turns), avoid sky, water and blur, or upload more photos."})
    report(1.0, f"Registered {best['registered_images']}/{used} images")
    return {
        "frames": used, "frames_added": state["added"],
        "mapper": mapper, "budget_s": budget,
        "ladder_elapsed_s": elapsed,
        "models": attempt["models"], "chosen_model": best["index"],
        "chosen_attempt": best["attempt"],
        "chosen_mapper": attempt["settings"].get("mapper", mapper),
        "model_sizes": {str(i): a.get("model_sizes", []) for i, a in enumerate(attempts)},
        "registered_images": best["registered_images"], "points3d": best["points3d"],
        "checks": checks, "partial": bool(checks["partial"]),
        "quality_warning": warnings[0] if warnings else None, "warnings": warnings,
        "attempts": attempts,
    }
