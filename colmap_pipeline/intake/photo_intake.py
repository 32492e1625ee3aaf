"""The photo part of ``POST /upload-images``: put the received photos, or the one zip of them,
into a new job's ``input/images/`` folder. No web framework, no image decoding here; the
checks on each photo and zip entry are :mod:`.photo_files`'.

Form: ``images`` (repeatable file field: JPEG/PNG photos, or a single zip of them; the field
``zip`` is accepted too) plus the text fields of ``POST /upload-video``. The job's input is the
folder ``DATA_DIR/jobs/JOB_ID/input/images/`` holding ``img_NNNNN.jpg|png`` (server-made names,
in the natural order of the client's names); the frames stage turns it into upright frames.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import PipelineError
from .multipart import ReceivedFile
from .photo_files import MAX_PHOTOS, MIN_PHOTOS, extract_photo_zip, install_photo_files

#: file fields of the form
FILE_FIELDS = frozenset({"images", "zip"})
__all__ = ["FILE_FIELDS", "MAX_PHOTOS", "MIN_PHOTOS", "PhotoSet", "install_photo_set", "is_zip"]
#: the two zip signatures: a local file header, or the end record of an empty archive
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


@dataclass(frozen=True)
class PhotoSet:
    """Photos installed in a job's ``input/images/``.

    Attributes:
        count: number of photos installed.
        source: ``"photos"`` (sent as files) or ``"zip"`` (extracted from one zip).
    """

    count: int
    source: Literal["photos", "zip"]


def is_zip(f: ReceivedFile) -> bool:
    """Whether a received file is a zip: by its field (``zip``), its name or its magic bytes.

    Blocking (reads 4 bytes).
    """
    with open(f.path, "rb") as fh:
        head = fh.read(4)
    name = (f.client_filename or "").lower()
    return f.file_field == "zip" or name.endswith(".zip") or head in _ZIP_MAGIC


def install_photo_set(files: list[ReceivedFile], images_dir: Path) -> PhotoSet:
    """Extract the one zip, or move the photos, into ``images_dir``. Blocking: call in a thread.

    Raises:
        PipelineError: ``invalid_request`` for a zip sent together with other files; else as
            :func:`.photo_files.extract_photo_zip` / :func:`.photo_files.install_photo_files`
            (``unsafe_archive`` 422, ``unsupported_image`` 415, ``too_few_frames`` 422 for
            fewer than :data:`MIN_PHOTOS`, ``invalid_request`` 422 for more than
            :data:`MAX_PHOTOS`). ``images_dir`` may be left partly filled: the caller removes
            the job folder.
    """
    if len(files) == 1 and is_zip(files[0]):
        listing = extract_photo_zip(files[0].path, images_dir)
        return PhotoSet(len(listing), "zip")
    if any(is_zip(f) for f in files):
        raise PipelineError("invalid_request", message="Send either photos or one zip, not "
                            "a zip together with other files.")
    listing = install_photo_files([(f.path, f.client_filename) for f in files], images_dir)
    return PhotoSet(len(listing), "photos")
