"""A COLMAP model as nerfstudio's ``transforms.json``: its world frame, camera axes and names.

Conventions are those of nerfstudio's ``colmap_to_json`` and ``parse_colmap_camera_params``
(``nerfstudio/process_data/colmap_utils.py``):

* ``transform_matrix`` is the 4x4 ``world_from_cam`` matrix in OpenGL camera axes (x right,
  y up, z back: COLMAP/OpenCV's y and z flipped), in the world frame rotated by
  ``applied_transform`` (3x4, stored too), which maps a COLMAP world point X to
  ``A[:, :3] @ X + A[:, 3]``;
* intrinsics ``fl_x, fl_y, cx, cy`` are px in COLMAP's pixel convention (origin at the top-left
  corner of the top-left pixel), ``w, h`` the image size in px;
* distortion terms carry nerfstudio's names (``k1, k2, k3, k4, p1, p2``), mapped from pycolmap's
  parameter names by :data:`NERFSTUDIO_CAMERA_MODELS` (SIMPLE_RADIAL's single term is ``k`` in
  pycolmap, ``k1`` in nerfstudio); every term of the nerfstudio model is written, 0 when unused.

The export stage runs this on the undistorted (PINHOLE) model of ``gaussian_splatting.zip``, so
the file describes the images shipped beside it (:func:`.export.export_model`). Import lazily:
it loads pycolmap.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pycolmap

from ..errors import PipelineError

#: COLMAP camera model -> (nerfstudio ``camera_model``, the nerfstudio terms it has, and
#: ``{pycolmap parameter name: nerfstudio name}``). COLMAP's RADIAL_FISHEYE family is the
#: OpenCV fisheye model with its higher terms at 0 (theta_d = theta (1 + k1 theta^2 + ...)).
NERFSTUDIO_CAMERA_MODELS: dict[str, tuple[str, dict[str, str]]] = {
    "SIMPLE_PINHOLE": ("PINHOLE", {}),
    "PINHOLE": ("PINHOLE", {}),
    "SIMPLE_RADIAL": ("OPENCV", {"k": "k1"}),
    "RADIAL": ("OPENCV", {"k1": "k1", "k2": "k2"}),
    "OPENCV": ("OPENCV", {"k1": "k1", "k2": "k2", "p1": "p1", "p2": "p2"}),
    "SIMPLE_RADIAL_FISHEYE": ("OPENCV_FISHEYE", {"k": "k1"}),
    "RADIAL_FISHEYE": ("OPENCV_FISHEYE", {"k1": "k1", "k2": "k2"}),
    "OPENCV_FISHEYE": ("OPENCV_FISHEYE", {"k1": "k1", "k2": "k2", "k3": "k3", "k4": "k4"}),
}
#: Distortion terms of each nerfstudio camera model (all written, 0 when the COLMAP model
#: lacks them).
NERFSTUDIO_TERMS: dict[str, tuple[str, ...]] = {
    "PINHOLE": (),
    "OPENCV": ("k1", "k2", "p1", "p2"),
    "OPENCV_FISHEYE": ("k1", "k2", "k3", "k4"),
}

#: nerfstudio's ``applied_transform`` (colmap_to_json without keep_original_world_coordinate):
#: world (x, y, z) -> (x, z, -y), so that COLMAP's usual "y down" world becomes "z up".
NERFSTUDIO_APPLIED_TRANSFORM = ((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, -1.0, 0.0, 0.0))
#: OpenCV camera axes (x right, y down, z forward) -> OpenGL (x right, y up, z back).
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])


@dataclass
class NerfstudioScene:
    """``transforms.json`` and the model's points in the same (nerfstudio) world frame.

    Attributes:
        transforms: the JSON document (nerfstudio's format).
        xyz: ``(N, 3)`` float64 world points, ``applied_transform`` applied.
        rgb: ``(N, 3)`` uint8 colours.
    """

    transforms: dict[str, Any]
    xyz: np.ndarray
    rgb: np.ndarray


def intrinsics(cam: pycolmap.Camera) -> dict[str, Any]:
    """nerfstudio's camera keys for one COLMAP camera: ``w, h`` (px), ``fl_x, fl_y, cx, cy``
    (px), ``camera_model`` and its distortion terms (:data:`NERFSTUDIO_TERMS`).

    Raises:
        PipelineError("pipeline_error"): a camera model nerfstudio cannot read.
    """
    if cam.model_name not in NERFSTUDIO_CAMERA_MODELS:
        raise PipelineError("pipeline_error", details={
            "reason": "transforms.json needs a camera model nerfstudio reads",
            "camera_model": cam.model_name})
    ns_model, renames = NERFSTUDIO_CAMERA_MODELS[cam.model_name]
    names = [n.strip() for n in cam.params_info.split(",")]
    vals = {n: float(v) for n, v in zip(names, cam.params, strict=True)}
    out: dict[str, Any] = {
        "w": int(cam.width), "h": int(cam.height),
        "fl_x": vals.get("fx", vals.get("f")), "fl_y": vals.get("fy", vals.get("f")),
        "cx": vals["cx"], "cy": vals["cy"], "camera_model": ns_model}
    out.update(dict.fromkeys(NERFSTUDIO_TERMS[ns_model], 0.0))
    out.update({ns_name: vals[colmap_name] for colmap_name, ns_name in renames.items()})
    return out


def transform_matrix(image: pycolmap.Image, applied: np.ndarray) -> np.ndarray:
    """The image's 4x4 ``world_from_cam`` in OpenGL camera axes and nerfstudio's world frame
    (``applied`` = the 3x4 ``applied_transform``)."""
    cam_from_world = np.eye(4)
    cam_from_world[:3, :] = image.cam_from_world().matrix()
    world_from_cam = np.linalg.inv(cam_from_world) @ OPENCV_TO_OPENGL
    ns_from_world = np.eye(4)
    ns_from_world[:3, :] = applied
    return np.asarray(ns_from_world @ world_from_cam)


def nerfstudio_scene(model_dir: str | os.PathLike[str], image_prefix: str = "images/",
                     ply_name: str = "sparse_pc.ply") -> NerfstudioScene:
    """The model in ``model_dir`` as nerfstudio's ``transforms.json`` plus its points.

    One camera: its intrinsics (:func:`intrinsics`) at the top level, as nerfstudio's
    ``colmap_to_json`` writes them. Several cameras (photo sets, issue 15): each frame carries
    its own camera's ``w, h, fl_x, fl_y, cx, cy`` and distortion terms (nerfstudio's
    per-frame intrinsics, read by its ``nerfstudio`` dataparser when the top level lacks them),
    and the top level keeps only ``camera_model``, which nerfstudio reads there (all cameras
    must map to the same nerfstudio model; the export's undistorted model is all PINHOLE).

    Args:
        model_dir: a COLMAP model.
        image_prefix: prefix of every ``file_path`` (relative to ``transforms.json``).
        ply_name: ``ply_file_path`` (the points, written by the caller).

    Returns:
        frames sorted by image name, each ``{"file_path": prefix + name,
        "transform_matrix": 4x4, "colmap_im_id": int}`` (+ intrinsics with several cameras).

    Raises:
        PipelineError("pipeline_error"): a camera model nerfstudio cannot read, or cameras
            that map to different nerfstudio camera models.
    """
    rec = pycolmap.Reconstruction(str(model_dir))
    ids = sorted(rec.reg_image_ids(), key=lambda i: rec.images[i].name)
    used = sorted({int(rec.images[i].camera_id) for i in ids}) or sorted(rec.cameras)
    per_cam = {cid: intrinsics(rec.cameras[cid]) for cid in used}
    models = sorted({k["camera_model"] for k in per_cam.values()})
    if len(models) != 1:
        raise PipelineError("pipeline_error", details={
            "reason": "transforms.json needs one nerfstudio camera model for every frame",
            "camera_models": models})
    applied = np.array(NERFSTUDIO_APPLIED_TRANSFORM)
    several = len(per_cam) > 1
    out: dict[str, Any] = ({"camera_model": models[0]} if several
                           else dict(per_cam[used[0]]))
    out["frames"] = [
        {"file_path": f"{image_prefix}{rec.images[i].name}",
         "transform_matrix": transform_matrix(rec.images[i], applied).tolist(),
         "colmap_im_id": int(i),
         **(per_cam[int(rec.images[i].camera_id)] if several else {})}
        for i in ids]
    out["applied_transform"] = applied.tolist()
    out["ply_file_path"] = ply_name
    pts = list(rec.points3D.values())
    xyz = np.array([pt.xyz for pt in pts], dtype=np.float64).reshape(-1, 3)
    rgb = np.array([pt.color for pt in pts], dtype=np.uint8).reshape(-1, 3)
    return NerfstudioScene(out, xyz @ applied[:, :3].T + applied[:, 3], rgb)
