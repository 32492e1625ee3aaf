"""Sparse reconstruction with pycolmap: SIFT features, sequential matching, incremental mapping.

This is the ONLY module of the package that imports :mod:`pycolmap`; import it lazily (inside a
pipeline stage) so that light commands such as ``probe`` stay fast. Each step is a plain function
of ``(paths, options)`` in the style of pycolmap's own Python examples. Progress callbacks have
the signature ``progress(fraction: float in [0, 1], message: str)``.

Facts used here (checked on pycolmap 4.2.1, CPU build):

* ``extract_features`` with ``CameraMode.SINGLE`` creates one camera per call; later calls share
  it when ``ImageReaderOptions.existing_camera_id`` names it, so extraction can run in chunks of
  images (real progress) and still end with one camera in the database.
* ``match_image_pairs`` on the pairs of ``SequentialPairGenerator`` gives the same verified pairs
  as ``match_sequential`` and can run in chunks (real progress).
* ``incremental_mapping`` returns ``{}`` (no exception) on an empty database or a failed
  initialisation, often returns several models, and model 0 is frequently a 2-image fragment.
  It writes model ``k`` to ``output_path/k``.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pycolmap

from .config import Preset
from .errors import PipelineError

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]

#: Camera model shared by all frames of a video (one physical camera, fixed zoom):
#: SIMPLE_RADIAL = f, cx, cy, k (COLMAP ``src/colmap/sensor/models.h``), COLMAP's default.
CAMERA_MODEL = "SIMPLE_RADIAL"
#: Sequential matching: each image is matched with the next ``SEQUENTIAL_OVERLAP`` images and,
#: with quadratic overlap, images 2**k further (COLMAP's defaults, ``SequentialPairingOptions``).
SEQUENTIAL_OVERLAP = 10
#: Images per ``extract_features`` call. Measured on 2 cores, 30 frames 848x480: one call 11.0 s,
#: chunks of 10: 11.1 s, chunks of 6: 11.6 s, chunks of 3: 13.9 s (per-call start-up cost).
MIN_IMAGES_PER_CHUNK = 5
TARGET_CHUNKS = 10
#: Image pairs per ``match_image_pairs`` call (119 sequential pairs for 30 frames: one call
#: 4.0-4.9 s, four chunks 5.7 s).
MIN_PAIRS_PER_CHUNK = 30
#: Pair budget of :func:`match_wide` (all pairs of 50 frames = 1225; about 35 s on 2 CPU cores
#: at 2048 features).
WIDE_MAX_PAIRS = 1225
#: Plausible intrinsics (a registered-image count alone does not prove a model right): focal
#: length between these multiples of the longest image side (0.3 ~ 118 deg horizontal field of
#: view for a pinhole, GoPro wide modes fitted with SIMPLE_RADIAL give about 0.6-0.8; 5 ~ 11 deg)
#: and radial distortion |k| <= MAX_ABS_RADIAL (COLMAP's own ``max_extra_param`` is 1.0).
#: Seen on the Karma drone clip: bogus models at f = 46 px, 149 px, 10204 px or k = 256.
PLAUSIBLE_FOCAL_RATIO = (0.3, 5.0)
MAX_ABS_RADIAL = 1.0
#: A best model with fewer registered images than max(MIN_REGISTERED_IMAGES,
#: ceil(MIN_REGISTERED_FRACTION * frames)) is a failure: an empty or 2-image model never is a
#: result.
MIN_REGISTERED_IMAGES = 3
MIN_REGISTERED_FRACTION = 0.2

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def _noop(fraction: float, message: str) -> None:  # pragma: no cover - trivial
    pass


def _device(use_gpu: bool) -> pycolmap.Device:
    return pycolmap.Device.cuda if (use_gpu and pycolmap.has_cuda) else pycolmap.Device.cpu


def _chunks(items: list, n_min: int, target: int) -> list[list]:
    size = max(n_min, math.ceil(len(items) / max(1, target)))
    return [items[i:i + size] for i in range(0, len(items), size)]


def list_images(image_dir: str | os.PathLike) -> list[str]:
    """Sorted image file names (``.jpg``/``.jpeg``/``.png``) directly inside ``image_dir``."""
    return sorted(p.name for p in Path(image_dir).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def extract_features(database_path: str | os.PathLike, image_dir: str | os.PathLike,
                     preset: Preset, use_gpu: bool = False,
                     progress: Progress | None = None, num_threads: int = -1) -> dict:
    """Detect SIFT features (Lowe, IJCV 2004; COLMAP's SIFT) in every image of ``image_dir``.

    One shared camera (``CameraMode.SINGLE``, model ``CAMERA_MODEL``, focal length initialised
    from COLMAP's default 1.2 x max(width, height)). Images are downscaled internally to
    ``preset.max_image_size`` px (longest side) and keep at most ``preset.max_num_features``
    features. Extraction runs in chunks of images (first chunk creates the camera, later ones
    reuse it through ``existing_camera_id``) so that ``progress`` reports real work.

    Args:
        database_path: COLMAP database (created; should not already hold these images).
        image_dir: folder of frames.
        preset: quality preset.
        use_gpu: use CUDA SIFT when pycolmap was built with CUDA (ignored otherwise).
        progress: ``progress(fraction, message)``.
        num_threads: CPU threads (-1 = all cores).

    Returns:
        ``{"images": int, "cameras": int, "keypoints": int, "mean_keypoints_per_image": float,
        "images_without_features": int, "device": "cpu"|"cuda"}`` read from the database.

    Raises:
        PipelineError("too_few_frames"): ``image_dir`` holds no image.
        PipelineError("pipeline_error"): the database does not end with exactly one camera.
    """
    progress = progress or _noop
    names = list_images(image_dir)
    if not names:
        raise PipelineError("too_few_frames", details={"images": 0})
    device = _device(use_gpu)
    ext = pycolmap.FeatureExtractionOptions()
    ext.max_image_size = int(preset.max_image_size)
    ext.sift.max_num_features = int(preset.max_num_features)
    ext.num_threads = num_threads
    ext.use_gpu = device == pycolmap.Device.cuda
    camera_id = -1
    done = 0
    progress(0.0, f"Detecting features in images (0/{len(names)})...")
    for chunk in _chunks(names, MIN_IMAGES_PER_CHUNK, TARGET_CHUNKS):
        reader = pycolmap.ImageReaderOptions()
        reader.camera_model = CAMERA_MODEL
        if camera_id != -1:
            reader.existing_camera_id = camera_id
        pycolmap.extract_features(database_path, image_dir, image_names=chunk,
                                  camera_mode=pycolmap.CameraMode.SINGLE,
                                  reader_options=reader, extraction_options=ext, device=device)
        if camera_id == -1:
            db = pycolmap.Database.open(database_path)
            try:
                cams = db.read_all_cameras()
            finally:
                db.close()
            if cams:
                camera_id = cams[0].camera_id
        done += len(chunk)
        progress(done / len(names), f"Detecting features in images ({done}/{len(names)})...")
    db = pycolmap.Database.open(database_path)
    try:
        images = db.read_all_images()
        per_image = [db.num_keypoints_for_image(im.image_id) for im in images]
        num_cameras = db.num_cameras()
    finally:
        db.close()
    if num_cameras != 1:
        raise PipelineError("pipeline_error", details={
            "reason": "feature extraction did not end with one shared camera",
            "cameras": num_cameras})
    return {
        "images": len(images),
        "cameras": num_cameras,
        "keypoints": int(sum(per_image)),
        "mean_keypoints_per_image": round(sum(per_image) / max(1, len(per_image)), 1),
        "images_without_features": int(sum(1 for n in per_image if n == 0)),
        "device": device.name,
    }


def _match_pairs(database_path, pairs: list[tuple[int, int]], id_to_name: dict[int, str],
                 use_gpu: bool, progress: Progress, num_threads: int) -> dict:
    """Match and verify ``pairs`` (image ids) in chunks with ``match_image_pairs``."""
    device = _device(use_gpu)
    matching = pycolmap.FeatureMatchingOptions()
    matching.num_threads = num_threads
    matching.use_gpu = device == pycolmap.Device.cuda
    done = 0
    progress(0.0, f"Matching image pairs (0/{len(pairs)})...")
    fd, list_path = tempfile.mkstemp(prefix=".pairs_", suffix=".txt",
                                     dir=os.path.dirname(os.path.abspath(database_path)))
    os.close(fd)
    try:
        for chunk in _chunks(pairs, MIN_PAIRS_PER_CHUNK, TARGET_CHUNKS):
            with open(list_path, "w", encoding="utf-8") as fh:
                for a, b in chunk:
                    fh.write(f"{id_to_name[a]} {id_to_name[b]}\n")
            imported = pycolmap.ImportedPairingOptions()
            imported.match_list_path = list_path
            pycolmap.match_image_pairs(database_path, matching_options=matching,
                                       pairing_options=imported, device=device)
            done += len(chunk)
            progress(done / len(pairs), f"Matching image pairs ({done}/{len(pairs)})...")
    finally:
        os.unlink(list_path)
    db = pycolmap.Database.open(database_path)
    try:
        return {
            "image_pairs": len(pairs),
            "matched_pairs": db.num_matched_image_pairs(),
            "verified_pairs": db.num_verified_image_pairs(),
            "inlier_matches": db.num_inlier_matches(),
            "device": device.name,
        }
    finally:
        db.close()


def match_sequential(database_path: str | os.PathLike, use_gpu: bool = False,
                     progress: Progress | None = None, num_threads: int = -1,
                     overlap: int = SEQUENTIAL_OVERLAP) -> dict:
    """Match SIFT features between frames that are close in time, then verify geometrically.

    Pairs come from COLMAP's ``SequentialPairGenerator`` (each image with the next ``overlap``
    images plus quadratic overlap 2**k; images ordered by name = time order); they are matched
    in chunks with ``match_image_pairs`` (brute-force SIFT matching with ratio test 0.8 and
    cross-check, then two-view geometry verification with RANSAC: COLMAP defaults).

    Returns:
        ``{"image_pairs": int`` (pairs matched by this call), ``"matched_pairs": int,
        "verified_pairs": int, "inlier_matches": int`` (database totals),
        ``"device": "cpu"|"cuda"}``.

    Raises:
        PipelineError("reconstruction_failed"): no image pair could be formed (< 2 images).
    """
    progress = progress or _noop
    pairing = pycolmap.SequentialPairingOptions()
    pairing.overlap = int(overlap)
    pairing.loop_detection = False  # needs a vocabulary tree download
    db = pycolmap.Database.open(database_path)
    try:
        pairs = pycolmap.SequentialPairGenerator(pairing, db).all_pairs()
        id_to_name = {im.image_id: im.name for im in db.read_all_images()}
    finally:
        db.close()
    if not pairs:
        raise PipelineError("reconstruction_failed", details={
            "reason": "no image pairs to match", "images": len(id_to_name)})
    return _match_pairs(database_path, pairs, id_to_name, use_gpu, progress, num_threads)


def wide_distances(n: int, max_pairs: int) -> list[int]:
    """Name-order distances for :func:`match_wide`: all of 1..n-1 when the n*(n-1)/2 pairs fit
    in ``max_pairs``, else the largest set of m evenly spaced distances (rounded
    ``linspace(1, n-1, m)``) whose pairs (n - d per distance d) fit."""
    if n < 2:
        return []
    if n * (n - 1) // 2 <= max_pairs:
        return list(range(1, n))
    best = [1]
    for m in range(2, n):
        ds = sorted({round(1 + (n - 2) * j / (m - 1)) for j in range(m)})
        if sum(n - d for d in ds) > max_pairs:
            break
        best = ds
    return best


def match_wide(database_path: str | os.PathLike, use_gpu: bool = False,
               progress: Progress | None = None, num_threads: int = -1,
               max_pairs: int = WIDE_MAX_PAIRS) -> dict:
    """Match the image pairs that sequential matching skipped, up to a pair budget.

    When all pairs fit in ``max_pairs`` (30 frames: 435 pairs, 50 frames: 1225) every pair is
    used (exhaustive matching); otherwise all pairs whose name-order distance is in a set of
    evenly spaced distances from 1 to n-1, as many as the budget allows (:func:`wide_distances`).
    Pairs already in the database are skipped. Wide-baseline pairs give the mapper an initial
    pair with enough triangulation angle on slow, distant footage (the Karma drone clip fails
    with sequential pairs alone and registers 30/30 with all pairs).

    Returns:
        as :func:`match_sequential`, ``image_pairs`` counting only the new pairs (0: nothing to do).
    """
    progress = progress or _noop
    db = pycolmap.Database.open(database_path)
    try:
        id_to_name = {im.image_id: im.name for im in db.read_all_images()}
        ids = sorted(id_to_name, key=lambda i: id_to_name[i])
        pairs = [(ids[i], ids[i + d]) for d in wide_distances(len(ids), max_pairs)
                 for i in range(len(ids) - d) if not db.exists_matches(ids[i], ids[i + d])]
    finally:
        db.close()
    if not pairs:
        progress(1.0, "No further image pairs to match")
        db = pycolmap.Database.open(database_path)
        try:
            return {"image_pairs": 0, "matched_pairs": db.num_matched_image_pairs(),
                    "verified_pairs": db.num_verified_image_pairs(),
                    "inlier_matches": db.num_inlier_matches(), "device": _device(use_gpu).name}
        finally:
            db.close()
    return _match_pairs(database_path, pairs, id_to_name, use_gpu, progress, num_threads)


def min_registered_images(num_frames: int) -> int:
    """Smallest acceptable best model: max(3, ceil(0.2 * num_frames)) registered images."""
    return max(MIN_REGISTERED_IMAGES, math.ceil(MIN_REGISTERED_FRACTION * num_frames))


def camera_plausible(cam: pycolmap.Camera) -> bool:
    """True when the focal length is within ``PLAUSIBLE_FOCAL_RATIO`` x the longest image side
    and every extra (distortion) parameter is within +-``MAX_ABS_RADIAL``."""
    side = max(cam.width, cam.height)
    lo, hi = PLAUSIBLE_FOCAL_RATIO
    return bool(not cam.has_bogus_params(lo, hi, MAX_ABS_RADIAL)
                and lo * side <= cam.mean_focal_length() <= hi * side)


def _model_stats(rec: pycolmap.Reconstruction) -> dict:
    return {
        "registered_images": int(rec.num_reg_images()),
        "points3d": int(rec.num_points3D()),
        "mean_reprojection_error_px": round(float(rec.compute_mean_reprojection_error()), 4),
        "mean_track_length": round(float(rec.compute_mean_track_length()), 4),
        "camera_plausible": all(camera_plausible(c) for c in rec.cameras.values()),
    }


def choose_model(models: list[dict]) -> dict | None:
    """The model with the most registered images (tie: more 3D points, then lower index) among
    those whose camera is plausible (:func:`camera_plausible`); ``None`` if there is none."""
    ok = [m for m in models if m.get("camera_plausible", True)]
    if not ok:
        return None
    return max(ok, key=lambda m: (m["registered_images"], m["points3d"], -m["index"]))


def map_incremental(database_path: str | os.PathLike, image_dir: str | os.PathLike,
                    output_dir: str | os.PathLike, num_frames: int,
                    progress: Progress | None = None, num_threads: int = -1,
                    random_seed: int = -1) -> tuple[list[dict], int]:
    """Incremental SfM (Schoenberger & Frahm, CVPR 2016: COLMAP's incremental mapper).

    Writes every model ``k`` to ``output_dir/<k>`` (binary COLMAP format). Progress is the
    largest number of images registered so far in one model (2 at ``initial_image_pair_callback``,
    +1 per ``next_image_callback``) over ``num_frames``: in [0, 1], never decreasing.

    Args:
        database_path, image_dir: inputs (features and verified matches must exist).
        output_dir: created; must not hold older models.
        num_frames: frames given to SfM (for progress and the failure threshold).
        num_threads, random_seed: -1 = all cores / random; fix both (1, seed) for exact numbers.

    Returns:
        ``(models, chosen)``: ``models`` = ``[{"index", "registered_images", "points3d",
        "mean_reprojection_error_px", "mean_track_length", "camera_plausible"}]`` sorted by
        index, and ``chosen`` = index picked by :func:`choose_model` (most registered images
        among models with plausible intrinsics; model 0 is often a 2-image fragment).

    Raises:
        PipelineError("reconstruction_failed"): mapping returned no model, no model has
            plausible intrinsics, or the best one has fewer than :func:`min_registered_images`
            registered images. Details give ``models``, ``best_registered``, ``required``,
            ``frames``, ``model_sizes`` and ``implausible_camera_models``.
    """
    progress = progress or _noop
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    opts = pycolmap.IncrementalPipelineOptions()
    opts.num_threads = num_threads
    opts.random_seed = random_seed
    opts.mapper.num_threads = num_threads
    opts.mapper.random_seed = random_seed
    opts.triangulation.random_seed = random_seed
    # The callbacks fire for every initialisation trial (failed trials are discarded), so the
    # count restarts at 2 on each initial pair; progress is the running maximum.
    state = {"registered": 0, "best": 0}

    def on_image(initial: bool) -> None:
        state["registered"] = 2 if initial else state["registered"] + 1
        if state["registered"] > state["best"]:
            state["best"] = state["registered"]
            n = min(state["best"], num_frames)
            progress(n / max(1, num_frames), f"Registering images ({n}/{num_frames})...")

    progress(0.0, "Initializing reconstruction...")
    recs = pycolmap.incremental_mapping(
        database_path, image_dir, out, options=opts,
        initial_image_pair_callback=lambda: on_image(True),
        next_image_callback=lambda: on_image(False))
    required = min_registered_images(num_frames)
    if not recs:  # {} without exception: empty database, no initial pair, flat video
        raise PipelineError("reconstruction_failed", details={
            "models": 0, "best_registered": 0, "required": required, "frames": num_frames})
    models = []
    for k in sorted(recs):
        stats = _model_stats(recs[k])
        models.append({"index": int(k), **stats})
        model_dir = out / str(k)
        if not (model_dir / "images.bin").exists():  # pycolmap writes them; be sure
            model_dir.mkdir(parents=True, exist_ok=True)
            recs[k].write_binary(str(model_dir))
    best = choose_model(models)
    if best is None or best["registered_images"] < required:
        raise PipelineError("reconstruction_failed", details={
            "models": len(models),
            "best_registered": best["registered_images"] if best else 0,
            "required": required, "frames": num_frames,
            "model_sizes": [m["registered_images"] for m in models],
            "implausible_camera_models": [m["index"] for m in models
                                          if not m["camera_plausible"]]})
    progress(1.0, f"Registered {best['registered_images']}/{num_frames} images")
    return models, best["index"]


def _camera_dict(cam: pycolmap.Camera) -> dict:
    names = [n.strip() for n in cam.params_info.split(",")]
    params = {n: round(float(v), 6) for n, v in zip(names, cam.params, strict=False)}
    return {"camera_id": int(cam.camera_id), "model": cam.model_name, "width": int(cam.width),
            "height": int(cam.height), "params": params}


def summarize_model(model_dir: str | os.PathLike) -> dict:
    """Statistics of the COLMAP model in ``model_dir``, all read from the reconstruction.

    Returns:
        ``{"registered_images": int, "points3d": int, "observations": int,
        "mean_reprojection_error_px": float, "mean_track_length": float`` (observations per 3D
        point), ``"mean_observations_per_image": float`` (per registered image),
        ``"camera": {"camera_id", "model", "width", "height", "params": {name: value}}``
        (params named by COLMAP, e.g. SIMPLE_RADIAL ``f, cx, cy, k`` in px / unitless),
        ``"cameras": [...]`` (all, when more than one), ``"registered_image_names": [str]``
        (sorted)}``.

    Raises:
        ValueError / RuntimeError from pycolmap when ``model_dir`` holds no readable model.
    """
    rec = pycolmap.Reconstruction(str(model_dir))
    reg_ids = set(rec.reg_image_ids())
    names = sorted(rec.images[i].name for i in reg_ids)
    cams = [_camera_dict(c) for _, c in sorted(rec.cameras.items())]
    out = _model_stats(rec)
    out.update({
        "observations": int(rec.compute_num_observations()),
        "mean_observations_per_image":
            round(float(rec.compute_mean_observations_per_reg_image()), 4),
        "camera": cams[0] if cams else None,
        "registered_image_names": names,
    })
    if len(cams) > 1:
        out["cameras"] = cams
    return out


def write_model_files(model_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      binary: bool = True, text: bool = True) -> list[Path]:
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


def export_ply(model_dir: str | os.PathLike, ply_path: str | os.PathLike) -> int:
    """Write the model's 3D points as a binary little-endian PLY with ``x y z`` (float) and
    ``red green blue`` (uchar) per vertex (``Reconstruction.export_PLY``). Returns the count."""
    rec = pycolmap.Reconstruction(str(model_dir))
    rec.export_PLY(str(ply_path))
    return int(rec.num_points3D())


def _nvml_device_count() -> int | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver / no GPU: report, never crash
        return 0


def gpu_capabilities() -> dict:
    """What this process can use for GPU stages.

    Returns:
        ``{"pycolmap_version": str, "colmap_version": str, "cuda": bool`` (pycolmap built with
        CUDA, ``pycolmap.has_cuda``), ``"device_count": int`` (NVIDIA GPUs usable by pycolmap:
        0 without CUDA support or without a driver), ``"nvml_device_count": int | None`` (GPUs
        the driver reports through NVML, ``None`` without nvidia-ml-py), ``"dense_possible":
        bool`` (PatchMatch stereo needs CUDA and a device)}. Never raises.
    """
    cuda = bool(getattr(pycolmap, "has_cuda", False))
    nvml = _nvml_device_count()
    count = (nvml or 0) if cuda else 0
    return {
        "pycolmap_version": getattr(pycolmap, "__version__", "unknown"),
        "colmap_version": str(getattr(pycolmap, "COLMAP_version", "unknown")),
        "cuda": cuda,
        "device_count": int(count),
        "nvml_device_count": nvml,
        "dense_possible": bool(cuda and count > 0),
    }



def clear_matches(database_path: str | os.PathLike) -> None:
    """Delete all matches and two-view geometries from the database (keeps features)."""
    db = pycolmap.Database.open(database_path)
    try:
        db.clear_matches()
        db.clear_two_view_geometries()
    finally:
        db.close()
