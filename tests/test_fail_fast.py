"""Issue 15 items 3-4: the ladder fails fast with a narrow code from what the matches say
(:mod:`colmap_pipeline.core.match_diagnostics`), and reports moving content
(:mod:`colmap_pipeline.core.moving_content`).

Unit tests run on hand-made pair records and point arrays; the scene tests render small 3D
scenes (``tests/scenes_moving.py``: 16 frames at 480x360), extract SIFT features, match them
sequentially, and run the real ladder at ``low``.
"""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import scenes_moving as sm_scenes

from colmap_pipeline.core import ladder, ladder_rungs
from colmap_pipeline.core import ladder_attempt as la
from colmap_pipeline.core import match_diagnostics as md
from colmap_pipeline.core import moving_content as mc
from colmap_pipeline.core import sfm_features as sf
from colmap_pipeline.core import sfm_matching as sfmatch
from colmap_pipeline.errors import ERROR_CATALOG, PipelineError
from colmap_pipeline.presets import LADDER_BUDGET_S, VIDEO_SIFT_OPTIONS, Preset
from colmap_pipeline.results import MappingAttempt

N_FRAMES = 16
BUDGET_S = LADDER_BUDGET_S["low"]


# --- match diagnostics on hand-made pairs ---------------------------------------------------

def pair(a: int, b: int, inliers: int = 300, config: int = md.CONFIG_UNCALIBRATED,
         disp: float = 0.03, rot: float | None = None) -> md.PairGeometry:
    return md.PairGeometry(a, b, inliers, config, disp, rot)


def chain(ids: list[int], **kw) -> list[md.PairGeometry]:
    return [pair(a, b, **kw) for a, b in zip(ids, ids[1:], strict=False)]


def test_components_of_the_match_graph_largest_first():
    comps = md.components([1, 2, 3, 4, 5, 6, 7], [(1, 2), (2, 3), (5, 6), (6, 4), (3, 1)])
    assert comps == [[1, 2, 3], [4, 5, 6], [7]]
    assert md.components([], []) == []
    assert md.components([1], [(2, 3)]) == [[2, 3], [1]]  # nodes of edges are added


def test_a_connected_walk_with_parallax_has_no_verdict():
    ids = list(range(1, 21))
    d = md.diagnose(chain(ids) + chain(ids[::2]), ids)
    assert d.verdict is None
    assert (d.pairs, d.verified_pairs, d.parallax_pairs, d.components) == (28, 28, 28, [20])
    assert d.verified_share == 1.0 and d.homography_share == 0.0
    assert d.largest_component_share == 1.0 and d.scenes == []


def test_two_groups_without_a_verified_pair_between_them_are_disconnected_scenes():
    ids = list(range(1, 21))
    failed = pair(10, 11, inliers=4)  # tried, rejected by verification
    d = md.diagnose(chain(ids[:10]) + chain(ids[10:]) + [failed], ids)
    assert d.verdict == "disconnected_scenes"
    assert d.components == [10, 10] and d.scenes == [ids[:10], ids[10:]]
    assert (d.pairs, d.verified_pairs) == (19, 18)
    assert "groups of 10 and 10 frames" in md.describe(d)


def test_small_fragments_are_not_scenes():
    """A component counts as a scene from max(3, 20% of the images): 3 stray frames of 20 do
    not make two scenes (the model of the other 17 is a partial result, not a failure)."""
    ids = list(range(1, 21))
    assert md.min_scene_images(20) == 4 and md.min_scene_images(5) == 3
    d = md.diagnose(chain(ids[:17]) + chain(ids[17:]), ids)
    assert d.components == [17, 3] and d.verdict is None
    d4 = md.diagnose(chain(ids[:16]) + chain(ids[16:]), ids)
    assert d4.components == [16, 4] and d4.verdict == "disconnected_scenes"


