"""result.json: the export stage writes a JobResult with every stage's warnings.

A synthetic workspace (``tests/scenes.py``: frames, features and matching done on a synthetic
database) runs the real mapping, dense (skipped on a CPU), meshing (skipped) and export stages;
about five seconds.
"""
from __future__ import annotations

import json

import pytest

pycolmap = pytest.importorskip("pycolmap")

from scenes import broken_chain, synthetic_workspace  # noqa: E402

from colmap_pipeline.core import job_result, ladder, pipeline  # noqa: E402
from colmap_pipeline.layout import Workspace  # noqa: E402
from colmap_pipeline.results import JobResult, MappingSummary  # noqa: E402

TRUNCATED = {"code": "video_truncated",
             "message": "The video is damaged or cut short: decoding stopped at 0.40 s of 1.33 s",
             "details": {"decoded_until_s": 0.4, "declared_duration_s": 1.333}}


def test_as_warning_keeps_the_numbers_of_either_shape():
    assert job_result.as_warning(TRUNCATED).model_dump() == {**TRUNCATED, "hint": None}
    old = {"code": "video_truncated", "message": "m", "decoded_until_s": 0.4, "error": "EOF"}
    w = job_result.as_warning(old)
    assert (w.code, w.message, w.details) == ("video_truncated", "m",
                                              {"decoded_until_s": 0.4, "error": "EOF"})


def test_export_writes_a_job_result_with_every_stages_warnings(tmp_path, monkeypatch):
    """Issue 10 item 7 (the export side): the frames stage's warning and the mapping stage's
    partial-reconstruction warning both reach result.json, as {code, message, details};
    issue 11 item 8: the ladder's attempts are ``mapping_attempts`` (no ``attempts`` key)."""
    monkeypatch.setattr(ladder, "STEPS", ())
    n = 12
    root = synthetic_workspace(tmp_path / "ws", broken_chain(tmp_path / "scene", n),
                               warnings=[TRUNCATED])
    for stage in ("mapping", "dense", "meshing", "export"):
        pipeline.run_stage(stage, root)
    ws = Workspace(root)
    raw = json.loads(ws.result_json.read_text())
    assert "attempts" not in raw and "wide_matching" not in raw
    result = JobResult.model_validate(raw)
    assert [w.code for w in result.warnings] == ["video_truncated", "partial_reconstruction"]
    assert result.warnings[0].details == TRUNCATED["details"]
    partial = result.warnings[1]
    assert partial.details == {"registered_images": result.registered_images, "frames": n}
    assert partial.message == (f"Only {result.registered_images} of {n} selected frames were "
                               f"registered.")
    assert result.quality_warning == partial and result.partial is True
    assert [a.step for a in result.mapping_attempts] == ["baseline"]
    mapping = MappingSummary.model_validate(pipeline.read_checkpoint(root, "mapping")["summary"])
    assert result.mapping_attempts == mapping.mapping_attempts
    assert result.registered_images == mapping.registered_images <= n // 2
    assert result.frames_extracted == result.frames_used == n
    assert result.camera.model == "SIMPLE_RADIAL" and result.cameras is None
    assert result.dense == {"skipped": True, "reason": "dense skipped: no CUDA GPU"}
    assert {a.name for a in result.artifacts} >= {"sparse.ply", "transforms.json",
                                                  "gaussian_splatting.zip"}
    t = result.timings_s
    assert t.mapping > 0 and t.export > 0 and t.frames == 1.0
    assert t.total == pytest.approx(sum(v for k, v in t.model_dump().items()
                                        if k != "total" and v is not None), abs=0.01)
    summary = pipeline.read_checkpoint(root, "export")["summary"]
    assert summary["registered_images"] == result.registered_images
    assert [a["name"] for a in summary["artifacts"]] == [a.name for a in result.artifacts]
