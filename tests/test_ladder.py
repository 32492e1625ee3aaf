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
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

pycolmap = pytest.importorskip("pycolmap")

from colmap_pipeline.core import ladder  # noqa: E402
from colmap_pipeline.core import reconstruction as rc  # noqa: E402
from colmap_pipeline.errors import PipelineError  # noqa: E402


def synth(tmp: Path, n: int, points: int, seed: int = 1, camera: tuple | None = None,
          size: tuple[int, int] = (640, 480), return_rec: bool = False):
    """A synthetic database (one camera, default SIMPLE_RADIAL; ``camera`` = (model name,
    params)) of ``n`` images with all pairs matched."""
    pycolmap.set_random_seed(seed)
    opts = pycolmap.SyntheticDatasetOptions()
    opts.num_rigs = 1
    opts.num_cameras_per_rig = 1
    opts.num_frames_per_rig = n
    opts.num_points3D = points
    opts.camera_width, opts.camera_height = size
    if camera is not None:
        opts.camera_model_id = getattr(pycolmap.CameraModelId, camera[0])
        opts.camera_params = list(camera[1])
    (tmp / "img").mkdir(parents=True, exist_ok=True)
    db = pycolmap.Database.open(str(tmp / "db.db"))
    try:
        rec = pycolmap.synthesize_dataset(opts, db)
    finally:
        db.close()
    return (tmp / "db.db", rec) if return_rec else tmp / "db.db"


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
                             mapper="incremental", num_threads=1, random_seed=1)


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
                            mapper="incremental", num_threads=1, random_seed=1)
    assert [(a["step"], a["outcome"], a.get("reason")) for a in out["attempts"][1:]] == [
        ("more_overlap", "skipped", "time_budget"), ("init_thresholds", "skipped",
                                                     "time_budget")]


@pytest.mark.parametrize("step,reason", [("focal_prior", "no_focal_length_metadata"),
                                         ("more_frames", "no_frame_source")])
def test_rung_without_its_input_is_skipped_and_recorded(tmp_path, step, reason):
    """No focal length in the metadata (videos), no frame source (photo sets)."""
    n = 12
    dbp = broken_chain(tmp_path, n)
    out = climb(tmp_path, dbp, n, (step,))
    assert out["attempts"][1] == {"step": step, "settings": {}, "elapsed_s": 0.0,
                                  "outcome": "skipped", "reason": reason}


def test_other_mapper_rung_maps_globally_without_an_initial_pair(tmp_path):
    """Global SfM (rotation averaging + global positioning) has no initial-pair thresholds:
    on the 70-point scene where incremental mapping finds no initial pair it maps every view."""
    n = 8
    dbp = synth(tmp_path, n, 70)
    out = climb(tmp_path, dbp, n, ("other_mapper",))
    base, rung = out["attempts"]
    assert base["step"] == "baseline" and base["outcome"] in ("no_model", "failed_checks")
    assert rung["step"] == "other_mapper" and rung["settings"] == {"mapper": "global"}
    assert rung["outcome"] == "improved" and out["registered_images"] == n
    assert out["chosen_mapper"] == "global"


def test_camera_model_rung_fits_non_square_pixels(tmp_path):
    """True camera OPENCV fx=800, fy=1200: SIMPLE_RADIAL (one focal length) cannot fit it."""
    n = 10
    dbp = synth(tmp_path, n, 400, camera=("OPENCV", [800., 1200., 512., 384., 0.05, 0, 0, 0]),
                size=(1024, 768))
    rc.set_camera_model(dbp, "SIMPLE_RADIAL")  # what feature extraction gives every video
    with pytest.raises(PipelineError) as ei:
        climb(tmp_path, dbp, n, ())
    base = ei.value.details["attempts"][0]
    assert base["outcome"] == "failed_checks"
    assert all("implausible_intrinsics" in m["checks"]["failures"] for m in base["models"])
    shutil.rmtree(tmp_path / "sparse", ignore_errors=True)
    out = climb(tmp_path, dbp, n, ("camera_model",))
    rung = out["attempts"][1]
    assert rung["step"] == "camera_model" and rung["settings"] == {"camera_model": "OPENCV"}
    assert rung["outcome"] == "improved" and rung["camera_kept"] is True
    assert out["registered_images"] == n and out["chosen_attempt"] == 1
    fx, fy = rung["best"]["camera_params"][:2]
    assert fx == pytest.approx(800, rel=0.01) and fy == pytest.approx(1200, rel=0.01)
    assert rung["best"]["mean_reprojection_error_px"] < 0.1
    assert rc.read_camera(dbp).model_name == "OPENCV"  # kept for the later stages


