"""The recovery ladder of the mapping stage: bounded, recorded attempts; the best checked model.

COLMAP's defaults are not reliable on real clips (on the Karma drone clip the same 30 frames give
30 or 2 registered images, with focal lengths from 46 px to 10,204 px). So mapping is a series of
attempts. The first uses what the matching stage produced (sequential pairs, SIMPLE_RADIAL
camera, the preset's mapper). While no model registers ``TARGET_FRACTION`` of the frames and
passes :func:`.sfm_mapping.check_model` (plausible intrinsics, reprojection error, points), the
ladder climbs its rungs (:data:`.ladder_rungs.RUNGS`, in the order of :data:`STEPS`):

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
   :data:`.sfm_mapping.FOCAL_PRIOR_TOLERANCE`): self-calibration on low-parallax views
   drifts to a plausible-looking but wrong focal length that the other checks cannot see;
7. ``camera_model``: OPENCV (fx, fy, cx, cy, k1, k2, p1, p2), then OPENCV_FISHEYE (k1..k4) for
   wide action-camera lenses; a camera change that does not help is undone;
8. ``more_frames``: one more frame in the middle of every gap between selected frames (from
   the video, :func:`.more_frames.extract_between`, through the ``more_frames`` callback), with
   features and sequential matches for them: halves the baseline between neighbours when the
   preset's cap spreads the frames too thin to match (fast motion, long clips at a low cap).
   Last, because it costs new decoding, features and matching. No shared clip needs it at the
   presets' caps (tested on a synthetic case, ``tests/test_ladder.py``). Skipped for photo
   sets (no frame source).

Matching rungs add pairs to the database (they stay for later rungs). Every attempt is recorded
(:class:`..results.MappingAttempt`) with its settings, outcome (size and checks of every model)
and time; a rung that would not fit in the time budget (the preset's ``LADDER_BUDGET_S``,
capped at 3x the first attempt's time but at least 120 s: :func:`ladder_budget`) is
recorded as skipped. The best model of all attempts (most registered images among the models
passing the checks) is the result. Each attempt moves the progress bar and says which it is:
"attempt 3 of at most 8: camera model OPENCV (112 s of 600 s budget)". A ladder that ends with
no model says why, with numbers (:func:`_failure`).

The registered share of an attempt is over the frames it was given (``frames`` of the attempt:
more after ``more_frames``).

Fail fast (issue 15): before the first attempt, and again after each matching rung while it
matters, :mod:`.match_diagnostics` reads the verified matches. Its verdict rules rungs out
(:data:`HELPFUL_RUNGS`; the others are recorded as skipped, reason ``ruled_out_by_<verdict>``,
and the progress bar moves past them):

* ``rotation_only`` (pure rotation): nothing makes parallax; unless the first attempt is good
  enough (a diagnosis is no proof, and that attempt is what a good input costs too), the ladder
  fails at once after it, skipping every rung;
* ``disconnected_scenes``: only matching more pairs can join the scenes; a matching rung whose
  pairs leave them apart does not map (``still_disconnected_scenes``); once exhaustive
  matching or loop closure has searched far pairs in vain, the ladder fails with this code,
  even when one scene alone made a model;
* ``insufficient_parallax``: only wider pairs (``more_overlap``, ``exhaustive``) can show
  parallax; the ladder fails with this code when no model passed its checks.

A good-enough model always wins, and ``reconstruction_failed`` / ``no_initial_pair`` remain for
failures the matches do not explain. The chosen model is then checked for moving content
(:mod:`.moving_content`): a ``moving_content`` warning when many matches follow a second motion.
"""
from __future__ import annotations

import logging
import os
import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import PipelineError
from ..presets import LADDER_BUDGET_S, MAPPER_BY_QUALITY
from ..results import JobWarning, MappingSummary, MatchDiagnostics, ModelSummary
from . import ladder_attempt as la
from . import ladder_rungs as lr
from . import match_diagnostics as md
from . import moving_content as mc
from . import sfm_cameras as scam
from . import sfm_features as sf
from . import sfm_mapping as sm
from . import sfm_matching as sfmatch
from .ladder_attempt import (  # noqa: F401 - TARGET_FRACTION, AddedFrames re-exported
    TARGET_FRACTION,
    AddedFrames,
    Candidate,
    FrameSource,
    LadderConfig,
    LadderState,
    Plan,
)
from .progress import Progress, no_progress

