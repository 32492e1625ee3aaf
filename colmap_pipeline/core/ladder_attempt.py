"""One attempt of the recovery ladder (:mod:`.ladder`): its state, progress, record and verdict.

:class:`LadderConfig` holds a ladder run's inputs, :class:`LadderState` what it has done so far;
:func:`map_attempt` runs SfM once as a :class:`Plan` says, records the attempt
(:class:`..results.MappingAttempt`) and keeps the best model; :func:`match_then_map` first
matches new image pairs. Each attempt gets its own share of the progress bar and says which it
is: "attempt 3 of at most 8: camera model OPENCV (112 s of 600 s budget)".
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..results import MappingAttempt, MatchDiagnostics, ModelSummary
from . import sfm_cameras as scam
from . import sfm_mapping as sm
from . import sfm_matching as sfmatch
from .progress import Progress, no_progress

log = logging.getLogger(__name__)

#: The ladder stops once the best checked model registers this share of the frames.
TARGET_FRACTION = 0.9
#: ``focal_prior``: a model held to the metadata focal length is vetoed when its mean
#: reprojection error exceeds this many times that of the best free-focal model that failed
#: only the metadata check (floor ``PRIOR_ERROR_FLOOR_PX``): a wrong EXIF value (crop, digital
#: zoom) fits visibly worse (seen in a fresh-user trial: 1.08 px vs 0.25 px on fountain crops
#: labelled 26 mm whose true focal length is 41 mm equivalent), a right one fits as well
#: (0.5757 vs 0.5756 px, tests/test_ladder.py).
PRIOR_MAX_ERROR_RATIO = 1.5
PRIOR_ERROR_FLOOR_PX = 0.3
#: Progress: the first attempt fills this share of the mapping stage's bar (it usually is the
#: only one); every later attempt an equal share of the rest, up to ``MAX_FRACTION``; a
#: matching rung spends ``MATCH_SHARE`` of its share matching.
FIRST_ATTEMPT_SHARE = 0.6
MAX_FRACTION = 0.99
MATCH_SHARE = 0.3


@dataclass(frozen=True)
class AddedFrames:
    """What the ``more_frames`` frame source did: new file names, and frames in all now."""

    added: list[str]
    frames: int


FrameSource = Callable[[], AddedFrames]


@dataclass(frozen=True)
class LadderConfig:
    """The inputs of one ladder run (see :func:`run_ladder` for each)."""

    database_path: Path
    image_dir: Path
    work: Path
    mapper: str
    budget_s: float
    steps: tuple[str, ...]
    use_gpu: bool = False
    focal_prior_px: scam.FocalPriors = None
    num_threads: int = -1
    random_seed: int = -1
    target_fraction: float = TARGET_FRACTION
    more_frames: FrameSource | None = None
    progress: Progress = no_progress


@dataclass
class Candidate:
    """A model, the attempt that made it, and the folder holding that attempt's models."""

    model: ModelSummary
    attempt: int
    directory: Path


@dataclass
class LadderState:
    """What the ladder has done so far.

    Attributes:
        frames: frames given to SfM now (more after ``more_frames``).
        max_attempts: mapping attempts this run may make at most (for progress messages).
        attempts: every attempt so far, skipped ones included.
        maps_run: attempts that ran SfM.
        best: best model passing its checks so far.
        meta_only: best model that failed only ``focal_disagrees_with_metadata``.
        added: frames added by ``more_frames``.
        fraction: progress reported so far (never decreases).
        ladder_t0: monotonic time when the first attempt ended (the budget starts there).
        exhaustive_done: every pair has been matched.
        names_ordered: the images' names follow the capture order (a video; a photo set
            matched sequentially): neighbours by name are neighbours in space.
        diagnostics: what the matches say (:mod:`.match_diagnostics`), latest reading.
        slots_skipped: attempts of ``max_attempts`` given up by skipped rungs (the progress
            bar moves past them; "at most" counts down).
        recheck: set while a diagnosis rules mapping out: called by :func:`match_then_map`
            after matching; returns why the new pairs still cannot help (mapping skipped),
            or ``None`` (map).
    """

    frames: int
    max_attempts: int = 1
    attempts: list[MappingAttempt] = field(default_factory=list)
    maps_run: int = 0
    best: Candidate | None = None
    meta_only: Candidate | None = None
    added: list[str] = field(default_factory=list)
    names_ordered: bool = True
    fraction: float = 0.0
    ladder_t0: float | None = None
    exhaustive_done: bool = False
    diagnostics: MatchDiagnostics | None = None
    slots_skipped: int = 0
    recheck: Callable[[], str | None] | None = None


# --- bookkeeping ----------------------------------------------------------------------------

