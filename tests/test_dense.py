"""Dense path on the CPU: fusion and Poisson meshing from synthetic depth and normal maps.

PatchMatch stereo needs CUDA (scripts/gpu_check.sh covers it on a GPU machine); everything
after it runs here. The scene is a unit sphere at the origin seen by COLMAP's synthetic
cameras (``pycolmap.synthesize_dataset``: cameras on a sphere of radius ~5 looking at the
origin); depth and normal maps are ray-sphere intersections, so every fused point and mesh
vertex must lie near radius 1.

Images are written with ``pycolmap.Bitmap`` (writing them with OpenCV in a process that has
loaded pycolmap aborted with "double free or corruption" here).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pycolmap = pytest.importorskip("pycolmap")
trimesh = pytest.importorskip("trimesh")

from colmap_pipeline.core import dense  # noqa: E402
from colmap_pipeline.errors import PipelineError  # noqa: E402

RADIUS = 1.0
#: fusion tolerances of the test: the maps are exact, but COLMAP projects to pixel indices
#: by rounding, which moves depths by up to half a pixel on the sphere's rim.
FUSION = {"min_num_pixels": 3, "max_depth_error": 0.05, "max_normal_error": 20.0}


def make_workspace(root: Path, frames: int = 12, width: int = 160, height: int = 120,
                   focal: float = 260.0) -> Path:
    """COLMAP dense workspace of a sphere of radius RADIUS: images/, sparse/, stereo/."""
    opts = pycolmap.SyntheticDatasetOptions()
    opts.num_rigs, opts.num_cameras_per_rig, opts.num_frames_per_rig = 1, 1, frames
    opts.num_points3D = 200
    opts.camera_width, opts.camera_height = width, height
    opts.camera_model_id = pycolmap.CameraModelId.PINHOLE
    opts.camera_params = [focal, focal, width / 2, height / 2]
    pycolmap.set_random_seed(7)
    with pycolmap.Database.open(str(root / "synthetic.db")) as db:
        rec = pycolmap.synthesize_dataset(opts, db)
    ws = root / "dense"
    for sub in ("images", "sparse", "stereo/depth_maps", "stereo/normal_maps"):
        (ws / sub).mkdir(parents=True)
    rec.write(str(ws / "sparse"))
    rng = np.random.default_rng(7)
    names = []
    for _, im in sorted(rec.images.items()):
        cam = rec.cameras[im.camera_id]
        K = cam.calibration_matrix()
        cfw = im.cam_from_world()
        R, t = cfw.rotation.matrix(), np.asarray(cfw.translation)
        C = -R.T @ t
        u, v = np.meshgrid(np.arange(cam.width, dtype=float), np.arange(cam.height, dtype=float))
        rays_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1],
                             np.ones_like(u)], -1)
        rays = rays_cam @ R  # world directions with unit camera-z: the ray parameter is depth
        a, b, c = (rays ** 2).sum(-1), 2 * (rays @ C), C @ C - RADIUS ** 2
        disc = b * b - 4 * a * c
        hit = disc > 0
        depth = np.where(hit, (-b - np.sqrt(np.where(hit, disc, 0))) / (2 * a), 0.0)
        X = C + depth[..., None] * rays
        normals = (X / RADIUS) @ R.T  # outward normal in camera frame: faces the camera
        normals[~hit] = 0
        depth = depth.astype(np.float32)
        dm = pycolmap.DepthMap.from_array(depth, float(depth[hit].min()), float(depth.max()))
        dm.write(str(ws / "stereo" / "depth_maps" / f"{im.name}.geometric.bin"))
        nm = pycolmap.NormalMap.from_array(normals.astype(np.float32))
        nm.write(str(ws / "stereo" / "normal_maps" / f"{im.name}.geometric.bin"))
        img = rng.integers(0, 255, (cam.height, cam.width, 3), dtype=np.uint8)
        pycolmap.Bitmap.from_array(img).write(str(ws / "images" / im.name))
        names.append(im.name)
    (ws / "stereo" / "fusion.cfg").write_text("\n".join(names) + "\n")
    return ws


def _fusion_options():
    opts = pycolmap.StereoFusionOptions()
    for k, v in FUSION.items():
        setattr(opts, k, v)
    opts.num_threads = 2
    return opts


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    ws = make_workspace(root)
    out = dense.fuse(ws, ws / "fused.ply", dense.DENSE_PRESETS["low"], input_type="geometric",
                     options=_fusion_options())
    return ws, out


def test_fusion_of_synthetic_sphere(fused):
    ws, out = fused
    pts = trimesh.load(str(ws / "fused.ply"))
    xyz = np.asarray(pts.vertices)
    assert out["fused_points"] == len(xyz) == dense.ply_vertex_count(ws / "fused.ply")
    assert out["fused_points"] > 300
    r = np.linalg.norm(xyz, axis=1)
    assert abs(float(np.median(r)) - RADIUS) < 0.02, np.percentile(r, [5, 50, 95])
    assert float(np.percentile(np.abs(r - RADIUS), 95)) < 0.05


def test_poisson_mesh_ply_and_glb(fused, tmp_path):
    ws, _ = fused
    preset = dense.DensePreset(1000, 4, 2, 7, 3, True, 25, poisson_depth=7, poisson_trim=3.0)
    out = dense.mesh(ws / "fused.ply", tmp_path / "mesh.ply", tmp_path / "mesh.glb", preset)
    assert out["mesh_vertices"] > 100 and out["mesh_faces"] > 100
    # density trimming removes the low-density surface far from the samples
    untrimmed = dense.DensePreset(1000, 4, 2, 7, 3, True, 25, poisson_depth=7, poisson_trim=0.0)
    full = dense.mesh(ws / "fused.ply", tmp_path / "full.ply", tmp_path / "full.glb", untrimmed)
    assert full["mesh_vertices"] > out["mesh_vertices"]
    ply = trimesh.load(str(tmp_path / "mesh.ply"), force="mesh", process=False)
    glb = trimesh.load(str(tmp_path / "mesh.glb"), force="mesh", process=False)
    assert len(ply.vertices) == len(glb.vertices) == out["mesh_vertices"]
    assert len(glb.faces) == out["mesh_faces"]
    r = np.linalg.norm(np.asarray(ply.vertices), axis=1)
    assert abs(float(np.median(r)) - RADIUS) < 0.1, np.percentile(r, [5, 50, 95])


def test_over_trimmed_mesh_is_an_error_not_an_artifact(fused, tmp_path):
    ws, _ = fused  # ~500 points: trim 5 at octree depth 7 leaves no vertex
    preset = dense.DensePreset(1000, 4, 2, 7, 3, True, 25, poisson_depth=7, poisson_trim=5.0)
    with pytest.raises(PipelineError) as exc:
        dense.mesh(ws / "fused.ply", tmp_path / "m.ply", tmp_path / "m.glb", preset)
    assert exc.value.code == "dense_failed" and exc.value.details["mesh_vertices"] == 0
    assert not (tmp_path / "m.glb").exists()


def test_empty_cloud_is_an_error_not_a_crash(tmp_path):
    empty = tmp_path / "empty.ply"
    empty.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 0\n"
                      b"property float x\nproperty float y\nproperty float z\nend_header\n")
    with pytest.raises(PipelineError) as exc:
        dense.mesh(empty, tmp_path / "m.ply", tmp_path / "m.glb", dense.DENSE_PRESETS["low"])
    assert exc.value.code == "dense_failed"
    assert not (tmp_path / "m.glb").exists()


def test_patch_match_without_cuda_is_a_clean_error(tmp_path):
    if pycolmap.has_cuda:
        pytest.skip("CUDA build: PatchMatch runs (scripts/gpu_check.sh)")
    code = ("import sys; from colmap_pipeline.core import dense\n"
            "from colmap_pipeline.errors import PipelineError\n"
            "try:\n    dense.patch_match(sys.argv[1], dense.DENSE_PRESETS['low'])\n"
            "except PipelineError as e:\n    print(e.code)\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert res.stdout.strip().splitlines()[-1] == "dense_failed", res.stderr[-2000:]


def test_gpu_memory_concurrency():
    high = dense.DENSE_PRESETS["high"]
    t4, a10g = 16 * 1024**3, 24 * 1024**3
    assert dense.max_concurrent_dense_jobs(t4, 1920, 1080, high) == 4
    assert dense.max_concurrent_dense_jobs(a10g, 1920, 1080, high) == 6
    # a 4K frame is capped at 2400 px first; a tiny GPU still runs one job
    assert dense.patchmatch_memory_bytes(3840, 2160, high) < dense.patchmatch_memory_bytes(
        3840 * 2, 2160 * 2, dense.DensePreset(4800, 5, 1, 15, 5, True, 50, 11, 7.0))
    assert dense.max_concurrent_dense_jobs(1024**3, 1920, 1080, high) == 1
    assert [dense.DENSE_PRESETS[q].geom_consistency for q in ("low", "medium", "high")] == [
        False, False, True]


def test_undistort_writes_a_capped_dense_workspace(fused, tmp_path):
    ws, _ = fused  # its sparse/ model and images/ stand in for a mapping result
    preset = dense.DensePreset(100, 4, 2, 7, 3, False, 25, 9, 7.0)  # cap 100 px < 160 px
    out = dense.undistort(ws / "sparse", ws / "images", tmp_path / "d", preset)
    assert out == {"images": 12}
    rec = pycolmap.Reconstruction(str(tmp_path / "d" / "sparse"))
    cams = list(rec.cameras.values())
    assert {c.model_name for c in cams} == {"PINHOLE"} and max(cams[0].width, cams[0].height) <= 100
    assert (tmp_path / "d" / "stereo" / "patch-match.cfg").is_file()
