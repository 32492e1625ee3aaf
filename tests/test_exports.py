"""Artifacts: sparse.ply, model.zip, thumbnail, and the undistorted nerfstudio / splatting dataset.

Models come from ``pycolmap.synthesize_dataset`` (exact, noise-free synthetic SfM with distorted
cameras) and frames are random textures of the camera's size, so each test runs in a second or
two. The nerfstudio maths itself is tested in ``tests/test_nerfstudio.py``.
"""
from __future__ import annotations

import hashlib
import json
import zipfile

import cv2
import numpy as np
import pytest

pycolmap = pytest.importorskip("pycolmap")

from nerfstudio_reference import reprojection_errors  # noqa: E402
from scenes import synthetic_model, write_frames  # noqa: E402

from colmap_pipeline.core import export  # noqa: E402

ARTIFACTS = ["sparse.ply", "model.zip", "thumbnail.jpg", "transforms.json", "sparse_pc.ply",
             "gaussian_splatting.zip"]


@pytest.mark.parametrize("model,params", [
    ("OPENCV", [500.0, 510.0, 322.0, 238.0, -0.2, 0.05, 0.001, -0.002]),
    ("SIMPLE_RADIAL", [480.0, 320.0, 240.0, -0.15]),
])
def test_transforms_json_describes_the_images_it_ships(tmp_path, model, params):
    """Issue 10 item 1: transforms.json names images that ship (inside gaussian_splatting.zip),
    at their own size, with the undistorted PINHOLE intrinsics, and reprojects the shipped
    model's observations. The old file named the distorted frames, which no artifact holds,
    at their size, with SIMPLE_RADIAL's k dropped."""
    model_dir = synthetic_model(tmp_path, model, params)
    write_frames(model_dir, tmp_path / "frames")
    art = tmp_path / "art"
    export.export_model(model_dir, tmp_path / "frames", art)
    t = json.loads((art / "transforms.json").read_text())
    with zipfile.ZipFile(art / export.SPLATTING_ZIP) as zf:
        names = set(zf.namelist())
        assert json.loads(zf.read("transforms.json")) == t  # the same file, beside the images
        assert zf.read("sparse_pc.ply") == (art / "sparse_pc.ply").read_bytes()
        assert t["ply_file_path"] in names
        sizes = set()
        for f in t["frames"]:
            assert f["file_path"] in names, f["file_path"]
            img = cv2.imdecode(np.frombuffer(zf.read(f["file_path"]), np.uint8), cv2.IMREAD_COLOR)
            sizes.add((img.shape[1], img.shape[0]))
        zf.extractall(tmp_path / "gs")
    assert sizes == {(t["w"], t["h"])}  # the size named is the size shipped
    assert (t["w"], t["h"]) != (640, 480)  # undistorted images are larger than the frames
    assert t["camera_model"] == "PINHOLE"
    assert not {"k1", "k2", "k3", "k4", "p1", "p2"} & set(t)
    assert len(t["frames"]) == 8
    # the shipped (undistorted) model's observations reproject with transforms.json alone
    errs = reprojection_errors(tmp_path / "gs" / "sparse" / "0", t)
    assert len(errs) > 1000 and np.max(errs) < 1e-3, np.max(errs)


def test_export_model_writes_every_artifact_atomically(tmp_path):
    model_dir = synthetic_model(tmp_path, "SIMPLE_RADIAL", [480.0, 320.0, 240.0, -0.05])
    write_frames(model_dir, tmp_path / "frames")
    art = tmp_path / "art"
    arts = export.export_model(model_dir, tmp_path / "frames", art)
    assert [a.name for a in arts] == ARTIFACTS
    for a in arts:
        data = (art / a.name).read_bytes()
        assert a.bytes == len(data) and a.sha256 == hashlib.sha256(data).hexdigest()
    assert {a.name: a.media_type for a in arts}["transforms.json"] == "application/json"
    assert sorted(p.name for p in art.iterdir()) == sorted(ARTIFACTS)  # no temporary left
    thumb = cv2.imread(str(art / "thumbnail.jpg"))
    assert thumb.shape[1] == min(export.THUMBNAIL_WIDTH, 640)
    with zipfile.ZipFile(art / "model.zip") as zf:
        for base in ("cameras", "images", "points3D"):
            assert {f"sparse/0/{base}.bin", f"sparse/0/{base}.txt"} <= set(zf.namelist())
        zf.extractall(tmp_path / "m")
    rec = pycolmap.Reconstruction(str(tmp_path / "m" / "sparse" / "0"))
    assert rec.num_reg_images() == 8 and rec.num_points3D() == 300
    assert next(iter(rec.cameras.values())).model_name == "SIMPLE_RADIAL"  # as mapped