def lateral_sweep(tmp: Path, n: int = 10, f: float = 400.0, noise_px: float = 0.5,
                  seed: int = 1) -> Path:
    """A camera (SIMPLE_RADIAL, f px, 640x480, no distortion) sliding 14 m sideways past a
    slab of points 40-44 m away, keypoints with ``noise_px`` Gaussian noise. The tracks are
    those of ``synthesize_dataset``; only the geometry is replaced. Pure translation past a
    shallow scene leaves the focal length unobservable (it trades off against depth)."""
    w, h = 640, 480
    dbp, rec = synth(tmp, n, 400, seed=seed, camera=("SIMPLE_RADIAL", [f, w / 2, h / 2, 0.0]),
                     return_rec=True)
    rng = np.random.default_rng(seed)
    half = 40.0 / f * np.array([w / 2, h / 2]) * 0.8  # inside the view from every position
    xyz = {pid: np.array([rng.uniform(-half[0], half[0]), rng.uniform(-half[1], half[1]),
                          rng.uniform(40.0, 44.0)]) for pid in rec.points3D}
    db = pycolmap.Database.open(str(dbp))
    try:
        for k, iid in enumerate(sorted(rec.images)):
            kps = np.array(db.read_keypoints(iid), dtype=np.float32)
            for j, p2 in enumerate(rec.images[iid].points2D):
                if p2.point3D_id in xyz:
                    x = xyz[p2.point3D_id] - np.array([14.0 * k / (n - 1), 0.0, 0.0])
                    kps[j, 0] = f * x[0] / x[2] + w / 2 + rng.normal(0, noise_px)
                    kps[j, 1] = f * x[1] / x[2] + h / 2 + rng.normal(0, noise_px)
            db.update_keypoints(iid, kps)
    finally:
        db.close()
    return dbp


def test_focal_prior_rung_holds_the_metadata_focal_length(tmp_path):
    n = 10
    dbp = lateral_sweep(tmp_path, n)
    # without metadata the drifted focal length looks plausible: nothing to climb for
    out = climb(tmp_path, dbp, n, ("focal_prior",))
    assert [a["outcome"] for a in out["attempts"]] == ["improved"]
    drifted = out["attempts"][0]["best"]["focal_px"]
    assert abs(drifted / 400.0 - 1) > rc.FOCAL_PRIOR_TOLERANCE  # 290 px: 27% off
    shutil.rmtree(tmp_path / "sparse")
    rc.set_camera_model(dbp, "SIMPLE_RADIAL")
    out = ladder.run_ladder(dbp, tmp_path / "img", tmp_path / "sparse", n,
                            steps=("focal_prior",), budget_s=120, mapper="incremental",
                            num_threads=1, random_seed=1, focal_prior_px=400.0)
    steps = [(a["step"], a["outcome"], a["settings"].get("focal")) for a in out["attempts"]]
    assert steps[0] == ("baseline", "failed_checks", None)
    assert out["attempts"][0]["models"][0]["checks"]["failures"] == [
        "focal_disagrees_with_metadata"]
    assert steps[-1] == ("focal_prior", "improved", "fixed")
    assert out["registered_images"] == n and out["partial"] is False
    assert out["attempts"][-1]["best"]["focal_px"] == pytest.approx(400.0, rel=1e-3)
    assert out["checks"]["failures"] == []


def _copy_images(src: Path, dst: Path, image_ids: list[int]) -> None:
    """Copy images (rows, keypoints, descriptors, frames) between COLMAP databases (SQL: the
    pycolmap Database API has no way to delete or copy an image)."""
    q = ",".join(str(int(i)) for i in image_ids)
    with closing(sqlite3.connect(dst)) as c:
        c.execute("ATTACH DATABASE ? AS src", (str(src),))
        for table, key in (("frames", "frame_id"), ("frame_data", "frame_id"),
                           ("images", "image_id"), ("keypoints", "image_id"),
                           ("descriptors", "image_id")):
            c.execute(f"INSERT INTO main.{table} SELECT * FROM src.{table} WHERE {key} IN ({q})")
        c.commit()


