"""Tests of colmap_pipeline.intake.photo_files: photo and zip safety on upload (issue 4).

Each bad archive is refused with a clear 4xx error code, and afterwards nothing exists outside
the job folder (no job folder is left, the uploads folder is empty, and the traversal targets
were never written): checked on the function and through ``POST /upload-images`` on a real
server (``start_server``).
"""
from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest
from factories import bomb_zip, jpeg_bytes, make_zip, png_bytes, zip_with

from colmap_pipeline.errors import PipelineError
from colmap_pipeline.intake import photo_files

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
        photo_files.extract_photo_zip(zpath, job / "input" / "images")
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
    out = photo_files.extract_photo_zip(zpath, tmp_path / "images")
    assert [o["client_filename"] for o in out] == ["set/img1.JPEG", "set/img2.jpg",
                                                   "set/img10.jpg"]
    assert [o["file"] for o in out] == ["img_00000.jpg", "img_00001.jpg", "img_00002.jpg"]
    assert (tmp_path / "images" / "img_00002.jpg").read_bytes() == jpeg_bytes(seed=10)


def test_install_photo_files_names_by_server_and_checks_content(tmp_path):
    received = []
    for i, (name, data) in enumerate([("IMG_10.jpg", jpeg_bytes(seed=10)), (None, png_bytes()),
                                      ("IMG_2.JPEG", jpeg_bytes(seed=2))]):
        p = tmp_path / f"upload{i}"
        p.write_bytes(data)
        received.append((p, name))
    out = photo_files.install_photo_files(received, tmp_path / "images")
    # natural order of the client names; a nameless file is typed by its magic bytes
    assert [(o["file"], o["client_filename"]) for o in out] == [
        ("img_00000.png", None), ("img_00001.jpg", "IMG_2.JPEG"),
        ("img_00002.jpg", "IMG_10.jpg")]
    assert out[2]["bytes"] == len(jpeg_bytes(seed=10))
    fake = tmp_path / "fake"
    fake.write_bytes(b"MZ\x90\x00 not a photo")
    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_bytes())
    with pytest.raises(PipelineError) as ei:  # named by its place in the upload, not its name
        photo_files.install_photo_files([(good, "a.jpg"), (fake, "a.jpg"), (good, "c.jpg")],
                                        tmp_path / "x")
    assert ei.value.code == "unsupported_image" and ei.value.http_status == 415
    assert ei.value.message == ("File 2 of the 3 sent is not a JPEG or PNG photo (its content "
                                "does not start like a JPEG or PNG file).")
    assert ei.value.details == {"file_index": 1, "files": 3}
    with pytest.raises(PipelineError) as ei:
        photo_files.install_photo_files([(fake, "a.jpg")] * 2, tmp_path / "x")
    assert ei.value.code == "too_few_frames" and ei.value.details == {"photos": 2,
                                                                      "min_photos": 3}


def test_photos_are_typed_by_content_not_by_name(tmp_path):
    """Issue 10 (fresh-user trial): a valid PNG named ``.jpg`` got 415 ("does not start like a
    JPG file"); a photo's magic bytes decide its type and its stored extension."""
    received: list[tuple[Path, str | None]] = []
    for i, (name, data) in enumerate([("png_named.jpg", png_bytes()),
                                      ("jpeg_named.png", jpeg_bytes(seed=1)),
                                      ("photo.webp", jpeg_bytes(seed=2))]):
        p = tmp_path / f"upload{i}"
        p.write_bytes(data)
        received.append((p, name))
    out = photo_files.install_photo_files(received, tmp_path / "images")
    assert [(o["file"], o["client_filename"]) for o in out] == [
        ("img_00000.jpg", "jpeg_named.png"), ("img_00001.jpg", "photo.webp"),
        ("img_00002.png", "png_named.jpg")]
    assert (tmp_path / "images" / "img_00002.png").read_bytes() == png_bytes()
    assert (tmp_path / "images" / "img_00000.jpg").read_bytes() == jpeg_bytes(seed=1)


def test_zip_entries_are_typed_by_content(tmp_path):
    """The same for a zip: a PNG entry named .jpg is kept, stored as .png."""
    zpath = tmp_path / "a.zip"
    zpath.write_bytes(make_zip([("a.jpg", png_bytes()), ("b.png", jpeg_bytes(seed=1)),
                                ("c.jpg", jpeg_bytes(seed=2))]))
    out = photo_files.extract_photo_zip(zpath, tmp_path / "images")
    assert [o["file"] for o in out] == ["img_00000.png", "img_00001.jpg", "img_00002.jpg"]
    assert (tmp_path / "images" / "img_00000.png").read_bytes() == png_bytes()


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
        # a text file among photos, too few photos, a non-image named like a photo (issue
        # 10: a photo whose extension lies about its type is accepted, see below)
        r = _post(c, [("images", (f"p{i}.jpg", d, "image/jpeg")) for i, (_, d) in
                      enumerate(GOOD)] + [("images", ("readme.txt", b"hi", "text/plain"))])
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_image"
        r = _post(c, [("images", ("a.jpg", jpeg_bytes(), "image/jpeg"))])
        assert r.status_code == 422 and r.json()["error"]["code"] == "too_few_frames"
        r = _post(c, [("images", ("a.png", b"MZ\x90\x00 not a photo", "image/png"))] * 3)
        assert r.status_code == 415
        assert _leftovers(srv) == []
        assert c.get("/jobs").json()["total"] == 0
        r = _post(c, [("images", (f"png_named{i}.jpg", png_bytes(), "image/jpeg"))
                      for i in range(3)])
        assert r.status_code == 202, r.text
    imgs = srv.data_dir / "jobs" / r.json()["job_id"] / "input" / "images"
    assert sorted(p.name for p in imgs.iterdir()) == ["img_00000.png", "img_00001.png",
                                                      "img_00002.png"]


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


