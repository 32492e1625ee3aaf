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

import contextlib
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pycolmap

from ..config import Preset
from ..errors import PipelineError

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
#: length between these multiples of the image width (0.25 ~ 127 deg horizontal field of view
#: for a pinhole, GoPro wide modes fitted with SIMPLE_RADIAL give about 0.6-0.8; 4 ~ 14 deg;
#: issue 4's bounds) and every distortion parameter |k| <= MAX_ABS_RADIAL (COLMAP's own
#: ``max_extra_param`` is 1.0). Seen on the Karma drone clip: bogus models at f = 46 px,
#: 149 px, 10204 px or k = 256.
PLAUSIBLE_FOCAL_RATIO = (0.25, 4.0)
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


def registration_progress(progress: Progress, num_frames: int) -> Callable[[bool], None]:
    """Callback for ``incremental_mapping``'s image callbacks that reports registered images.

    The returned ``on_image(initial)`` is called with ``True`` for an initial pair and ``False``
    for each next image. The callbacks fire for every initialisation trial (failed trials are
    discarded), so the count restarts at 2 on each initial pair; ``progress`` receives the
    running maximum as ``(registered / num_frames, message)`` and so never goes backwards.
    """
    state = {"registered": 0, "best": 0}

    def on_image(initial: bool) -> None:
        state["registered"] = 2 if initial else state["registered"] + 1
        if state["registered"] > state["best"]:
            state["best"] = state["registered"]
            n = min(state["best"], num_frames)
            progress(n / max(1, num_frames), f"Registering images ({n}/{num_frames})...")

    return on_image


def list_images(image_dir: str | os.PathLike) -> list[str]:
    """Sorted image file names (``.jpg``/``.jpeg``/``.png``) directly inside ``image_dir``."""
    return sorted(p.name for p in Path(image_dir).iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                  and not p.name.startswith("."))


