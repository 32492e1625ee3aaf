"""Artifacts of a finished sparse reconstruction: point clouds, zipped models, nerfstudio files.

Every artifact is written under a temporary name in the same folder and moved into place with
``os.replace`` (atomic on POSIX), so a reader never sees a half-written file. Import lazily: it
loads pycolmap and OpenCV.

The nerfstudio files describe the UNDISTORTED images that ``gaussian_splatting.zip`` ships
(PINHOLE camera at the undistorted images' own size, no distortion terms): ``transforms.json``
and ``sparse_pc.ply`` are written as artifacts and inside the zip, beside ``images/``, so the
unpacked zip is a dataset nerfstudio (``ns-train ... --data``), gsplat and 3D Gaussian
splatting (``train.py -s``) all read as it is. A photo set may have several cameras (issue 15):
the undistortion builds one map per camera, the COLMAP models keep every camera, and
``transforms.json`` gives each frame its own camera's intrinsics
(:func:`.nerfstudio.nerfstudio_scene`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pycolmap

from ..results import Artifact
from .nerfstudio import nerfstudio_scene

PathLike = str | os.PathLike[str]

#: Width (px) of ``thumbnail.jpg``; height follows the aspect ratio.
THUMBNAIL_WIDTH = 480
THUMBNAIL_JPEG_QUALITY = 85
#: JPEG quality of the undistorted images in ``gaussian_splatting.zip`` (COLMAP's undistorter
#: writes about 100: 8 MiB for the sample's 30 frames, against 4 MiB at 95).
UNDISTORTED_JPEG_QUALITY = 95
#: Dense artifacts (issue 6), copied from ``WS/dense`` when the GPU stages made them.
DENSE_ARTIFACTS = ("fused.ply", "mesh.ply", "mesh.glb")
#: Name of the Gaussian-splatting / nerfstudio dataset artifact.
SPLATTING_ZIP = "gaussian_splatting.zip"
TRANSFORMS_JSON = "transforms.json"
SPARSE_PC_PLY = "sparse_pc.ply"

MEDIA_TYPES = {
    ".ply": "application/octet-stream",  # no registered IANA type for PLY
    ".zip": "application/zip",
    ".jpg": "image/jpeg",
    ".json": "application/json",
}


def _tmp_path(final: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; artifacts are ordinary readable files
    return Path(tmp)


class _Atomic:
    """``with _Atomic(final) as tmp:`` write ``tmp``; on success it replaces ``final``."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = _tmp_path(final)

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type: object, *_: object) -> None:
        try:
            if exc_type is None:
                os.replace(self.tmp, self.final)
        finally:
            self.tmp.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_artifact(path: PathLike) -> Artifact:
    """Name, size (bytes), media type and sha256 (hex) of an artifact file."""
    p = Path(path)
    return Artifact(name=p.name, bytes=p.stat().st_size,
                    media_type=MEDIA_TYPES.get(p.suffix.lower(), "application/octet-stream"),
                    sha256=_sha256(p))


def write_model_files(model_dir: PathLike, out_dir: PathLike, binary: bool = True,
                      text: bool = True) -> list[Path]:
    """Write the model of ``model_dir`` to ``out_dir`` as COLMAP binary and/or text files.

    Returns the written file paths (``cameras``, ``images``, ``points3D`` and, with COLMAP >=
    3.12 formats, ``rigs`` and ``frames``; ``.bin`` and/or ``.txt``).
    """
    rec = pycolmap.Reconstruction(str(model_dir))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.iterdir())
    if binary:
        rec.write_binary(str(out))
    if text:
        rec.write_text(str(out))
    return sorted(set(out.iterdir()) - before)


def _undistortion_maps(cam: pycolmap.Camera,
                       und: pycolmap.Camera) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.remap`` maps from ``cam``'s (distorted) image to ``und``'s (its undistorted
    PINHOLE version): for every pixel centre of the undistorted image, the distorted pixel that
    COLMAP's ``WarpImageBetweenCameras`` samples (COLMAP pixel coordinates have their origin
    at the top-left corner of the top-left pixel, OpenCV's at its centre: hence +-0.5)."""
    xs, ys = np.meshgrid(np.arange(und.width) + 0.5, np.arange(und.height) + 0.5)
    rays = und.cam_from_img(np.stack([xs.ravel(), ys.ravel()], axis=1))
    src = cam.img_from_cam(np.hstack([rays, np.ones((len(rays), 1))]), check_cheirality=False)
    shape = (und.height, und.width)
    return ((src[:, 0] - 0.5).reshape(shape).astype(np.float32),
            (src[:, 1] - 0.5).reshape(shape).astype(np.float32))