def test_more_frames_rung_bridges_frames_too_far_apart(tmp_path):
    """Selected frames = the even ones of 12; every pair across the middle failed to match.
    The frame source adds the odd ones (as the video's in-between frames would be)."""
    n = 12
    src = synth(tmp_path / "src", n, 400)
    ids = sorted(rc._id_names(src), key=lambda i: rc._id_names(src)[i])
    even, odd = ids[0::2], ids[1::2]
    dbp = tmp_path / "db.db"
    db = pycolmap.Database.open(str(dbp))  # an empty database with COLMAP's schema
    db.close()
    with closing(sqlite3.connect(dbp)) as c, closing(sqlite3.connect(src)) as s:
        for table in ("rigs", "rig_sensors", "cameras"):
            rows = s.execute(f"SELECT * FROM {table}").fetchall()
            if rows:
                c.executemany(f"INSERT INTO {table} VALUES ({','.join('?' * len(rows[0]))})",
                              rows)
        c.commit()
    _copy_images(src, dbp, even)
    left, right = even[:3], even[3:]
    rc.match_new_pairs(dbp, [(a, b) for a, b in zip(even, even[1:], strict=False)
                             if not (a in left and b in right)], num_threads=1)
    db = pycolmap.Database.open(str(dbp))
    try:  # the wide pairs across the middle were tried and failed
        for a in left:
            for b in right:
                db.write_matches(a, b, np.zeros((0, 2), dtype=np.uint32))
                db.write_two_view_geometry(a, b, pycolmap.TwoViewGeometry())
    finally:
        db.close()
    (tmp_path / "img").mkdir(exist_ok=True)
    calls = []

    def more_frames() -> dict:
        calls.append(1)
        _copy_images(src, dbp, odd)
        names = rc._id_names(src)
        return {"added": [names[i] for i in odd], "frames": n}

    out = ladder.run_ladder(dbp, tmp_path / "img", tmp_path / "sparse", len(even), steps=(),
                            budget_s=120, mapper="incremental", num_threads=1, random_seed=1)
    assert out["registered_images"] <= 3 and out["partial"] is True  # one half at most
    out = ladder.run_ladder(dbp, tmp_path / "img", tmp_path / "sparse", len(even),
                            steps=("more_frames",), budget_s=120, mapper="incremental",
                            num_threads=1, random_seed=1, more_frames=more_frames)
    base, rung = out["attempts"]
    assert calls == [1]
    assert base["frames"] == len(even) and max(base["model_sizes"], default=0) <= 3
    assert rung["step"] == "more_frames" and rung["outcome"] == "improved"
    assert rung["settings"] == {"added_frames": len(odd), "frames": n}
    assert rung["new_pairs"] > 0 and rung["frames"] == n
    assert out["registered_images"] == n and out["frames"] == n
    assert sorted(out["frames_added"]) == sorted(rc._id_names(src)[i] for i in odd)


def test_global_mapping_reports_progress_while_it_runs(tmp_path, monkeypatch):
    """Global SfM has no callbacks: a heartbeat thread reports elapsed time, never 'done'."""
    monkeypatch.setattr(rc, "HEARTBEAT_S", 0.01)
    dbp = synth(tmp_path, 40, 2000)
    seen: list[tuple[float, str]] = []
    models = rc.map_models(dbp, tmp_path / "img", tmp_path / "out", 40, mapper="global",
                           progress=lambda f, m: seen.append((f, m)), num_threads=1,
                           random_seed=1)
    assert models and models[0]["registered_images"] == 40
    beats = [f for f, m in seen if m.startswith("Global SfM")]
    assert len(beats) >= 2, seen  # the mapping takes > 0.02 s
    assert beats == sorted(beats) and 0 < beats[0] and beats[-1] <= 0.95
    assert seen[0] == (0.0, "Initializing reconstruction...") and seen[-1] == (1.0, "Mapping done")


def test_wrong_focal_metadata_is_outvoted_by_the_images(tmp_path):
    """EXIF says 600 px (a crop keeps the original's focal length); the images, from a
    general scene where the focal length is observable, say 400 px. The model held to 600 px
    fits worse, so the free-focal model is the result, with a warning."""
    n = 10
    dbp = synth(tmp_path, n, 400, camera=("SIMPLE_RADIAL", [400.0, 320.0, 240.0, 0.0]))
    rc.set_camera_model(dbp, "SIMPLE_RADIAL")
    out = ladder.run_ladder(dbp, tmp_path / "img", tmp_path / "sparse", n,
                            steps=("focal_prior",), budget_s=120, mapper="incremental",
                            num_threads=1, random_seed=1, focal_prior_px=600.0)
    by_step = [(a["step"], a["settings"].get("focal"), a["outcome"]) for a in out["attempts"]]
    assert by_step[0] == ("baseline", None, "failed_checks")
    assert out["attempts"][0]["models"][0]["checks"]["failures"] == [
        "focal_disagrees_with_metadata"]
    fixed = out["attempts"][-1]
    assert fixed["settings"]["focal"] == "fixed" and fixed["outcome"] in ("rejected",
                                                                          "failed_checks")
    assert out["registered_images"] == n
    assert out["checks"]["passed"] is True
    assert out["checks"]["overridden"] == ["focal_disagrees_with_metadata"]
    assert [w["code"] for w in out["warnings"]] == ["focal_metadata_ignored"]
    assert out["quality_warning"]["code"] == "focal_metadata_ignored"
    rec = pycolmap.Reconstruction(str(tmp_path / "sparse" / str(out["chosen_model"])))
    assert next(iter(rec.cameras.values())).params[0] == pytest.approx(400.0, rel=0.01)


@pytest.mark.parametrize("mapper,options,what", [
    ("incremental", {"init_min_num_inliers_typo": 1}, "incremental mapper"),
    ("incremental", {"pipeline": {"no_such_option": 1}}, "incremental pipeline"),
    ("global", {"no_such_option": 1}, "global pipeline")])
def test_unknown_mapper_option_is_refused_before_mapping(tmp_path, mapper, options, what):
    with pytest.raises(ValueError, match=f"unknown {what} option"):
        rc.map_models(tmp_path / "absent.db", tmp_path, tmp_path / "out", 3, mapper=mapper,
                      mapper_options=options)
