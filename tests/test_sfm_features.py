"""SIFT features, pair generators, matching in chunks, database statistics, own vocabulary.

Feature extraction runs on a few small random-texture images; the pair and vocabulary tests use
synthetic databases (``tests/scenes.py``). Each test takes about a second.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pycolmap = pytest.importorskip("pycolmap")

from scenes import fail_pairs, names_in_order, synth  # noqa: E402

from colmap_pipeline.core import sfm_features as sf  # noqa: E402
from colmap_pipeline.core import sfm_matching as sfmatch  # noqa: E402
from colmap_pipeline.errors import PipelineError  # noqa: E402
from colmap_pipeline.presets import Preset  # noqa: E402

PRESET = Preset("low", 30, 320, 256)


def texture_images(folder: Path, n: int, size: tuple[int, int] = (320, 240)) -> list[str]:
    """``n`` random-texture images ``img_K.png``, blurred a little so SIFT finds blobs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size[1] // 4, size[0] // 4), dtype=np.uint8)
    names = []
    for k in range(n):
        img = np.kron(np.roll(base, k, axis=1), np.ones((4, 4), np.uint8))
        name = f"img_{k}.png"
        pycolmap.Bitmap.from_array(np.ascontiguousarray(img)).write(str(folder / name))
        names.append(name)
    (folder / ".hidden.png").write_bytes(b"not listed")
    (folder / "notes.txt").write_text("not an image")
    return names


def test_extract_features_one_shared_camera_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sf, "MIN_IMAGES_PER_CHUNK", 5)  # default 10: one chunk for 7 images
    names = texture_images(tmp_path / "img", 7)
    assert sf.list_images(tmp_path / "img") == names
    db = tmp_path / "db.db"
    seen: list[tuple[float, str]] = []
    got = sf.extract_features(db, tmp_path / "img", PRESET, num_threads=1,
                              progress=lambda f, m: seen.append((f, m)))
    assert (got.images, got.cameras, got.device) == (7, 1, "cpu")
    assert got.keypoints > 7 * 20 and got.images_without_features == 0
    assert got.mean_keypoints_per_image == pytest.approx(got.keypoints / 7, abs=0.1)
    # COLMAP caps features before orientation assignment: up to 2 orientations each
    assert got.keypoints <= 7 * 2 * PRESET.max_num_features
    # chunks of at least MIN_IMAGES_PER_CHUNK: 5 then 2 images, progress after each
    assert [f for f, _ in seen] == [0.0, 5 / 7, 1.0]
    assert seen[-1][1] == "Detecting features in images (7/7)..."
    assert sf.read_camera(db).model_name == sf.CAMERA_MODEL
    assert got.to_dict()["images"] == 7


def test_extract_features_adds_named_frames_to_the_existing_camera(tmp_path):
    texture_images(tmp_path / "img", 6)
    db = tmp_path / "db.db"
    sf.extract_features(db, tmp_path / "img", PRESET, num_threads=1)
    (tmp_path / "img" / "img_2_m.png").write_bytes((tmp_path / "img" / "img_2.png").read_bytes())
    got = sf.extract_features(db, tmp_path / "img", PRESET, num_threads=1,
                              names=["img_2_m.png"])
    assert (got.images, got.cameras) == (7, 1)
    assert "img_2_m.png" in sf.image_names(db).values()


def test_no_image_is_too_few_frames(tmp_path):
    (tmp_path / "img").mkdir()
    with pytest.raises(PipelineError) as ei:
        sf.extract_features(tmp_path / "db.db", tmp_path / "img", PRESET)
    assert ei.value.code == "too_few_frames" and ei.value.details == {"images": 0}


def test_match_sequential_then_the_missing_pairs_once(tmp_path):
    texture_images(tmp_path / "img", 4)
    db = tmp_path / "db.db"
    sf.extract_features(db, tmp_path / "img", PRESET, num_threads=1)
    seq = sfmatch.match_sequential(db, num_threads=1)
    assert seq.image_pairs == seq.matched_pairs == 5  # distances 1 (3 pairs) and 2 (2 pairs)
    assert seq.verified_pairs >= 3 and seq.inlier_matches > 0
    # exhaustive matching adds exactly the one missing pair, once
    assert sfmatch.match_new_pairs(db, sfmatch.all_pairs(db), num_threads=1).image_pairs == 1
    again = sfmatch.match_new_pairs(db, sfmatch.all_pairs(db), num_threads=1)
    assert again.image_pairs == 0 and again.matched_pairs == 6