def test_wide_pure_rotation_pairs_make_rotation_only():
    ids = list(range(1, 11))
    hom = md.CONFIG_PLANAR_OR_PANORAMIC
    near = chain(ids, config=hom, disp=0.02, rot=0.001)
    wide = [pair(a, a + 4, config=hom, disp=0.12, rot=0.003) for a in range(1, 7)]
    d = md.diagnose(near + wide, ids)
    assert d.verdict == "rotation_only"
    assert (d.wide_pairs, d.rotation_like_pairs, d.median_rotation_error) == (6, 6, 0.003)
    # a homography that is not K R K^-1 (translation over a plane: 0.028-0.042) is no rotation
    planar = [pair(a, a + 4, config=hom, disp=0.12, rot=0.03) for a in range(1, 7)]
    d2 = md.diagnose(near + planar, ids)
    assert d2.rotation_like_pairs == 0 and d2.verdict == "insufficient_parallax"
    # 4 of 6 wide pairs rotation-like is under the 80% the verdict needs
    mixed = wide[:4] + [pair(a, a + 4, disp=0.12) for a in (7, 8)]
    assert md.diagnose(chain(ids) + mixed, ids).verdict is None


def test_only_homography_pairs_mean_insufficient_parallax():
    ids = list(range(1, 11))
    hom = chain(ids, config=md.CONFIG_PLANAR_OR_PANORAMIC, disp=0.02)
    d = md.diagnose(hom, ids)
    assert d.verdict == "insufficient_parallax" and d.homography_share == 1.0
    # one essential-matrix pair with 50 inliers can start a model; 49 cannot
    assert md.diagnose(hom + [pair(1, 5, inliers=50)], ids).verdict is None
    assert md.diagnose(hom + [pair(1, 5, inliers=49)], ids).verdict == "insufficient_parallax"
    assert md.diagnose([], ids).verdict is None  # nothing verified: not this module's call
    # weak pairs with parallax (30 inliers each) are not this: relaxed thresholds may help
    assert md.diagnose(chain(ids, inliers=30), ids).verdict is None
    # 8 homography pairs of 10 is the 80% the verdict needs
    mixed = chain(ids[:9], config=md.CONFIG_PLANAR_OR_PANORAMIC) + [
        pair(9, 10, inliers=30), pair(1, 10, inliers=30)]
    assert md.diagnose(mixed, ids).homography_share == 0.8
    assert md.diagnose(mixed, ids).verdict == "insufficient_parallax"
    assert "80% of the 10 verified pairs" in md.describe(md.diagnose(mixed, ids))
    assert md.diagnose(mixed[1:], ids).verdict is None  # 7 of 9: under 80%


def test_median_displacement_is_a_fraction_of_the_diagonal():
    p1 = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    p2 = p1 + np.array([[3.0, 4.0], [6.0, 8.0], [30.0, 40.0]])
    assert md.median_displacement(p1, p2, 100.0) == pytest.approx(0.1)
    assert md.median_displacement(p1[:0], p2[:0], 100.0) == 0.0


def test_new_error_codes_have_a_message_and_a_hint():
    for code in ("insufficient_parallax", "disconnected_scenes", "rotation_only"):
        status, message, hint = ERROR_CATALOG[code]
        assert status == 422 and message and hint
    assert PipelineError("disconnected_scenes").hint.startswith("Upload each scene")


# --- the ladder's bookkeeping ---------------------------------------------------------------

def test_skipped_rungs_move_the_bar_and_count_down_the_attempts():
    cfg = la.LadderConfig(database_path=Path("db"), image_dir=Path("img"), work=Path("w"),
                          mapper="global", budget_s=600.0, steps=())
    st = la.LadderState(frames=20, max_attempts=6, maps_run=1)
    st.ladder_t0 = time.monotonic() - 8.2
    before = la.window(st)
    la.skip(st, "other_mapper", "ruled_out_by_disconnected_scenes")
    st.slots_skipped += 1
    after = la.window(st)
    assert after[0] == pytest.approx(before[1]) and after[0] > before[0]
    assert la.after_rung(cfg, st, "other_mapper") == (
        "other_mapper: skipped (ruled_out_by_disconnected_scenes); at most 4 more attempts "
        "(8 s of 600 s budget)")
    assert la.headline(cfg, st, "camera model OPENCV").startswith("attempt 2 of at most 5:")


