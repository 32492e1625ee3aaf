"""Mapping once, the model checks, the best model, camera edits and the model read back.

Scenes are synthetic (``tests/scenes.py``: ``pycolmap.synthesize_dataset``), one thread and a
fixed seed; each test takes about a second.
"""
from __future__ import annotations

import pytest

pycolmap = pytest.importorskip("pycolmap")

from scenes import synth, synthetic_model  # noqa: E402

from colmap_pipeline.core import sfm_cameras as scam  # noqa: E402
from colmap_pipeline.core import sfm_features as sf  # noqa: E402
from colmap_pipeline.core import sfm_mapping as sm  # noqa: E402
from colmap_pipeline.core import sfm_matching as sfmatch  # noqa: E402
from colmap_pipeline.results import ModelCheck, ModelSummary  # noqa: E402


def test_check_model_names_each_failure():
    ok = {"registered_images": 30, "points3d": 2000, "mean_reprojection_error_px": 0.8,
          "camera_plausible": True}
    assert sm.check_model(ok, 30) == ModelCheck(passed=True, registered_share=1.0,
                                                partial=False, failures=[])
    assert sm.check_model({**ok, "registered_images": 20}, 30).partial is True
    assert sm.check_model({**ok, "registered_images": 24}, 30).partial is False
    assert sm.check_model({**ok, "camera_plausible": False}, 30).failures == [
        "implausible_intrinsics"]
    assert sm.check_model({**ok, "mean_reprojection_error_px": 2.5}, 30).failures == [
        "reprojection_error"]
    assert sm.check_model({**ok, "points3d": 10}, 30).failures == ["too_few_points"]
    assert sm.check_model({**ok, "registered_images": 2}, 30).failures == ["too_few_images"]
    # a focal length from metadata: 20% off is allowed, more is not
    assert sm.check_model({**ok, "focal_px": 480.0}, 30, focal_prior_px=400.0).passed
    assert sm.check_model({**ok, "focal_px": 490.0}, 30, focal_prior_px=400.0).failures == [
        "focal_disagrees_with_metadata"]


def test_camera_plausible_uses_focal_between_quarter_and_four_widths():
    def cam(f, k=0.0):
        c = pycolmap.Camera.create_from_model_name(1, "SIMPLE_RADIAL", f, 854, 480)
        c.params = [f, 427.0, 240.0, k]
        return c
    assert sm.camera_plausible(cam(670.0, -0.2))  # Karma, exhaustive matching (data README)
    assert not sm.camera_plausible(cam(46.0))  # seen on Karma with SIMPLE_PINHOLE
    assert not sm.camera_plausible(cam(149.0))  # < 0.25 x 854 = 213.5
    assert not sm.camera_plausible(cam(10204.0))  # > 4 x 854 = 3416
    assert not sm.camera_plausible(cam(670.0, 256.0))  # absurd distortion
    assert sm.camera_plausible(cam(214.0)) and sm.camera_plausible(cam(3416.0))


def _model(i: int, n: int, p: int, ok: bool = True, err: float = 0.5) -> ModelSummary:
    checks = ModelCheck(passed=ok, registered_share=1.0, partial=False,
                        failures=[] if ok else ["implausible_intrinsics"])
    return ModelSummary(index=i, registered_images=n, points3d=p, mean_reprojection_error_px=err,
                        mean_track_length=3.0, camera_plausible=ok, checks=checks)


def test_best_model_prefers_the_largest_model_that_passes():
    """Model 0 is often a 2-image fragment; a bigger model with a bogus camera never wins."""
    assert sm.best_model([_model(0, 2, 300), _model(1, 30, 1500)]).index == 1
    assert sm.best_model([_model(0, 10, 300), _model(1, 10, 400)]).index == 1
    assert sm.best_model([_model(0, 10, 400, err=0.9), _model(1, 10, 400, err=0.4)]).index == 1
    assert sm.best_model([_model(0, 30, 3000, ok=False), _model(1, 12, 400)]).index == 1
    assert sm.best_model([_model(0, 30, 3000, ok=False)]) is None
    assert sm.best_model([]) is None


def test_map_models_judges_every_model_and_writes_it(tmp_path):
    n = 8
    dbp = synth(tmp_path, n, 400)
    seen: list[tuple[float, str]] = []
    models = sm.map_models(dbp, tmp_path / "img", tmp_path / "out", n, mapper="incremental",
                           progress=lambda f, m: seen.append((f, m)), num_threads=1,
                           random_seed=1)
    assert [m.index for m in models] == [0] and models[0].registered_images == n
    m = models[0]
    assert m.checks.passed and m.camera_model == "SIMPLE_RADIAL" and m.camera_plausible
    assert m.mean_reprojection_error_px < 0.1 and 200 < m.points3d <= 400
    assert m.focal_ratio == pytest.approx(m.focal_px / 640, abs=1e-3)
    rec = pycolmap.Reconstruction(str(tmp_path / "out" / "0"))
    assert rec.num_reg_images() == n and rec.num_points3D() == m.points3d
    # incremental progress: registered images / frames, never backwards, then done
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and seen[-1] == (1.0, "Mapping done")
    assert (1.0, f"Registering images ({n}/{n})...") in seen