log = logging.getLogger(__name__)

STEPS = ("more_overlap", "exhaustive", "loop_closure", "other_mapper", "init_thresholds",
         "focal_prior", "camera_model", "more_frames")
#: COLMAP's ``init_min_num_inliers`` default (``IncrementalMapperOptions``; the
#: ``init_thresholds`` rung halves it: :data:`.ladder_rungs.RELAXED_INIT`).
COLMAP_INIT_MIN_INLIERS = 100
#: A failed ladder is named ``too_blurry`` when the median sharpness of the selected frames
#: (variance of the Laplacian on the 480 px analysis image, :mod:`.frame_scores`) is below
#: this; the frames stage already refuses clips under ``BLUR_ABSOLUTE`` (10). Measured on the
#: sample walk (848x480) with every frame smeared by a random-direction motion kernel of L px
#: plus 6-8 px of shake (``scripts/blur_clip.py``), at low: L = 0: 950; 9: 137; 17: 84;
#: 31: 48 (the ladder registered 56/58 with more_frames); 51: 31 (partial, 22/58); 75: 22
#: (failed; 94 keypoints per frame, 55 inlier matches over 119 pairs). EuRoC's sharp, static
#: frames score 60-90.
BLURRY_FAILURE_SHARPNESS = 50.0
#: The preset's budget (``LADDER_BUDGET_S``, low 600 s) is a ceiling: the ladder gets at most
#: ``FIRST_ATTEMPT_FACTOR`` x the first attempt's time, and never less than
#: ``MIN_BUDGET_S`` (:func:`ladder_budget`), so that a failing input fails within about twice
#: the time a good one of its size takes (issue 15). A good 30-frame clip at low takes 25-50 s
#: in all on 2 shared cores, its first mapping attempt 3-8 s (CLI runs of the GoPro walk, the
#: Karma clip and the fountain photos); a hopeless one stopped 733 s in. Now an input that fails
#: quickly stops 120 s after its first attempt (about 2.5-3 min in all); one whose attempts are
#: slow (Karma's took 100-370 s on 5x-shared cores, issue 4) keeps up to 3 of them.
FIRST_ATTEMPT_FACTOR = 3.0
MIN_BUDGET_S = 120.0
#: Rungs that can still help under a diagnosis of the matches (:mod:`.match_diagnostics`):
#: matching more pairs can join disconnected scenes (nothing else can), wider pairs can show
#: parallax that near pairs lack; no rung gives a camera that only turns any parallax.
HELPFUL_RUNGS: dict[str, frozenset[str]] = {
    "disconnected_scenes": frozenset({"more_overlap", "exhaustive", "loop_closure"}),
    "insufficient_parallax": frozenset({"more_overlap", "exhaustive"}),
    "rotation_only": frozenset(),
}


# --- what the matches say: skip what cannot help ------------------------------------------

def _diagnose(cfg: LadderConfig, st: LadderState) -> MatchDiagnostics:
    """Read the matches (:func:`.match_diagnostics.diagnose_database`) into ``st``."""
    st.diagnostics = md.diagnose_database(cfg.database_path)
    log.info("match diagnostics: %s", st.diagnostics.model_dump(exclude={"scenes"}))
    return st.diagnostics


def _verdict(st: LadderState) -> str | None:
    return st.diagnostics.verdict if st.diagnostics is not None else None


def _ruled_out(step: str, st: LadderState) -> str | None:
    """Why rung ``step`` cannot help under the current diagnosis (``None``: it may)."""
    v = _verdict(st)
    if v is None or step in HELPFUL_RUNGS.get(v, frozenset(STEPS)) or (
            v == "disconnected_scenes" and not _searched_all_pairs(st)):
        return None
    return f"ruled_out_by_{v}"


