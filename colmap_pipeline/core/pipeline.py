"""Stage machinery shared by the server's runner (one child process per stage) and the CLI.

A job runs in a workspace folder ``WS``::

    WS/job.json                 written by the caller (see :func:`write_job`)
    WS/frames/frame_00000.jpg   selected frames            (stage "frames")
    WS/frames.json              kept frames, per-frame scores, probe, motion, diagnosis ("frames")
    WS/database.db              COLMAP database            (stages "features", "matching")
    WS/sparse/<k>/              COLMAP models              (stage "mapping")
    WS/artifacts/               sparse.ply, model.zip, thumbnail.jpg   (stage "export")
    WS/result.json              final metrics              (stage "export")
    WS/checkpoints/<stage>.json {"stage", "elapsed_s", "summary"}, written atomically when a
                                stage ends; a resumed job starts at :func:`next_stage`.

``job.json`` = ``{"input": absolute video path, "preset": Preset.to_dict(), "use_gpu": bool,
"test_fault": ""}``. ``input`` may also be a folder of photos (``POST /upload-images``); the
frames stage then prepares them with :func:`photos.prepare_photo_frames`.

Test-fault hook (TEST ONLY, off unless set): ``job.json["test_fault"]`` or, when that is empty,
the environment variable ``COLMAP_TEST_FAULT``, of the form ``ACTION:STAGE``. At the start of
``STAGE``: ``abort`` calls ``os.abort()`` (SIGABRT, like a pycolmap crash), ``fail`` raises
``PipelineError("pipeline_error")``, ``sleep`` sleeps 3600 s (to test timeouts/cancel),
``pause`` creates ``WS/test_fault_paused.STAGE`` and blocks until that file is removed (so a
test knows the child reached the stage, and can kill, cancel or release it).

Each stage holds an exclusive ``flock`` on ``WS/.lock`` (:mod:`.workspace_lock`) while it runs.

This module imports neither pycolmap (stages import :mod:`.sfm_features` etc. lazily) nor any web
or database framework.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

from ..errors import PipelineError
from ..layout import (  # noqa: F401 - re-exported
    Workspace,
    next_stage,
    read_checkpoint,
    read_job,
    read_json,
    write_job,
    write_json_atomic,
)
from ..presets import Preset
from ..protocol import STAGE_NAMES, STAGE_WEIGHTS, overall_progress  # noqa: F401 - re-exported (CLI, tests)
from ..protocol import STAGES as STAGE_IDS
from .fake_stage import fake_stage_seconds, run_fake_stage
from .progress import Progress, no_progress
from .workspace_lock import workspace_lock

log = logging.getLogger(__name__)

# The stage table (ids, human names, progress shares, GPU stages) lives in the light
# :mod:`..protocol` module, which the API process imports too.
STAGES = STAGE_NAMES
STAGE_ORDER = STAGE_IDS

#: Environment variable of the test-fault hook (see module docstring).
TEST_FAULT_ENV = "COLMAP_TEST_FAULT"
TEST_FAULT_ACTIONS = ("abort", "fail", "sleep", "pause")
#: ``pause:STAGE`` creates ``Workspace.test_pause_file(STAGE)`` when it reaches the stage,
#: then blocks while the file exists: a test waits for the file, then kills, cancels or releases
#: (deletes it). Gives up after :data:`TEST_PAUSE_MAX_S`.
TEST_PAUSE_MAX_S = 3600.0

def _repeatable(job: dict) -> dict:
    """``{"num_threads": 1, "random_seed": seed}`` when job.json fixes a seed, else ``{}``."""
    seed = int(job.get("random_seed", -1))
    return {"num_threads": 1, "random_seed": seed} if seed >= 0 else {}


def parse_test_fault(spec: str) -> tuple[str, str] | None:
    """``"ACTION:STAGE"`` -> ``(action, stage)``; ``""`` -> ``None``.

    Raises:
        ValueError: unknown action or stage.
    """
    spec = (spec or "").strip()
    if not spec:
        return None
    action, _, stage = spec.partition(":")
    if action not in TEST_FAULT_ACTIONS or stage not in STAGES:
        raise ValueError(f"bad test fault {spec!r}: want ACTION:STAGE with ACTION in "
                         f"{TEST_FAULT_ACTIONS} and STAGE in {STAGE_ORDER}")
    return action, stage


def _apply_test_fault(job: dict, stage: str, workspace: Path | None = None) -> None:
    fault = parse_test_fault(job.get("test_fault") or os.environ.get(TEST_FAULT_ENV, ""))
    if fault is None or fault[1] != stage:
        return
    action = fault[0]
    log.warning("TEST FAULT %s at stage %s", action, stage)
    if action == "abort":
        os.abort()
    if action == "fail":
        raise PipelineError("pipeline_error", details={"test_fault": f"{action}:{stage}"})
    if action == "sleep":
        time.sleep(3600)
    if action == "pause" and workspace is not None:
        flag = Workspace(workspace).test_pause_file(stage)
        flag.write_text(str(os.getpid()))
        deadline = time.monotonic() + TEST_PAUSE_MAX_S
        while flag.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _sqlite_copy(src: Path, dst: Path) -> None:
    """Consistent copy of a SQLite database (the backup API), written next to ``dst`` then
    renamed over it, so ``dst`` is never half-written."""
    import sqlite3

    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    with closing(sqlite3.connect(src)) as a, closing(sqlite3.connect(tmp)) as b:
        a.backup(b)
    os.replace(tmp, dst)


def _undo_mapping_changes(ws: Workspace) -> None:
    """Put the database and ``frames/`` back as they were before the mapping stage's ladder
    changed them (pairs, cameras, ``more_frames``), then forget the saved copy."""
    if ws.database_before_mapping.exists():
        for suffix in ("-wal", "-shm", "-journal"):
            _remove(Path(str(ws.database) + suffix))
        os.replace(ws.database_before_mapping, ws.database)
    if ws.frames_added_json.exists():
        for name in read_json(ws.frames_added_json).get("added", []):
            if "/" not in name and name not in ("", ".", ".."):
                (ws.frames_dir / name).unlink(missing_ok=True)
        ws.frames_added_json.unlink()


def _clean_stage(ws: Workspace, stage: str) -> None:
    """Remove outputs of ``stage`` and checkpoints of ``stage`` and every later stage."""
    for s in STAGE_ORDER[STAGE_ORDER.index(stage):]:
        ws.checkpoint(s).unlink(missing_ok=True)
    if STAGE_ORDER.index(stage) <= STAGE_ORDER.index("mapping"):
        _undo_mapping_changes(ws)
    if stage == "matching":
        if ws.database.exists():
            from .sfm_matching import clear_matches

            clear_matches(ws.database)
        return
    outputs = {
        "frames": [ws.frames_dir, ws.frames_json],
        "features": [Path(str(ws.database) + s) for s in ("", "-wal", "-shm", "-journal")],
        "mapping": [ws.sparse_dir],
        "dense": [ws.dense_dir],
        "meshing": [ws.dense_dir / "mesh.ply", ws.dense_dir / "mesh.glb"],
        "export": [ws.artifacts_dir, ws.result_json],
    }
    for path in outputs.get(stage, []):
        _remove(path)


def _require(ws: Workspace, stage: str) -> dict:
    cp = read_checkpoint(ws.root, stage)
    if cp is None:
        raise PipelineError("pipeline_error", details={
            "reason": f"stage {stage!r} has not completed in this workspace"})
    return cp


# --- stages ---------------------------------------------------------------------------------

def _stage_frames(ws: Workspace, job: dict, progress: Progress, t0: float) -> dict:
    """Frames of the video (:mod:`.frame_select`) checked before SfM (:mod:`.clip_checks`), or
    the prepared photos (:mod:`.photos`), into ``frames/`` and ``frames.json`` (with
    ``warnings``: a damaged video's ``video_truncated`` / ``video_corrupted``)."""
    from . import clip_checks, frame_select, frame_tracks

    preset: Preset = job["preset"]
    if Path(job["input"]).is_dir():  # photo set (POST /upload-images, issue 4)
        from . import photos

        progress(0.0, "Preparing photos...")
        photo_res = photos.prepare_photo_frames(job["input"], ws.frames_dir,
                                                preset.max_image_size)
        write_json_atomic(ws.frames_json, photo_res)
        progress(1.0, f"Prepared {len(photo_res['frames'])} photos")
        return {"frames_extracted": len(photo_res["frames"]),
                "num_decoded": photo_res["num_decoded"], "video": photo_res["video"],
                "input_kind": "images", "warnings": photo_res["warnings"]}
    ahead = frame_tracks.MotionLookAhead()  # the motion check's tracking, done while decoding
    res = frame_select.extract_frames(job["input"], ws.frames_dir, preset.max_frames,
                                      max_image_size=preset.max_image_size,
                                      progress=lambda f, m: progress(0.9 * f, m), motion=ahead)
    progress(0.9, "Checking camera motion and parallax...")
    # Degenerate clips (too short, dark, blurry, static, tripod pan...) are named here.
    diag = clip_checks.diagnose(res, ws.frames_dir, ahead.tracks_for(res, ws.frames_dir))
    res["motion"], res["parallax"], res["diagnosis"] = (
        dict(diag["motion"]) if diag["motion"] else None, diag["parallax"], diag["error"])
    write_json_atomic(ws.frames_json, res)  # kept on failure: served at GET /jobs/{id}/frames
    if diag["error"]:
        raise PipelineError(diag["error"]["code"], message=diag["error"]["message"] or "",
                            details=diag["error"]["details"])
    progress(1.0, f"Selected {len(res['frames'])} frames")
    return {"frames_extracted": len(res["frames"]), "num_decoded": res["num_decoded"],
            "video": res["video"], "motion": diag["motion"], "selection": res["selection"],
            "warnings": res["warnings"]}


def _sift_options(job: dict) -> dict:
    """SIFT overrides of the job: :data:`..presets.VIDEO_SIFT_OPTIONS` for a video, none (COLMAP's
    defaults) for a photo set."""
    from ..presets import VIDEO_SIFT_OPTIONS

    if Path(job["input"]).is_dir():
        return {}
    return dict(VIDEO_SIFT_OPTIONS.get(job["preset"].quality, {}))


def _stage_features(ws: Workspace, job: dict, progress: Progress, t0: float) -> dict:
    from . import sfm_features

    _require(ws, "frames")
    groups = sfm_features.camera_groups(read_json(ws.frames_json)["frames"])  # photo sets
    summary = sfm_features.extract_features(ws.database, ws.frames_dir, job["preset"],
                                            use_gpu=bool(job["use_gpu"]), progress=progress,
                                            sift_options=_sift_options(job), groups=groups)
    return {**summary.to_dict(), **sfm_features.camera_ids(ws.database, groups)}


def _stage_matching(ws: Workspace, job: dict, progress: Progress, t0: float) -> dict:
    from . import sfm_matching
    from .ladder_rungs import EXHAUSTIVE_MAX_PAIRS

    _require(ws, "features")
    threads = {"num_threads": 1} if _repeatable(job) else {}
    order = read_json(ws.frames_json).get("order")  # photo sets (issue 15); videos: None
    if order is None:
        return sfm_matching.match_sequential(ws.database, use_gpu=bool(job["use_gpu"]),
                                             progress=progress, **threads).to_dict()
    got = sfm_matching.match_photos(ws.database, bool(order["ordered"]), EXHAUSTIVE_MAX_PAIRS,
                                    use_gpu=bool(job["use_gpu"]), progress=progress, **threads)
    return {**got.to_dict(), "order": order}


def _stage_mapping(ws: Workspace, job: dict, progress: Progress, t0: float) -> dict:
    """Map with checks and the bounded recovery ladder (:mod:`.ladder`, issue 4); a failure is
    named after blur when the frames' sharpness explains it (:func:`.ladder.name_failure`)."""
    from . import ladder, sfm_features

    _require(ws, "matching")
    frames = read_json(ws.frames_json)
    preset: Preset = job["preset"]
    _sqlite_copy(ws.database, ws.database_before_mapping)
    repeatable = _repeatable(job)

    def more_frames() -> ladder.AddedFrames:
        """The ladder's ``more_frames`` rung: a frame between each pair of selected frames."""
        from . import sfm_features
        from .more_frames import extract_between

        added = extract_between(job["input"], ws.frames_dir, frames["frames"],
                                max_image_size=preset.max_image_size)
        names = [a["file"] for a in added]
        write_json_atomic(ws.frames_added_json, {"added": names, "frames": added})
        if names:
            sfm_features.extract_features(
                ws.database, ws.frames_dir, preset, use_gpu=bool(job["use_gpu"]), names=names,
                num_threads=repeatable.get("num_threads", -1), sift_options=_sift_options(job))
        return ladder.AddedFrames(names, len(frames["frames"]) + len(names))

    is_video = not Path(job["input"]).is_dir()
    try:
        summary = ladder.run_ladder(
            ws.database, ws.frames_dir, ws.sparse_dir, len(frames["frames"]),
            quality=preset.quality, use_gpu=bool(job["use_gpu"]),
            focal_prior_px=sfm_features.focal_priors(ws.database, frames),
            matching=str(_require(ws, "matching")["summary"].get("method", "sequential")),
            progress=progress,
            more_frames=more_frames if is_video else None, **repeatable)
    except PipelineError as exc:
        if not is_video:  # a photo set: its own hint (the photos' overlap, not filming)
            raise ladder.for_photos(exc) from None
        raise ladder.name_failure(exc, frames["frames"]) from None
    return summary.model_dump(mode="json")


def _stage_export(ws: Workspace, job: dict, progress: Progress, t0: float) -> dict:
    """Artifacts, then ``result.json``: a :class:`..results.JobResult` (:mod:`.job_result`)
    carrying every stage's warnings."""
    from ..results import MappingSummary
    from . import export, job_result

    _require(ws, "frames")
    mapping = MappingSummary.model_validate(_require(ws, "mapping")["summary"])
    model_dir = ws.sparse_dir / str(mapping.chosen_model)
    progress(0.0, "Writing point cloud and model files...")
    artifacts = export.export_model(model_dir, ws.frames_dir, ws.artifacts_dir)
    artifacts += export.copy_dense_artifacts(ws.dense_dir, ws.artifacts_dir)  # GPU stages
    progress(0.8, "Reading back model statistics...")
    result = job_result.build_result(ws, job["preset"], mapping, model_dir, artifacts,
                                     export_s=time.monotonic() - t0)
    write_json_atomic(ws.result_json, result.model_dump(mode="json"))
    progress(1.0, "Done")
    return {"registered_images": result.registered_images, "points3d": result.points3d,
            "artifacts": [a.model_dump(mode="json") for a in artifacts]}


def _stage_dense(ws: Workspace, job: dict, progress: Progress, t0: float) -> dict:
    """Undistortion, PatchMatch stereo and fusion on a CUDA GPU into ``WS/dense/`` (issue 6);
    skipped, not failed, without one (see :func:`.dense.dense_skip_reason`)."""
    from . import dense

    mapping_cp = _require(ws, "mapping")
    reason = dense.dense_skip_reason(job)
    if reason:
        progress(1.0, reason)
        return {"skipped": True, "reason": reason}
    model_dir = ws.sparse_dir / str(mapping_cp["summary"]["chosen_model"])
    return {"skipped": False, **dense.run_dense(model_dir, ws.frames_dir, ws.dense_dir,
                                                job["preset"].quality, progress=progress)}


def _stage_meshing(ws: Workspace, job: dict, progress: Progress, t0: float) -> dict:
    """Poisson mesh of ``WS/dense/fused.ply`` as ``mesh.ply`` and ``mesh.glb`` (issue 6)."""
    from . import dense

    dense_cp = _require(ws, "dense")
    if dense_cp["summary"].get("skipped"):
        progress(1.0, dense_cp["summary"]["reason"])
        return {"skipped": True, "reason": dense_cp["summary"]["reason"]}
    d = ws.dense_dir
    progress(0.0, "Building a Poisson mesh...")
    out = dense.mesh(d / "fused.ply", d / "mesh.ply", d / "mesh.glb",
                     dense.DENSE_PRESETS[job["preset"].quality])
    progress(1.0, f"Mesh with {out['mesh_vertices']} vertices")
    return {"skipped": False, **out}


_STAGE_FUNCS = {
    "frames": _stage_frames,
    "features": _stage_features,
    "matching": _stage_matching,
    "mapping": _stage_mapping,
    "dense": _stage_dense,
    "meshing": _stage_meshing,
    "export": _stage_export,
}


def run_stage(name: str, workspace: str | os.PathLike, progress: Progress | None = None) -> dict:
    """Run one stage of the job in ``workspace`` from its inputs.

    Removes the stage's (possibly half-written) outputs and the checkpoints of this and later
    stages first, applies the test-fault hook, runs the stage, then writes
    ``checkpoints/<name>.json`` = ``{"stage", "elapsed_s", "summary"}`` atomically.

    Args:
        name: one of :data:`STAGE_ORDER`.
        workspace: job folder holding ``job.json``.
        progress: ``progress(fraction in [0, 1], message)``; fraction never decreases.

    Returns:
        the stage summary (JSON-serialisable; everything read from files or the model).

    Raises:
        PipelineError: stable codes, e.g. ``no_video_stream``, ``too_few_frames``,
            ``insufficient_motion`` (frames), ``reconstruction_failed`` (matching, mapping),
            ``pipeline_error`` (bad job.json, earlier stage missing, test fault ``fail``).
        ValueError: unknown stage name or malformed test fault.
    """
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {STAGE_ORDER}")
    ws = Workspace(workspace)
    job = read_job(ws.root)
    with workspace_lock(ws.root):  # one writer per workspace, released by the kernel on death
        _apply_test_fault(job, name, ws.root)
        _clean_stage(ws, name)
        progress = progress or no_progress
        t0 = time.monotonic()
        log.info("stage %s started in %s", name, ws.root)
        fake_s = fake_stage_seconds()  # TEST ONLY: COLMAP_TEST_FAKE_STAGES (core/fake_stage.py)
        if fake_s is not None:
            summary = run_fake_stage(name, ws, progress, fake_s)
        else:
            summary = _STAGE_FUNCS[name](ws, job, progress, t0)
        elapsed = round(time.monotonic() - t0, 3)
        write_json_atomic(ws.checkpoint(name), {"stage": name, "elapsed_s": elapsed,
                                                "summary": summary})
    log.info("stage %s done in %.1f s", name, elapsed)
    return summary


def run_all(video: str | os.PathLike, out_dir: str | os.PathLike, preset: Preset,
            progress: Callable[[str, float, str], None] | None = None,
            use_gpu: bool | None = None) -> dict:
    """Run every stage in this process (the CLI's ``reconstruct``); returns ``result.json``.

    Args:
        video: input video file.
        out_dir: workspace (created); earlier outputs in it are replaced stage by stage.
        preset: quality preset.
        progress: ``progress(stage, fraction in [0, 1], message)``.
        use_gpu: ``None`` = use CUDA when pycolmap has it.

    Raises:
        PipelineError: as :func:`run_stage`.
    """
    if use_gpu is None:
        from .sfm_mapping import gpu_capabilities

        use_gpu = bool(gpu_capabilities()["cuda"])
    write_job(out_dir, video, preset, use_gpu=use_gpu)
    for stage in STAGE_ORDER:
        cb = (lambda f, m, _s=stage: progress(_s, f, m)) if progress else None
        run_stage(stage, out_dir, cb)
    return read_json(Workspace(out_dir).result_json)
