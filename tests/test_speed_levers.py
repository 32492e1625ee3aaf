"""Issue 14's speed levers: each setting pinned per preset, and what it gives on the real sample.

The levers (BENCHMARKS.md, "Issue 14"): SIFT from the frame's own size at ``low`` and
``medium`` for videos (``first_octave`` 0), photo sets and ``high`` on COLMAP's defaults;
global SfM on a subset of tracks (``track_required_tracks_per_view`` 100); extraction chunks
that are a multiple of the threads; a skipped dense stage that never loads pycolmap; the CLI
leaving without interpreter teardown. The frames stage's levers (shared reads and tracks of the
clip checks, near-duplicate tracking ahead on a helper thread) change no result and are tested
beside their code (``test_clip_checks.py``, ``test_frame_select.py``). No test here asserts a
time.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from colmap_pipeline import presets
from colmap_pipeline.core import dense, pipeline

pycolmap = pytest.importorskip("pycolmap")

from colmap_pipeline.core import sfm_features as sf  # noqa: E402
from colmap_pipeline.core import sfm_mapping as sm  # noqa: E402
from colmap_pipeline.core import sfm_matching as sfmatch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "max-heromode.mp4"


def test_sift_settings_per_preset_videos_only(tmp_path):
    assert presets.VIDEO_SIFT_OPTIONS == {"low": {"first_octave": 0},
                                          "medium": {"first_octave": 0}, "high": {}}
    photos = tmp_path / "photos"
    photos.mkdir()
    for q in ("low", "medium", "high"):
        video_job = {"input": str(SAMPLE), "preset": presets.default_preset(q)}
        assert pipeline._sift_options(video_job) == presets.VIDEO_SIFT_OPTIONS[q]
        # photo sets keep COLMAP's defaults (Strecha fountain accuracy at low)
        assert pipeline._sift_options({"input": str(photos),
                                       "preset": presets.default_preset(q)}) == {}


def test_global_mapper_uses_a_subset_of_tracks():
    assert sm.GLOBAL_OPTIONS == {"mapper.track_required_tracks_per_view": 100}


def test_dotted_mapper_options_reach_nested_options():
    opts = pycolmap.GlobalPipelineOptions()
    sm._override(opts, {"mapper.ba_num_iterations": 2, "min_num_matches": 20}, "global")
    assert opts.mapper.ba_num_iterations == 2 and opts.min_num_matches == 20
    with pytest.raises(ValueError, match="mapper.no_such_option"):
        sm._override(opts, {"mapper.no_such_option": 1}, "global")
    with pytest.raises(ValueError, match="nothing.at_all"):
        sm._override(opts, {"nothing.at_all": 1}, "global")


def test_extraction_chunks_are_a_multiple_of_the_threads():
    items = list(range(30))
    got = sf.chunks(items, sf.MIN_IMAGES_PER_CHUNK, sf.TARGET_IMAGE_CHUNKS, multiple_of=2)
    assert [len(c) for c in got] == [10, 10, 10]
    got = sf.chunks(list(range(50)), sf.MIN_IMAGES_PER_CHUNK, sf.TARGET_IMAGE_CHUNKS,
                     multiple_of=4)
    assert [len(c) for c in got] == [20, 20, 10] and sum(got, []) == list(range(50))
    assert [len(c) for c in sf.chunks(list(range(119)), sfmatch.MIN_PAIRS_PER_CHUNK,
                                       sfmatch.TARGET_CHUNKS)] == [60, 59]


def test_unknown_sift_option_is_refused(tmp_path):
    ext = sf._extraction_options(presets.default_preset("low"), pycolmap.Device.cpu, 1,
                                 {"first_octave": 0})
    assert ext.sift.first_octave == 0 and ext.sift.max_num_features == 2048
    with pytest.raises(ValueError, match="no_such"):
        sf._extraction_options(presets.default_preset("low"), pycolmap.Device.cpu, 1,
                               {"no_such": 1})


def test_a_skipped_dense_stage_does_not_load_pycolmap():
    code = ("import sys\nfrom colmap_pipeline.core import dense\n"
            "print(dense.dense_skip_reason({'use_gpu': False}), 'pycolmap' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert res.stdout.strip() == f"{dense.SKIP_NO_GPU} False", res.stderr


@pytest.mark.skipif(not SAMPLE.exists(), reason="samples/max-heromode.mp4 absent")
def test_sample_at_low_registers_every_frame_with_the_levers(tmp_path):
    """The real sample at ``low`` through frames, features, matching and mapping (seeded): SIFT
    at the frame's own size gives 700-1,000 keypoints a frame (2,788 with COLMAP's upsampled
    first octave), and global SfM on 100 tracks per view still registers 30/30 with a
    plausible focal length (0.59 x width) and about 1,000 points (1,017-1,049 measured;
    1,656-1,668 with the upsampled octave)."""
    ws = tmp_path / "ws"
    pipeline.write_job(ws, SAMPLE, presets.default_preset("low"), use_gpu=False,
                       random_seed=1)
    for stage in ("frames", "features", "matching", "mapping"):
        pipeline.run_stage(stage, ws)
    cps = {s: pipeline.read_checkpoint(ws, s) for s in ("features", "mapping")}
    assert all(cps.values())
    features = cps["features"]["summary"]  # type: ignore[index]
    assert features["images"] == 30
    assert 700 <= features["mean_keypoints_per_image"] <= 1000
    mapping = cps["mapping"]["summary"]  # type: ignore[index]
    assert mapping["chosen_mapper"] == "global" and mapping["checks"]["passed"]
    assert mapping["registered_images"] >= 27
    assert 800 <= mapping["points3d"] <= 1400
    model = sm.summarize_model(ws / "sparse" / str(mapping["chosen_model"]))
    assert model.mean_reprojection_error_px < 1.0
    f = model.cameras[0].params["f"]
    assert 0.5 * 848 < f < 0.7 * 848


def test_the_cli_entry_point_skips_teardown_and_loses_no_output():
    """``python -m colmap_pipeline`` ends with ``os._exit`` after ``main`` (interpreter teardown
    cost 0.2-0.6 s per process): the exit status, the protocol's JSON line, a log line and text
    a native library left in C's stdout buffer (fd 1 points at stderr) all come through."""
    code = ("import ctypes, logging\nfrom colmap_pipeline.core import cli\n"
            "def main():\n"
            "    out = cli._protocol_stream()\n"
            "    cli._emit(out, {'event': 'done'})\n"
            "    ctypes.CDLL(None).printf(b'native text, no newline')\n"
            "    logging.getLogger('colmap_pipeline').warning('last log line')\n"
            "    return 3\n"
            "cli.main = main\ncli.run()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # C stdio buffered
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=60, env=env)
    assert res.returncode == 3
    assert res.stdout == '{"event":"done"}\n'
    assert "native text, no newline" in res.stderr and "last log line" in res.stderr
