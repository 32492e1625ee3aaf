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
* ``global_mapper``: the same 70-point scene, mapped by global SfM (no initial pair needed).

Not covered by a unit test: ``camera_model`` and ``focal_prior`` (no synthetic case was found
where SIMPLE_RADIAL fails and OPENCV/OPENCV_FISHEYE or a focal prior fixes it; see the report
in BENCHMARKS.md, issue 4).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pycolmap = pytest.importorskip("pycolmap")

from colmap_pipeline import ladder  # noqa: E402
from colmap_pipeline import reconstruction as rc  # noqa: E402
from colmap_pipeline.errors import PipelineError  # noqa: E402


def synth(tmp: Path, n: int, points: int, seed: int = 1) -> Path:
    """A synthetic database (one SIMPLE_RADIAL camera, ``n`` images) with all pairs matched."""
    pycolmap.set_random_seed(seed)
    opts = pycolmap.SyntheticDatasetOptions()
    opts.num_rigs = 1
    opts.num_cameras_per_rig = 1
    opts.num_frames_per_rig = n
    opts.num_points3D = points
    opts.camera_width, opts.camera_height = 640, 480
    (tmp / "img").mkdir(parents=True, exist_ok=True)
    db = pycolmap.Database.open(str(tmp / "db.db"))
    try:
        pycolmap.synthesize_dataset(opts, db)
    finally:
        db.close()
    return tmp / "db.db"


