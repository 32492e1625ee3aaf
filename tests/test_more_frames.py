"""The ``more_frames`` rung's glue (issue 4): in-between frames from the real sample video, and a
re-run of the mapping stage that puts the database and ``frames/`` back as matching left them.

The rung itself (taken, and it helps) is tested in ``tests/test_ladder.py``.
"""
from __future__ import annotations

import json
import sqlite3
from contextlib import closing

from conftest import SAMPLE_VIDEO

from colmap_pipeline.core import frame_scores, frame_select, ladder, more_frames, pipeline
from colmap_pipeline.errors import PipelineError
from colmap_pipeline.presets import Preset


def test_between_name_sorts_between_its_neighbours():
    names = ["frame_00003.jpg", "frame_00004.jpg", more_frames.between_name("frame_00003.jpg")]
    assert more_frames.between_name("frame_00003.jpg") == "frame_00003_m.jpg"
    assert sorted(names) == ["frame_00003.jpg", "frame_00003_m.jpg", "frame_00004.jpg"]


def test_extract_between_adds_one_sharp_frame_in_the_middle_of_each_gap(tmp_path):
    out = tmp_path / "frames"
    res = frame_select.extract_frames(SAMPLE_VIDEO, out, 6, max_image_size=320)
    kept = res["frames"]
    assert len(kept) >= 4
    added = more_frames.extract_between(SAMPLE_VIDEO, out, kept, max_image_size=320)
    assert len(added) == len(kept) - 1  # the walk has usable frames in every gap
    for a, b, new in zip(kept[:-1], kept[1:], added, strict=True):
        gap = b["timestamp_s"] - a["timestamp_s"]
        assert new["after"] == a["file"] and new["file"] == more_frames.between_name(a["file"])
        assert (a["timestamp_s"] + 0.25 * gap - 1e-6 <= new["timestamp_s"]
                <= b["timestamp_s"] - 0.25 * gap + 1e-6)
        assert new["sharpness"] >= frame_scores.BLUR_ABSOLUTE
    # name order (what sequential matching follows) is time order
    times = {f["file"]: f["timestamp_s"] for f in kept + added}
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".jpg")
    assert files == sorted(times) and [times[f] for f in files] == sorted(times.values())
    import cv2

    shapes = {cv2.imread(str(out / f)).shape for f in files}
    assert shapes == {(181, 320, 3)}  # 848x480 scaled (rounded) like the kept frames
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    # already added: nothing more
    assert more_frames.extract_between(SAMPLE_VIDEO, out, kept, max_image_size=320) == []


def _rows(db) -> list:
    with closing(sqlite3.connect(db)) as c:
        return c.execute("SELECT v FROM t ORDER BY v").fetchall()


def test_clean_mapping_restores_database_and_removes_added_frames(tmp_path):
    ws = pipeline.Workspace(tmp_path)
    ws.frames_dir.mkdir()
    with closing(sqlite3.connect(ws.database)) as c:
        c.execute("CREATE TABLE t (v INTEGER)")
        c.execute("INSERT INTO t VALUES (1)")
        c.commit()
    pipeline._sqlite_copy(ws.database, ws.database_before_mapping)
    with closing(sqlite3.connect(ws.database)) as c:  # what the ladder adds
        c.execute("INSERT INTO t VALUES (2)")
        c.commit()
    for name in ("frame_00000.jpg", "frame_00000_m.jpg", "outside.jpg"):
        (ws.frames_dir / name).write_bytes(b"x")
    (tmp_path / "keep.txt").write_text("x")
    ws.frames_added_json.write_text(json.dumps({"added": ["frame_00000_m.jpg", "../keep.txt"]}))
    pipeline._clean_stage(ws, "mapping")
    assert _rows(ws.database) == [(1,)]
    assert not ws.database_before_mapping.exists() and not ws.frames_added_json.exists()
    assert sorted(p.name for p in ws.frames_dir.iterdir()) == ["frame_00000.jpg", "outside.jpg"]
    assert (tmp_path / "keep.txt").exists()  # a path in the list is never followed


def test_mapping_stage_adds_frames_and_a_rerun_takes_them_back(tmp_path, monkeypatch):
    """The pipeline's frame source on the real sample: 5 frames, then 4 in between; the
    database gets their features; re-running mapping starts again from the 5."""
    import pycolmap

    monkeypatch.setattr(ladder, "STEPS", ("more_frames",))
    ws = pipeline.Workspace(tmp_path / "ws")
    pipeline.write_job(ws.root, SAMPLE_VIDEO, Preset("low", 5, 320, 512), random_seed=0)
    for stage in ("frames", "features", "matching"):
        pipeline.run_stage(stage, ws.root)

    def images() -> int:
        with pycolmap.Database.open(str(ws.database)) as db:
            return db.num_images()

    n = len(json.loads(ws.frames_json.read_text())["frames"])
    assert images() == n
    try:
        summary = pipeline.run_stage("mapping", ws.root)
        attempts = summary["mapping_attempts"]
    except PipelineError as exc:  # 9 frames at 320 px may still be too few: glue is the point
        attempts = exc.details["mapping_attempts"]
    rung = attempts[-1]
    assert rung["step"] == "more_frames" and rung["frames"] == 2 * n - 1
    added = json.loads(ws.frames_added_json.read_text())["added"]
    assert len(added) == n - 1 and all((ws.frames_dir / f).is_file() for f in added)
    assert images() == 2 * n - 1
    pipeline._clean_stage(pipeline.Workspace(ws.root), "mapping")
    assert images() == n
    assert not any((ws.frames_dir / f).exists() for f in added)