def _recheck(cfg: LadderConfig, st: LadderState) -> str | None:
    """After a matching rung: diagnose again; the reason to skip mapping while the same
    verdict holds (``still_<verdict>``), else ``None``."""
    before = _verdict(st)
    after = _diagnose(cfg, st).verdict
    if after is None:
        st.recheck = None
    return f"still_{before}" if before is not None and after == before else None


def _run_rungs(cfg: LadderConfig, st: LadderState, steps: Sequence[str]) -> None:
    """Climb ``steps`` until good enough; rungs the diagnosis rules out are skipped. Every
    rung moves the progress bar, run or not."""
    for step in steps:
        if la.good_enough(cfg, st):
            break
        cap = lr.RUNGS[step].max_attempts(cfg, st)
        maps_before = st.maps_run
        reason = _ruled_out(step, st)
        if reason:
            la.skip(st, step, reason, {"verdict": _verdict(st)})
        else:
            st.recheck = (lambda: _recheck(cfg, st)) if _verdict(st) else None
            lr.RUNGS[step].run(cfg, st)
        st.slots_skipped += max(0, cap - (st.maps_run - maps_before))
        la.report(cfg, st, la.window(st)[0], la.after_rung(cfg, st, step))


def _searched_all_pairs(st: LadderState) -> bool:
    """Every pair was matched (``exhaustive``), or loop closure looked for far pairs."""
    return st.exhaustive_done or any(
        a.step == "loop_closure" and (a.outcome != "skipped" or (a.reason or "").startswith(
            "still_") or a.reason == "no_new_pairs") for a in st.attempts)


def _diagnosed_failure(cfg: LadderConfig, st: LadderState) -> PipelineError | None:
    """The narrow error the diagnosis names, or ``None`` when it does not decide: a
    good-enough model always wins; ``insufficient_parallax`` only without a passing model;
    ``disconnected_scenes`` only once far pairs were searched (exhaustive matching or loop
    closure): before that a gap in one scene (a fast turn, a few blurred frames) looks the
    same, and the best model stays a partial result."""
    v = _verdict(st)
    if v is None or st.diagnostics is None or la.good_enough(cfg, st) or (
            v == "insufficient_parallax" and st.best is not None) or (
            v == "disconnected_scenes" and not _searched_all_pairs(st)):
        return None
    details = _failure_details(cfg, st)
    return PipelineError(v, message=md.describe(st.diagnostics), details=details)


# --- the end: choose, explain, or fail ------------------------------------------------------

def _trust_images(cfg: LadderConfig, st: LadderState) -> list[JobWarning]:
    """With no passing model: a model that failed ONLY the metadata check fits the data, and
    the metadata focal length, held fixed, did not do as well (or was not tried): use it."""
    if st.best is not None or st.meta_only is None:
        return []
    m = st.meta_only.model
    checks = m.checks.model_copy(update={"passed": True, "failures": [],
                                         "overridden": ["focal_disagrees_with_metadata"]})
    st.best = Candidate(m.model_copy(update={"checks": checks}), st.meta_only.attempt,
                        st.meta_only.directory)
    prior = cfg.focal_prior_px
    said = m.focal_px_by_camera or m.focal_px or 0.0
    return [JobWarning(
        code="focal_metadata_ignored",
        message=f"The photos' metadata says the focal length is {scam.prior_text(prior)}; the "
                f"images say {scam.prior_text(said)}, and a model held to the metadata fitted them "
                f"worse, so the metadata was ignored.",
        details={"metadata_focal_px": scam.prior_record(prior), "images_focal_px": m.focal_px},
        hint="Photos that were cropped, digitally zoomed or edited keep the original focal "
             "length in their EXIF; upload the originals.")]


