"""nerfstudio's camera projection, written independently of the code under test (a test helper).

Used to check ``transforms.json``: with ONLY the file (intrinsics, distortion, camera-to-world in
OpenGL axes, ``applied_transform``) every 3D point of a COLMAP model is projected into the images
where COLMAP observed it and compared with COLMAP's own 2D observations.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pycolmap


def project_nerfstudio(t: dict[str, Any], world_from_cam: Any, xyz: np.ndarray) -> np.ndarray:
    """Project world points (nerfstudio world) with one frame of transforms.json (its
    ``transform_matrix`` = ``world_from_cam``, nerfstudio's "c2w"): OpenGL camera axes ->
    OpenCV axes, then nerfstudio's OPENCV / OPENCV_FISHEYE distortion, then K."""
    cam_from_world = np.linalg.inv(np.asarray(world_from_cam))
    pc = xyz @ cam_from_world[:3, :3].T + cam_from_world[:3, 3]
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
        assert t["camera_model"] == "PINHOLE", t["camera_model"]
        xd, yd = x, y
    return np.c_[t["fl_x"] * xd + t["cx"], t["fl_y"] * yd + t["cy"]]


def reprojection_errors(model_dir: Path, t: dict[str, Any]) -> np.ndarray:
    """Errors (px) of every COLMAP observation of ``model_dir`` reprojected with the
    transforms.json document ``t`` alone. Frames are matched by ``colmap_im_id`` and their
    ``file_path`` must be ``images/<COLMAP image name>``."""
    rec = pycolmap.Reconstruction(str(model_dir))
    a = np.asarray(t["applied_transform"])
    errs = []
    for frame in t["frames"]:
        im = rec.images[frame["colmap_im_id"]]
        assert frame["file_path"] == f"images/{im.name}"
        obs = [(p.xy, rec.points3D[p.point3D_id].xyz) for p in im.points2D if p.has_point3D()]
        uv = np.array([o[0] for o in obs])
        xyz = np.array([o[1] for o in obs]) @ a[:, :3].T + a[:, 3]
        # several cameras: the frame's own intrinsics override the top level's
        errs.append(np.linalg.norm(project_nerfstudio({**t, **frame}, frame["transform_matrix"],
                                                      xyz) - uv, axis=1))
    return np.concatenate(errs)
