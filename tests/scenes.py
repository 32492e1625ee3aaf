"""Synthetic SfM scenes for the reconstruction tests (a helper module, not a test file).

Scenes come from ``pycolmap.synthesize_dataset``: a random scene, exact keypoints and SIFT-like
descriptors that real matching finds again. Each builder fixes pycolmap's random seed, so a test
with one thread and a fixed mapper seed gets the same numbers every run.
"""
from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pycolmap

from colmap_pipeline.core import sfm_features as sf
from colmap_pipeline.core import sfm_matching as sfmatch


def synthetic_options(n: int, points: int, camera: tuple[str, list[float]] | None = None,
                      size: tuple[int, int] = (640, 480)) -> pycolmap.SyntheticDatasetOptions:
    """One rig, one camera (default SIMPLE_RADIAL; ``camera`` = (model name, params)),
    ``n`` frames, ``points`` 3D points."""
    opts = pycolmap.SyntheticDatasetOptions()
    opts.num_rigs = 1
    opts.num_cameras_per_rig = 1
    opts.num_frames_per_rig = n
    opts.num_points3D = points
    opts.camera_width, opts.camera_height = size
    if camera is not None:
        opts.camera_model_id = getattr(pycolmap.CameraModelId, camera[0])
        opts.camera_params = list(camera[1])
    return opts


def synth_database(tmp: Path, n: int, points: int, seed: int = 1,
                   camera: tuple[str, list[float]] | None = None,
                   size: tuple[int, int] = (640, 480)) -> tuple[Path, pycolmap.Reconstruction]:
    """``tmp/db.db``: a database of ``n`` images with all pairs matched, and the true scene.
    Also creates the (empty) image folder ``tmp/img``."""
    pycolmap.set_random_seed(seed)
    (tmp / "img").mkdir(parents=True, exist_ok=True)
    with pycolmap.Database.open(str(tmp / "db.db")) as db:
        rec = pycolmap.synthesize_dataset(synthetic_options(n, points, camera, size), db)
    return tmp / "db.db", rec


def synth(tmp: Path, n: int, points: int, seed: int = 1,
          camera: tuple[str, list[float]] | None = None,
          size: tuple[int, int] = (640, 480)) -> Path:
    """:func:`synth_database` without the scene."""
    return synth_database(tmp, n, points, seed, camera, size)[0]


def names_in_order(dbp: Path) -> list[int]:
    """Image ids of the database sorted by name (= time order)."""
    names = sf.image_names(dbp)
    return sorted(names, key=lambda i: names[i])


def fail_pairs(dbp: Path, pairs: list[tuple[int, int]]) -> None:
    """Store ``pairs`` as tried and failed verification: present, with no matches (as COLMAP
    stores failed pairs)."""
    with pycolmap.Database.open(str(dbp)) as db:
        for a, b in pairs:
            db.write_matches(a, b, np.zeros((0, 2), dtype=np.uint32))
            db.write_two_view_geometry(a, b, pycolmap.TwoViewGeometry())


