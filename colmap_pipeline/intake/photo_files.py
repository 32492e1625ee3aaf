"""Safety checks on uploaded photos and photo zips, and their installation into a job folder
(API process: no pycolmap, no image decoding, only ``zipfile`` and magic bytes).

* :func:`install_photo_files` moves already-received image files into ``JOB/input/images/``
  under server-made names (``img_00000.jpg`` ...), in the natural order of the client's file
  names (metadata only, never used on disk);
* :func:`extract_photo_zip` checks a zip before writing anything (entry count, declared total
  size, per-entry compression ratio, entry names: ``..``, absolute paths, drive letters,
  symbolic links; non-image entries), then streams each entry to a server-made name, counting
  the real bytes (a zip may lie about sizes). Every failure raises ``PipelineError`` with a
  4xx code and leaves nothing behind outside ``dest_dir`` (the caller removes the job folder).

An error names a photo or a zip entry by its position, never by the client's name (no answer
echoes request bytes): "file 2 of the 3 sent" (``details.file_index`` 1, counted from 0 like
``empty_file``'s), "entry 5 of the 12 in the zip" (``details.entry_index`` 4: the position in
the zip's central directory, as ``unzip -l`` lists it).

The frames stage's side of a photo set (decoding, EXIF) is :mod:`colmap_pipeline.core.photos`.
"""
from __future__ import annotations

import contextlib
import lzma
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypedDict

from ..errors import PipelineError
from ..photo_rules import (  # noqa: F401 - MIN/MAX_PHOTOS re-exported to the intake
    IMAGE_EXTENSIONS,
    MAX_PHOTOS,
    MIN_PHOTOS,
    check_count,
    natural_key,
    unsupported_image,
)

#: Accepted photo types by magic bytes (JPEG: FF D8 FF, ITU T.81 / JFIF; PNG: the 8-byte
#: signature of RFC 2083 section 3.1); the extensions are :data:`..photo_rules.IMAGE_EXTENSIONS`.
MAGIC = {".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".png": b"\x89PNG\r\n\x1a\n"}
#: Zip caps (zip bombs, OWASP "File Upload Cheat Sheet"): entries in the central directory,
#: total uncompressed bytes, and the uncompressed/compressed ratio of any entry. JPEG and PNG
#: are already compressed (ratios ~1.0-1.5 seen on photos; flat PNGs reach ~20-50), a
#: DEFLATE bomb reaches ~1000.
MAX_ZIP_ENTRIES = 1000
MAX_ZIP_UNCOMPRESSED_BYTES = 4 * 1024**3
MAX_ZIP_RATIO = 100.0
#: Entries ignored inside a zip: macOS resource forks and hidden files.
_IGNORED = re.compile(r"(^|/)(__MACOSX/|\.)")
_COPY_BLOCK = 1 << 20
#: what opening or reading a damaged zip or entry raises (zipfile, and the deflate, bzip2 and
#: LZMA decoders: bzip2's is an OSError); their texts quote entry names, so none is passed on
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, NotImplementedError,
                RuntimeError, ValueError, OSError)


class InstalledPhoto(TypedDict):
    """One installed photo: server name, the client's name (metadata only) and its size."""

    file: str
    client_filename: str | None
    bytes: int


@dataclass(frozen=True)
class ZipCaps:
    """Limits of :func:`extract_photo_zip` (entries, uncompressed bytes, expansion ratio)."""

    max_entries: int = MAX_ZIP_ENTRIES
    max_total_bytes: int = MAX_ZIP_UNCOMPRESSED_BYTES
    max_ratio: float = MAX_ZIP_RATIO


def _unsafe(message: str, **details: object) -> PipelineError:
    return PipelineError("unsafe_archive", message=message, details=details or None)


def image_ext(name: str) -> str | None:
    """Lower-case extension of ``name`` if it is a photo type (``.jpg``/``.jpeg``/``.png``)."""
    ext = os.path.splitext(name)[1].lower()
    return ext if ext in IMAGE_EXTENSIONS else None


def sniff_ext(head: bytes) -> str | None:
    """The extension of the real type of a file whose first bytes are ``head``: ``".jpg"`` or
    ``".png"`` by :data:`MAGIC`, whatever its name says (a PNG named ``.jpg`` is a PNG);
    ``None`` when it is neither."""
    return next((ext for ext in (".jpg", ".png") if head.startswith(MAGIC[ext])), None)


_NOT_PHOTO_CONTENT = "its content does not start like a JPEG or PNG file"


