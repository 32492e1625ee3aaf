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
    return [describe_artifact(p) for p in outputs]