def undistort_model(model_dir: PathLike, image_dir: PathLike, out_dir: PathLike,
                    num_threads: int = -1) -> Path:
    """Undistort the registered images and the model to PINHOLE cameras, as COLMAP's image
    undistorter (``pycolmap.undistort_images``, output type COLMAP) does, into ``out_dir``:
    ``images/<name>`` and ``sparse/{cameras,images,points3D,...}.bin``, the input layout of
    3D Gaussian splatting (Kerbl et al., SIGGRAPH 2023) and of gsplat/nerfstudio's COLMAP
    loader. The undistorted images are larger than the frames (the undistorter keeps every
    source pixel). Returns ``out_dir/sparse``.

    Speed (issue 14): COLMAP undistorts the model and ONE image per camera; every other image
    is warped with ``cv2.remap`` (bilinear, black outside, as COLMAP) through a map computed
    once per camera (:func:`_undistortion_maps`) and written as JPEG quality
    :data:`UNDISTORTED_JPEG_QUALITY`, on ``num_threads`` threads (OpenCV releases the GIL).
    COLMAP warps each image by evaluating the camera model per pixel: 30 frames of 848x480
    took 2.2-2.4 s of CPU, the remap 7 ms per image; the pixels agree within JPEG noise
    (tests/test_exports.py)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rec = pycolmap.Reconstruction(str(model_dir))
    by_camera: dict[int, list[str]] = {}
    for i in sorted(rec.reg_image_ids(), key=lambda i: rec.images[i].name):
        by_camera.setdefault(int(rec.images[i].camera_id), []).append(rec.images[i].name)
    firsts = [names[0] for names in by_camera.values()]
    pycolmap.undistort_images(str(out), str(model_dir), str(image_dir), image_names=firsts,
                              jpeg_quality=UNDISTORTED_JPEG_QUALITY, num_threads=num_threads)
    und = pycolmap.Reconstruction(str(out / "sparse"))
    jobs = []
    for cid, names in by_camera.items():
        maps = _undistortion_maps(rec.cameras[cid], und.cameras[cid])
        jobs += [(name, maps) for name in names[1:]]

    def warp(job: tuple[str, tuple[np.ndarray, np.ndarray]]) -> None:
        name, (mx, my) = job
        img = cv2.imread(str(Path(image_dir) / name), cv2.IMREAD_COLOR)
        if img is None:
            raise OSError(f"cannot read image {name}")
        warped = cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                           borderValue=0)
        ok, buf = cv2.imencode(Path(name).suffix or ".jpg", warped,
                               [cv2.IMWRITE_JPEG_QUALITY, UNDISTORTED_JPEG_QUALITY])
        if not ok:
            raise OSError(f"cannot encode image {name}")
        dst = out / "images" / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(buf.tobytes())

    workers = (os.cpu_count() or 1) if num_threads <= 0 else num_threads
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(warp, jobs))
    return out / "sparse"


def _write_ply(model_dir: Path, out: Path) -> None:
    """Binary little-endian PLY of the model's points (``Reconstruction.export_PLY``)."""
    with _Atomic(out) as tmp:
        pycolmap.Reconstruction(str(model_dir)).export_PLY(str(tmp))


def _write_model_zip(model_dir: Path, out: Path) -> None:
    with _Atomic(out) as tmp, tempfile.TemporaryDirectory(dir=out.parent, prefix=".m_") as d:
        files = write_model_files(model_dir, d, binary=True, text=True)
        # level 1: the text model compresses about as well, in a fraction of the time
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for f in files:
                zf.write(f, arcname=f"sparse/0/{f.name}")