def test_match_sequential_needs_two_images(tmp_path):
    texture_images(tmp_path / "img", 1)
    db = tmp_path / "db.db"
    sf.extract_features(db, tmp_path / "img", PRESET, num_threads=1)
    with pytest.raises(PipelineError) as ei:
        sfmatch.match_sequential(db, num_threads=1)
    assert ei.value.code == "reconstruction_failed" and ei.value.details["images"] == 1


def test_sequential_pairs_distances(tmp_path):
    """pycolmap 4.2.1: quadratic overlap gives the distances 1, 2, 4, 8, 16 (119 pairs for 30
    frames); linear overlap 10 gives 1..10 (245 pairs)."""
    dbp = synth(tmp_path, 30, 50)
    order = {i: k for k, i in enumerate(names_in_order(dbp))}

    def distances(pairs: list[tuple[int, int]]) -> set[int]:
        return {abs(order[a] - order[b]) for a, b in pairs}

    quad = sfmatch.sequential_pairs(dbp, 10, quadratic=True)
    assert len(quad) == 119 and distances(quad) == {1, 2, 4, 8, 16}
    lin = sfmatch.sequential_pairs(dbp, 10, quadratic=False)
    assert len(lin) == 245 and distances(lin) == set(range(1, 11))
    assert len(sfmatch.all_pairs(dbp)) == 30 * 29 // 2


def test_database_stats_and_clear_matches(tmp_path):
    n = 6
    dbp = synth(tmp_path, n, 200)
    stats = sfmatch.database_stats(dbp)
    assert stats.images == n and stats.verified_pairs == stats.matched_pairs == n * (n - 1) // 2
    assert 0 < stats.best_pair_inliers <= 200 and stats.inlier_matches > 0
    assert 0 < stats.median_keypoints_per_image
    sfmatch.clear_matches(dbp)
    cleared = sfmatch.database_stats(dbp)
    assert (cleared.matched_pairs, cleared.verified_pairs, cleared.best_pair_inliers,
            cleared.inlier_matches) == (0, 0, 0, 0)
    assert cleared.median_keypoints_per_image == stats.median_keypoints_per_image
    ids = names_in_order(dbp)
    fail_pairs(dbp, [(ids[0], ids[1])])  # tried, failed verification: matched, not verified
    failed = sfmatch.database_stats(dbp)
    assert (failed.matched_pairs, failed.verified_pairs, failed.best_pair_inliers) == (1, 0, 0)


def test_own_vocabulary_gives_loop_closure_pairs_offline(tmp_path):
    dbp = synth(tmp_path, 12, 400)
    info = sfmatch.build_own_vocabulary(dbp, tmp_path / "vocab.bin")
    assert (tmp_path / "vocab.bin").stat().st_size > 0
    assert 16 <= info["vocab_words"] <= sfmatch.LOOP_VOCAB_WORDS
    pairs = sfmatch.loop_closure_pairs(dbp, tmp_path / "vocab.bin", num_images=4)
    assert pairs and all(a != b for a, b in pairs)
    order = {i: k for k, i in enumerate(names_in_order(dbp))}
    assert max(abs(order[a] - order[b]) for a, b in pairs) > 1  # retrieval, not neighbours


def test_no_preset_forces_sift_onto_the_cpu():
    """Affine-shape and DSP SIFT always run on the CPU (COLMAP ``sift.cc``); feature
    extraction leaves both at pycolmap's defaults, which must be off."""
    import inspect

    src = inspect.getsource(sf)
    assert "estimate_affine_shape" not in src and "domain_size_pooling" not in src
    opts = pycolmap.FeatureExtractionOptions()
    assert opts.sift.estimate_affine_shape is False and opts.sift.domain_size_pooling is False