def _failure_details(cfg: LadderConfig, st: LadderState) -> dict[str, Any]:
    """The numbers of a failed ladder: frames, matches, largest model, every attempt, and
    the match diagnostics."""
    db = sfmatch.database_stats(cfg.database_path)
    models = [m for a in st.attempts for m in a.models]
    largest = max(models, key=sm.model_key, default=None)
    return {
        "frames": st.frames, "frames_added": st.added,
        "median_keypoints_per_image": db.median_keypoints_per_image,
        "matched_pairs": db.matched_pairs, "verified_pairs": db.verified_pairs,
        "best_pair_inliers": db.best_pair_inliers,
        "largest_model_images": largest.registered_images if largest else 0,
        "largest_model_points": largest.points3d if largest else 0,
        "largest_model_failures": largest.checks.failures if largest else [],
        "required_images": sm.min_registered_images(st.frames),
        "ladder_elapsed_s": round(la.elapsed(st), 3), "budget_s": cfg.budget_s,
        "match_diagnostics": st.diagnostics.model_dump(mode="json") if st.diagnostics else None,
        "mapping_attempts": [a.model_dump(mode="json", exclude_none=True)
                             for a in st.attempts]}


def _failure(cfg: LadderConfig, st: LadderState) -> PipelineError:
    """The error of a ladder that found no usable model, with the numbers that say why:
    ``no_initial_pair`` when no model grew beyond an initial pair (none, or 2 images: COLMAP
    relaxes its own initial-pair thresholds and may keep such a fragment), else
    ``reconstruction_failed``."""
    db = sfmatch.database_stats(cfg.database_path)
    models = [m for a in st.attempts for m in a.models]
    largest = max(models, key=sm.model_key, default=None)
    required = sm.min_registered_images(st.frames)
    details = _failure_details(cfg, st)
    if largest is None or largest.registered_images <= 2:
        return PipelineError("no_initial_pair", details=details, message=(
            f"No initial pair: {db.verified_pairs} of {db.matched_pairs} image pairs "
            f"verified, the best has "
            f"{db.best_pair_inliers} inlier matches, and no model grew beyond "
            f"{largest.registered_images if largest else 0} images (COLMAP starts a model "
            f"from a pair with about {COLMAP_INIT_MIN_INLIERS} inliers seen from different "
            f"enough viewpoints)."))
    return PipelineError("reconstruction_failed", details=details, message=(
        f"COLMAP could not build a usable model: the largest of {len(models)} models "
        f"registered {largest.registered_images} of {st.frames} frames (at least {required} "
        f"needed) and failed {', '.join(largest.checks.failures) or 'no check'}; "
        f"{db.verified_pairs} of {db.matched_pairs} image pairs verified, median "
        f"{db.median_keypoints_per_image:.0f} keypoints per frame."))


def name_failure(error: PipelineError, frames: Sequence[Mapping[str, Any]]) -> PipelineError:
    """A failed ladder's error, named ``too_blurry`` (the ladder's numbers kept, the sharpness
    numbers added) when the selected ``frames`` (``frames.json``'s, each with a
    ``sharpness``) have a median sharpness under :data:`BLURRY_FAILURE_SHARPNESS`; else
    ``error`` unchanged."""
    sharp = [float(f["sharpness"]) for f in frames if f.get("sharpness") is not None]
    if error.code not in ("reconstruction_failed", "no_initial_pair") or not sharp:
        return error
    med = statistics.median(sharp)
    if med >= BLURRY_FAILURE_SHARPNESS:
        return error
    details = dict(error.details or {})
    keypoints = float(details.get("median_keypoints_per_image", 0.0))
    details.update(median_sharpness=round(med, 3), min_sharpness=round(min(sharp), 3),
                   max_sharpness=round(max(sharp), 3),
                   sharpness_threshold=BLURRY_FAILURE_SHARPNESS,
                   reconstruction_error={"code": error.code, "message": error.message})
    return PipelineError("too_blurry", details=details, message=(
        f"The frames are too blurry to reconstruct: their median sharpness is {med:.1f}, where "
        f"sharp footage scores over {BLURRY_FAILURE_SHARPNESS:.0f}; SIFT found a median of "
        f"{keypoints:.0f} features per frame and no usable model came out."))


#: the hint of a photo set's ``no_initial_pair`` / ``reconstruction_failed`` (the catalog's
#: speaks of filming; a failed photo set most often holds photos that do not overlap)
PHOTO_FAILURE_HINT = (
    "Send photos of one static, textured scene taken a step apart, each overlapping its "
    "neighbours by 60-80%; photos of different places, or of one place from far-apart "
    "viewpoints, cannot be joined into one model.")


