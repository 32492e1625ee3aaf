"""Photo-set input (issue 4): POST /upload-images, zip safety, EXIF orientation.

Zip tests run against the real server (``start_server``): each bad archive is refused with a
clear 4xx error code, and afterwards nothing exists outside the job folder (no job folder is
left, the uploads folder is empty, and the traversal targets were never written).
"""
from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from colmap_pipeline.core import photos
from colmap_pipeline.errors import PipelineError


def jpeg_bytes(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    ok, buf = cv2.imencode(".jpg", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    assert ok
    return buf.tobytes()


def with_exif_orientation(jpeg: bytes, orientation: int) -> bytes:
    """Insert an APP1 Exif segment holding only the Orientation tag (0x0112, SHORT) after SOI
    (Exif 2.32 section 4.5.4; TIFF 6.0 little-endian header 'II*\\0', IFD at offset 8)."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) \
        + struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + app1 + jpeg[2:]


def make_zip(entries: list[tuple[str, bytes]], compression=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = compression
            zf.writestr(info, data)
    return buf.getvalue()


def bomb_zip() -> bytes:
    """One .png entry of 64 MiB of zeros: DEFLATE shrinks it ~1000x (64 KiB on the wire)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo("bomb.png")
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as fh:
            fh.write(b"\x89PNG\r\n\x1a\n")
            block = bytes(1 << 20)
            for _ in range(64):
                fh.write(block)
    return buf.getvalue()


GOOD = [(f"p{i}.jpg", jpeg_bytes(seed=i)) for i in range(3)]
BAD_ZIPS = {
    "zip_slip": (make_zip(GOOD + [("../../escaped.jpg", jpeg_bytes())]), 422, "unsafe_archive"),
    "absolute": (make_zip(GOOD + [("/tmp/colmap_abs_escape.jpg", jpeg_bytes())]), 422,
                 "unsafe_archive"),
    "bomb": (bomb_zip(), 422, "unsafe_archive"),
    "many_entries": (make_zip([(f"t{i}.jpg", b"\xff\xd8\xff") for i in range(10_000)]), 422,
                     "unsafe_archive"),
    "non_image": (make_zip(GOOD + [("notes.txt", b"hello")]), 415, "unsupported_image"),
    "fake_jpeg": (make_zip(GOOD + [("fake.jpg", b"MZ\x90\x00 not a jpeg")]), 415,
                  "unsupported_image"),
}


@pytest.mark.parametrize("case", sorted(BAD_ZIPS))
def test_extract_photo_zip_refuses_and_writes_nothing_outside(tmp_path, case):
    data, _, code = BAD_ZIPS[case]
    job = tmp_path / "jobs" / "j1"
    (job / "input").mkdir(parents=True)
    zpath = job / "input" / "upload.zip"
    zpath.write_bytes(data)
    with pytest.raises(PipelineError) as ei:
        photos.extract_photo_zip(zpath, job / "input" / "images")
    assert ei.value.code == code
    assert ei.value.message and ei.value.hint
    # nothing outside the job folder, and no traversal target anywhere
    outside = [p for p in tmp_path.rglob("*") if job not in p.parents and p != job]
    assert {p.relative_to(tmp_path).as_posix() for p in outside} == {"jobs"}
    assert not Path("/tmp/colmap_abs_escape.jpg").exists()
    # refused before extraction: no photo was written for path, count and bomb problems
    if code == "unsafe_archive":
        assert not (job / "input" / "images").exists() or \
            not any((job / "input" / "images").iterdir())


def test_extract_photo_zip_orders_naturally_and_ignores_macos_junk(tmp_path):
    entries = [("set/img10.jpg", jpeg_bytes(seed=10)), ("set/img2.jpg", jpeg_bytes(seed=2)),
               ("set/img1.JPEG", jpeg_bytes(seed=1)), ("__MACOSX/set/._img1.jpg", b"junk"),
               ("set/.DS_Store", b"junk"), ("set/", b"")]
    zpath = tmp_path / "a.zip"
    zpath.write_bytes(make_zip(entries, zipfile.ZIP_DEFLATED))
    out = photos.extract_photo_zip(zpath, tmp_path / "images")
    assert [o["client_filename"] for o in out] == ["set/img1.JPEG", "set/img2.jpg",
                                                   "set/img10.jpg"]
    assert [o["file"] for o in out] == ["img_00000.jpg", "img_00001.jpg", "img_00002.jpg"]
    assert (tmp_path / "images" / "img_00002.jpg").read_bytes() == jpeg_bytes(seed=10)


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
    assert res["video"] == {"kind": "images", "images": 3, "width": 120, "height": 160}
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


def _post(c, files, quality="low"):
    return c.post("/upload-images", data={"project_id": "p", "quality": quality}, files=files)


def _leftovers(srv) -> list[str]:
    """Files under DATA_DIR other than the SQLite database (and its WAL/SHM files)."""
    return sorted(p.relative_to(srv.data_dir).as_posix() for p in srv.data_dir.rglob("*")
                  if p.is_file() and not p.name.startswith("colmap_app.db"))


def test_upload_images_refuses_bad_zips_with_4xx_and_leaves_nothing(start_server):
    srv = start_server(MAX_REQUESTS_PER_MINUTE="100")
    with srv.client() as c:
        for case in sorted(BAD_ZIPS):
            data, status, code = BAD_ZIPS[case]
            r = _post(c, [("images", ("photos.zip", data, "application/zip"))])
            assert r.status_code == status, (case, r.text)
            err = r.json()["error"]
            assert err["code"] == code and err["message"] and err["hint"], case
            assert _leftovers(srv) == [], case
            assert not (srv.data_dir.parent / "escaped.jpg").exists()
            assert not (srv.data_dir / "escaped.jpg").exists()
        # a text file among photos, too few photos, a photo with a lying extension
        r = _post(c, [("images", (f"p{i}.jpg", d, "image/jpeg")) for i, (_, d) in
                      enumerate(GOOD)] + [("images", ("readme.txt", b"hi", "text/plain"))])
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_image"
        r = _post(c, [("images", ("a.jpg", jpeg_bytes(), "image/jpeg"))])
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_few_frames"
        r = _post(c, [("images", ("a.png", jpeg_bytes(), "image/png"))] * 3)
        assert r.status_code == 415
        assert _leftovers(srv) == []
        assert c.get("/jobs").json()["total"] == 0


def test_upload_images_creates_a_pending_job_from_files_and_from_a_zip(start_server):
    srv = start_server(MAX_REQUESTS_PER_MINUTE="100", TEST_FAULT="sleep:frames")
    with srv.client() as c:
        files = [("images", (f"IMG_{i}.jpg", jpeg_bytes(seed=i), "image/jpeg"))
                 for i in (10, 2, 1)]
        r = _post(c, files)
        assert r.status_code == 202, r.text
        job = c.get(r.json()["status_url"]).json()
        assert job["video"] == {"kind": "images", "images": 3, "source": "photos"}
        r2 = _post(c, [("images", ("set.zip", make_zip(GOOD), "application/zip"))])
        assert r2.status_code == 202, r2.text
        assert c.get(r2.json()["status_url"]).json()["video"]["source"] == "zip"
    imgs = srv.data_dir / "jobs" / r.json()["job_id"] / "input" / "images"
    assert sorted(p.name for p in imgs.iterdir()) == ["img_00000.jpg", "img_00001.jpg",
                                                      "img_00002.jpg"]
    # natural order of the client names: IMG_1, IMG_2, IMG_10
    assert (imgs / "img_00000.jpg").read_bytes() == jpeg_bytes(seed=1)
    assert (imgs / "img_00002.jpg").read_bytes() == jpeg_bytes(seed=10)
    assert not any((srv.data_dir / "uploads").glob("*"))


def exif_jpeg(path: Path, size=(400, 300), orientation: int | None = None, **tags) -> None:
    """Write a textured JPEG with Exif sub-IFD ``tags`` (tag id -> value) using Pillow."""
    from PIL import Image

    rng = np.random.default_rng(5)
    im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    sub = exif.get_ifd(photos.EXIF_IFD)
    for tag, value in tags.items():
        sub[int(tag)] = value
    im.save(path, exif=exif, quality=90)


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
    a = {"focal_px": 300.0, "source": "exif_focal_35mm"}
    assert photos.shared_focal_prior([a, a, None]) is None  # one photo without EXIF
    assert photos.shared_focal_prior([a, {**a, "focal_px": 330.0}]) is None  # zoomed
    assert photos.shared_focal_prior([a, {**a, "focal_px": 303.0}, a]) == {
        "focal_px": 300.0, "source": "exif_focal_35mm", "photos": 3}
