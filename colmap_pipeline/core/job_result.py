"""A completed job's :class:`..results.JobResult`, assembled by the export stage.

Every number is read from the chosen sparse model (:func:`.sfm_mapping.summarize_model`) or from
the stage checkpoints and ``frames.json`` of the workspace; nothing is recomputed or guessed.
Warnings of every stage end up in one list: those of the frames stage (``frames.json``'s
``warnings``) first, then those of the mapping stage.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..layout import Workspace, read_checkpoint, read_json
from ..presets import Preset
from ..protocol import STAGES
from ..results import Artifact, JobResult, JobWarning, MappingSummary, StageTimings
from .photos import photo_camera_record
from .sfm_mapping import summarize_model


def as_warning(raw: Mapping[str, Any]) -> JobWarning:
    """A stage's warning as ``{code, message, details, hint?}``: keys other than ``code``,
    ``message``, ``hint`` and ``details`` (older frames.json: ``decoded_until_s``, ...) go
    into ``details``."""
    details = dict(raw.get("details") or {})
    details.update({k: v for k, v in raw.items()
                    if k not in ("code", "message", "hint", "details")})
    return JobWarning(code=str(raw.get("code", "warning")), message=str(raw.get("message", "")),
                      details=details, hint=raw.get("hint"))


def stage_warnings(frames: Mapping[str, Any], mapping: MappingSummary) -> list[JobWarning]:
    """Every stage's warnings: the frames stage's, then the mapping stage's."""
    return [as_warning(w) for w in frames.get("warnings") or []] + list(mapping.warnings)


def stage_timings(ws: Workspace, export_s: float) -> StageTimings:
    """Wall time (s) of each stage from its checkpoint, this export's, and their total."""
    times: dict[str, float | None] = {}
    for s in STAGES:
        cp = read_checkpoint(ws.root, s)
        times[s] = cp["elapsed_s"] if cp else None
    times["export"] = round(export_s, 3)
    times["total"] = round(sum(v for v in times.values() if v is not None), 3)
    return StageTimings(**times)


def _summary(ws: Workspace, stage: str) -> dict[str, Any] | None:
    cp = read_checkpoint(ws.root, stage)
    return cp.get("summary") if cp else None


def build_result(ws: Workspace, preset: Preset, mapping: MappingSummary, model_dir: Path,
                 artifacts: list[Artifact], export_s: float) -> JobResult:
    """The job's results from the workspace of a job whose mapping stage has completed.

    Args:
        ws: the workspace.
        preset: the job's preset.
        mapping: the mapping stage's summary (the ladder's outcome).
        model_dir: the chosen model (``sparse/<chosen_model>``).
        artifacts: the files written by the export stage.
        export_s: time the export stage has taken so far (s).
    """
    frames = read_json(ws.frames_json)
    model = summarize_model(model_dir)
    return JobResult(
        frames_extracted=len(frames["frames"]), frames_used=mapping.frames,
        frames_added=mapping.frames_added, focal_prior_px=frames.get("focal_prior_px"),
        registered_images=model.registered_images, points3d=model.points3d,
        observations=model.observations,
        mean_reprojection_error_px=model.mean_reprojection_error_px,
        mean_track_length=model.mean_track_length,
        mean_observations_per_image=model.mean_observations_per_image,
        camera=model.cameras[0] if model.cameras else None,
        cameras=model.cameras if len(model.cameras) > 1 else None,
        photo_cameras=photo_camera_record(frames, _summary(ws, "features")),
        camera_mode=frames.get("camera_mode"),
        models=mapping.models, chosen_model=mapping.chosen_model,
        checks=mapping.checks, partial=mapping.partial,
        quality_warning=mapping.quality_warning, warnings=stage_warnings(frames, mapping),
        mapper=mapping.chosen_mapper, first_mapper=mapping.mapper,
        mapping_attempts=mapping.mapping_attempts, model_sizes=mapping.model_sizes,
        match_diagnostics=mapping.match_diagnostics,
        input_kind=frames.get("input_kind", "video"), preset=preset.to_dict(),
        video=frames["video"], motion=frames.get("motion"),
        features=_summary(ws, "features"), matching=_summary(ws, "matching"),
        dense=_summary(ws, "dense"), meshing=_summary(ws, "meshing"),
        timings_s=stage_timings(ws, export_s), artifacts=artifacts)