def for_photos(error: PipelineError) -> PipelineError:
    """``error`` with :data:`PHOTO_FAILURE_HINT` when it is a ``no_initial_pair`` or
    ``reconstruction_failed`` of a photo set (numbers and message kept); else unchanged."""
    if error.code not in ("reconstruction_failed", "no_initial_pair"):
        return error
    message = error.message.replace("from this video", "from these photos")
    return PipelineError(error.code, message=message, hint=PHOTO_FAILURE_HINT,
                         details=error.details)


def _partial_warning(best: ModelSummary, frames: int) -> JobWarning:
    return JobWarning(
        code="partial_reconstruction",
        message=f"Only {best.registered_images} of {frames} selected frames were registered.",
        details={"registered_images": best.registered_images, "frames": frames},
        hint="Film with more overlap between views (slower sideways motion, no fast turns), "
             "avoid sky, water and blur, or upload more photos.")


def _keep_chosen(best: Candidate, sparse: Path, work: Path) -> None:
    """Move the chosen attempt's models to ``sparse/<k>``; drop the other attempts."""
    for d in sorted(best.directory.iterdir()):
        if d.is_dir() and d.name.isdigit():
            os.replace(d, sparse / d.name)
    shutil.rmtree(work, ignore_errors=True)


def _summary(cfg: LadderConfig, st: LadderState, best: Candidate,
             warnings: list[JobWarning]) -> MappingSummary:
    attempt = st.attempts[best.attempt]
    model = best.model
    used = attempt.frames or st.frames
    if model.checks.partial:
        warnings.insert(0, _partial_warning(model, used))
    return MappingSummary(
        frames=used, frames_added=st.added, mapper=cfg.mapper,
        chosen_mapper=str(attempt.settings.get("mapper", cfg.mapper)), budget_s=cfg.budget_s,
        ladder_elapsed_s=round(la.elapsed(st), 3), models=attempt.models,
        chosen_model=model.index, chosen_attempt=best.attempt,
        model_sizes={str(i): a.model_sizes for i, a in enumerate(st.attempts)},
        registered_images=model.registered_images, points3d=model.points3d,
        checks=model.checks, partial=model.checks.partial,
        quality_warning=warnings[0] if warnings else None, warnings=warnings,
        mapping_attempts=st.attempts, match_diagnostics=st.diagnostics)


def ladder_budget(ceiling_s: float, first_attempt_s: float) -> float:
    """The ladder's budget (s) after a first attempt of ``first_attempt_s`` s: ``ceiling_s``
    (the preset's) capped at max(``MIN_BUDGET_S``, ``FIRST_ATTEMPT_FACTOR`` x
    ``first_attempt_s``)."""
    return min(ceiling_s, max(MIN_BUDGET_S, FIRST_ATTEMPT_FACTOR * first_attempt_s))


def max_attempts(cfg: LadderConfig, frames: int) -> int:
    """Mapping attempts a run of ``cfg`` makes at most: the first plus each rung's most."""
    st = LadderState(frames=frames)
    return 1 + sum(lr.RUNGS[s].max_attempts(cfg, st) for s in cfg.steps)