def report(cfg: LadderConfig, st: LadderState, fraction: float, message: str) -> None:
    """Report progress, capped at :data:`MAX_FRACTION` and never lower than before."""
    st.fraction = max(st.fraction, min(MAX_FRACTION, fraction))
    cfg.progress(st.fraction, message)


def good_enough(cfg: LadderConfig, st: LadderState) -> bool:
    """The best model registers ``target_fraction`` of the frames (and the minimum)."""
    n = st.frames
    target = max(sm.min_registered_images(n), math.ceil(cfg.target_fraction * n))
    return st.best is not None and st.best.model.registered_images >= target


def elapsed(st: LadderState) -> float:
    """Seconds since the first attempt ended (0 before): what the budget counts."""
    return 0.0 if st.ladder_t0 is None else time.monotonic() - st.ladder_t0


def remaining(cfg: LadderConfig, st: LadderState) -> float:
    """Seconds of the budget left (negative once spent)."""
    return cfg.budget_s - elapsed(st)


def window(st: LadderState) -> tuple[float, float]:
    """Progress window (fractions of the stage) of the next mapping attempt (skipped rungs'
    attempts count as done)."""
    k = st.maps_run + st.slots_skipped + 1
    if k == 1:
        return 0.0, FIRST_ATTEMPT_SHARE
    share = (MAX_FRACTION - FIRST_ATTEMPT_SHARE) / max(1, st.max_attempts - 1)
    lo = FIRST_ATTEMPT_SHARE + share * (k - 2)
    return min(lo, MAX_FRACTION), min(lo + share, MAX_FRACTION)


def headline(cfg: LadderConfig, st: LadderState, label: str) -> str:
    """``attempt 3 of at most 8: camera model OPENCV (112 s of 600 s budget)``."""
    k = st.maps_run + 1
    text = f"attempt {k} of at most {max(k, st.max_attempts - st.slots_skipped)}: {label}"
    if st.ladder_t0 is not None:
        text += f" ({elapsed(st):.0f} s of {cfg.budget_s:.0f} s budget)"
    return text


def after_rung(cfg: LadderConfig, st: LadderState, step: str) -> str:
    """``exhaustive: skipped (still_disconnected_scenes); at most 3 more attempts (8 s of 600 s
    budget)``: what the last rung did, and what is left."""
    last = st.attempts[-1] if st.attempts else None
    what = f"{last.outcome}" + (f" ({last.reason})" if last.reason else "") if last else "done"
    left = max(0, st.max_attempts - st.slots_skipped - st.maps_run)
    text = f"{step}: {what}; at most {left} more attempts"
    if st.ladder_t0 is not None:
        text += f" ({elapsed(st):.0f} s of {cfg.budget_s:.0f} s budget)"
    return text


def reporter(cfg: LadderConfig, st: LadderState, lo: float, hi: float, title: str) -> Progress:
    """A progress callback that maps [0, 1] onto [lo, hi] and prefixes ``title``."""
    def on_progress(f: float, m: str) -> None:
        report(cfg, st, lo + (hi - lo) * f, f"{title}: {m}")
    return on_progress


def skip(st: LadderState, step: str, reason: str, settings: dict[str, Any] | None = None,
          elapsed_s: float = 0.0) -> None:
    """Record rung ``step`` as not run: appends a ``MappingAttempt(outcome="skipped")`` with
    ``reason``, its ``settings`` and ``elapsed_s`` (s spent deciding) to ``st.attempts``."""
    st.attempts.append(MappingAttempt(step=step, outcome="skipped", reason=reason,
                                      settings=settings or {}, elapsed_s=elapsed_s))


def fits(cfg: LadderConfig, st: LadderState, step: str) -> bool:
    """Whether the next attempt fits the budget; records a skip when it does not. The next
    attempt is expected to cost about as much as the slowest one so far."""
    est = max((a.elapsed_s for a in st.attempts if a.outcome != "skipped"), default=0.0)
    if remaining(cfg, st) < 0.5 * est or remaining(cfg, st) <= 0:
        skip(st, step, "time_budget")
        return False
    return True


def worse_fit_than_free_focal(st: LadderState, b: ModelSummary) -> str | None:
    """Veto of a focal-prior model that explains the data clearly worse than a model with a
    free focal length did: then the metadata is what is wrong (a crop, digital zoom)."""
    ref = st.meta_only
    if ref is not None and b.mean_reprojection_error_px > PRIOR_MAX_ERROR_RATIO * max(
            ref.model.mean_reprojection_error_px, PRIOR_ERROR_FLOOR_PX):
        return "fits_worse_than_the_free_focal_length"
    return None


# --- one mapping attempt --------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """One mapping attempt to make: its rung, what it changes, and how it maps."""

    step: str
    settings: dict[str, Any]
    label: str
    mapper: str | None = None
    mapper_options: Mapping[str, Any] | None = None
    veto: bool = False
    new_pairs: int | None = None
    verified_pairs: int | None = None


