"""Photo sets whose photos come from several cameras, or in no order (issue 15 items 1 and 2).

The grouping and ordering rules are tested on fakes (no decoding, no pycolmap). The
reconstructions use photo sets rendered here (``tests/photo_sets.py``: a static scene of
textured cards, pinhole cameras of known focal length, JPEGs with EXIF written by Pillow) and
run the pipeline's stages in-process at ``low`` with one thread and a fixed seed; each set is
8 photos of 480-640 px and reconstructs in a few seconds.
"""
from __future__ import annotations

import io
import random
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

pycolmap = pytest.importorskip("pycolmap")

from nerfstudio_reference import reprojection_errors  # noqa: E402
from photo_sets import Cam, photo, viewpoints, write_photo  # noqa: E402

from colmap_pipeline.core import pipeline  # noqa: E402
from colmap_pipeline.core import sfm_cameras as scam  # noqa: E402
from colmap_pipeline.core import sfm_features as sf  # noqa: E402
from colmap_pipeline.core import sfm_mapping as sm  # noqa: E402
from colmap_pipeline.core import sfm_matching as sfmatch  # noqa: E402
from colmap_pipeline.core.photos import (  # noqa: E402
    PhotoExif,
    group_cameras,
    photo_camera_record,
    photo_order,
)
from colmap_pipeline.layout import Workspace, read_checkpoint, read_json, write_job  # noqa: E402
from colmap_pipeline.presets import Preset  # noqa: E402

LOW = Preset("low", 30, 1000, 2048)
PHONE = PhotoExif(make="Acme", model="A1", focal_length_mm=4.67, focal_35mm=28.0)


# --- grouping and order, on fakes -----------------------------------------------------------

def test_one_phone_held_both_ways_is_one_camera_per_orientation():
    got = group_cameras([PHONE] * 4, [(640, 480), (480, 640), (640, 480), (480, 640)])
    assert (got.group, got.mode, got.cameras) == ([0, 1, 0, 1], "per_group", 2)


def test_make_model_and_zoom_split_cameras_of_one_size():
    other = PhotoExif(make="Zeta", model="Z9", focal_length_mm=4.67, focal_35mm=28.0)
    zoomed = PhotoExif(make="Acme", model="A1", focal_length_mm=9.0, focal_35mm=54.0)
    got = group_cameras([PHONE, other, zoomed, PHONE], [(640, 480)] * 4)
    assert (got.group, got.mode) == ([0, 1, 2, 0], "per_group")
    assert group_cameras([PHONE] * 3, [(640, 480)] * 3).mode == "single"


def test_without_exif_size_groups_and_mixed_sizes_get_one_camera_each():
    none = PhotoExif()
    assert group_cameras([none] * 3, [(400, 300)] * 3).group == [0, 0, 0]
    per_image = group_cameras([none] * 3, [(400, 300), (400, 300), (300, 400)])
    assert (per_image.group, per_image.mode) == ([0, 1, 2], "per_image")
    # some photos with EXIF: the others are grouped by size alone
    mixed = group_cameras([PHONE, none, none, PHONE], [(640, 480), (640, 480), (320, 240),
                                                       (640, 480)])
    assert (mixed.group, mixed.mode) == ([0, 1, 2, 0], "per_group")
    with pytest.raises(ValueError):
        group_cameras([none], [])


def test_only_one_camera_with_growing_exif_times_is_ordered():
    t = ["2026:05:01 10:00:00", "2026:05:01 10:00:00.50", "2026:05:01 10:00:03"]
    assert photo_order(t, 1) == {"ordered": True, "reason": "exif_time_increasing"}
    assert photo_order(t, 2) == {"ordered": False, "reason": "several_cameras"}
    assert photo_order([t[0], None, t[2]], 1)["reason"] == "no_exif_time"
    assert photo_order([t[2], t[0], t[1]], 1)["reason"] == "exif_time_not_increasing"
    assert photo_order([t[0]] * 3, 1)["reason"] == "exif_time_not_increasing"  # says nothing


def test_groups_records_and_per_camera_priors_from_frames_json():
    frames = [{"file": f"frame_{i:05d}.jpg", "camera": c} for i, c in enumerate([0, 1, 0])]
    assert sf.camera_groups(frames) == [["frame_00000.jpg", "frame_00002.jpg"],
                                        ["frame_00001.jpg"]]
    assert sf.camera_groups([{"file": "frame_00000.jpg"}]) is None  # a video's frames.json
    cams = [{"camera": 0, "frames": ["a", "b"], "focal_prior": {"focal_px": 5.0},
             "focal_prior_px": 5.0, "make": "Acme"},
            {"camera": 1, "frames": ["c"], "focal_prior": None, "focal_prior_px": None,
             "make": None}]
    assert photo_camera_record({"cameras": cams}, {"camera_ids": [3, 4]}) == [
        {"camera": 0, "focal_prior_px": 5.0, "make": "Acme", "camera_id": 3, "frames": 2},
        {"camera": 1, "focal_prior_px": None, "make": None, "camera_id": 4, "frames": 1}]
    assert photo_camera_record({"frames": []}, None) is None