def test_map_models_without_matches_returns_no_model(tmp_path):
    """Features but no matches: incremental_mapping returns {} without raising."""
    n = 6
    dbp = synth(tmp_path, n, 400)
    sfmatch.clear_matches(dbp)
    assert sm.map_models(dbp, tmp_path / "img", tmp_path / "out", n, num_threads=1,
                         random_seed=1) == []


def test_global_mapping_reports_progress_while_it_runs(tmp_path, monkeypatch):
    """Global SfM has no callbacks: a heartbeat thread reports elapsed time, never 'done'."""
    monkeypatch.setattr(sm, "HEARTBEAT_S", 0.01)
    # 15 frames map in 0.3 s on one core, with dozens of beats (40 frames, 2000 points: 3 s)
    dbp = synth(tmp_path, 15, 500)
    seen: list[tuple[float, str]] = []
    models = sm.map_models(dbp, tmp_path / "img", tmp_path / "out", 15, mapper="global",
                           progress=lambda f, m: seen.append((f, m)), num_threads=1,
                           random_seed=1)
    assert models and models[0].registered_images == 15
    beats = [f for f, m in seen if m.startswith("Global SfM")]
    assert len(beats) >= 2, seen  # the mapping takes > 0.02 s
    assert beats == sorted(beats) and 0 < beats[0] and beats[-1] <= 0.95
    assert seen[0] == (0.0, "Initializing reconstruction...") and seen[-1] == (1.0, "Mapping done")


@pytest.mark.parametrize("mapper,options,what", [
    ("incremental", {"init_min_num_inliers_typo": 1}, "incremental mapper"),
    ("incremental", {"pipeline": {"no_such_option": 1}}, "incremental pipeline"),
    ("global", {"no_such_option": 1}, "global pipeline")])
def test_unknown_mapper_option_is_refused_before_mapping(tmp_path, mapper, options, what):
    with pytest.raises(ValueError, match=f"unknown {what} option"):
        sm.map_models(tmp_path / "absent.db", tmp_path, tmp_path / "out", 3, mapper=mapper,
                      mapper_options=options)


def test_set_camera_model_then_restore_puts_the_camera_back(tmp_path):
    dbp = synth(tmp_path, 4, 100, camera=("SIMPLE_RADIAL", [500.0, 320.0, 240.0, -0.1]))
    before = sf.read_camera(dbp)
    saved = scam.set_camera_model(dbp, "OPENCV", focal_px=450.0, prior=True)
    cam = sf.read_camera(dbp)
    assert cam.model_name == "OPENCV" and list(cam.params[:4]) == [450.0, 450.0, 320.0, 240.0]
    assert cam.has_prior_focal_length and list(cam.params[4:]) == [0.0] * 4
    scam.set_camera_model(dbp, "PINHOLE")  # no focal: COLMAP's 1.2 x max(w, h) guess
    assert sf.read_camera(dbp).params[0] == pytest.approx(1.2 * 640)
    scam.restore_cameras(dbp, saved)
    after = sf.read_camera(dbp)
    assert after.model_name == "SIMPLE_RADIAL" and list(after.params) == list(before.params)
    assert after.has_prior_focal_length == before.has_prior_focal_length


def test_summarize_model_reads_the_model_back(tmp_path):
    model_dir = synthetic_model(tmp_path, "SIMPLE_RADIAL", [480.0, 320.0, 240.0, -0.08])
    rec = pycolmap.Reconstruction(str(model_dir))
    s = sm.summarize_model(model_dir)
    assert (s.registered_images, s.points3d) == (8, 300)
    assert s.observations == rec.compute_num_observations()
    assert s.mean_track_length == pytest.approx(s.observations / 300, abs=1e-3)
    (cam,) = s.cameras
    # pycolmap's own names: SIMPLE_RADIAL's distortion term is "k"
    assert cam.model == "SIMPLE_RADIAL" and cam.params == {"f": 480.0, "cx": 320.0,
                                                           "cy": 240.0, "k": -0.08}
    assert (cam.width, cam.height) == (640, 480)
    assert s.registered_image_names == sorted(im.name for im in rec.images.values())


def test_gpu_capabilities_is_consistent():
    caps = sm.gpu_capabilities()
    assert set(caps) >= {"pycolmap_version", "cuda", "device_count", "dense_possible"}
    if not caps["cuda"]:
        assert caps["device_count"] == 0 and caps["dense_possible"] is False