def _refusal(tmp_path: Path, data: bytes) -> PipelineError:
    zpath = tmp_path / "up.zip"
    zpath.write_bytes(data)
    with pytest.raises(PipelineError) as ei:
        photo_files.extract_photo_zip(zpath, tmp_path / "images")
    return ei.value


SECRET = "secret-name"  # in every refused entry's name: no error may echo it
POSITION = {"entry_index": 3, "entries": 4}


@pytest.mark.parametrize("name,code,message", [
    (f"/tmp/{SECRET}.jpg", "unsafe_archive", "Entry 4 of the 4 in the zip has an absolute path."),
    (f"../{SECRET}.jpg", "unsafe_archive",
     "Entry 4 of the 4 in the zip points outside the archive ('..' in its path)."),
    (f"C:{SECRET}.jpg", "unsafe_archive", "Entry 4 of the 4 in the zip has an absolute path."),
    (f"{SECRET}.txt", "unsupported_image", "Entry 4 of the 4 in the zip is not a JPEG or PNG "
     "photo (only .jpg, .jpeg and .png files may be in the zip)."),
], ids=["absolute", "dotdot", "drive", "not-a-photo-name"])
def test_zip_refusals_name_the_entry_by_position(tmp_path, name, code, message):
    """Issue 13: no error echoes request bytes, so a bad entry is "entry 4 of the 4", never
    its (client-made) name."""
    err = _refusal(tmp_path, make_zip(GOOD + [(name, jpeg_bytes())]))
    assert (err.code, err.message, err.details) == (code, message, POSITION)
    assert SECRET not in str(err.to_dict())


def _zip_with(info: zipfile.ZipInfo, data: bytes) -> bytes:
    return zip_with(GOOD, info, data)


def test_symlink_encrypted_and_fake_content_entries_are_named_by_position(tmp_path):
    link = zipfile.ZipInfo(f"{SECRET}.jpg")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    err = _refusal(tmp_path, _zip_with(link, b"/etc/passwd"))
    assert (err.code, err.message, err.details) == (
        "unsafe_archive", "Entry 4 of the 4 in the zip is a symbolic link.", POSITION)
    data = bytearray(_zip_with(zipfile.ZipInfo(f"{SECRET}.jpg"), jpeg_bytes()))
    central = data.rindex(b"PK\x01\x02")  # the last entry's central directory record
    data[central + 8] |= 0x1  # general purpose flag bit 0: encrypted
    err = _refusal(tmp_path, bytes(data))
    assert (err.code, err.message, err.details) == (
        "unsafe_archive", "Entry 4 of the 4 in the zip is encrypted.", POSITION)
    err = _refusal(tmp_path, _zip_with(zipfile.ZipInfo(f"{SECRET}.jpg"), b"MZ not a photo"))
    assert (err.code, err.details) == ("unsupported_image", POSITION)
    assert err.message.startswith("Entry 4 of the 4 in the zip is not a JPEG or PNG photo")
    assert SECRET not in str(err.to_dict())


@pytest.mark.parametrize("damage", ["crc", "local-name", "method"])
def test_a_damaged_entry_is_422_naming_its_position_not_a_500(tmp_path, damage):
    """zipfile's own errors (a bad CRC, a local header that names another file, an unknown
    compression method) quote the entry's name and were not caught: a 500."""
    photo = jpeg_bytes(seed=7)
    data = bytearray(_zip_with(zipfile.ZipInfo(f"{SECRET}.jpg"), photo))
    local = data.rindex(b"PK\x03\x04")  # the last entry's local header
    if damage == "crc":
        at = data.rindex(photo) + len(photo) // 2
        data[at] ^= 0xFF
    elif damage == "local-name":
        at = data.index(SECRET.encode(), local)
        data[at:at + 6] = b"other-"
    else:
        data[local + 8] = 99  # compression method 99 (AES): unsupported
        central = data.rindex(b"PK\x01\x02")
        data[central + 10] = 99
    err = _refusal(tmp_path, bytes(data))
    assert err.code == "unsafe_archive" and err.details == POSITION
    assert err.message == ("Entry 4 of the 4 in the zip cannot be read: its data is damaged or "
                           "uses an unsupported compression method.")
    assert SECRET not in str(err.to_dict())


def test_a_file_that_is_no_zip_is_refused_without_zipfiles_words(tmp_path):
    err = _refusal(tmp_path, b"PK\x03\x04" + SECRET.encode() * 10)
    assert (err.code, err.message) == ("unsafe_archive", "The file is not a readable zip "
                                                         "archive.")