def broken_chain(tmp: Path, n: int = 12) -> Path:
    """Matches only between neighbours in name order, with the middle link failed."""
    dbp = synth(tmp, n, 400)
    sfmatch.clear_matches(dbp)
    ids = names_in_order(dbp)
    gap = (ids[n // 2 - 1], ids[n // 2])
    chain = [(a, b) for a, b in zip(ids, ids[1:], strict=False) if (a, b) != gap]
    sfmatch.match_new_pairs(dbp, chain, num_threads=1)
    fail_pairs(dbp, [gap])
    return dbp


def lateral_sweep(tmp: Path, n: int = 10, f: float = 400.0, noise_px: float = 0.5,
                  seed: int = 1) -> Path:
    """A camera (SIMPLE_RADIAL, f px, 640x480, no distortion) sliding 14 m sideways past a
    slab of points 40-44 m away, keypoints with ``noise_px`` Gaussian noise. The tracks are
    those of ``synthesize_dataset``; only the geometry is replaced. Pure translation past a
    shallow scene leaves the focal length unobservable (it trades off against depth)."""
    w, h = 640, 480
    dbp, rec = synth_database(tmp, n, 400, seed=seed,
                              camera=("SIMPLE_RADIAL", [f, w / 2, h / 2, 0.0]))
    rng = np.random.default_rng(seed)
    half = 40.0 / f * np.array([w / 2, h / 2]) * 0.8  # inside the view from every position
    xyz = {pid: np.array([rng.uniform(-half[0], half[0]), rng.uniform(-half[1], half[1]),
                          rng.uniform(40.0, 44.0)]) for pid in rec.points3D}
    with pycolmap.Database.open(str(dbp)) as db:
        for k, iid in enumerate(sorted(rec.images)):
            kps = np.array(db.read_keypoints(iid), dtype=np.float32)
            for j, p2 in enumerate(rec.images[iid].points2D):
                if p2.point3D_id in xyz:
                    x = xyz[p2.point3D_id] - np.array([14.0 * k / (n - 1), 0.0, 0.0])
                    kps[j, 0] = f * x[0] / x[2] + w / 2 + rng.normal(0, noise_px)
                    kps[j, 1] = f * x[1] / x[2] + h / 2 + rng.normal(0, noise_px)
            db.update_keypoints(iid, kps)
    return dbp


def copy_images(src: Path, dst: Path, image_ids: list[int]) -> None:
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


def empty_database_like(src: Path, dst: Path) -> None:
    """``dst``: a COLMAP database with ``src``'s rigs and cameras and no image."""
    with pycolmap.Database.open(str(dst)):
        pass  # creates COLMAP's schema
    with closing(sqlite3.connect(dst)) as c, closing(sqlite3.connect(src)) as s:
        for table in ("rigs", "rig_sensors", "cameras"):
            rows = s.execute(f"SELECT * FROM {table}").fetchall()
            if rows:
                c.executemany(f"INSERT INTO {table} VALUES ({','.join('?' * len(rows[0]))})",
                              rows)
        c.commit()


def synthetic_model(tmp: Path, model: str, params: list[float], n: int = 8,
                    points: int = 300, size: tuple[int, int] = (640, 480)) -> Path:
    """A synthetic COLMAP model (one camera) written to ``tmp/model``."""
    rec = pycolmap.synthesize_dataset(synthetic_options(n, points, (model, params), size))
    out = tmp / "model"
    out.mkdir()
    rec.write_binary(str(out))
    return out


def write_frames(model_dir: Path, frames: Path, seed: int = 0) -> None:
    """Random-texture frames of the model's images at the camera's size (``frames/<name>``),
    written through ``pycolmap.Bitmap`` (OpenCV writes in a process that has loaded pycolmap
    aborted once, tests/test_dense.py)."""
    rec = pycolmap.Reconstruction(str(model_dir))
    frames.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for im in rec.images.values():
        cam = rec.cameras[im.camera_id]
        img = rng.integers(0, 255, (cam.height, cam.width, 3), dtype=np.uint8)
        pycolmap.Bitmap.from_array(img).write(str(frames / im.name))


def synthetic_workspace(root: Path, database: Path, sharpness: float = 300.0,
                        warnings: list[dict] | None = None, seed: int = 0) -> Path:
    """A job workspace whose frames, features and matching stages are done: ``database``
    copied in, one random-texture frame per database image (at the camera's size), and a
    ``frames.json`` naming them with ``sharpness`` each and the frames stage's ``warnings``.
    The job's input is a video path that does not exist (the ``more_frames`` rung must stay
    off: monkeypatch ``ladder.STEPS``)."""
    from colmap_pipeline.layout import Workspace, write_job, write_json_atomic
    from colmap_pipeline.presets import Preset

    ws = Workspace(root)
    write_job(ws.root, root.parent / "absent.mp4", Preset("low", 30, 640, 512), random_seed=seed)
    ws.database.write_bytes(database.read_bytes())
    ws.frames_dir.mkdir()
    rng = np.random.default_rng(seed)
    with pycolmap.Database.open(str(ws.database)) as db:
        cams = {c.camera_id: c for c in db.read_all_cameras()}
        images = sorted(db.read_all_images(), key=lambda im: im.name)
    for im in images:
        cam = cams[im.camera_id]
        img = rng.integers(0, 255, (cam.height, cam.width, 3), dtype=np.uint8)
        pycolmap.Bitmap.from_array(img).write(str(ws.frames_dir / im.name))
    frames = [{"index": k, "file": im.name, "timestamp_s": k / 10, "sharpness": sharpness}
              for k, im in enumerate(images)]
    write_json_atomic(ws.frames_json, {
        "frames": frames, "warnings": warnings or [],
        "video": {"width": 640, "height": 480, "codec": "h264", "duration_s": 1.2}})
    for stage in ("frames", "features", "matching"):
        write_json_atomic(ws.checkpoint(stage), {"stage": stage, "elapsed_s": 1.0,
                                                 "summary": {"stage": stage}})
    return ws.root