def broken_chain(tmp: Path, n: int = 12) -> Path:
    """Matches only between neighbours in name order, with the middle link failed."""
    dbp = synth(tmp, n, 400)
    rc.clear_matches(dbp)
    ids = sorted(rc._id_names(dbp), key=lambda i: rc._id_names(dbp)[i])
    gap = (ids[n // 2 - 1], ids[n // 2])
    chain = [(a, b) for a, b in zip(ids, ids[1:], strict=False) if (a, b) != gap]
    rc.match_new_pairs(dbp, chain, num_threads=1)
    db = pycolmap.Database.open(str(dbp))
    try:  # a pair that was tried and failed verification: present, with no matches
        db.write_matches(gap[0], gap[1], np.zeros((0, 2), dtype=np.uint32))
        db.write_two_view_geometry(gap[0], gap[1], pycolmap.TwoViewGeometry())
    finally:
        db.close()
    return dbp


def climb(tmp: Path, dbp: Path, n: int, steps: tuple[str, ...]) -> dict:
    return ladder.run_ladder(dbp, tmp / "img", tmp / "sparse", n, steps=steps, budget_s=120,
                             num_threads=1, random_seed=1)


def test_check_model_names_each_failure():
    ok = {"registered_images": 30, "points3d": 2000, "mean_reprojection_error_px": 0.8,
          "camera_plausible": True}
    assert rc.check_model(ok, 30) == {"passed": True, "registered_share": 1.0,
                                      "partial": False, "failures": []}
    assert rc.check_model({**ok, "registered_images": 20}, 30)["partial"] is True
    assert rc.check_model({**ok, "registered_images": 24}, 30)["partial"] is False
    assert rc.check_model({**ok, "camera_plausible": False}, 30)["failures"] == [
        "implausible_intrinsics"]
    assert rc.check_model({**ok, "mean_reprojection_error_px": 2.5}, 30)["failures"] == [
        "reprojection_error"]
    assert rc.check_model({**ok, "points3d": 10}, 30)["failures"] == ["too_few_points"]
    assert rc.check_model({**ok, "registered_images": 2}, 30)["failures"] == ["too_few_images"]


def test_camera_plausible_uses_focal_between_quarter_and_four_widths():
    def cam(f, k=0.0):
        c = pycolmap.Camera.create_from_model_name(1, "SIMPLE_RADIAL", f, 854, 480)
        c.params = [f, 427.0, 240.0, k]
        return c
    assert rc.camera_plausible(cam(670.0, -0.2))  # Karma, exhaustive matching (data README)
    assert not rc.camera_plausible(cam(46.0))  # seen on Karma with SIMPLE_PINHOLE
    assert not rc.camera_plausible(cam(149.0))  # < 0.25 x 854 = 213.5
    assert not rc.camera_plausible(cam(10204.0))  # > 4 x 854 = 3416
    assert not rc.camera_plausible(cam(670.0, 256.0))  # absurd distortion
    assert rc.camera_plausible(cam(214.0)) and rc.camera_plausible(cam(3416.0))


@pytest.mark.parametrize("step", ["more_overlap", "exhaustive", "loop_closure"])
def test_matching_rung_bridges_a_failed_link(tmp_path, step):
    n = 12
    dbp = broken_chain(tmp_path, n)
    out = climb(tmp_path, dbp, n, (step,))
    base, rung = out["attempts"][0], out["attempts"][1]
    assert base["step"] == "baseline" and max(base["model_sizes"], default=0) <= n // 2
    assert rung["step"] == step and rung["new_pairs"] > 0
    assert rung["outcome"] == "improved" and rung["best"]["registered_images"] == n
    assert out["registered_images"] == n and out["chosen_attempt"] == 1
    assert out["partial"] is False and out["quality_warning"] is None
    assert rung["elapsed_s"] > 0 and rung["settings"]
    # the chosen attempt's models are what the export stage reads: sparse/<k>
    rec = pycolmap.Reconstruction(str(tmp_path / "sparse" / str(out["chosen_model"])))
    assert rec.num_reg_images() == n
    assert not (tmp_path / "sparse" / "_attempts").exists()
    if step == "loop_closure":
        assert rung["settings"]["vocabulary"] == "built from this job's descriptors"


def test_without_a_rung_the_broken_chain_stays_partial(tmp_path):
    n = 12
    dbp = broken_chain(tmp_path, n)
    out = climb(tmp_path, dbp, n, ())
    assert [a["step"] for a in out["attempts"]] == ["baseline"]
    assert out["registered_images"] <= n // 2
    assert out["partial"] is True
    assert out["quality_warning"]["code"] == "partial_reconstruction"
    assert out["quality_warning"]["hint"]


def test_init_thresholds_rung_finds_an_initial_pair(tmp_path):
    n = 8
    dbp = synth(tmp_path, n, 70)
    with pytest.raises(PipelineError) as ei:
        climb(tmp_path, dbp, n, ())
    assert ei.value.code == "reconstruction_failed"
    assert [a["step"] for a in ei.value.details["attempts"]] == ["baseline"]
    shutil.rmtree(tmp_path / "sparse", ignore_errors=True)
    out = climb(tmp_path, dbp, n, ("init_thresholds",))
    rung = out["attempts"][1]
    assert rung["step"] == "init_thresholds"
    assert rung["settings"]["init_min_num_inliers"] == 50
    assert rung["outcome"] == "improved" and out["registered_images"] == n


def test_time_budget_skips_rungs_and_records_them(tmp_path):
    n = 12
    dbp = broken_chain(tmp_path, n)
    out = ladder.run_ladder(dbp, tmp_path / "img", tmp_path / "sparse", n,
                            steps=("more_overlap", "init_thresholds"), budget_s=0.0,
                            num_threads=1, random_seed=1)
    assert [(a["step"], a["outcome"], a.get("reason")) for a in out["attempts"][1:]] == [
        ("more_overlap", "skipped", "time_budget"), ("init_thresholds", "skipped",
                                                     "time_budget")]


def test_focal_prior_rung_is_skipped_without_metadata(tmp_path):
    n = 12
    dbp = broken_chain(tmp_path, n)
    out = climb(tmp_path, dbp, n, ("focal_prior",))
    assert out["attempts"][1] == {"step": "focal_prior", "settings": {}, "elapsed_s": 0.0,
                                  "outcome": "skipped", "reason": "no_focal_length_metadata"}


def test_global_mapper_rung_needs_no_initial_pair(tmp_path):
    """Global SfM (rotation averaging + global positioning) has no initial-pair thresholds:
    on the 70-point scene where incremental mapping finds no initial pair it maps every view."""
    n = 8
    dbp = synth(tmp_path, n, 70)
    out = climb(tmp_path, dbp, n, ("global_mapper",))
    base, rung = out["attempts"]
    assert base["step"] == "baseline" and base["outcome"] in ("no_model", "failed_checks")
    assert rung["step"] == "global_mapper" and rung["settings"] == {"mapper": "global"}
    assert rung["outcome"] == "improved" and out["registered_images"] == n
    assert out["chosen_mapper"] == "global"