def test_each_camera_is_checked_against_its_own_focal_prior():
    ok = {"registered_images": 10, "points3d": 2000, "mean_reprojection_error_px": 0.5,
          "camera_plausible": True, "focal_px": 520.0,
          "focal_px_by_camera": {"1": 520.0, "2": 400.0}}
    assert sm.check_model(ok, 10, focal_prior_px={1: 500.0, 2: 420.0}).passed
    assert sm.check_model(ok, 10, focal_prior_px={1: 500.0, 2: 300.0}).failures == [
        "focal_disagrees_with_metadata"]
    assert sm.check_model(ok, 10, focal_prior_px={1: 500.0}).passed  # camera 2: no EXIF
    assert (scam.prior_for({1: 500.0}, 2), scam.prior_for(480.0, 7)) == (None, 480.0)
    assert scam.prior_record({2: 420.0004, 1: 500.0}) == {"1": 500.0, "2": 420.0}
    assert scam.prior_text({1: 500.0, 2: 420.0}) == "500, 420 px (per camera)"
    assert scam.prior_text(480.4) == "480 px"


# --- rendered photo sets, reconstructed -----------------------------------------------------

def _reconstruct(src: Path, ws: Path, stages: tuple[str, ...] = pipeline.STAGE_ORDER) -> Path:
    write_job(ws, src, LOW, random_seed=0)
    for stage in stages:
        pipeline.run_stage(stage, ws)
    return ws


def test_two_cameras_at_two_sizes_register_with_their_own_focal_lengths(tmp_path):
    a, b = Cam(640, 480, 520.0), Cam(512, 384, 400.0, make="Zeta", model="Z9")
    src = tmp_path / "in"
    src.mkdir()
    for i, c in enumerate(viewpoints(8)):
        cam = a if i % 2 == 0 else b
        write_photo(src / f"p{i:02d}.jpg", photo(cam, c), cam)
    res = read_json(Workspace(_reconstruct(src, tmp_path / "ws")).result_json)
    assert res["registered_images"] == 8 and res["camera_mode"] == "per_group"
    by_size = {(c["width"], c["height"]): c for c in res["cameras"]}
    assert set(by_size) == {(640, 480), (512, 384)}
    for cam in (a, b):
        got = by_size[(cam.width, cam.height)]
        assert got["images"] == 4
        assert got["params"]["f"] == pytest.approx(cam.focal_px, rel=0.05)
    groups = {(g["make"], g["width"]): g for g in res["photo_cameras"]}
    assert groups[("Zeta", 512)]["frames"] == 4
    assert groups[("Zeta", 512)]["camera_id"] == by_size[(512, 384)]["camera_id"]
    # unordered (two cameras), 8 photos: every pair
    assert (res["matching"]["method"], res["matching"]["image_pairs"]) == ("exhaustive", 28)


def test_portrait_photos_tagged_orientation_6_register_upright(tmp_path):
    land, port = Cam(640, 480, 520.0), Cam(480, 640, 520.0)
    src = tmp_path / "in"
    src.mkdir()
    upright = {}
    for i, c in enumerate(viewpoints(8)):
        cam = land if i % 2 == 0 else port
        upright[i] = photo(cam, c)
        write_photo(src / f"p{i:02d}.jpg", upright[i], land, orientation=1 if cam is land else 6)
    ws = Workspace(_reconstruct(src, tmp_path / "ws"))
    res = read_json(ws.result_json)
    assert res["registered_images"] == 8
    assert sorted((c["width"], c["height"], c["images"]) for c in res["cameras"]) == [
        (480, 640, 4), (640, 480, 4)]
    # the frames COLMAP saw are the upright pictures, not the stored (turned) pixels
    frame = cv2.imread(str(ws.frames_dir / "frame_00001.jpg"), cv2.IMREAD_GRAYSCALE)
    ref = cv2.cvtColor(upright[1], cv2.COLOR_BGR2GRAY)
    assert frame.shape == ref.shape == (640, 480)
    assert np.median(np.abs(frame.astype(int) - ref.astype(int))) < 4
    # transforms.json (per-frame intrinsics) reprojects the shipped model's observations
    with zipfile.ZipFile(io.BytesIO((ws.artifacts_dir / "gaussian_splatting.zip").read_bytes())) \
            as zf:
        zf.extractall(tmp_path / "gs")
    t = read_json(tmp_path / "gs" / "transforms.json")
    assert t["camera_model"] == "PINHOLE" and "fl_x" not in t
    sizes = {(f["w"], f["h"]) for f in t["frames"]}  # undistorted: about the frames' sizes
    assert len(sizes) == 2 and {w > h for w, h in sizes} == {True, False}
    errs = reprojection_errors(tmp_path / "gs" / "sparse" / "0", t)
    assert len(errs) > 1000 and float(np.median(errs)) < 2.0, float(np.median(errs))