def run_ladder(database_path: str | os.PathLike[str], image_dir: str | os.PathLike[str],
               sparse_dir: str | os.PathLike[str], num_frames: int, quality: str = "low",
               use_gpu: bool = False, focal_prior_px: scam.FocalPriors = None,
               progress: Progress = no_progress, steps: tuple[str, ...] | None = None,
               budget_s: float | None = None, mapper: str | None = None,
               num_threads: int = -1, random_seed: int = -1,
               target_fraction: float = TARGET_FRACTION,
               more_frames: FrameSource | None = None,
               matching: str = "sequential") -> MappingSummary:
    """Map, check, and climb the recovery ladder until a model is good enough or time is up.

    Args:
        database_path: COLMAP database with features and the matching stage's pairs.
        image_dir: the frames.
        sparse_dir: replaced; on return holds the chosen attempt's models as ``<k>/``.
        num_frames: frames selected for SfM.
        quality: preset name (budget and mapper).
        use_gpu: CUDA matching in the matching rungs.
        focal_prior_px: focal length from metadata (px at the frames' size; one value, or one
            per camera id: :data:`.sfm_cameras.FocalPriors`) or ``None``; with it, models that
            disagree with it fail their checks.
        progress: ``progress(fraction, message)``; every attempt moves it.
        steps: rungs to allow (default :data:`STEPS`, in that order).
        budget_s: time budget (s) after the first attempt; default: the preset's
            ``LADDER_BUDGET_S`` capped by :func:`ladder_budget` once the first attempt's time
            is known (an explicit value is used as it is).
        mapper: ``"incremental"`` or ``"global"`` (default ``MAPPER_BY_QUALITY[quality]``).
        num_threads, random_seed: as pycolmap (-1 = all cores / random).
        target_fraction: stop once the best model registers this share of the frames.
        more_frames: frame source of the ``more_frames`` rung: called once, writes new frames
            into ``image_dir``, adds their features to the database (existing camera);
            ``None`` (photo sets): the rung is skipped.
        matching: how the matching stage chose its pairs (``sequential``, ``exhaustive``,
            ``retrieval``: :func:`.sfm_matching.match_photos`); after ``exhaustive`` there
            is no pair left for the matching rungs.

    Returns:
        the chosen model, its checks and warnings, and every attempt.

    Raises:
        PipelineError("no_initial_pair"): no attempt produced any model.
        PipelineError("reconstruction_failed"): no model passed the checks.
        Both with numbers in ``details`` (:func:`_failure`).
        ValueError: an unknown step.
    """
    steps = tuple(STEPS if steps is None else steps)
    unknown = [s for s in steps if s not in lr.RUNGS]
    if unknown:
        raise ValueError(f"unknown ladder step {unknown[0]!r}")
    sparse = Path(sparse_dir)
    cfg = LadderConfig(
        database_path=Path(database_path), image_dir=Path(image_dir), work=sparse / "_attempts",
        mapper=mapper or MAPPER_BY_QUALITY.get(quality, "incremental"),
        budget_s=float(LADDER_BUDGET_S.get(quality, 600.0) if budget_s is None else budget_s),
        steps=steps, use_gpu=use_gpu, focal_prior_px=focal_prior_px, num_threads=num_threads,
        random_seed=random_seed, target_fraction=target_fraction, more_frames=more_frames,
        progress=progress)
    if sparse.exists():
        shutil.rmtree(sparse)
    cfg.work.mkdir(parents=True)
    st = LadderState(frames=int(num_frames), max_attempts=max_attempts(cfg, int(num_frames)))
    cam = sf.read_camera(cfg.database_path)
    first = {"mapper": cfg.mapper, "camera_model": cam.model_name, "matching": matching}
    st.exhaustive_done = matching == "exhaustive"
    st.names_ordered = matching == "sequential"
    la.report(cfg, st, 0.0, "Checking what the matches show...")
    _diagnose(cfg, st)
    base = la.map_attempt(cfg, st, Plan("baseline", first, f"mapper {cfg.mapper}"),
                          time.monotonic())
    st.ladder_t0 = time.monotonic()
    if budget_s is None:
        cfg = replace(cfg, budget_s=ladder_budget(cfg.budget_s, base.elapsed_s))
    _run_rungs(cfg, st, steps)
    warnings = _trust_images(cfg, st)
    error = _diagnosed_failure(cfg, st)  # a narrow code first, even beside a partial model
    if error is not None or st.best is None:
        shutil.rmtree(cfg.work, ignore_errors=True)
        raise error or _failure(cfg, st)
    _keep_chosen(st.best, sparse, cfg.work)
    _, moving = mc.check(cfg.database_path, sparse / str(st.best.model.index))
    if moving is not None:
        warnings.append(moving)
    summary = _summary(cfg, st, st.best, warnings)
    la.report(cfg, st, 1.0, f"Registered {summary.registered_images}/{summary.frames} images")
    return summary
