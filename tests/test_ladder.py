"""The recovery ladder (issue 4): every rung is taken on a case that needs it, and it helps.

Cases are synthetic (``pycolmap.synthesize_dataset``: a random scene, exact keypoints, SIFT-like
descriptors that real matching finds again), run with one thread and a fixed seed; each takes
about a second.

* matching rungs: the matching stage's pairs form a chain whose link between the two halves of
  the sequence failed verification (stored with 0 matches, as COLMAP stores failed pairs), so
  the baseline can register at most half of the frames; ``more_overlap``, ``exhaustive`` and
  ``loop_closure`` (own vocabulary, offline) each add pairs across the gap;
* ``init_thresholds``: 70 scene points, so no image pair reaches COLMAP's 100 inliers for an
  initial pair; the relaxed thresholds find one;
* ``other_mapper``: the same 70-point scene, mapped by global SfM (no initial pair needed).

Rungs are climbed from an incremental baseline (``mapper="incremental"``), whatever the
presets' default mapper.

* ``camera_model``: the true camera is OPENCV with fy = 1.5 fx (non-square pixels); the shared
  SIMPLE_RADIAL camera can only fit it with an absurd distortion term, so every baseline model
  fails the plausibility check; OPENCV recovers fx, fy;
* ``focal_prior``: a lateral sweep past a distant slab of points (0.5 px noise), where the focal
  length is not observable: self-calibration lands 27% off the true 400 px (a plausible-looking
  290 px), so with the metadata focal the models fail ``focal_disagrees_with_metadata``; the
  prior, held fixed, gives a model that agrees;
* ``more_frames``: every pair across the middle of the selected frames failed to match (too far
  apart); the frame source adds the frames in between, which match both sides.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pycolmap = pytest.importorskip("pycolmap")

from scenes import (  # noqa: E402
    broken_chain,
    copy_images,
    empty_database_like,
    fail_pairs,
    lateral_sweep,
    names_in_order,
    synth,
    synthetic_workspace,
)

from colmap_pipeline.core import ladder, ladder_attempt, pipeline  # noqa: E402
from colmap_pipeline.core import sfm_cameras as scam  # noqa: E402
from colmap_pipeline.core import sfm_features as sf  # noqa: E402
from colmap_pipeline.core import sfm_mapping as sm  # noqa: E402
from colmap_pipeline.core import sfm_matching as sfmatch  # noqa: E402
from colmap_pipeline.errors import PipelineError  # noqa: E402
from colmap_pipeline.results import MappingSummary  # noqa: E402


def climb(tmp: Path, dbp: Path, n: int, steps: tuple[str, ...], **kw) -> MappingSummary:
    return ladder.run_ladder(dbp, tmp / "img", tmp / "sparse", n, steps=steps, budget_s=120,
                             mapper="incremental", num_threads=1, random_seed=1, **kw)


@pytest.mark.parametrize("step", ["more_overlap", "exhaustive", "loop_closure"])
def test_matching_rung_bridges_a_failed_link(tmp_path, step):
    n = 12
    dbp = broken_chain(tmp_path, n)
    out = climb(tmp_path, dbp, n, (step,))
    base, rung = out.mapping_attempts[0], out.mapping_attempts[1]
    assert base.step == "baseline" and max(base.model_sizes, default=0) <= n // 2
    assert rung.step == step and rung.new_pairs > 0
    assert rung.outcome == "improved" and rung.best.registered_images == n
    assert out.registered_images == n and out.chosen_attempt == 1
    assert out.partial is False and out.quality_warning is None
    assert rung.elapsed_s > 0 and rung.settings
    # the chosen attempt's models are what the export stage reads: sparse/<k>
    rec = pycolmap.Reconstruction(str(tmp_path / "sparse" / str(out.chosen_model)))
    assert rec.num_reg_images() == n
    assert not (tmp_path / "sparse" / "_attempts").exists()
    if step == "loop_closure":
        assert rung.settings["vocabulary"] == "built from this job's descriptors"


def test_without_a_rung_the_broken_chain_stays_partial(tmp_path):
    n = 12
    dbp = broken_chain(tmp_path, n)
    out = climb(tmp_path, dbp, n, ())
    assert [a.step for a in out.mapping_attempts] == ["baseline"]
    assert out.registered_images <= n // 2
    assert out.partial is True
    assert out.quality_warning.code == "partial_reconstruction"
    assert out.quality_warning.hint
    # a warning carries its numbers (issue 10 item 7: {code, message, details})
    assert out.quality_warning.details == {"registered_images": out.registered_images,
                                           "frames": n}
    assert out.warnings == [out.quality_warning]


def test_init_thresholds_rung_finds_an_initial_pair(tmp_path):
    n = 8
    dbp = synth(tmp_path, n, 70)
    with pytest.raises(PipelineError) as ei:
        climb(tmp_path, dbp, n, ())
    # issue 10 item 6: no model at all is named for what it is, with its numbers
    assert ei.value.code == "no_initial_pair"
    assert [a["step"] for a in ei.value.details["mapping_attempts"]] == ["baseline"]
    shutil.rmtree(tmp_path / "sparse", ignore_errors=True)
    out = climb(tmp_path, dbp, n, ("init_thresholds",))
    rung = out.mapping_attempts[1]
    assert rung.step == "init_thresholds"
    assert rung.settings["init_min_num_inliers"] == 50
    assert rung.outcome == "improved" and out.registered_images == n


def test_no_initial_pair_says_how_many_pairs_and_the_best_inliers(tmp_path):
    """Issue 10 item 6: a scene too poor for an initial pair (70 points: no pair reaches
    COLMAP's 100 inliers) fails as no_initial_pair with the numbers of the database."""
    n = 8
    dbp = synth(tmp_path, n, 70)
    with pytest.raises(PipelineError) as ei:
        climb(tmp_path, dbp, n, ())
    err, d = ei.value, ei.value.details
    stats = sfmatch.database_stats(dbp)
    assert d["frames"] == n and d["verified_pairs"] == stats.verified_pairs == n * (n - 1) // 2
    assert 0 < d["best_pair_inliers"] == stats.best_pair_inliers < 100
    assert d["median_keypoints_per_image"] == stats.median_keypoints_per_image > 0
    # COLMAP relaxes its own thresholds and keeps a 2-image fragment: nothing grew from it
    assert d["largest_model_images"] <= 2 and d["required_images"] == 3
    assert [a["step"] for a in d["mapping_attempts"]] == ["baseline"]
    assert d["matched_pairs"] == n * (n - 1) // 2
    assert err.message.startswith(f"No initial pair: {n * (n - 1) // 2} of {n * (n - 1) // 2} "
                                  f"image pairs verified, the best has "
                                  f"{d['best_pair_inliers']} inlier")
    assert err.to_dict()["details"] == d  # what the job's error carries


def test_features_without_matches_fail_as_no_initial_pair(tmp_path):
    """incremental_mapping returns {} without raising when nothing is matched (moved from
    tests/test_pipeline.py, where map_incremental raised reconstruction_failed with models 0
    and required 3; the ladder now names it)."""
    n = 4
    dbp = synth(tmp_path, n, 400)
    sfmatch.clear_matches(dbp)
    with pytest.raises(PipelineError) as ei:
        climb(tmp_path, dbp, n, ())
    d = ei.value.details
    assert ei.value.code == "no_initial_pair"
    assert (d["largest_model_images"], d["required_images"], d["frames"]) == (0, 3, n)
    assert (d["matched_pairs"], d["verified_pairs"], d["best_pair_inliers"]) == (0, 0, 0)
    assert not (tmp_path / "sparse" / "_attempts").exists()


def test_time_budget_skips_rungs_and_records_them(tmp_path):
    n = 12
    dbp = broken_chain(tmp_path, n)
    out = ladder.run_ladder(dbp, tmp_path / "img", tmp_path / "sparse", n,
                            steps=("more_overlap", "init_thresholds"), budget_s=0.0,
                            mapper="incremental", num_threads=1, random_seed=1)
    assert [(a.step, a.outcome, a.reason) for a in out.mapping_attempts[1:]] == [
        ("more_overlap", "skipped", "time_budget"), ("init_thresholds", "skipped",
                                                     "time_budget")]


@pytest.mark.parametrize("step,reason", [("focal_prior", "no_focal_length_metadata"),
                                         ("more_frames", "no_frame_source")])
def test_rung_without_its_input_is_skipped_and_recorded(tmp_path, step, reason):
    """No focal length in the metadata (videos), no frame source (photo sets)."""
    n = 12
    dbp = broken_chain(tmp_path, n)
    out = climb(tmp_path, dbp, n, (step,))
    assert out.mapping_attempts[1].model_dump(exclude_defaults=True) == {
        "step": step, "outcome": "skipped", "reason": reason}
    assert out.mapping_attempts[1].settings == {} and out.mapping_attempts[1].elapsed_s == 0.0


def test_other_mapper_rung_maps_globally_without_an_initial_pair(tmp_path):
    """Global SfM (rotation averaging + global positioning) has no initial-pair thresholds:
    on the 70-point scene where incremental mapping finds no initial pair it maps every view."""
    n = 8
    dbp = synth(tmp_path, n, 70)
    out = climb(tmp_path, dbp, n, ("other_mapper",))
    base, rung = out.mapping_attempts
    assert base.step == "baseline" and base.outcome in ("no_model", "failed_checks")
    assert rung.step == "other_mapper" and rung.settings == {"mapper": "global"}
    assert rung.outcome == "improved" and out.registered_images == n
    assert out.chosen_mapper == "global"


def test_camera_model_rung_fits_non_square_pixels(tmp_path):
    """True camera OPENCV fx=800, fy=1200: SIMPLE_RADIAL (one focal length) cannot fit it."""
    n = 10
    dbp = synth(tmp_path, n, 400, camera=("OPENCV", [800., 1200., 512., 384., 0.05, 0, 0, 0]),
                size=(1024, 768))
    scam.set_camera_model(dbp, "SIMPLE_RADIAL")  # what feature extraction gives every video
    with pytest.raises(PipelineError) as ei:
        climb(tmp_path, dbp, n, ())
    assert ei.value.code == "reconstruction_failed"
    base = ei.value.details["mapping_attempts"][0]
    assert base["outcome"] == "failed_checks"
    assert all("implausible_intrinsics" in m["checks"]["failures"] for m in base["models"])
    # issue 10 item 6: the largest model's size and what it failed, in the error
    d = ei.value.details
    assert d["largest_model_images"] == max(base["model_sizes"]) > 0
    assert "implausible_intrinsics" in d["largest_model_failures"]
    assert d["verified_pairs"] == n * (n - 1) // 2 and d["median_keypoints_per_image"] > 0
    assert f"registered {d['largest_model_images']} of {n} frames" in ei.value.message
    shutil.rmtree(tmp_path / "sparse", ignore_errors=True)
    out = climb(tmp_path, dbp, n, ("camera_model",))
    rung = out.mapping_attempts[1]
    assert rung.step == "camera_model" and rung.settings == {"camera_model": "OPENCV"}
    assert rung.outcome == "improved" and rung.camera_kept is True
    assert out.registered_images == n and out.chosen_attempt == 1
    fx, fy = rung.best.camera_params[:2]
    assert fx == pytest.approx(800, rel=0.01) and fy == pytest.approx(1200, rel=0.01)
    assert rung.best.mean_reprojection_error_px < 0.1
    assert sf.read_camera(dbp).model_name == "OPENCV"  # kept for the later stages


def test_focal_prior_rung_holds_the_metadata_focal_length(tmp_path):
    n = 10
    dbp = lateral_sweep(tmp_path, n)
    # without metadata the drifted focal length looks plausible: nothing to climb for
    out = climb(tmp_path, dbp, n, ("focal_prior",))
    assert [a.outcome for a in out.mapping_attempts] == ["improved"]
    drifted = out.mapping_attempts[0].best.focal_px
    assert abs(drifted / 400.0 - 1) > sm.FOCAL_PRIOR_TOLERANCE  # 290 px: 27% off
    shutil.rmtree(tmp_path / "sparse")
    scam.set_camera_model(dbp, "SIMPLE_RADIAL")
    out = climb(tmp_path, dbp, n, ("focal_prior",), focal_prior_px=400.0)
    steps = [(a.step, a.outcome, a.settings.get("focal")) for a in out.mapping_attempts]
    assert steps[0] == ("baseline", "failed_checks", None)
    assert out.mapping_attempts[0].models[0].checks.failures == [
        "focal_disagrees_with_metadata"]
    assert steps[-1] == ("focal_prior", "improved", "fixed")
    assert out.registered_images == n and out.partial is False
    assert out.mapping_attempts[-1].best.focal_px == pytest.approx(400.0, rel=1e-3)
    assert out.checks.failures == []


def test_more_frames_rung_bridges_frames_too_far_apart(tmp_path):
    """Selected frames = the even ones of 12; every pair across the middle failed to match.
    The frame source adds the odd ones (as the video's in-between frames would be)."""
    n = 12
    src = synth(tmp_path / "src", n, 400)
    ids = names_in_order(src)
    even, odd = ids[0::2], ids[1::2]
    dbp = tmp_path / "db.db"
    empty_database_like(src, dbp)
    copy_images(src, dbp, even)
    left, right = even[:3], even[3:]
    sfmatch.match_new_pairs(dbp, [(a, b) for a, b in zip(even, even[1:], strict=False)
                             if not (a in left and b in right)], num_threads=1)
    fail_pairs(dbp, [(a, b) for a in left for b in right])  # too far apart: tried, failed
    (tmp_path / "img").mkdir(exist_ok=True)
    calls = []
    names = sf.image_names(src)

    def more_frames() -> ladder.AddedFrames:
        calls.append(1)
        copy_images(src, dbp, odd)
        return ladder.AddedFrames([names[i] for i in odd], n)

    out = climb(tmp_path, dbp, len(even), ())
    assert out.registered_images <= 3 and out.partial is True  # one half at most
    out = climb(tmp_path, dbp, len(even), ("more_frames",), more_frames=more_frames)
    base, rung = out.mapping_attempts
    assert calls == [1]
    assert base.frames == len(even) and max(base.model_sizes, default=0) <= 3
    assert rung.step == "more_frames" and rung.outcome == "improved"
    assert rung.settings == {"added_frames": len(odd), "frames": n}
    assert rung.new_pairs > 0 and rung.frames == n
    assert out.registered_images == n and out.frames == n
    assert sorted(out.frames_added) == sorted(names[i] for i in odd)


def test_wrong_focal_metadata_is_outvoted_by_the_images(tmp_path):
    """EXIF says 600 px (a crop keeps the original's focal length); the images, from a
    general scene where the focal length is observable, say 400 px. The model held to 600 px
    fits worse, so the free-focal model is the result, with a warning."""
    n = 10
    dbp = synth(tmp_path, n, 400, camera=("SIMPLE_RADIAL", [400.0, 320.0, 240.0, 0.0]))
    scam.set_camera_model(dbp, "SIMPLE_RADIAL")
    out = climb(tmp_path, dbp, n, ("focal_prior",), focal_prior_px=600.0)
    by_step = [(a.step, a.settings.get("focal"), a.outcome) for a in out.mapping_attempts]
    assert by_step[0] == ("baseline", None, "failed_checks")
    assert out.mapping_attempts[0].models[0].checks.failures == [
        "focal_disagrees_with_metadata"]
    fixed = out.mapping_attempts[-1]
    assert fixed.settings["focal"] == "fixed" and fixed.outcome in ("rejected", "failed_checks")
    assert out.registered_images == n
    assert out.checks.passed is True
    assert out.checks.overridden == ["focal_disagrees_with_metadata"]
    assert [w.code for w in out.warnings] == ["focal_metadata_ignored"]
    assert out.quality_warning.code == "focal_metadata_ignored"
    assert out.quality_warning.details["metadata_focal_px"] == 600.0
    rec = pycolmap.Reconstruction(str(tmp_path / "sparse" / str(out.chosen_model)))
    assert next(iter(rec.cameras.values())).params[0] == pytest.approx(400.0, rel=0.01)


def test_every_attempt_moves_the_bar_and_says_which_it_is(tmp_path):
    """Issue 11 item 8: "attempt 3 of at most 8: camera model OPENCV (112 s of 600 s budget)"
    and a bar that moves with each attempt (not stuck at one value for the whole ladder)."""
    n = 10
    dbp = synth(tmp_path, n, 400, camera=("OPENCV", [800., 1200., 512., 384., 0.05, 0, 0, 0]),
                size=(1024, 768))
    scam.set_camera_model(dbp, "SIMPLE_RADIAL")
    seen: list[tuple[float, str]] = []
    steps = ("exhaustive", "camera_model")
    cfg = ladder.LadderConfig(dbp, tmp_path / "img", tmp_path / "w", "incremental", 120.0,
                              steps)
    assert ladder.max_attempts(cfg, n) == 4  # first + exhaustive + OPENCV + OPENCV_FISHEYE
    # the default ladder of a video: 30 frames (exhaustive is cheap, so neither more_overlap
    # nor loop_closure maps) -> 7; 100 frames (4950 pairs: no exhaustive) -> 8
    video = ladder.LadderConfig(dbp, tmp_path, tmp_path, "global", 600.0, ladder.STEPS,
                                more_frames=lambda: ladder.AddedFrames([], 0))
    assert (ladder.max_attempts(video, 30), ladder.max_attempts(video, 100)) == (7, 8)
    photos = ladder.LadderConfig(dbp, tmp_path, tmp_path, "global", 600.0, ladder.STEPS,
                                 focal_prior_px=500.0)  # no frame source, two focal attempts
    assert ladder.max_attempts(photos, 30) == 8
    out = climb(tmp_path, dbp, n, steps, progress=lambda f, m: seen.append((f, m)))
    # every pair is matched already: exhaustive adds none and maps nothing
    assert [(a.step, a.outcome) for a in out.mapping_attempts] == [
        ("baseline", "failed_checks"), ("exhaustive", "skipped"), ("camera_model", "improved")]
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] <= ladder_attempt.MAX_FRACTION
    first = [f for f, m in seen if m.startswith("attempt 1 of at most 4: mapper incremental: ")]
    # exhaustive mapped nothing: "at most" counts down (issue 15)
    second = [(f, m) for f, m in seen if m.startswith("attempt 2 of at most 3: camera model "
                                                      "OPENCV (")]
    assert first and second
    assert max(first) <= ladder_attempt.FIRST_ATTEMPT_SHARE < min(f for f, _ in second)
    assert max(f for f, _ in second) < fractions[-1] == ladder_attempt.MAX_FRACTION
    assert any(" s of 120 s budget): Registering images (" in m for _, m in second)