def install_photo_files(files: list[tuple[Path, str | None]],
                        dest_dir: Path) -> list[InstalledPhoto]:
    """Move received photo files into ``dest_dir`` as ``img_NNNNN<ext>``.

    Args:
        files: ``(received path, client file name or None)`` per photo, in upload order.
        dest_dir: created; must be inside the job folder.

    Returns:
        ``[{"file": server name, "client_filename": str | None, "bytes": int}]`` in the order
        used (natural order of client names, then upload order).

    Each file is stored with the extension of its real type by its magic bytes
    (:func:`sniff_ext`), whatever its client name says.

    Raises:
        PipelineError: ``unsupported_image`` (415) for content that is neither JPEG nor PNG
            by its magic bytes (``details={"file_index": i, "files": n}``, ``i`` counted from
            0 in upload order); ``too_few_frames`` / ``invalid_request`` (422) for fewer than
            ``MIN_PHOTOS`` or more than ``MAX_PHOTOS`` photos.
    """
    check_count(len(files))
    checked = []
    for i, (path, client) in enumerate(files):
        with open(path, "rb") as fh:
            head = fh.read(16)
        ext = sniff_ext(head)  # the content decides, not the name
        if ext is None:
            raise unsupported_image(f"File {i + 1} of the {len(files)} sent", _NOT_PHOTO_CONTENT,
                                    file_index=i, files=len(files))
        checked.append((natural_key(client or ""), i, path, client, ext))
    checked.sort(key=lambda t: (t[0], t[1]))
    dest_dir.mkdir(parents=True, exist_ok=True)
    out: list[InstalledPhoto] = []
    for n, (_, _, path, client, ext) in enumerate(checked):
        name = f"img_{n:05d}{ext}"
        size = path.stat().st_size
        os.replace(path, dest_dir / name)
        out.append({"file": name, "client_filename": client, "bytes": size})
    return out


