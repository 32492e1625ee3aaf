"""Typed results: the schema the child writes and the API serves."""
from __future__ import annotations

from colmap_pipeline.results import AttemptRecord


def test_stage_wall_times_come_back_in_pipeline_order():
    """A JSONB round trip (PostgreSQL) sorts object keys; the record puts them back in order."""
    rec = AttemptRecord(attempt=1, outcome="completed",
                        stage_wall_s={"export": 1.0, "features": 8.0, "frames": 2.0,
                                      "mapping": 4.0, "matching": 3.0})
    assert list(rec.stage_wall_s) == ["frames", "features", "matching", "mapping", "export"]
    assert rec.stage_wall_s["features"] == 8.0
