"""``POST /upload-images`` glue (issue 4): receive photos or one zip, install them safely in a
new job folder, insert the pending job. No FastAPI, no pycolmap, no image decoding here.

Form: ``images`` (repeatable file field: JPEG/PNG photos, or a single zip of them; the field
``zip`` is accepted too) plus the text fields of ``POST /upload-video`` (``project_id``,
``scan_name``, ``quality``, ``user_email``). The job's input is the folder
``DATA_DIR/jobs/JOB_ID/input/images/`` holding ``img_NNNNN.jpg|png`` (server-made names, in the
natural order of the client's names); the frames stage turns it into upright frames
(:func:`photos.prepare_photo_frames`).
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import uuid
from pathlib import Path
from typing import Any

from starlette.requests import Request

from ..config import Settings
from ..core import photos
from ..layout import DataDir
from .intake import parse_form
from .multipart import ReceivedUpload, receive_files

#: File fields of the form.
FILE_FIELDS = frozenset({"images", "zip"})
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _is_zip(f: ReceivedUpload) -> bool:
    with open(f.path, "rb") as fh:
        head = fh.read(4)
    name = (f.client_filename or "").lower()
    return f.file_field == "zip" or name.endswith(".zip") or head in _ZIP_MAGIC


def _install(files: list[ReceivedUpload], images_dir: Path) -> tuple[list[dict], str]:
    """Blocking part: zip extraction or file moves. Returns (listing, input kind)."""
    if len(files) == 1 and _is_zip(files[0]):
        return photos.extract_photo_zip(files[0].path, images_dir), "zip"
    if any(_is_zip(f) for f in files):
        from ..errors import PipelineError

        raise PipelineError("invalid_request", message="Send either photos or one zip, not "
                            "a zip together with other files.")
    return photos.install_photo_files([(f.path, f.client_filename) for f in files],
                                      images_dir), "photos"


async def create_photo_job(request: Request, store: Any, settings: Settings,
                           idempotency_key: str | None = None) -> dict:
    """Receive the form, install the photos into a new job folder, insert the pending row.

    Limits: ``MAX_UPLOAD_BYTES`` on the total of the files (checked while they stream in),
    ``photos.MAX_PHOTOS`` files or zip photos, the zip caps of :func:`photos.extract_photo_zip`.

    Returns:
        the stored row (``input_path`` = the images folder, ``video_info`` =
        ``{"kind": "images", "images": n, "source": "photos"|"zip"}``).

    Raises:
        PipelineError: as :func:`uploads.receive_files`, :func:`jobs.parse_form`,
            :func:`photos.install_photo_files` and :func:`photos.extract_photo_zip`
            (``unsafe_archive`` 422, ``unsupported_image`` 415, ``too_few_frames`` 422,
            ``upload_too_large`` 413, ``empty_file`` 400, ``invalid_request`` 422). On every
            failure the job folder is removed and the received files are deleted.
    """
    data = DataDir(settings.data_dir)
    upload_dir = data.uploads
    received = await receive_files(request, upload_dir, max_bytes=settings.max_upload_bytes,
                                   file_fields=FILE_FIELDS, max_files=photos.MAX_PHOTOS)
    try:
        form = parse_form(received.fields)
        job_id = str(uuid.uuid4())
        jdir = data.job(job_id)
        root, images_dir = jdir.root, jdir.input_images
        try:
            listing, source = await asyncio.to_thread(_install, received.files, images_dir)
            digest = hashlib.sha256()
            for f in received.files:
                digest.update(bytes.fromhex(f.sha256))
            first = received.files[0].client_filename
            return await store.create_job({
                "job_id": job_id, "scan_id": str(uuid.uuid4()), "project_id": form.project_id,
                "scan_name": form.scan_name, "user_email": form.user_email,
                "quality": form.quality, "input_path": str(images_dir),
                "input_filename": first if source == "zip" else f"{len(listing)} photos",
                "input_bytes": received.total_bytes,
                "input_sha256": received.files[0].sha256 if len(received.files) == 1
                else digest.hexdigest(),
                "video_info": {"kind": "images", "images": len(listing), "source": source},
                **({"idempotency_key": idempotency_key} if idempotency_key else {})})
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, root, True)
            raise
    finally:
        for f in received.files:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(f.path.unlink, True)
