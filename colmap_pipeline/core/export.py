"""Artifacts of a finished sparse reconstruction: PLY point cloud, zipped COLMAP model, thumbnail.

Every artifact is written under a temporary name in the same folder and moved into place with
``os.replace`` (atomic on POSIX), so a reader never sees a half-written file. pycolmap is only
reached through :mod:`colmap_pipeline.reconstruction` (imported lazily).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from pathlib import Path

import cv2

#: Width (px) of ``thumbnail.jpg``; height follows the aspect ratio.
THUMBNAIL_WIDTH = 480
THUMBNAIL_JPEG_QUALITY = 85

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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def describe_artifact(path: str | os.PathLike) -> dict:
    """``{"name", "bytes", "media_type", "sha256"}`` of an artifact file."""
    p = Path(path)
    return {"name": p.name, "bytes": p.stat().st_size,
            "media_type": MEDIA_TYPES.get(p.suffix.lower(), "application/octet-stream"),
            "sha256": _sha256(p)}


def _write_ply(model_dir: Path, out: Path) -> None:
    from . import reconstruction

    tmp = _tmp_path(out)
    try:
        reconstruction.export_ply(model_dir, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _write_zip(model_dir: Path, out: Path) -> None:
    from . import reconstruction

    tmp = _tmp_path(out)
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".model_") as d:
            files = reconstruction.write_model_files(model_dir, d, binary=True, text=True)
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
                for f in files:
                    zf.write(f, arcname=f"sparse/0/{f.name}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _write_thumbnail(frames_dir: Path, names: list[str], out: Path) -> bool:
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
        tmp = _tmp_path(out)
        try:
            tmp.write_bytes(buf.tobytes())
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
        return True
    return False


def export_model(model_dir: str | os.PathLike, frames_dir: str | os.PathLike,
                 artifacts_dir: str | os.PathLike) -> list[dict]:
    """Write the artifacts of the COLMAP model in ``model_dir`` into ``artifacts_dir``.

    * ``sparse.ply``: binary little-endian PLY, one vertex per 3D point with ``x y z`` (float,
      model units) and ``red green blue`` (uchar) (pycolmap ``Reconstruction.export_PLY``).
    * ``model.zip``: ``sparse/0/`` with the model in COLMAP binary (``cameras.bin``,
      ``images.bin``, ``points3D.bin``, plus ``rigs.bin``/``frames.bin`` of the COLMAP >= 3.12
      format) and text (``.txt``) form; ``colmap gui`` / ``pycolmap.Reconstruction`` read it.
    * ``thumbnail.jpg``: the middle registered frame (by name = time order), ``THUMBNAIL_WIDTH``
      px wide. Skipped if no registered frame can be read.
    * ``transforms.json`` + ``sparse_pc.ply``: nerfstudio's format (:func:`write_nerfstudio`).
    * ``gaussian_splatting.zip``: undistorted images + PINHOLE COLMAP model
      (:func:`_write_splatting_zip`).

    Returns:
        ``[{"name": str, "bytes": int, "media_type": str, "sha256": str (hex)}]`` in the order
        above.

    Raises:
        ValueError / RuntimeError from pycolmap if ``model_dir`` holds no readable model;
        OSError on write errors.
    """
    from . import reconstruction

    model_dir, frames_dir, art = Path(model_dir), Path(frames_dir), Path(artifacts_dir)
    art.mkdir(parents=True, exist_ok=True)
    _write_ply(model_dir, art / "sparse.ply")
    _write_zip(model_dir, art / "model.zip")
    names = reconstruction.summarize_model(model_dir)["registered_image_names"]
    outputs = [art / "sparse.ply", art / "model.zip"]
    if _write_thumbnail(frames_dir, names, art / "thumbnail.jpg"):
        outputs.append(art / "thumbnail.jpg")
    outputs += write_nerfstudio(model_dir, art)
    _write_splatting_zip(model_dir, frames_dir, art / SPLATTING_ZIP)
    outputs.append(art / SPLATTING_ZIP)
    return [describe_artifact(p) for p in outputs]


#: Name of the Gaussian-splatting-ready artifact.
SPLATTING_ZIP = "gaussian_splatting.zip"


def _write_binary_ply(path: Path, xyz, rgb) -> None:
    """Binary little-endian PLY: ``x y z`` float32 and ``red green blue`` uchar per vertex."""
    import numpy as np

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
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(header.encode("ascii"))
            fh.write(rec.tobytes())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_nerfstudio(model_dir: str | os.PathLike, artifacts_dir: str | os.PathLike) -> list[Path]:
    """Write ``transforms.json`` (nerfstudio's format) and ``sparse_pc.ply`` (the model's
    points, in the same world frame: ``applied_transform`` applied, as nerfstudio's
    ``create_ply_from_colmap``) into ``artifacts_dir``.

    ``frames[i].file_path`` is ``images/<frame name>``; intrinsics and camera-to-world
    matrices follow :func:`reconstruction.nerfstudio_transforms` (OpenGL camera axes).

    Returns:
        the two paths. Raises ``PipelineError("pipeline_error")`` for a camera model that
        nerfstudio cannot read.
    """
    import json

    from . import reconstruction

    art = Path(artifacts_dir)
    transforms, xyz, rgb = reconstruction.nerfstudio_transforms(model_dir)
    ply = art / "sparse_pc.ply"
    _write_binary_ply(ply, xyz, rgb)
    out = art / "transforms.json"
    tmp = _tmp_path(out)
    try:
        tmp.write_text(json.dumps(transforms, indent=2), encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return [out, ply]


def _write_splatting_zip(model_dir: Path, frames_dir: Path, out: Path) -> None:
    """``gaussian_splatting.zip`` = ``images/<name>`` (undistorted) + ``sparse/0/`` (PINHOLE
    model, binary and text): what 3D Gaussian splatting's ``train.py -s`` and gsplat read."""
    from . import reconstruction

    tmp = _tmp_path(out)
    try:
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".undistort_") as d:
            d = Path(d)
            reconstruction.undistort_model(model_dir, frames_dir, d / "u")
            files = reconstruction.write_model_files(d / "u" / "sparse", d / "m",
                                                     binary=True, text=True)
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                for f in sorted((d / "u" / "images").iterdir()):
                    zf.write(f, arcname=f"images/{f.name}")
                for f in files:
                    zf.write(f, arcname=f"sparse/0/{f.name}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