def extract_features(database_path: str | os.PathLike, image_dir: str | os.PathLike,
                     preset: Preset, use_gpu: bool = False,
                     progress: Progress | None = None, num_threads: int = -1,
                     names: list[str] | None = None) -> dict:
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
        names: only these files of ``image_dir``, added to the database's existing camera
            (the ladder's ``more_frames`` rung); default: every image, new camera.

    Returns:
        ``{"images": int, "cameras": int, "keypoints": int, "mean_keypoints_per_image": float,
        "images_without_features": int, "device": "cpu"|"cuda"}`` read from the database.

    Raises:
        PipelineError("too_few_frames"): ``image_dir`` holds no image.
        PipelineError("pipeline_error"): the database does not end with exactly one camera.
    """
    progress = progress or _noop
    camera_id = -1
    if names is None:
        names = list_images(image_dir)
    else:
        names = list(names)
        camera_id = int(read_camera(database_path).camera_id) if names else -1
    if not names:
        raise PipelineError("too_few_frames", details={"images": 0})
    device = _device(use_gpu)
    ext = pycolmap.FeatureExtractionOptions()
    ext.max_image_size = int(preset.max_image_size)
    ext.sift.max_num_features = int(preset.max_num_features)
    ext.num_threads = num_threads
    ext.use_gpu = device == pycolmap.Device.cuda
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
    """True when every focal length (fx, fy) is within ``PLAUSIBLE_FOCAL_RATIO`` x the image
    width and every extra (distortion) parameter is within +-``MAX_ABS_RADIAL``."""
    lo, hi = PLAUSIBLE_FOCAL_RATIO
    w = float(cam.width)
    focals = [float(cam.params[i]) for i in cam.focal_length_idxs()]
    extra = [float(cam.params[i]) for i in cam.extra_params_idxs()]
    return bool(all(lo * w <= f <= hi * w for f in focals)
                and all(abs(k) <= MAX_ABS_RADIAL for k in extra))


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
    on_image = registration_progress(progress, num_frames)

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


# --- model checks and the building blocks of the recovery ladder (issue 4) -------------------

#: Model checks (issue 4): a model passes when its camera is plausible (:func:`camera_plausible`),
#: its mean reprojection error is at most ``MAX_MEAN_REPROJECTION_ERROR_PX`` (COLMAP filters
#: observations above 4 px, ``filter_max_reproj_error``; a healthy SIFT model is at 0.5-1.2 px),
#: it has at least ``MIN_POINTS3D`` points and at least :func:`min_registered_images` images.
MAX_MEAN_REPROJECTION_ERROR_PX = 2.0
MIN_POINTS3D = 50
#: Under this share of the selected frames registered, a job is ``partial`` (issue 4).
PARTIAL_BELOW_FRACTION = 0.8
#: Own vocabulary for offline loop closure: visual words and descriptors sampled to build it
#: (COLMAP's downloadable trees have 32K-1M words for millions of images; a job has at most a
#: few hundred thousand descriptors, so a few hundred words keep the build to ~1-2 s on 2
#: cores), and images retrieved per query (COLMAP's ``loop_detection_num_images`` default 50 is
#: meant for long videos; a job has <= 100 frames).
LOOP_VOCAB_WORDS = 256
LOOP_VOCAB_SAMPLE = 20000
LOOP_NUM_IMAGES = 8


#: With a focal length from metadata (EXIF), a model whose mean focal length differs from it by
#: more than this fraction fails the ``focal_disagrees_with_metadata`` check. EXIF's 35 mm
#: equivalent is rounded to whole millimetres (about 4% at 26 mm) and phones crop a little for
#: stabilisation; self-calibration from low-parallax views drifts much further (seen: 27-41% on
#: a synthetic lateral sweep with 0.5-1.5 px noise, tests/test_ladder.py).
FOCAL_PRIOR_TOLERANCE = 0.2


def check_model(stats: dict, num_frames: int, focal_prior_px: float | None = None) -> dict:
    """Judge one model's statistics (as from :func:`_model_stats` and :func:`_camera_stats`).

    Args:
        stats: ``{"registered_images", "points3d", "mean_reprojection_error_px",
            "camera_plausible", "focal_px"?}``.
        num_frames: frames selected for SfM.
        focal_prior_px: focal length from metadata (px at the frames' size), or ``None``.

    Returns:
        ``{"passed": bool, "registered_share": float in [0, 1], "partial": bool`` (share <
        ``PARTIAL_BELOW_FRACTION``), ``"failures": [str]`` (empty when passed: any of
        ``implausible_intrinsics``, ``focal_disagrees_with_metadata`` (only with a prior:
        off by more than ``FOCAL_PRIOR_TOLERANCE``), ``reprojection_error``, ``too_few_points``,
        ``too_few_images``)}.
    """
    reg = int(stats.get("registered_images", 0))
    share = reg / max(1, num_frames)
    failures = []
    if not stats.get("camera_plausible", False):
        failures.append("implausible_intrinsics")
    if focal_prior_px and stats.get("focal_px") and (
            abs(float(stats["focal_px"]) / float(focal_prior_px) - 1.0) > FOCAL_PRIOR_TOLERANCE):
        failures.append("focal_disagrees_with_metadata")
    if float(stats.get("mean_reprojection_error_px", 1e9)) > MAX_MEAN_REPROJECTION_ERROR_PX:
        failures.append("reprojection_error")
    if int(stats.get("points3d", 0)) < MIN_POINTS3D:
        failures.append("too_few_points")
    if reg < min_registered_images(num_frames):
        failures.append("too_few_images")
    return {"passed": not failures, "registered_share": round(share, 4),
            "partial": share < PARTIAL_BELOW_FRACTION, "failures": failures}


def _camera_stats(rec: pycolmap.Reconstruction) -> dict:
    cams = list(rec.cameras.values())
    if not cams:
        return {}
    cam = cams[0]
    return {"camera_model": cam.model_name,
            "focal_px": round(float(cam.mean_focal_length()), 3),
            "focal_ratio": round(float(cam.mean_focal_length()) / max(1, cam.width), 4),
            "camera_params": [round(float(v), 6) for v in cam.params]}


#: Progress of global SfM, which has no callbacks: a heartbeat every ``HEARTBEAT_S`` seconds
#: reports 1 - exp(-t / T) with T = ``GLOBAL_S_PER_FRAME`` x frames (measured on 2 CPU cores:
#: Karma 30 frames 19-26 s, 50 frames 45-53 s; the walk 30 frames 6-9 s), capped below 1, and
#: the elapsed time in the message, so a client sees it moving without a promise of when it
#: ends. pycolmap releases the GIL while mapping, so the thread runs.
HEARTBEAT_S = 2.0
GLOBAL_S_PER_FRAME = 1.0


@contextlib.contextmanager
def _heartbeat(progress: Progress, num_frames: int):
    stop = threading.Event()
    t0 = time.monotonic()
    expected = max(5.0, GLOBAL_S_PER_FRAME * num_frames)

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            t = time.monotonic() - t0
            progress(min(0.95, 1.0 - math.exp(-t / expected)),
                     f"Global SfM: rotation averaging, positions, bundle adjustment "
                     f"({t:.0f} s)...")

    th = threading.Thread(target=beat, name="global-sfm-heartbeat", daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()


def _seeded(opts, num_threads: int, random_seed: int):
    """Set threads and seed on pipeline options and on their ``mapper`` options."""
    opts.num_threads = opts.mapper.num_threads = num_threads
    opts.random_seed = opts.mapper.random_seed = random_seed
    return opts


def _override(target, overrides: dict, what: str) -> None:
    """``setattr`` each override on ``target``; ``ValueError`` names an unknown option."""
    for k, v in overrides.items():
        if not hasattr(target, k):
            raise ValueError(f"unknown {what} option {k!r}")
        setattr(target, k, v)


def map_models(database_path: str | os.PathLike, image_dir: str | os.PathLike,
               output_dir: str | os.PathLike, num_frames: int, mapper: str = "incremental",
               mapper_options: dict | None = None, progress: Progress | None = None,
               num_threads: int = -1, random_seed: int = -1,
               focal_prior_px: float | None = None) -> list[dict]:
    """Run SfM once and judge every model it returns; never raises for a failed mapping.

    Incremental: Schoenberger & Frahm, CVPR 2016 (``pycolmap.incremental_mapping``); global:
    GLOMAP, Pan et al., ECCV 2024 (``pycolmap.global_mapping``). Model ``k`` is written to
    ``output_dir/<k>`` (binary).

    Args:
        mapper_options: attribute overrides of ``IncrementalPipelineOptions.mapper``
            (``IncrementalMapperOptions``, e.g. ``{"init_min_num_inliers": 50}``) or, for the
            global mapper, of ``GlobalPipelineOptions``; the key ``"pipeline"`` may hold
            overrides of ``IncrementalPipelineOptions`` itself (e.g. ``ba_refine_focal_length``).
        num_frames: frames given to SfM (progress and checks).
        focal_prior_px: focal length from metadata, for :func:`check_model`.

    Returns:
        ``[{"index", "registered_images", "points3d", "mean_reprojection_error_px",
        "mean_track_length", "camera_plausible", "camera_model", "focal_px"`` (mean focal
        length), ``"focal_ratio"`` (focal / image width), ``"camera_params", "checks":
        check_model(...)}]`` sorted by index; ``[]`` when
        SfM found no initial pair.

    Raises:
        ValueError: unknown ``mapper`` or option name.
    """
    progress = progress or _noop
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = dict(mapper_options or {})
    pipe_over = overrides.pop("pipeline", {})
    progress(0.0, "Initializing reconstruction...")
    if mapper == "incremental":
        opts = _seeded(pycolmap.IncrementalPipelineOptions(), num_threads, random_seed)
        opts.triangulation.random_seed = random_seed
        _override(opts.mapper, overrides, "incremental mapper")
        _override(opts, pipe_over, "incremental pipeline")
        on_image = registration_progress(progress, num_frames)

        recs = pycolmap.incremental_mapping(
            database_path, image_dir, out, options=opts,
            initial_image_pair_callback=lambda: on_image(True),
            next_image_callback=lambda: on_image(False))
    elif mapper == "global":
        opts = _seeded(pycolmap.GlobalPipelineOptions(), num_threads, random_seed)
        _override(opts, {**overrides, **pipe_over}, "global pipeline")
        with _heartbeat(progress, num_frames):
            recs = pycolmap.global_mapping(database_path, image_dir, out, options=opts)
    else:
        raise ValueError(f"unknown mapper {mapper!r}")
    models = []
    for k in sorted(recs or {}):
        model_dir = out / str(k)
        if not (model_dir / "images.bin").exists():
            model_dir.mkdir(parents=True, exist_ok=True)
            recs[k].write_binary(str(model_dir))
        stats = {"index": int(k), **_model_stats(recs[k]), **_camera_stats(recs[k])}
        stats["checks"] = check_model(stats, num_frames, focal_prior_px)
        models.append(stats)
    progress(1.0, "Mapping done")
    return models


def best_model(models: list[dict]) -> dict | None:
    """The largest model that passes :func:`check_model` (most registered images, then more
    points, then lower reprojection error); ``None`` when none passes."""
    ok = [m for m in models if m.get("checks", {}).get("passed")]
    if not ok:
        return None
    return max(ok, key=lambda m: (m["registered_images"], m["points3d"],
                                  -m["mean_reprojection_error_px"]))


def read_camera(database_path: str | os.PathLike) -> pycolmap.Camera:
    """The (first) camera in the database. Raises ``PipelineError("pipeline_error")`` if none."""
    db = pycolmap.Database.open(database_path)
    try:
        cams = db.read_all_cameras()
    finally:
        db.close()
    if not cams:
        raise PipelineError("pipeline_error", details={"reason": "database has no camera"})
    return cams[0]


def set_camera_model(database_path: str | os.PathLike, model_name: str,
                     focal_px: float | None = None, prior: bool = False) -> dict:
    """Replace every database camera by a fresh ``model_name`` camera of the same size.

    The new camera's focal length is ``focal_px`` or COLMAP's default guess 1.2 x max(width,
    height) (``ImageReaderOptions.default_focal_length_factor``), the principal point is the
    image centre and the distortion terms are 0. ``prior=True`` sets
    ``has_prior_focal_length`` so the incremental mapper trusts the focal length for the
    initial pair (COLMAP ``IncrementalMapper`` uses the prior when set).

    Returns:
        the replaced cameras as ``{"model", "params", "has_prior_focal_length"}`` keyed by
        camera id (for :func:`restore_cameras`).
    """
    db = pycolmap.Database.open(database_path)
    try:
        old = {}
        for cam in db.read_all_cameras():
            old[int(cam.camera_id)] = {"model": cam.model_name,
                                       "params": [float(v) for v in cam.params],
                                       "has_prior_focal_length": bool(cam.has_prior_focal_length)}
            f = float(focal_px) if focal_px else 1.2 * max(cam.width, cam.height)
            new = pycolmap.Camera.create_from_model_name(int(cam.camera_id), model_name, f,
                                                         int(cam.width), int(cam.height))
            new.has_prior_focal_length = bool(prior)
            db.update_camera(new)
    finally:
        db.close()
    return old


def restore_cameras(database_path: str | os.PathLike, saved: dict) -> None:
    """Undo :func:`set_camera_model` with the dict it returned."""
    db = pycolmap.Database.open(database_path)
    try:
        for cam in db.read_all_cameras():
            s = saved.get(int(cam.camera_id))
            if s is None:
                continue
            new = pycolmap.Camera.create_from_model_name(int(cam.camera_id), s["model"], 1.0,
                                                         int(cam.width), int(cam.height))
            new.params = s["params"]
            new.has_prior_focal_length = s["has_prior_focal_length"]
            db.update_camera(new)
    finally:
        db.close()


def _id_names(database_path) -> dict[int, str]:
    db = pycolmap.Database.open(database_path)
    try:
        return {im.image_id: im.name for im in db.read_all_images()}
    finally:
        db.close()


def match_new_pairs(database_path: str | os.PathLike, pairs: list[tuple[int, int]],
                    use_gpu: bool = False, progress: Progress | None = None,
                    num_threads: int = -1) -> dict:
    """Match and verify those of ``pairs`` (image ids, either order) that the database does not
    hold yet. Returns as :func:`match_sequential` (``image_pairs`` = new pairs matched)."""
    progress = progress or _noop
    id_to_name = _id_names(database_path)
    db = pycolmap.Database.open(database_path)
    try:
        seen, todo = set(), []
        for a, b in pairs:
            a, b = int(a), int(b)
            key = (min(a, b), max(a, b))
            if a == b or key in seen or a not in id_to_name or b not in id_to_name:
                continue
            seen.add(key)
            if not db.exists_matches(*key):
                todo.append(key)
        totals = {"matched_pairs": db.num_matched_image_pairs(),
                  "verified_pairs": db.num_verified_image_pairs(),
                  "inlier_matches": db.num_inlier_matches()}
    finally:
        db.close()
    if not todo:
        progress(1.0, "No further image pairs to match")
        return {"image_pairs": 0, **totals, "device": _device(use_gpu).name}
    return _match_pairs(database_path, todo, id_to_name, use_gpu, progress, num_threads)


def sequential_pairs(database_path: str | os.PathLike, overlap: int,
                     quadratic: bool = True) -> list[tuple[int, int]]:
    """Pairs of COLMAP's ``SequentialPairGenerator`` in name order, without loop detection.
    pycolmap 4.2.1 (measured): ``quadratic=True`` gives the distances 1, 2, 4, ... only (up to
    ``overlap`` of them), ``quadratic=False`` the distances 1 .. ``overlap``."""
    pairing = pycolmap.SequentialPairingOptions()
    pairing.overlap = int(overlap)
    pairing.quadratic_overlap = bool(quadratic)
    pairing.loop_detection = False
    db = pycolmap.Database.open(database_path)
    try:
        return list(pycolmap.SequentialPairGenerator(pairing, db).all_pairs())
    finally:
        db.close()


def all_pairs(database_path: str | os.PathLike) -> list[tuple[int, int]]:
    """Every unordered pair of images (exhaustive matching: n (n - 1) / 2 pairs)."""
    ids = sorted(_id_names(database_path))
    return [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]


def _affine_to_similarity(kps) -> pycolmap.FeatureKeypoints:
    import numpy as np

    k = np.asarray(kps, dtype=np.float32)
    if k.shape[1] >= 6:  # x, y, a11, a12, a21, a22 -> x, y, scale, orientation
        k = np.c_[k[:, :2], np.hypot(k[:, 2], k[:, 4]), np.arctan2(k[:, 4], k[:, 2])]
    return pycolmap.keypoints_from_matrix(np.ascontiguousarray(k[:, :4], dtype=np.float32))


def build_own_vocabulary(database_path: str | os.PathLike, vocab_path: str | os.PathLike,
                         num_words: int = LOOP_VOCAB_WORDS, sample: int = LOOP_VOCAB_SAMPLE,
                         seed: int = 0) -> dict:
    """Build a visual-word vocabulary (COLMAP ``VisualIndex``: k-means words + Hamming
    embedding, Schoenberger et al., ACCV 2016) from this database's own SIFT descriptors and
    write it to ``vocab_path``. Offline: nothing is downloaded (COLMAP's default
    ``vocab_tree_path`` is a URL; this file replaces it).

    Returns:
        ``{"vocab_words": int, "descriptors_sampled": int, "path": str}``.

    Raises:
        PipelineError("reconstruction_failed"): the database holds no descriptors.
    """
    import numpy as np

    db = pycolmap.Database.open(database_path)
    try:
        arrays = [np.asarray(db.read_descriptors(im.image_id).data, dtype=np.float32)
                  for im in db.read_all_images()]
    finally:
        db.close()
    arrays = [a for a in arrays if a.size]
    if not arrays:
        raise PipelineError("reconstruction_failed", details={"reason": "no descriptors"})
    desc = np.concatenate(arrays)
    rng = np.random.default_rng(seed)
    if len(desc) > sample:
        desc = desc[rng.choice(len(desc), sample, replace=False)]
    words = int(max(16, min(num_words, len(desc) // 8)))
    index = pycolmap.VisualIndex.create(128, 64)
    opts = pycolmap.VisualIndex.BuildOptions()
    opts.num_visual_words = words
    opts.num_iterations = 20
    opts.num_rounds = 1
    index.build(opts, pycolmap.FeatureDescriptorsFloat(pycolmap.FeatureExtractorType.SIFT,
                                                       np.ascontiguousarray(desc)))
    index.write(str(vocab_path))
    return {"vocab_words": words, "descriptors_sampled": int(len(desc)), "path": str(vocab_path)}


def loop_closure_pairs(database_path: str | os.PathLike, vocab_path: str | os.PathLike,
                       num_images: int = LOOP_NUM_IMAGES) -> list[tuple[int, int]]:
    """Image pairs from COLMAP's sequential pairing with loop detection against the local
    vocabulary ``vocab_path`` (every image queries the index for its ``num_images`` most
    similar images; overlap 1 adds the neighbours)."""
    pairing = pycolmap.SequentialPairingOptions()
    pairing.overlap = 1
    pairing.quadratic_overlap = False
    pairing.loop_detection = True
    pairing.loop_detection_period = 1
    pairing.loop_detection_num_images = int(num_images)
    pairing.vocab_tree_path = str(vocab_path)
    db = pycolmap.Database.open(database_path)
    try:
        return [(a, b) for a, b in pycolmap.SequentialPairGenerator(pairing, db).all_pairs()
                if a != b]
    finally:
        db.close()


# --- exports for NeRF / Gaussian splatting (issue 4) ----------------------------------------

#: COLMAP camera model -> (nerfstudio ``camera_model``, names of the distortion terms written).
#: As nerfstudio's ``parse_colmap_camera_params`` (nerfstudio/process_data/colmap_utils.py).
NERFSTUDIO_CAMERA_MODELS = {
    "SIMPLE_PINHOLE": ("PINHOLE", ()),
    "PINHOLE": ("PINHOLE", ()),
    "SIMPLE_RADIAL": ("OPENCV", ("k1",)),
    "RADIAL": ("OPENCV", ("k1", "k2")),
    "OPENCV": ("OPENCV", ("k1", "k2", "p1", "p2")),
    "OPENCV_FISHEYE": ("OPENCV_FISHEYE", ("k1", "k2", "k3", "k4")),
}

#: nerfstudio's ``applied_transform`` (colmap_to_json without keep_original_world_coordinate):
#: world (x, y, z) -> (x, z, -y), so that COLMAP's usual "y down" world becomes "z up".
NERFSTUDIO_APPLIED_TRANSFORM = ((1.0, 0.0, 0.0, 0.0), (0.0, 0.0, 1.0, 0.0), (0.0, -1.0, 0.0, 0.0))


def nerfstudio_transforms(model_dir: str | os.PathLike, image_prefix: str = "images/",
                          ply_name: str = "sparse_pc.ply") -> tuple[dict, object, object]:
    """The model as nerfstudio's ``transforms.json`` plus its points in the same world frame.

    Conventions (nerfstudio ``colmap_utils.colmap_to_json``): ``transform_matrix`` is the 4x4
    camera-to-world matrix in OpenGL camera axes (x right, y up, z back: COLMAP/OpenCV's y and
    z flipped), in the world frame rotated by ``applied_transform`` (3x4, also stored), which
    maps COLMAP world points X to ``A[:, :3] @ X + A[:, 3]``. Intrinsics ``fl_x, fl_y, cx, cy``
    are px in COLMAP's pixel convention (image origin at the top-left corner of the top-left
    pixel), with the distortion terms of :data:`NERFSTUDIO_CAMERA_MODELS`; zero for unused ones.

    Returns:
        ``(transforms, points, colors)``: the JSON dict, ``(N, 3)`` float64 world points
        (transformed) and ``(N, 3)`` uint8 colours.

    Raises:
        PipelineError("pipeline_error"): more than one camera, or a camera model nerfstudio
            cannot read.
    """
    import numpy as np

    rec = pycolmap.Reconstruction(str(model_dir))
    cams = list(rec.cameras.values())
    if len(cams) != 1 or cams[0].model_name not in NERFSTUDIO_CAMERA_MODELS:
        raise PipelineError("pipeline_error", details={
            "reason": "transforms.json needs one camera of a model nerfstudio reads",
            "cameras": [c.model_name for c in cams]})
    cam = cams[0]
    ns_model, dist_names = NERFSTUDIO_CAMERA_MODELS[cam.model_name]
    p = [float(v) for v in cam.params]
    names = [n.strip() for n in cam.params_info.split(",")]
    vals = dict(zip(names, p, strict=False))
    fx = vals.get("fx", vals.get("f"))
    fy = vals.get("fy", vals.get("f"))
    out: dict = {"w": int(cam.width), "h": int(cam.height), "fl_x": fx, "fl_y": fy,
                 "cx": vals["cx"], "cy": vals["cy"], "camera_model": ns_model}
    if ns_model == "OPENCV":
        for k in ("k1", "k2", "p1", "p2"):
            out[k] = vals.get(k, 0.0)
    elif ns_model == "OPENCV_FISHEYE":
        for k in ("k1", "k2", "k3", "k4"):
            out[k] = vals.get(k, 0.0)
    applied = np.array(NERFSTUDIO_APPLIED_TRANSFORM)
    a4 = np.eye(4)
    a4[:3, :] = applied
    frames = []
    for image_id in sorted(rec.reg_image_ids(), key=lambda i: rec.images[i].name):
        im = rec.images[image_id]
        w2c = np.eye(4)
        w2c[:3, :] = im.cam_from_world().matrix()
        c2w = np.linalg.inv(w2c)
        c2w[0:3, 1:3] *= -1  # OpenCV camera axes -> OpenGL camera axes
        c2w = a4 @ c2w  # COLMAP world -> nerfstudio world
        frames.append({"file_path": f"{image_prefix}{im.name}",
                       "transform_matrix": c2w.tolist(), "colmap_im_id": int(image_id)})
    out["frames"] = frames
    out["applied_transform"] = applied.tolist()
    out["ply_file_path"] = ply_name
    pts = list(rec.points3D.values())
    xyz = np.array([pt.xyz for pt in pts], dtype=np.float64).reshape(-1, 3)
    rgb = np.array([pt.color for pt in pts], dtype=np.uint8).reshape(-1, 3)
    xyz = xyz @ applied[:, :3].T + applied[:, 3]
    return out, xyz, rgb


def undistort_model(model_dir: str | os.PathLike, image_dir: str | os.PathLike,
                    out_dir: str | os.PathLike, num_threads: int = -1) -> dict:
    """Undistort the registered images and the model to PINHOLE cameras (COLMAP's image
    undistorter, ``pycolmap.undistort_images``, output type COLMAP) into ``out_dir``:
    ``images/<name>`` and ``sparse/{cameras,images,points3D,...}.bin``: the input layout of
    3D Gaussian splatting (Kerbl et al., SIGGRAPH 2023) and of gsplat/nerfstudio's COLMAP loader.

    Returns:
        ``{"images": int, "camera_model": str, "width": int, "height": int}`` of the result.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pycolmap.undistort_images(str(out), str(model_dir), str(image_dir), num_threads=num_threads)
    rec = pycolmap.Reconstruction(str(out / "sparse"))
    cam = next(iter(rec.cameras.values()))
    return {"images": int(rec.num_reg_images()), "camera_model": cam.model_name,
            "width": int(cam.width), "height": int(cam.height)}