def test_shuffled_photos_without_times_register_as_well_as_the_ordered_set(tmp_path):
    cam = Cam(640, 480, 520.0)
    views = viewpoints(8)
    ordered, shuffled = tmp_path / "ordered", tmp_path / "shuffled"
    ordered.mkdir()
    shuffled.mkdir()
    names = [f"{n:04d}.jpg" for n in random.Random(7).sample(range(1000), 8)]
    for i, c in enumerate(views):
        img = photo(cam, c)
        write_photo(ordered / f"p{i:02d}.jpg", img, cam, time=f"2026:05:01 10:00:{i:02d}")
        write_photo(shuffled / names[i], img, cam)
    stages = ("frames", "features", "matching", "mapping")
    got = {}
    for name, src in (("ordered", ordered), ("shuffled", shuffled)):
        ws = _reconstruct(src, tmp_path / f"ws_{name}", stages)
        got[name] = (read_checkpoint(ws, "matching")["summary"],
                     read_checkpoint(ws, "mapping")["summary"])
    seq, exh = got["ordered"][0], got["shuffled"][0]
    assert seq["method"] == "sequential" and seq["order"]["reason"] == "exif_time_increasing"
    assert exh["method"] == "exhaustive" and exh["image_pairs"] == 28
    assert exh["order"] == {"ordered": False, "reason": "no_exif_time"}
    assert got["ordered"][1]["registered_images"] == 8
    assert got["shuffled"][1]["registered_images"] == 8
    assert got["shuffled"][1]["mapping_attempts"][0]["settings"]["matching"] == "exhaustive"


def test_unordered_sets_above_the_exhaustive_size_match_by_retrieval(tmp_path):
    """Retrieval with the job's own vocabulary (the ladder's loop-closure vocabulary) on a
    synthetic database of 12 images, the exhaustive limit lowered to 20 pairs."""
    from scenes import synth

    dbp = synth(tmp_path, 12, 400)
    sfmatch.clear_matches(dbp)
    got = sfmatch.match_photos(dbp, ordered=False, max_exhaustive_pairs=20, num_threads=1)
    assert got.method == "retrieval"
    assert 12 <= got.image_pairs <= 66 and got.verified_pairs == got.image_pairs
    assert sfmatch.match_photos(dbp, ordered=False, max_exhaustive_pairs=66,
                           num_threads=1).method == "exhaustive"


def test_each_group_gets_its_camera_and_the_camera_rungs_give_each_its_own_prior(tmp_path):
    """Three photos in one group, two alone (extracted together with PER_IMAGE): three cameras;
    ``set_camera_model`` with per-camera priors sets and flags only the cameras that have one,
    and ``restore_cameras`` undoes it."""
    from test_sfm_features import PRESET, texture_images

    names = texture_images(tmp_path / "img", 5)
    db = tmp_path / "db.db"
    groups = [names[:3], names[3:4], names[4:]]
    got = sf.extract_features(db, tmp_path / "img", PRESET, num_threads=1, groups=groups)
    assert (got.images, got.cameras) == (5, 3)
    ids = sf.camera_ids(db, groups)["camera_ids"]
    assert len(set(ids)) == 3
    with pycolmap.Database.open(str(db)) as d:
        cam_of = {im.name: int(im.camera_id) for im in d.read_all_images()}
    assert {cam_of[n] for n in names[:3]} == {ids[0]}
    frames_json = {"cameras": [{"frames": g, "focal_prior_px": p}
                               for g, p in zip(groups, (300.0, None, 250.0), strict=True)]}
    priors = sf.focal_priors(db, frames_json)
    assert priors == {ids[0]: 300.0, ids[2]: 250.0}
    saved = scam.set_camera_model(db, "OPENCV", focal_px=priors, prior=True)
    with pycolmap.Database.open(str(db)) as d:
        cams = {int(c.camera_id): c for c in d.read_all_cameras()}
    assert (cams[ids[0]].model_name, cams[ids[0]].params[0]) == ("OPENCV", 300.0)
    assert cams[ids[2]].params[0] == 250.0 and cams[ids[2]].has_prior_focal_length
    assert cams[ids[1]].params[0] == pytest.approx(1.2 * 320) and not (
        cams[ids[1]].has_prior_focal_length)
    scam.restore_cameras(db, saved)
    with pycolmap.Database.open(str(db)) as d:
        assert {c.model_name for c in d.read_all_cameras()} == {sf.CAMERA_MODEL}