def _write_thumbnail(frames_dir: Path, names: list[str], out: Path) -> bool:
    """The middle registered frame (by name = time order), else the first readable one."""
    for name in ([names[len(names) // 2]] + names) if names else []:
        img = cv2.imread(str(frames_dir / name), cv2.IMREAD_COLOR)
        if img is None:
            continue
        h, w = img.shape[:2]
        if w > THUMBNAIL_WIDTH:
            img = cv2.resize(img, (THUMBNAIL_WIDTH, max(1, round(h * THUMBNAIL_WIDTH / w))),
                             interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_JPEG_QUALITY])
        if not ok:
            continue
        with _Atomic(out) as tmp:
            tmp.write_bytes(buf.tobytes())
        return True
    return False


def _write_binary_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """Binary little-endian PLY: ``x y z`` float32 and ``red green blue`` uchar per vertex."""
    n = len(xyz)
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {n}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    rec = np.empty(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                             ("r", "u1"), ("g", "u1"), ("b", "u1")])
    if n:
        rec["x"], rec["y"], rec["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
        rec["r"], rec["g"], rec["b"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    with _Atomic(path) as tmp, open(tmp, "wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(rec.tobytes())


def write_nerfstudio(model_dir: PathLike, out_dir: PathLike) -> list[Path]:
    """Write ``transforms.json`` (nerfstudio's format, :func:`.nerfstudio.nerfstudio_scene`:
    ``file_path`` = ``images/<name>``) and ``sparse_pc.ply`` (the model's points in the same
    world frame, as nerfstudio's ``create_ply_from_colmap``) into ``out_dir``.

    Returns:
        the two paths.

    Raises:
        PipelineError("pipeline_error"): a camera model that nerfstudio cannot read.
    """
    out = Path(out_dir)
    scene = nerfstudio_scene(model_dir, image_prefix="images/", ply_name=SPARSE_PC_PLY)
    _write_binary_ply(out / SPARSE_PC_PLY, scene.xyz, scene.rgb)
    with _Atomic(out / TRANSFORMS_JSON) as tmp:
        tmp.write_text(json.dumps(scene.transforms, indent=2), encoding="utf-8")
    return [out / TRANSFORMS_JSON, out / SPARSE_PC_PLY]


def write_splatting_dataset(model_dir: PathLike, frames_dir: PathLike,
                            artifacts_dir: PathLike) -> list[Path]:
    """Undistort the model once and write, into ``artifacts_dir``, ``transforms.json`` and
    ``sparse_pc.ply`` of the undistorted model (:func:`write_nerfstudio`) and
    ``gaussian_splatting.zip`` = ``images/<name>`` (undistorted) + ``sparse/0/`` (PINHOLE
    model, binary and text) + the same ``transforms.json`` and ``sparse_pc.ply``.

    Returns:
        ``[transforms.json, sparse_pc.ply, gaussian_splatting.zip]`` paths.
    """
    art = Path(artifacts_dir)
    with tempfile.TemporaryDirectory(dir=art, prefix=".undistort_") as d:
        und = undistort_model(model_dir, frames_dir, Path(d) / "u")
        model_files = write_model_files(und, Path(d) / "m", binary=True, text=True)
        ns_files = write_nerfstudio(und, art)
        out = art / SPLATTING_ZIP
        with _Atomic(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for f in sorted((Path(d) / "u" / "images").iterdir()):
                zf.write(f, arcname=f"images/{f.name}")
            for f in model_files:
                zf.write(f, arcname=f"sparse/0/{f.name}")
            for f in ns_files:
                zf.write(f, arcname=f.name)
    return [*ns_files, out]


def export_model(model_dir: PathLike, frames_dir: PathLike,
                 artifacts_dir: PathLike) -> list[Artifact]:
    """Write the artifacts of the COLMAP model in ``model_dir`` into ``artifacts_dir``.

    * ``sparse.ply``: binary little-endian PLY, one vertex per 3D point with ``x y z`` (float,
      model units) and ``red green blue`` (uchar) (pycolmap ``Reconstruction.export_PLY``).
    * ``model.zip``: ``sparse/0/`` with the model in COLMAP binary (``cameras.bin``,
      ``images.bin``, ``points3D.bin``, plus ``rigs.bin``/``frames.bin`` of the COLMAP >= 3.12
      format) and text (``.txt``) form; ``colmap gui`` / ``pycolmap.Reconstruction`` read it.
    * ``thumbnail.jpg``: the middle registered frame, ``THUMBNAIL_WIDTH`` px wide; skipped if
      no registered frame can be read.
    * ``transforms.json``, ``sparse_pc.ply``, ``gaussian_splatting.zip``: the undistorted
      dataset (:func:`write_splatting_dataset`).

    Returns:
        the artifacts in the order above.

    Raises:
        ValueError / RuntimeError from pycolmap if ``model_dir`` holds no readable model;
        OSError on write errors.
    """
    model_dir, frames_dir, art = Path(model_dir), Path(frames_dir), Path(artifacts_dir)
    art.mkdir(parents=True, exist_ok=True)
    _write_ply(model_dir, art / "sparse.ply")
    _write_model_zip(model_dir, art / "model.zip")
    outputs = [art / "sparse.ply", art / "model.zip"]
    rec = pycolmap.Reconstruction(str(model_dir))
    names = sorted(rec.images[i].name for i in rec.reg_image_ids())
    if _write_thumbnail(frames_dir, names, art / "thumbnail.jpg"):
        outputs.append(art / "thumbnail.jpg")
    outputs += write_splatting_dataset(model_dir, frames_dir, art)
    return [describe_artifact(p) for p in outputs]


def copy_dense_artifacts(dense_dir: PathLike, artifacts_dir: PathLike) -> list[Artifact]:
    """Copy :data:`DENSE_ARTIFACTS` that exist in ``dense_dir`` into ``artifacts_dir``
    (atomically each); none on a CPU machine, where the dense stages are skipped."""
    out = []
    for name in DENSE_ARTIFACTS:
        src = Path(dense_dir) / name
        if src.is_file():
            with _Atomic(Path(artifacts_dir) / name) as tmp:
                shutil.copyfile(src, tmp)
            out.append(describe_artifact(Path(artifacts_dir) / name))
    return out