def test_sparse_pc_ply_holds_the_points_in_the_nerfstudio_frame(tmp_path):
    from plyfile import PlyData

    model_dir = synthetic_model(tmp_path, "OPENCV", [500.0, 500.0, 320.0, 240.0, 0, 0, 0, 0])
    art = tmp_path / "art"
    art.mkdir()
    written = export.write_nerfstudio(model_dir, art)
    assert [p.name for p in written] == ["transforms.json", "sparse_pc.ply"]
    ply = PlyData.read(str(art / "sparse_pc.ply"))["vertex"]
    rec = pycolmap.Reconstruction(str(model_dir))
    assert ply.count == rec.num_points3D() == 300
    a = np.asarray(json.loads((art / "transforms.json").read_text())["applied_transform"])
    colmap = np.array(sorted(tuple(p.xyz @ a[:, :3].T + a[:, 3]) for p in rec.points3D.values()))
    mine = np.array(sorted(zip(ply["x"], ply["y"], ply["z"], strict=True)))
    assert np.allclose(colmap, mine, atol=1e-4)


def test_gaussian_splatting_zip_has_undistorted_images_and_pinhole_model(tmp_path):
    model_dir = synthetic_model(tmp_path, "OPENCV", [500.0, 500.0, 320.0, 240.0, -0.2, 0.05,
                                                     0.0, 0.0])
    rec = pycolmap.Reconstruction(str(model_dir))
    write_frames(model_dir, tmp_path / "frames")
    art = tmp_path / "art"
    art.mkdir()
    written = export.write_splatting_dataset(model_dir, tmp_path / "frames", art)
    assert [p.name for p in written] == ["transforms.json", "sparse_pc.ply", export.SPLATTING_ZIP]
    with zipfile.ZipFile(art / export.SPLATTING_ZIP) as zf:
        names = set(zf.namelist())
        assert {f"images/{im.name}" for im in rec.images.values()} <= names
        assert {"sparse/0/cameras.bin", "sparse/0/images.bin", "sparse/0/points3D.bin",
                "sparse/0/cameras.txt", "transforms.json", "sparse_pc.ply"} <= names
        zf.extractall(tmp_path / "gs")
    und = pycolmap.Reconstruction(str(tmp_path / "gs" / "sparse" / "0"))
    cam = next(iter(und.cameras.values()))
    assert cam.model_name == "PINHOLE"
    assert und.num_reg_images() == 8 and und.num_points3D() == 300
    img = cv2.imread(str(tmp_path / "gs" / "images" / next(iter(rec.images.values())).name))
    assert img.shape[:2] == (cam.height, cam.width)
    assert sorted(p.name for p in art.iterdir()) == sorted(p.name for p in written)


def test_dense_artifacts_are_copied_when_the_gpu_stages_made_them(tmp_path):
    dense, art = tmp_path / "dense", tmp_path / "art"
    dense.mkdir()
    art.mkdir()
    assert export.copy_dense_artifacts(dense, art) == []  # CPU machine: dense skipped
    (dense / "fused.ply").write_bytes(b"ply\n")
    (dense / "mesh.glb").write_bytes(b"glTF")
    arts = export.copy_dense_artifacts(dense, art)
    assert [(a.name, a.bytes) for a in arts] == [("fused.ply", 4), ("mesh.glb", 4)]
    assert (art / "mesh.glb").read_bytes() == b"glTF"
    assert (art / "fused.ply").read_bytes() == b"ply\n"


def test_undistorted_images_match_colmaps_undistorter(tmp_path):
    """Issue 14: COLMAP undistorts the model and one image per camera, ``cv2.remap`` the rest;
    every image matches what ``pycolmap.undistort_images`` makes of it, within JPEG noise, and
    the model is COLMAP's own."""
    model_dir = synthetic_model(tmp_path, "OPENCV", [500.0, 500.0, 320.0, 240.0, -0.2, 0.05,
                                                     0.001, -0.001])
    frames = tmp_path / "frames"
    write_frames(model_dir, frames)
    # smooth content: JPEG noise on random pixels would hide a half-pixel shift
    for p in frames.iterdir():
        img = cv2.GaussianBlur(cv2.imread(str(p)), (0, 0), 3)
        pycolmap.Bitmap.from_array(np.ascontiguousarray(img[:, :, ::-1])).write(str(p))
    export.undistort_model(model_dir, frames, tmp_path / "ours", num_threads=2)
    pycolmap.undistort_images(str(tmp_path / "colmap"), str(model_dir), str(frames),
                              jpeg_quality=100)
    ours = pycolmap.Reconstruction(str(tmp_path / "ours" / "sparse"))
    ref = pycolmap.Reconstruction(str(tmp_path / "colmap" / "sparse"))
    assert ours.cameras[1].params.tolist() == ref.cameras[1].params.tolist()
    assert (ours.cameras[1].width, ours.cameras[1].height) == (ref.cameras[1].width,
                                                               ref.cameras[1].height)
    assert ours.num_points3D() == ref.num_points3D() == 300
    names = sorted(im.name for im in ref.images.values())
    assert sorted(p.name for p in (tmp_path / "ours" / "images").iterdir()) == names
    for name in names:
        a = cv2.imread(str(tmp_path / "ours" / "images" / name)).astype(float)
        b = cv2.imread(str(tmp_path / "colmap" / "images" / name)).astype(float)
        assert a.shape == b.shape
        assert np.abs(a - b).mean() < 0.3, name  # a half-pixel shift gives 0.9
