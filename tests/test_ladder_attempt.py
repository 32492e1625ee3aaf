"""One ladder attempt's bookkeeping: progress windows and messages, the budget, the verdict.

No SfM runs here: models are hand-made :class:`ModelSummary` records (the rungs themselves run in
``tests/test_ladder.py``).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("pycolmap")

from colmap_pipeline.core import ladder_attempt as la  # noqa: E402
from colmap_pipeline.results import MappingAttempt, ModelCheck, ModelSummary  # noqa: E402


def cfg(**kw) -> la.LadderConfig:
    args = {"database_path": Path("db"), "image_dir": Path("img"), "work": Path("w"),
            "mapper": "incremental", "budget_s": 600.0, "steps": ()}
    return la.LadderConfig(**{**args, **kw})


def model(n: int, points: int = 500, err: float = 0.5, failures: tuple[str, ...] = (),
          index: int = 0) -> ModelSummary:
    checks = ModelCheck(passed=not failures, registered_share=n / 10, partial=n < 8,
                        failures=list(failures))
    return ModelSummary(index=index, registered_images=n, points3d=points,
                        mean_reprojection_error_px=err, mean_track_length=3.0,
                        camera_plausible="implausible_intrinsics" not in failures, checks=checks)


def test_each_attempt_gets_its_own_share_of_the_bar():
    st = la.LadderState(frames=10, max_attempts=5)
    assert la.window(st) == (0.0, la.FIRST_ATTEMPT_SHARE)
    shares = []
    for k in range(1, 5):
        st.maps_run = k
        shares.append(la.window(st))
    assert shares[0][0] == la.FIRST_ATTEMPT_SHARE
    assert shares[-1][1] == pytest.approx(la.MAX_FRACTION)
    assert all(a[1] == pytest.approx(b[0]) for a, b in zip(shares, shares[1:], strict=False))
    assert len({round(b - a, 9) for a, b in shares}) == 1  # equal shares


def test_headline_names_the_attempt_and_the_budget():
    st = la.LadderState(frames=10, max_attempts=8)
    assert la.headline(cfg(), st, "mapper global") == "attempt 1 of at most 8: mapper global"
    st.maps_run, st.ladder_t0 = 2, time.monotonic() - 112.4
    assert la.headline(cfg(), st, "camera model OPENCV") == (
        "attempt 3 of at most 8: camera model OPENCV (112 s of 600 s budget)")


def test_progress_never_goes_back_and_stops_short_of_done():
    seen: list[tuple[float, str]] = []
    c = cfg(progress=lambda f, m: seen.append((f, m)))
    st = la.LadderState(frames=10)
    report = la.reporter(c, st, 0.6, 0.8, "attempt 2 of at most 3: x")
    report(0.5, "Registering images (5/10)...")
    la.report(c, st, 0.1, "late message")
    la.report(c, st, 1.0, "done")
    assert seen == [(0.7, "attempt 2 of at most 3: x: Registering images (5/10)..."),
                    (0.7, "late message"), (la.MAX_FRACTION, "done")]


def test_an_attempt_that_would_not_fit_the_budget_is_recorded_as_skipped():
    c = cfg(budget_s=100.0)
    st = la.LadderState(frames=10, ladder_t0=time.monotonic() - 80.0)
    st.attempts.append(MappingAttempt(step="baseline", outcome="failed_checks", elapsed_s=30.0))
    assert la.fits(c, st, "other_mapper") is True  # 20 s left >= half of the slowest (15 s)
    st.attempts[0].elapsed_s = 50.0
    assert la.fits(c, st, "other_mapper") is False
    assert st.attempts[-1].model_dump(exclude_defaults=True) == {
        "step": "other_mapper", "outcome": "skipped", "reason": "time_budget"}


def test_judge_names_each_outcome_and_keeps_the_best():
    st = la.LadderState(frames=10)
    plan = la.Plan("baseline", {}, "x")
    assert la.judge(st, plan, [], Path("a")).outcome == "no_model"
    assert la.judge(st, plan, [model(9, failures=("reprojection_error",))],
                    Path("a")).outcome == "failed_checks"
    first = la.judge(st, plan, [model(2, index=0), model(9, index=1)], Path("a"))
    assert first.outcome == "improved" and first.best.index == 1
    assert first.model_sizes == [2, 9] and st.best.directory == Path("a")
    st.attempts.append(first)
    assert la.judge(st, plan, [model(8)], Path("b")).outcome == "passed"  # not better
    assert st.best.model.registered_images == 9


def test_a_focal_prior_model_that_fits_worse_is_rejected():
    st = la.LadderState(frames=10)
    free = model(10, err=0.25, failures=("focal_disagrees_with_metadata",))
    la.judge(st, la.Plan("baseline", {}, "x"), [free], Path("a"))
    assert st.meta_only is not None and st.best is None
    prior = la.Plan("focal_prior", {"focal": "fixed"}, "x", veto=True)
    worse = la.judge(st, prior, [model(10, err=1.08)], Path("b"))
    assert (worse.outcome, worse.reason) == ("rejected", "fits_worse_than_the_free_focal_length")
    assert st.best is None
    # the free-focal error is floored at PRIOR_ERROR_FLOOR_PX: 0.44 px < 1.5 x 0.3
    assert la.judge(st, prior, [model(10, err=0.44)], Path("c")).outcome == "improved"


def test_good_enough_needs_the_target_share():
    c, st = cfg(target_fraction=0.9), la.LadderState(frames=10)
    assert la.good_enough(c, st) is False
    st.best = la.Candidate(model(8), 0, Path("a"))
    assert la.good_enough(c, st) is False
    st.best = la.Candidate(model(9), 0, Path("a"))
    assert la.good_enough(c, st) is True
