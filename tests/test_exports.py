"""Exports of issue 4: nerfstudio's transforms.json + sparse_pc.ply, the Gaussian-splatting zip.

The reprojection test uses ONLY transforms.json (intrinsics, distortion, camera-to-world in
OpenGL axes, nerfstudio's conventions) and sparse_pc.ply's frame (applied_transform) to project
every 3D point of a COLMAP model into the images where COLMAP observed it, and compares with
COLMAP's own 2D observations. Models come from ``pycolmap.synthesize_dataset`` (exact, noise-free
synthetic SfM with distorted cameras), so the test runs in about a second.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

pycolmap = pytest.importorskip("pycolmap")

from colmap_pipeline.core import export  # noqa: E402


def synthetic_model(tmp_path: Path, model: str, params: list[float]) -> Path:
    """A synthetic COLMAP model (one camera, 8 images, 300 points) written to tmp/model."""
    opts = pycolmap.SyntheticDatasetOptions()
    opts.num_rigs = 1
    opts.num_cameras_per_rig = 1
    opts.num_frames_per_rig = 8
    opts.num_points3D = 300
    opts.camera_width, opts.camera_height = 640, 480
    opts.camera_model_id = getattr(pycolmap.CameraModelId, model)
    opts.camera_params = params
    rec = pycolmap.synthesize_dataset(opts)
    out = tmp_path / "model"
    out.mkdir()
    rec.write_binary(str(out))
    return out


def project_nerfstudio(t: dict, c2w: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Project world points (nerfstudio world) with one frame of transforms.json: OpenGL camera
    axes -> OpenCV axes, then nerfstudio's OPENCV / OPENCV_FISHEYE distortion, then K."""
    w2c = np.linalg.inv(np.asarray(c2w))
    pc = xyz @ w2c[:3, :3].T + w2c[:3, 3]
    pc[:, 1:] *= -1  # OpenGL (y up, z back) -> OpenCV (y down, z forward)
    x, y = pc[:, 0] / pc[:, 2], pc[:, 1] / pc[:, 2]
    if t["camera_model"] == "OPENCV":
        r2 = x * x + y * y
        rad = 1 + t["k1"] * r2 + t["k2"] * r2 * r2
        xd = x * rad + 2 * t["p1"] * x * y + t["p2"] * (r2 + 2 * x * x)
        yd = y * rad + t["p1"] * (r2 + 2 * y * y) + 2 * t["p2"] * x * y
    elif t["camera_model"] == "OPENCV_FISHEYE":
        r = np.hypot(x, y)
        th = np.arctan(r)
        thd = th * (1 + t["k1"] * th**2 + t["k2"] * th**4 + t["k3"] * th**6 + t["k4"] * th**8)
        s = np.where(r > 1e-12, thd / np.maximum(r, 1e-12), 1.0)
        xd, yd = x * s, y * s
    else:
        xd, yd = x, y
    return np.c_[t["fl_x"] * xd + t["cx"], t["fl_y"] * yd + t["cy"]]


def reprojection_errors(model_dir: Path, art: Path) -> np.ndarray:
    """Errors (px) of every COLMAP observation reprojected with transforms.json alone."""
    t = json.loads((art / "transforms.json").read_text())
    rec = pycolmap.Reconstruction(str(model_dir))
    a = np.asarray(t["applied_transform"])
    errs = []
    frames = {f["colmap_im_id"]: f for f in t["frames"]}
    for image_id, frame in frames.items():
        im = rec.images[image_id]
        assert frame["file_path"] == f"images/{im.name}"
        obs = [(p.xy, rec.points3D[p.point3D_id].xyz) for p in im.points2D if p.has_point3D()]
        uv = np.array([o[0] for o in obs])
        xyz = np.array([o[1] for o in obs]) @ a[:, :3].T + a[:, 3]
        errs.append(np.linalg.norm(project_nerfstudio(t, frame["transform_matrix"], xyz) - uv,
                                   axis=1))
    return np.concatenate(errs)


@pytest.mark.parametrize("model,params", [
    ("OPENCV", [500.0, 510.0, 322.0, 238.0, -0.12, 0.03, 0.001, -0.002]),
    ("SIMPLE_RADIAL", [480.0, 320.0, 240.0, -0.08]),
    ("OPENCV_FISHEYE", [300.0, 300.0, 320.0, 240.0, 0.05, -0.01, 0.002, 0.0]),
])
def test_transforms_json_reprojects_colmap_observations(tmp_path, model, params):
    model_dir = synthetic_model(tmp_path, model, params)
    art = tmp_path / "art"
    art.mkdir()
    written = export.write_nerfstudio(model_dir, art)
    assert [p.name for p in written] == ["transforms.json", "sparse_pc.ply"]
    t = json.loads((art / "transforms.json").read_text())
    rec = pycolmap.Reconstruction(str(model_dir))
    assert len(t["frames"]) == rec.num_reg_images() == 8
    assert (t["w"], t["h"]) == (640, 480)
    for f in t["frames"]:
        m = np.asarray(f["transform_matrix"])
        assert m.shape == (4, 4) and np.allclose(m[3], [0, 0, 0, 1])
        assert np.allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-9)  # a rotation
    errs = reprojection_errors(model_dir, art)
    assert len(errs) > 1000
    assert np.median(errs) < 2.0, np.median(errs)
    # the camera centre in transforms.json is COLMAP's centre moved by applied_transform
    a = np.asarray(t["applied_transform"])
    im = rec.images[t["frames"][0]["colmap_im_id"]]
    centre = im.projection_center() @ a[:, :3].T + a[:, 3]
    assert np.allclose(np.asarray(t["frames"][0]["transform_matrix"])[:3, 3], centre)
    # a wrong convention is caught: without the OpenGL axis flip the error is huge
    bad = dict(t, frames=[dict(f, transform_matrix=(np.asarray(f["transform_matrix"])
                                                    @ np.diag([1, -1, -1, 1])).tolist())
                          for f in t["frames"]])
    (art / "transforms.json").write_text(json.dumps(bad))
    assert np.median(reprojection_errors(model_dir, art)) > 50


def test_sparse_pc_ply_holds_the_points_in_the_nerfstudio_frame(tmp_path):
    from plyfile import PlyData

    model_dir = synthetic_model(tmp_path, "OPENCV", [500.0, 500.0, 320.0, 240.0, 0, 0, 0, 0])
    art = tmp_path / "art"
    art.mkdir()
    export.write_nerfstudio(model_dir, art)
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
    frames = tmp_path / "frames"
    frames.mkdir()
    rng = np.random.default_rng(0)
    for im in rec.images.values():
        cv2.imwrite(str(frames / im.name), rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    out = tmp_path / export.SPLATTING_ZIP
    export._write_splatting_zip(model_dir, frames, out)
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
        assert {f"images/{im.name}" for im in rec.images.values()} <= names
        assert {"sparse/0/cameras.bin", "sparse/0/images.bin", "sparse/0/points3D.bin",
                "sparse/0/cameras.txt"} <= names
        zf.extractall(tmp_path / "gs")
    und = pycolmap.Reconstruction(str(tmp_path / "gs" / "sparse" / "0"))
    cam = next(iter(und.cameras.values()))
    assert cam.model_name == "PINHOLE"
    assert und.num_reg_images() == 8 and und.num_points3D() == 300
    img = cv2.imread(str(tmp_path / "gs" / "images" / next(iter(rec.images.values())).name))
    assert img.shape[:2] == (cam.height, cam.width)