def judge(st: LadderState, plan: Plan, models: list[ModelSummary], out: Path) -> MappingAttempt:
    """Record the attempt's models; update the best and the metadata-only candidates."""
    i = len(st.attempts)
    for m in models:  # data-driven models the metadata alone condemns (ladder._trust_images)
        if m.checks.failures == ["focal_disagrees_with_metadata"] and (
                st.meta_only is None or sm.model_key(m) > sm.model_key(st.meta_only.model)):
            st.meta_only = Candidate(m, i, out)
    b = sm.best_model(models)
    rejected = worse_fit_than_free_focal(st, b) if (b is not None and plan.veto) else None
    if rejected:
        b = None
    improved = b is not None and (st.best is None
                                  or sm.model_key(b) > sm.model_key(st.best.model))
    if improved and b is not None:
        st.best = Candidate(b, i, out)
    outcome = ("no_model" if not models else "rejected" if rejected else
               "improved" if improved else "passed" if b is not None else "failed_checks")
    return MappingAttempt(step=plan.step, settings=plan.settings, outcome=outcome,
                          reason=rejected, frames=st.frames, models=models,
                          model_sizes=[m.registered_images for m in models], best=b,
                          new_pairs=plan.new_pairs, verified_pairs=plan.verified_pairs)


def map_attempt(cfg: LadderConfig, st: LadderState, plan: Plan, t0: float,
                lo: float | None = None) -> MappingAttempt:
    """Run SfM once as ``plan`` says, judge and record it. ``lo``: where its progress window
    starts (a matching rung has already used the start of it)."""
    mapper = plan.mapper or cfg.mapper
    opts: dict[str, Any] = dict(plan.mapper_options or {})
    if st.maps_run > 0 and mapper == "incremental":
        pipeline_opts = dict(opts.get("pipeline") or {})
        pipeline_opts["max_runtime_seconds"] = int(max(10, remaining(cfg, st)))
        opts["pipeline"] = pipeline_opts
    w_lo, hi = window(st)
    report = reporter(cfg, st, w_lo if lo is None else lo, hi, headline(cfg, st, plan.label))
    out = cfg.work / str(len(st.attempts))
    models = sm.map_models(cfg.database_path, cfg.image_dir, out, st.frames, mapper=mapper,
                           mapper_options=opts, focal_prior_px=cfg.focal_prior_px,
                           progress=report, num_threads=cfg.num_threads,
                           random_seed=cfg.random_seed)
    attempt = judge(st, plan, models, out)
    attempt.elapsed_s = round(time.monotonic() - t0, 3)
    st.attempts.append(attempt)
    st.maps_run += 1
    log.info("ladder attempt %d (%s): %s, sizes %s", len(st.attempts) - 1, plan.step,
             attempt.outcome, attempt.model_sizes)
    return attempt


def kept(st: LadderState) -> bool:
    """The last attempt gave the best model so far (a camera change it made stays)."""
    return st.best is not None and st.best.attempt == len(st.attempts) - 1


def match_then_map(cfg: LadderConfig, st: LadderState, plan: Plan,
                   pairs: Callable[[], list[sfmatch.Pair]], t0: float | None = None,
                   always_map: bool = False) -> None:
    """Match the new pairs ``pairs()`` gives, then map; recorded as skipped when nothing is
    new, unless ``always_map``, or when ``st.recheck`` says the new pairs still cannot help
    (its reason). ``t0``: when the attempt began (default: now)."""
    t0 = time.monotonic() if t0 is None else t0
    lo, hi = window(st)
    mid = lo + MATCH_SHARE * (hi - lo)
    res = sfmatch.match_new_pairs(cfg.database_path, pairs(), use_gpu=cfg.use_gpu,
                             num_threads=cfg.num_threads,
                             progress=reporter(cfg, st, lo, mid, headline(cfg, st, plan.label)))
    if res.image_pairs == 0 and not always_map:
        st.attempts.append(MappingAttempt(step=plan.step, settings=plan.settings,
                                          outcome="skipped", reason="no_new_pairs", new_pairs=0,
                                          elapsed_s=round(time.monotonic() - t0, 3)))
        return
    still = st.recheck() if st.recheck is not None and not always_map else None
    if still:
        st.attempts.append(MappingAttempt(step=plan.step, settings=plan.settings,
                                          outcome="skipped", reason=still,
                                          new_pairs=res.image_pairs,
                                          verified_pairs=res.verified_pairs,
                                          elapsed_s=round(time.monotonic() - t0, 3)))
        return
    map_attempt(cfg, st, Plan(plan.step, plan.settings, plan.label, new_pairs=res.image_pairs,
                              verified_pairs=res.verified_pairs), t0, lo=mid)
