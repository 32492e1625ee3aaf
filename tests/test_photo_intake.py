"""colmap_pipeline.intake.photo_intake: photos or one zip into a job's ``input/images/``."""
from __future__ import annotations

import io
import zipfile

import cv2
import numpy as np
import pytest

from colmap_pipeline.errors import PipelineError
from colmap_pipeline.intake.multipart import ReceivedFile
from colmap_pipeline.intake.photo_intake import PhotoSet, install_photo_set, is_zip


def _jpeg(seed: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.random.default_rng(seed).integers(0, 255, (24, 32, 3),
                                                                        dtype=np.uint8))
    assert ok
    return buf.tobytes()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _received(tmp_path, name: str | None, data: bytes, field: str = "images") -> ReceivedFile:
    path = tmp_path / f"{len(list(tmp_path.iterdir()))}.upload"
    path.write_bytes(data)
    return ReceivedFile(field, path, len(data), "00" * 32, name)


def test_is_zip_by_field_name_or_magic(tmp_path):
    assert is_zip(_received(tmp_path, "a.bin", b"xxxx", field="zip"))
    assert is_zip(_received(tmp_path, "Photos.ZIP", b"xxxx"))
    assert is_zip(_received(tmp_path, None, _zip({"a.jpg": _jpeg(0)})))
    assert not is_zip(_received(tmp_path, "a.jpg", _jpeg(0)))


def test_photos_and_one_zip_install_in_natural_order(tmp_path):
    up = tmp_path / "up"
    up.mkdir()
    files = [_received(up, n, _jpeg(s)) for n, s in (("IMG_10.jpg", 10), ("IMG_2.jpg", 2),
                                                     ("IMG_1.jpg", 1))]
    assert install_photo_set(files, tmp_path / "a") == PhotoSet(3, "photos")
    assert (tmp_path / "a" / "img_00000.jpg").read_bytes() == _jpeg(1)
    z = _received(up, "set.zip", _zip({f"p{i}.jpg": _jpeg(i) for i in range(3)}))
    assert install_photo_set([z], tmp_path / "b") == PhotoSet(3, "zip")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [
        "img_00000.jpg", "img_00001.jpg", "img_00002.jpg"]


def test_a_zip_among_photos_is_refused(tmp_path):
    files = [_received(tmp_path, "a.jpg", _jpeg(0)),
             _received(tmp_path, "b.zip", _zip({"c.jpg": _jpeg(1)}))]
    with pytest.raises(PipelineError) as ei:
        install_photo_set(files, tmp_path / "images")
    assert ei.value.code == "invalid_request" and "zip" in ei.value.message
