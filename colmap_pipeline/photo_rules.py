"""What a photo set must be, shared by the upload (``intake/photo_files.py``) and the frames
stage (``core/photos.py``, which checks a workspace made by hand the same way): the accepted
types, the size limits, their order, and the error for a set of the wrong size.
A light leaf: no third-party import.
"""
from __future__ import annotations

import re

from .errors import PipelineError

#: Accepted photo types by extension (the upload also checks magic bytes).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
#: Smallest and largest photo set (SfM needs at least 3 views; the largest preset selects 100
#: video frames, photo sets get a little more room).
MIN_PHOTOS = 3
MAX_PHOTOS = 300


def natural_key(name: str) -> list[int | str]:
    """Sort key that orders ``img2`` before ``img10`` (digits compared as numbers)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def unsupported_image(what: str, why: str, **details: object) -> PipelineError:
    """``unsupported_image`` (HTTP 415): "``what`` is not a JPEG or PNG photo (``why``)."

    ``what`` and ``details`` are the server's words for the item, never a client's file or
    entry name (an answer echoes no request bytes): e.g. "File 2 of the 3 sent" with
    ``details={"file_index": 1, "files": 3}``.
    """
    return PipelineError("unsupported_image", message=f"{what} is not a JPEG or PNG photo "
                         f"({why}).", details=details or None)


def not_image_error(name: str, why: str) -> PipelineError:
    """:func:`unsupported_image` for the photo ``name`` of a workspace (a name the server made,
    e.g. ``img_00003.jpg``; cut to 200 characters in ``details.file``). Never pass a client's
    file name: an upload names its photos by position (:func:`unsupported_image`)."""
    return unsupported_image(repr(name), why, file=name[:200])


def check_count(n: int) -> None:
    """Refuse a set of ``n`` photos of the wrong size.

    Raises:
        PipelineError: ``too_few_frames`` (fewer than :data:`MIN_PHOTOS`) or
            ``invalid_request`` (more than :data:`MAX_PHOTOS`), with the numbers in details.
    """
    if n < MIN_PHOTOS:
        raise PipelineError("too_few_frames", message=f"{n} photo(s) were sent; at least "
                            f"{MIN_PHOTOS} are needed.",
                            hint="Upload at least 3 overlapping photos of the scene.",
                            details={"photos": n, "min_photos": MIN_PHOTOS})
    if n > MAX_PHOTOS:
        raise PipelineError("invalid_request", message=f"{n} photos were sent; at most "
                            f"{MAX_PHOTOS} are accepted.",
                            hint=f"Send at most {MAX_PHOTOS} photos.",
                            details={"photos": n, "max_photos": MAX_PHOTOS})