@dataclass(frozen=True)
class _Entry:
    """Where an entry sits in the zip: ``index`` in the central directory (from 0) of
    ``count`` entries; what an error names instead of the entry's (client-made) name."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"Entry {self.index + 1} of the {self.count} in the zip"

    def details(self) -> dict[str, object]:
        return {"entry_index": self.index, "entries": self.count}


def _safe_member_name(info: zipfile.ZipInfo, at: _Entry) -> str:
    """The entry's name as a relative POSIX path, or raise ``unsafe_archive``."""
    name = info.filename.replace("\\", "/")
    if (name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\x00" in name):
        raise _unsafe(f"{at} has an absolute path.", **at.details())
    if any(p == ".." for p in PurePosixPath(name).parts):
        raise _unsafe(f"{at} points outside the archive ('..' in its path).", **at.details())
    if stat.S_ISLNK((info.external_attr >> 16) & 0xFFFF):
        raise _unsafe(f"{at} is a symbolic link.", **at.details())
    return name


@dataclass(frozen=True)
class _Member:
    name: str
    info: zipfile.ZipInfo
    at: _Entry


def _photo_members(zf: zipfile.ZipFile, caps: ZipCaps) -> list[_Member]:
    """The zip's photo entries in natural order, after every check that needs no extraction
    (entry count, names, links, types, encryption, declared sizes and ratios, photo count)."""
    infos = zf.infolist()
    if len(infos) > caps.max_entries:
        raise _unsafe(f"The zip holds {len(infos)} entries; at most {caps.max_entries} are "
                      "accepted.", entries=len(infos), max_entries=caps.max_entries)
    members = []
    declared = 0
    for index, info in enumerate(infos):
        at = _Entry(index, len(infos))
        name = _safe_member_name(info, at)
        if info.is_dir() or _IGNORED.search(name):
            continue
        if image_ext(name) is None:
            raise unsupported_image(str(at), "only .jpg, .jpeg and .png files may be in the zip",
                                    **at.details())
        if info.flag_bits & 0x1:
            raise _unsafe(f"{at} is encrypted.", **at.details())
        declared += info.file_size
        ratio = info.file_size / max(1, info.compress_size)
        if ratio > caps.max_ratio:
            raise _unsafe(f"{at} expands {ratio:.0f}x; at most {caps.max_ratio:.0f}x is "
                          "accepted (zip bomb?).", **at.details(), ratio=round(ratio, 1),
                          max_ratio=caps.max_ratio)
        members.append(_Member(name, info, at))
    if declared > caps.max_total_bytes:
        raise _unsafe(f"The zip would expand to {declared} bytes; at most "
                      f"{caps.max_total_bytes} are accepted.", uncompressed_bytes=declared,
                      max_uncompressed_bytes=caps.max_total_bytes)
    check_count(len(members))
    members.sort(key=lambda m: natural_key(m.name))
    return members


def _blocks(zf: zipfile.ZipFile, m: _Member) -> Generator[bytes, None, None]:
    """The entry's bytes: its first 16 (the magic bytes), then blocks of ``_COPY_BLOCK``.

    Raises: PipelineError("unsafe_archive") naming the entry's position when it cannot be
    read (damaged data, a CRC or header mismatch, an unsupported compression method).
    """
    try:
        with zf.open(m.info) as src:
            yield src.read(16)
            while block := src.read(_COPY_BLOCK):
                yield block
    except _READ_ERRORS:
        raise _unsafe(f"{m.at} cannot be read: its data is damaged or uses an unsupported "
                      "compression method.", **m.at.details()) from None


def _copy_member(zf: zipfile.ZipFile, m: _Member, stem: Path, total: int,
                 caps: ZipCaps) -> tuple[Path, int]:
    """Stream one entry to ``stem`` + the extension of its real type (:func:`sniff_ext`; the
    file must not exist), counting the real bytes against its declared size and the caps;
    returns ``(path written, bytes written)``."""
    with contextlib.closing(_blocks(zf, m)) as blocks:
        head = next(blocks)
        ext = sniff_ext(head)
        if ext is None:
            raise unsupported_image(str(m.at), _NOT_PHOTO_CONTENT, **m.at.details())
        target = stem.with_suffix(ext)
        with open(target, "xb") as dst:
            dst.write(head)
            written = len(head)
            for block in blocks:
                written += len(block)
                if (written > m.info.file_size or total + written > caps.max_total_bytes
                        or written > caps.max_ratio * max(1, m.info.compress_size)):
                    raise _unsafe(f"{m.at} expands beyond its declared size or the caps (zip "
                                  "bomb?).", **m.at.details())
                dst.write(block)
    return target, written


def extract_photo_zip(zip_path: Path, dest_dir: Path,
                      max_entries: int = MAX_ZIP_ENTRIES,
                      max_total_bytes: int = MAX_ZIP_UNCOMPRESSED_BYTES,
                      max_ratio: float = MAX_ZIP_RATIO) -> list[InstalledPhoto]:
    """Check the zip at ``zip_path`` and extract its photos into ``dest_dir`` as
    ``img_NNNNN<ext>`` (natural order of entry names); blocking: run it in a thread.

    Checks, all before the first byte is written: the zip opens; at most ``max_entries``
    entries; no entry name is absolute, has a drive letter or a ``..`` component, and no entry
    is a symbolic link; every file entry (folders, ``__MACOSX/`` and hidden files are ignored)
    is named .jpg/.jpeg/.png; the declared uncompressed total is at most ``max_total_bytes``
    and no entry's declared ratio exceeds ``max_ratio``. During extraction the real bytes are
    counted against the same caps and the declared size, and each entry's first bytes must be
    JPEG or PNG magic bytes; it is stored with the extension of that real type.

    Returns:
        as :func:`install_photo_files` (``client_filename`` = the entry name).

    Raises:
        PipelineError: ``unsafe_archive`` (422: not a zip, too many entries, path traversal,
            absolute path, link, encryption, bomb caps, an entry that cannot be read),
            ``unsupported_image`` (415: an entry that is not a photo), ``too_few_frames`` /
            ``invalid_request`` (photo count). An entry is named by its position
            (``details.entry_index``, ``details.entries``), never by its name. ``dest_dir``
            may hold partial output on failure: the caller removes the job folder.
    """
    caps = ZipCaps(max_entries, max_total_bytes, max_ratio)
    try:
        zf = zipfile.ZipFile(zip_path)
    except _READ_ERRORS:  # the texts may quote the archive's bytes: none is passed on
        raise _unsafe("The file is not a readable zip archive.") from None
    with zf:
        members = _photo_members(zf, caps)
        dest_dir.mkdir(parents=True, exist_ok=True)
        total = 0
        out: list[InstalledPhoto] = []
        for n, m in enumerate(members):
            target, written = _copy_member(zf, m, dest_dir / f"img_{n:05d}", total, caps)
            total += written
            out.append({"file": target.name, "client_filename": m.name, "bytes": written})
        return out