def test_more_overlap_is_skipped_for_photos_without_order():
    """A large unordered photo set (retrieval-matched: over 50 photos, exhaustive not cheap)
    has no neighbours by name, so the rung that adds name neighbours is skipped; a video of the
    same size runs it (here: it does not fit a spent budget, the next check)."""
    cfg = la.LadderConfig(database_path=Path("db"), image_dir=Path("img"), work=Path("w"),
                          mapper="global", budget_s=0.0, steps=ladder.STEPS)
    photos = la.LadderState(frames=60, names_ordered=False)
    ladder_rungs._rung_more_overlap(cfg, photos)
    assert [(a.step, a.outcome, a.reason) for a in photos.attempts] == [
        ("more_overlap", "skipped", "images_have_no_order")]
    video = la.LadderState(frames=60, ladder_t0=time.monotonic())
    ladder_rungs._rung_more_overlap(cfg, video)
    assert [(a.step, a.outcome, a.reason) for a in video.attempts] == [
        ("more_overlap", "skipped", "time_budget")]  # it got past the order check


def _state(verdict: str | None, attempts: tuple[tuple[str, str, str | None], ...] = (),
           exhaustive_done: bool = False) -> la.LadderState:
    st = la.LadderState(frames=20, exhaustive_done=exhaustive_done)
    st.diagnostics = md.diagnose([], list(range(20))).model_copy(update={"verdict": verdict})
    st.attempts = [MappingAttempt(step=s, outcome=o, reason=r) for s, o, r in attempts]
    return st


def test_each_verdict_keeps_only_the_rungs_that_can_help():
    for step in ladder.STEPS:
        assert ladder._ruled_out(step, _state(None)) is None
        assert ladder._ruled_out(step, _state("rotation_only")) == "ruled_out_by_rotation_only"
    parallax = [s for s in ladder.STEPS if ladder._ruled_out(s, _state("insufficient_parallax"))
                is None]
    assert parallax == ["more_overlap", "exhaustive"]
    # disconnected: matching rungs may join the scenes; the rest waits for a far-pair search
    before = _state("disconnected_scenes")
    assert all(ladder._ruled_out(s, before) is None for s in ladder.STEPS)
    searched = _state("disconnected_scenes", exhaustive_done=True)
    assert [s for s in ladder.STEPS if ladder._ruled_out(s, searched) is None] == [
        "more_overlap", "exhaustive", "loop_closure"]
    assert ladder._ruled_out("camera_model", searched) == "ruled_out_by_disconnected_scenes"


def test_a_far_pair_search_is_exhaustive_matching_or_a_loop_closure_that_matched():
    assert not ladder._searched_all_pairs(_state("disconnected_scenes"))
    assert ladder._searched_all_pairs(_state(None, exhaustive_done=True))
    assert ladder._searched_all_pairs(_state(None, (("loop_closure", "skipped",
                                                     "still_disconnected_scenes"),)))
    assert ladder._searched_all_pairs(_state(None, (("loop_closure", "failed_checks", None),)))
    assert not ladder._searched_all_pairs(_state(None, (("loop_closure", "skipped",
                                                         "time_budget"),)))


def test_the_budget_scales_with_the_first_attempt_up_to_the_presets():
    assert ladder.ladder_budget(600.0, 5.0) == ladder.MIN_BUDGET_S == 120.0
    assert ladder.ladder_budget(600.0, 60.0) == 180.0  # 3 x a slow first attempt
    assert ladder.ladder_budget(600.0, 370.0) == 600.0  # never above the preset's
    assert ladder.ladder_budget(90.0, 5.0) == 90.0


# --- moving content on point arrays ---------------------------------------------------------

def _project(points: np.ndarray, r: np.ndarray, t: np.ndarray, f: float = 500.0) -> np.ndarray:
    cam = points @ r.T + t
    return f * cam[:, :2] / cam[:, 2:] + np.array([320.0, 240.0])