@pytest.mark.parametrize("sharpness,code", [(21.9, "too_blurry"), (300.0, "no_initial_pair")])
def test_the_mapping_stage_names_a_blurry_failure(tmp_path, monkeypatch, sharpness, code):
    """Issue 10 item 6: a clip shaken to blur passes the frames stage (every frame above
    video.BLUR_ABSOLUTE) and then fails in mapping; with the frames' median sharpness under
    BLURRY_FAILURE_SHARPNESS (the sample walk smeared by 75 px scored 21.9) the failure is
    too_blurry, with the sharpness numbers and the ladder's numbers; sharp frames keep the
    ladder's code."""
    monkeypatch.setattr(ladder, "STEPS", ())
    monkeypatch.setitem(ladder.MAPPER_BY_QUALITY, "low", "incremental")  # no initial pair
    root = synthetic_workspace(tmp_path / "ws", synth(tmp_path / "scene", 8, 70),
                               sharpness=sharpness)
    with pytest.raises(PipelineError) as ei:
        pipeline.run_stage("mapping", root)
    err, d = ei.value, ei.value.details
    assert err.code == code
    assert d["verified_pairs"] == 28 and d["median_keypoints_per_image"] > 0
    assert [a["step"] for a in d["mapping_attempts"]] == ["baseline"]
    if code == "too_blurry":
        assert d["median_sharpness"] == d["min_sharpness"] == d["max_sharpness"] == 21.9
        assert d["sharpness_threshold"] == ladder.BLURRY_FAILURE_SHARPNESS
        assert d["reconstruction_error"]["code"] == "no_initial_pair"
        assert "median sharpness is 21.9" in err.message
    assert not pipeline.read_checkpoint(root, "mapping")


def test_name_failure_leaves_other_errors_alone():
    err = PipelineError("reconstruction_failed", details={"frames": 3})
    assert ladder.name_failure(err, [{"sharpness": 5.0}]).code == "too_blurry"
    assert ladder.name_failure(err, []) is err  # photos stage: no sharpness measured
    assert ladder.name_failure(err, [{"sharpness": 50.0}]) is err
    other = PipelineError("pipeline_error")
    assert ladder.name_failure(other, [{"sharpness": 5.0}]) is other
