"""Tests of colmap_pipeline.core.photos: the frames stage's side of a photo set (issue 4):
EXIF orientation baked into the frames, and the focal length from EXIF as the mapping prior.
(The upload's zip and photo checks are tested in ``tests/test_photo_files.py``.)
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from factories import exif_jpeg, with_exif_orientation

from colmap_pipeline.core import photos
from colmap_pipeline.errors import PipelineError


def test_exif_orientation_is_baked_into_the_frames(tmp_path):
    """Orientation 6 (= rotate 90 deg clockwise to display): the frame given to COLMAP is the
    upright image, the same pixels OpenCV decodes."""
    rng = np.random.default_rng(3)
    img = cv2.resize(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8), (160, 120),
                     interpolation=cv2.INTER_NEAREST)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 100])
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        (src / f"img_{i:05d}.jpg").write_bytes(with_exif_orientation(buf.tobytes(), 6))
    res = photos.prepare_photo_frames(src, tmp_path / "frames")
    assert res["video"] == {"kind": "images", "images": 3, "width": 120, "height": 160,
                            "cameras": 1}
    assert res["warnings"] == []  # frames.json always has the key (issue 10 item 7)
    frame = cv2.imread(str(tmp_path / "frames" / res["frames"][0]["file"]),
                       cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert frame.shape[:2] == (160, 120)  # stored upright: no EXIF left to interpret
    upright = np.rot90(img, k=-1)  # 90 deg clockwise

    def gray(a: np.ndarray) -> np.ndarray:
        return cv2.cvtColor(np.ascontiguousarray(a), cv2.COLOR_BGR2GRAY).astype(int)

    err = np.abs(gray(frame) - gray(upright))
    assert np.median(err) < 6  # JPEG artefacts only (encoded twice)
    wrong_way = np.abs(gray(frame) - gray(np.rot90(img, k=1)))
    assert wrong_way.mean() > 3 * err.mean()
    assert np.abs(frame.astype(int) - cv2.resize(img, (120, 160)).astype(int)).mean() > 30


def test_too_few_photos_are_refused_and_mixed_sizes_without_exif_are_one_camera_each(
        tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    exif_jpeg(src / "img_00000.jpg", size=(400, 300))
    exif_jpeg(src / "img_00001.jpg", size=(400, 300))
    with pytest.raises(PipelineError) as ei:
        photos.prepare_photo_frames(src, tmp_path / "frames")
    assert ei.value.code == "too_few_frames" and ei.value.details == {"photos": 2,
                                                                      "min_photos": 3}
    exif_jpeg(src / "img_00002.jpg", size=(300, 200))  # issue 15: no longer refused
    res = photos.prepare_photo_frames(src, tmp_path / "frames")
    # no camera EXIF and two sizes: nothing says which photos share a lens
    assert [f["camera"] for f in res["frames"]] == [0, 1, 2]
    assert res["camera_mode"] == "per_image"
    assert [(c["width"], c["height"], c["frames"]) for c in res["cameras"]] == [
        (400, 300, ["frame_00000.jpg"]), (400, 300, ["frame_00001.jpg"]),
        (300, 200, ["frame_00002.jpg"])]
    assert res["order"] == {"ordered": False, "reason": "several_cameras"}
    assert res["focal_prior_px"] is None and res["video"]["cameras"] == 3


def test_exif_focal_length_becomes_the_focal_prior(tmp_path):
    """A phone photo: 26 mm equivalent, 4:3. At 400x300 the diagonal is 500 px, so the focal
    length is 26 x 500 / 43.2666 = 300.46 px; scaled to 200x150 by the preset, 150.23 px.
    Orientation 6 (portrait: frames 150x200) swaps the sides but not the diagonal."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        exif_jpeg(src / f"img_{i}.jpg", orientation=6,
                  **{str(photos.TAG_FOCAL_35MM): 26})
    res = photos.prepare_photo_frames(src, tmp_path / "frames", max_image_size=200)
    assert res["focal_prior_px"] == pytest.approx(26 * 250 / 43.2666, abs=0.01)
    assert res["focal_prior"] is not None
    assert res["focal_prior"]["source"] == "exif_focal_35mm"
    assert res["focal_prior"]["photos"] == 3
    assert res["video"]["width"] == 150 and res["video"]["height"] == 200
    assert [f["exif_focal_px"] for f in res["frames"]] == [pytest.approx(150.23, abs=0.01)] * 3


def test_exif_focal_plane_resolution_gives_the_focal_length(tmp_path):
    """No 35 mm equivalent: FocalLength 4.0 mm on a sensor with 1000 px per cm (FocalPlane
    resolution unit 3) at 4000x3000 is 400 px at full size; the 400x300 file is 1/10 of it."""
    from PIL.TiffImagePlugin import IFDRational

    p = tmp_path / "a.jpg"
    exif_jpeg(p, **{str(photos.TAG_FOCAL_LENGTH): IFDRational(4, 1),
                    str(photos.TAG_FOCAL_PLANE_XRES): IFDRational(1000, 1),
                    str(photos.TAG_FOCAL_PLANE_UNIT): 3,
                    str(photos.TAG_PIXEL_X): 4000, str(photos.TAG_PIXEL_Y): 3000})
    got = photos.exif_focal_px(p, 400, 300)
    assert got == {"focal_px": pytest.approx(40.0), "source": "exif_focal_plane"}


def test_no_shared_focal_prior_without_exif_or_when_zoom_changed(tmp_path):
    plain = tmp_path / "plain.jpg"
    exif_jpeg(plain)
    assert photos.exif_focal_px(plain, 400, 300) is None
    png = tmp_path / "x.png"
    cv2.imwrite(str(png), np.zeros((10, 10, 3), np.uint8))
    assert photos.exif_focal_px(png, 10, 10) is None
    a: photos.FocalPrior = {"focal_px": 300.0, "source": "exif_focal_35mm"}
    assert photos.shared_focal_prior([a, a, None]) is None  # one photo without EXIF
    assert photos.shared_focal_prior([a, {**a, "focal_px": 330.0}]) is None  # zoomed
    assert photos.shared_focal_prior([a, {**a, "focal_px": 303.0}, a]) == {
        "focal_px": 300.0, "source": "exif_focal_35mm", "photos": 3}