def test_matches_of_a_second_rigid_motion_are_found_random_ones_are_not():
    rng = np.random.default_rng(4)
    obj = rng.uniform([-1, -1, 4], [1, 1, 6], (120, 3))
    a = math.radians(6)
    r_obj = np.array([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    p1 = _project(obj, np.eye(3), np.zeros(3))
    # the object turns by 6 degrees and moves up while the camera slides sideways
    p2 = _project(obj @ r_obj.T + np.array([0.0, -0.3, 0.0]), np.eye(3), np.array([-0.2, 0, 0]))
    assert mc.second_motion_inliers(p1, p2) == 120
    junk1, junk2 = rng.uniform(0, 640, (200, 2)), rng.uniform(0, 640, (200, 2))
    assert mc.second_motion_inliers(junk1, junk2) == 0
    assert mc.second_motion_inliers(p1[:14], p2[:14]) == 0  # too few to be a motion


def test_rejected_matches_are_the_raw_ones_not_among_the_inliers():
    raw = np.array([[0, 5], [1, 6], [2, 7], [3, 8]], dtype=np.uint32)
    inl = np.array([[1, 6], [3, 8]], dtype=np.uint32)
    assert mc._rejected(raw, inl).tolist() == [[0, 5], [2, 7]]
    assert mc._rejected(raw, inl[:0]).tolist() == raw.tolist()


def test_the_warning_needs_both_the_share_and_the_spread():
    strong = mc.MovingContent(pairs=60, matches=30000, rejected=4000,
                              second_motion_matches=3600, pairs_with_second_motion=55)
    w = mc.warning(strong)
    assert w is not None and w.code == "moving_content"
    assert w.details["share"] == 0.12 and "12% of the matched features" in w.message
    assert w.hint is not None and "walk around it" in w.hint
    assert "static part" in w.message
    brief = mc.MovingContent(60, 30000, 4000, 3600, 10)  # one person crossing briefly
    assert mc.warning(brief) is None
    few = mc.MovingContent(60, 30000, 1000, 600, 40)  # 2% of the matches
    assert mc.warning(few) is None
    assert mc.warning(mc.MovingContent(0, 0, 0, 0, 0)) is None


# --- rendered scenes through the real ladder ------------------------------------------------

def _matched(root: Path, frames) -> tuple[Path, Path]:
    images = root / "frames"
    sm_scenes.write_frames(frames, images)
    db = root / "database.db"
    sf.extract_features(db, images, Preset("low", 30, 1000, 2048), num_threads=2,
                        sift_options=VIDEO_SIFT_OPTIONS["low"])  # as for a video
    sfmatch.match_sequential(db, num_threads=2)
    return db, images


def _ladder(tmp: Path, frames, progress=la.no_progress):
    db, images = _matched(tmp, frames)
    return ladder.run_ladder(db, images, tmp / "sparse", N_FRAMES, quality="low",
                             num_threads=1, random_seed=1, progress=progress)


def test_a_pure_rotation_pan_fails_fast_as_rotation_only(tmp_path):
    with pytest.raises(PipelineError) as ei:
        _ladder(tmp_path, sm_scenes.pan_frames(N_FRAMES))
    err = ei.value
    assert err.code == "rotation_only", err.message
    d = err.details or {}
    assert d["budget_s"] == ladder.ladder_budget(BUDGET_S, d["mapping_attempts"][0]["elapsed_s"])
    assert d["ladder_elapsed_s"] < d["budget_s"] / 3 <= BUDGET_S / 3
    diag = d["match_diagnostics"]
    assert diag["verdict"] == "rotation_only"
    assert diag["rotation_like_pairs"] == diag["wide_pairs"] >= 10
    assert diag["parallax_pairs"] == 0
    first, *rungs = d["mapping_attempts"]
    # the first attempt runs (a good input pays it too), found nothing good, then no rung
    assert first["step"] == "baseline"
    assert [a["step"] for a in rungs] == list(ladder.STEPS)
    assert {(a["outcome"], a["reason"]) for a in rungs} == {
        ("skipped", "ruled_out_by_rotation_only")}
    assert not (tmp_path / "sparse" / "_attempts").exists()


def test_two_unrelated_scenes_cut_together_fail_fast_as_disconnected_scenes(tmp_path):
    seen: list[tuple[float, str]] = []
    with pytest.raises(PipelineError) as ei:
        _ladder(tmp_path, sm_scenes.two_scenes_frames(N_FRAMES),
                progress=lambda f, m: seen.append((f, m)))
    err = ei.value
    assert err.code == "disconnected_scenes", err.message
    d = err.details or {}
    assert d["ladder_elapsed_s"] < d["budget_s"] / 3 <= BUDGET_S / 3
    diag = d["match_diagnostics"]
    assert diag["components"] == [8, 8] and len(diag["scenes"]) == 2
    outcome = {a["step"]: (a["outcome"], a.get("reason")) for a in d["mapping_attempts"]}
    # exhaustive matching was tried (it could have joined them), then nothing else
    assert outcome["exhaustive"] == ("skipped", "still_disconnected_scenes")
    assert outcome["other_mapper"] == ("skipped", "ruled_out_by_disconnected_scenes")
    assert outcome["camera_model"] == ("skipped", "ruled_out_by_disconnected_scenes")
    # one scene alone made a model, but the clip is two scenes: no result
    assert outcome["baseline"][0] in ("improved", "failed_checks", "no_model")
    # the bar moves past every rung that could have mapped, and says what is left
    after = [(f, m) for f, m in seen if "more attempts" in m]
    assert len(after) == len(ladder.STEPS)
    assert all(b[0] >= a[0] for a, b in zip(after, after[1:], strict=False))
    mapping_rungs = [f for f, m in after if m.split(":")[0] in (
        "exhaustive", "other_mapper", "init_thresholds", "camera_model")]
    assert all(b > a for a, b in zip(mapping_rungs, mapping_rungs[1:], strict=False))
    assert re.search(rf"at most 0 more attempts \(\d+ s of {d['budget_s']:.0f} s budget\)$",
                     after[-1][1])


def test_a_moving_object_gets_moving_content_and_the_static_scene_does_not(tmp_path):
    moving = _ladder(tmp_path / "moving", sm_scenes.walk_frames(N_FRAMES, moving=True))
    static = _ladder(tmp_path / "static", sm_scenes.walk_frames(N_FRAMES))
    assert moving.registered_images == static.registered_images == N_FRAMES
    warn = [w for w in moving.warnings if w.code == "moving_content"]
    assert len(warn) == 1
    assert warn[0].details["share"] >= mc.MOVING_SHARE_MIN
    assert warn[0].details["pair_fraction"] >= mc.MOVING_PAIR_FRACTION
    assert "static part" in warn[0].message
    assert [w.code for w in static.warnings if w.code == "moving_content"] == []
    assert static.match_diagnostics is not None and static.match_diagnostics.verdict is None
    got = mc.measure(tmp_path / "static" / "database.db")
    assert got.pairs > 0 and got.share < mc.MOVING_SHARE_MIN / 10


def test_a_failed_photo_set_gets_a_hint_about_overlap_not_filming():
    """Trial 2: three unrelated photos failed with no_initial_pair and a hint about moving the
    camera while filming; a photo set's failure speaks of the photos' overlap, numbers kept."""
    err = PipelineError("no_initial_pair", message="No initial pair: 0 of 3 image pairs "
                        "verified", details={"verified_pairs": 0})
    out = ladder.for_photos(err)
    assert (out.code, out.message, out.details) == (err.code, err.message, err.details)
    assert out.hint == ladder.PHOTO_FAILURE_HINT and "overlapping" in out.hint
    assert "film" not in out.hint.lower() and out.hint != err.hint
    other = PipelineError("rotation_only")
    assert ladder.for_photos(other) is other  # narrower codes keep their own hints
