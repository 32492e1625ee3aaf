"""Photo-set input (issue 4): safe installation of uploaded photos or a zip of photos into a job
folder, and the frames stage's preparation of a photo set.

Upload side (API process; no pycolmap, no image decoding, only ``zipfile`` and magic bytes):

* :func:`install_photo_files` moves already-received image files into ``JOB/input/images/``
  under server-made names (``img_00000.jpg`` ...), in the natural order of the client's file
  names (metadata only, never used on disk);
* :func:`extract_photo_zip` checks a zip before writing anything (entry count, declared total
  size, per-entry compression ratio, entry names: ``..``, absolute paths, drive letters,
  symbolic links; non-image entries), then streams each entry to a server-made name, counting
  the real bytes (a zip may lie about sizes). Every failure raises ``PipelineError`` with a
  4xx code and leaves nothing behind (the caller removes the job folder).

Frames-stage side (child process): :func:`prepare_photo_frames` decodes each photo with OpenCV,
which applies the EXIF orientation tag (``cv2.IMREAD_COLOR`` honours it unless
``IMREAD_IGNORE_ORIENTATION`` is given), scales it to the preset's size and writes it as a plain
JPEG without EXIF into ``frames/``. COLMAP then reads those upright pixels, so decoding and SfM
see the same orientation (COLMAP itself ignores the EXIF orientation tag). Because the frames
carry no EXIF, the focal length COLMAP would have read from it is taken here instead
(:func:`exif_focal_px`, with Pillow) and handed to the mapping stage as ``focal_prior_px``.
"""
from __future__ import annotations

import os
import re
import stat
import zipfile
from pathlib import Path, PurePosixPath

from ..errors import PipelineError

#: Accepted photo types, by extension and by magic bytes (JPEG: FF D8 FF, ITU T.81 / JFIF;
#: PNG: the 8-byte signature of RFC 2083 section 3.1).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MAGIC = {".jpg": b"\xff\xd8\xff", ".jpeg": b"\xff\xd8\xff", ".png": b"\x89PNG\r\n\x1a\n"}
#: Smallest and largest photo set (SfM needs at least 3 views; the largest preset selects 100
#: video frames, photo sets get a little more room).
MIN_PHOTOS = 3
MAX_PHOTOS = 300
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


def natural_key(name: str) -> list:
    """Sort key that orders ``img2`` before ``img10`` (digits compared as numbers)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _unsafe(message: str, **details: object) -> PipelineError:
    return PipelineError("unsafe_archive", message=message, details=details or None)


def _not_image(name: str, why: str) -> PipelineError:
    return PipelineError("unsupported_image",
                         message=f"{name!r} is not a JPEG or PNG photo ({why}).",
                         details={"file": name[:200]})


def image_ext(name: str) -> str | None:
    """Lower-case extension of ``name`` if it is a photo type (``.jpg``/``.jpeg``/``.png``)."""
    ext = os.path.splitext(name)[1].lower()
    return ext if ext in IMAGE_EXTENSIONS else None


def check_magic(head: bytes, ext: str, name: str) -> None:
    """Raise ``unsupported_image`` unless ``head`` starts with the magic bytes of ``ext``."""
    if not head.startswith(MAGIC[ext]):
        raise _not_image(name, "its content does not start like a " + ext[1:].upper() + " file")


def _check_count(n: int) -> None:
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


def install_photo_files(files: list[tuple[Path, str | None]], dest_dir: Path) -> list[dict]:
    """Move received photo files into ``dest_dir`` as ``img_NNNNN<ext>``.

    Args:
        files: ``(received path, client file name or None)`` per photo, in upload order.
        dest_dir: created; must be inside the job folder.

    Returns:
        ``[{"file": server name, "client_filename": str | None, "bytes": int}]`` in the order
        used (natural order of client names, then upload order).

    Raises:
        PipelineError: ``unsupported_image`` (415) for a name without .jpg/.jpeg/.png or content
            without the type's magic bytes; ``too_few_frames`` / ``invalid_request`` (422) for
            fewer than ``MIN_PHOTOS`` or more than ``MAX_PHOTOS`` photos.
    """
    _check_count(len(files))
    checked = []
    for i, (path, client) in enumerate(files):
        label = client or f"file #{i + 1}"
        ext = image_ext(client or "") or ""
        with open(path, "rb") as fh:
            head = fh.read(16)
        if not ext:  # no usable name: decide by content
            ext = next((e for e in (".jpg", ".png") if head.startswith(MAGIC[e])), "")
            if not ext:
                raise _not_image(label, "its name does not end in .jpg, .jpeg or .png")
        check_magic(head, ext, label)
        checked.append((natural_key(client or ""), i, path, client, ".jpg" if ext == ".jpeg"
                        else ext))
    checked.sort(key=lambda t: (t[0], t[1]))
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for n, (_, _, path, client, ext) in enumerate(checked):
        name = f"img_{n:05d}{ext}"
        size = path.stat().st_size
        os.replace(path, dest_dir / name)
        out.append({"file": name, "client_filename": client, "bytes": size})
    return out


def _safe_member_name(info: zipfile.ZipInfo) -> str:
    """The entry's name as a relative POSIX path, or raise ``unsafe_archive``."""
    raw = info.filename
    name = raw.replace("\\", "/")
    if (name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\x00" in name):
        raise _unsafe(f"The zip holds an entry with an absolute path ({raw[:200]!r}).",
                      entry=raw[:200])
    parts = PurePosixPath(name).parts
    if any(p == ".." for p in parts):
        raise _unsafe(f"The zip holds an entry that points outside the archive "
                      f"({raw[:200]!r}).", entry=raw[:200])
    mode = (info.external_attr >> 16) & 0xFFFF
    if stat.S_ISLNK(mode):
        raise _unsafe(f"The zip holds a symbolic link ({raw[:200]!r}).", entry=raw[:200])
    return name


def extract_photo_zip(zip_path: Path, dest_dir: Path,
                      max_entries: int = MAX_ZIP_ENTRIES,
                      max_total_bytes: int = MAX_ZIP_UNCOMPRESSED_BYTES,
                      max_ratio: float = MAX_ZIP_RATIO) -> list[dict]:
    """Check the zip at ``zip_path`` and extract its photos into ``dest_dir`` as
    ``img_NNNNN<ext>`` (natural order of entry names); blocking: run it in a thread.

    Checks, all before the first byte is written: the zip opens; at most ``max_entries``
    entries; no entry name is absolute, has a drive letter or a ``..`` component, and no entry
    is a symbolic link; every file entry (folders, ``__MACOSX/`` and hidden files are ignored)
    is named .jpg/.jpeg/.png; the declared uncompressed total is at most ``max_total_bytes``
    and no entry's declared ratio exceeds ``max_ratio``. During extraction the real bytes are
    counted against the same caps and the declared size, and each entry's first bytes must be
    the magic bytes of its type.

    Returns:
        as :func:`install_photo_files` (``client_filename`` = the entry name).

    Raises:
        PipelineError: ``unsafe_archive`` (422: not a zip, too many entries, path traversal,
            absolute path, link, bomb caps), ``unsupported_image`` (415: an entry that is not
            a photo), ``too_few_frames`` / ``invalid_request`` (photo count). ``dest_dir`` may
            hold partial output on failure: the caller removes the job folder.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _unsafe(f"The file is not a readable zip archive ({exc}).") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_entries:
            raise _unsafe(f"The zip holds {len(infos)} entries; at most {max_entries} are "
                          "accepted.", entries=len(infos), max_entries=max_entries)
        members = []
        declared = 0
        for info in infos:
            name = _safe_member_name(info)
            if info.is_dir() or _IGNORED.search(name):
                continue
            ext = image_ext(name)
            if ext is None:
                raise _not_image(name, "only .jpg, .jpeg and .png files may be in the zip")
            if info.flag_bits & 0x1:
                raise _unsafe(f"The zip entry {name[:200]!r} is encrypted.", entry=name[:200])
            declared += info.file_size
            ratio = info.file_size / max(1, info.compress_size)
            if ratio > max_ratio:
                raise _unsafe(f"The zip entry {name[:200]!r} expands {ratio:.0f}x; at most "
                              f"{max_ratio:.0f}x is accepted (zip bomb?).", entry=name[:200],
                              ratio=round(ratio, 1), max_ratio=max_ratio)
            members.append((natural_key(name), name, info, ext))
        if declared > max_total_bytes:
            raise _unsafe(f"The zip would expand to {declared} bytes; at most "
                          f"{max_total_bytes} are accepted.", uncompressed_bytes=declared,
                          max_uncompressed_bytes=max_total_bytes)
        _check_count(len(members))
        members.sort(key=lambda m: m[0])
        dest_dir.mkdir(parents=True, exist_ok=True)
        total = 0
        out = []
        for n, (_, name, info, ext) in enumerate(members):
            ext = ".jpg" if ext == ".jpeg" else ext
            target = dest_dir / f"img_{n:05d}{ext}"
            written = 0
            with zf.open(info) as src, open(target, "xb") as dst:
                head = src.read(16)
                check_magic(head, ext, name)
                dst.write(head)
                written = len(head)
                while block := src.read(_COPY_BLOCK):
                    written += len(block)
                    if (written > info.file_size or total + written > max_total_bytes
                            or written > max_ratio * max(1, info.compress_size)):
                        raise _unsafe(f"The zip entry {name[:200]!r} expands beyond its "
                                      "declared size or the caps (zip bomb?).",
                                      entry=name[:200])
                    dst.write(block)
            total += written
            out.append({"file": target.name, "client_filename": name, "bytes": written})
        return out


#: EXIF tags (CIPA DC-008 / JEITA CP-3451): the Exif sub-IFD pointer, FocalLength (mm),
#: FocalLengthIn35mmFilm (mm), FocalPlaneXResolution, FocalPlaneResolutionUnit, PixelXDimension,
#: PixelYDimension.
EXIF_IFD = 0x8769
TAG_FOCAL_LENGTH = 0x920A
TAG_FOCAL_35MM = 0xA405
TAG_FOCAL_PLANE_XRES = 0xA20E
TAG_FOCAL_PLANE_UNIT = 0xA210
TAG_PIXEL_X = 0xA002
TAG_PIXEL_Y = 0xA003
#: FocalPlaneResolutionUnit values in mm (2 = inch, 3 = cm, 4 = mm, 5 = micrometre).
_PLANE_UNIT_MM = {2: 25.4, 3: 10.0, 4: 1.0, 5: 0.001}
#: Diagonal of the 36 x 24 mm frame: the 35 mm equivalent focal length scales with the diagonal
#: (crop factor = 43.27 mm / sensor diagonal).
FULL_FRAME_DIAGONAL_MM = 43.2666
#: Photos whose EXIF focal lengths (px) differ by more than this fraction are not one camera
#: setting (zoomed between shots): no shared prior.
FOCAL_PRIOR_AGREEMENT = 0.02


def exif_focal_px(path: str | os.PathLike, width: int, height: int) -> dict | None:
    """Focal length (px) of a photo at the size it is given to SfM, from its EXIF.

    In order: ``FocalLengthIn35mmFilm`` x (pixel diagonal / 43.27 mm); else ``FocalLength`` x
    ``FocalPlaneXResolution`` (px per unit on the sensor, at ``PixelXDimension``), scaled to
    ``max(width, height)``. Both are what COLMAP's own image reader would use when it sees the
    EXIF (``src/colmap/sensor/bitmap.cc``, ``ExifFocalLength``); the frames written here carry no
    EXIF, so the value is passed on instead.

    Args:
        path: the uploaded photo (JPEG or PNG; PNG usually has no EXIF).
        width, height: size (px) of the frame made from it (after orientation and scaling).

    Returns:
        ``{"focal_px": float, "source": "exif_focal_35mm" | "exif_focal_plane"}``, or ``None``
        when the photo has no usable EXIF focal length. Never raises for bad EXIF.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            ifd = im.getexif().get_ifd(EXIF_IFD)
            orig = (im.width, im.height)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None

    def num(tag: int) -> float | None:
        try:
            v = float(ifd.get(tag)) if ifd.get(tag) is not None else None
        except (TypeError, ValueError, ZeroDivisionError):
            return None
        return v if v is not None and v > 0 and v == v and v != float("inf") else None

    f35 = num(TAG_FOCAL_35MM)
    if f35:
        diag = (float(width) ** 2 + float(height) ** 2) ** 0.5
        return {"focal_px": f35 * diag / FULL_FRAME_DIAGONAL_MM, "source": "exif_focal_35mm"}
    f_mm, xres = num(TAG_FOCAL_LENGTH), num(TAG_FOCAL_PLANE_XRES)
    unit = _PLANE_UNIT_MM.get(int(num(TAG_FOCAL_PLANE_UNIT) or 2))
    if f_mm and xres and unit:
        px_w = num(TAG_PIXEL_X) or max(orig)
        px_h = num(TAG_PIXEL_Y) or min(orig)
        f_orig = f_mm * xres / unit  # px at the sensor's full resolution
        return {"focal_px": f_orig * max(width, height) / max(px_w, px_h),
                "source": "exif_focal_plane"}
    return None


def shared_focal_prior(priors: list[dict | None]) -> dict | None:
    """One focal prior for a photo set (one shared camera): the median of the photos' EXIF
    focal lengths when every photo has one and they agree within ``FOCAL_PRIOR_AGREEMENT``;
    else ``None``. Returns ``{"focal_px", "source", "photos"}``."""
    if not priors or any(p is None for p in priors):
        return None
    f = sorted(p["focal_px"] for p in priors)
    if f[-1] > f[0] * (1.0 + FOCAL_PRIOR_AGREEMENT):
        return None
    mid = f[len(f) // 2] if len(f) % 2 else 0.5 * (f[len(f) // 2 - 1] + f[len(f) // 2])
    return {"focal_px": round(mid, 3), "source": priors[0]["source"], "photos": len(priors)}


def prepare_photo_frames(input_dir: str | os.PathLike, frames_dir: str | os.PathLike,
                         max_image_size: int | None = None, jpeg_quality: int = 95) -> dict:
    """Decode every photo of ``input_dir`` upright (EXIF orientation applied by OpenCV), scale
    its longest side to at most ``max_image_size`` px (INTER_AREA) and write it to
    ``frames_dir/frame_NNNNN.jpg`` (no EXIF, so COLMAP sees the same upright pixels).

    Returns:
        ``{"frames": [{"file", "source", "width", "height", "exif_focal_px"}], "num_decoded":
        int, "video": {"kind": "images", "images": int, "width": int, "height": int},
        "input_kind": "images", "focal_prior_px": float | None, "focal_prior": {"focal_px",
        "source", "photos"} | None}`` (the shape of the video path's ``frames.json``; the prior
        from :func:`shared_focal_prior`).

    Raises:
        PipelineError("unsupported_image"): a photo cannot be decoded;
        PipelineError("too_few_frames"): fewer than ``MIN_PHOTOS`` photos;
        PipelineError("invalid_request"): photos of different sizes (one shared camera).
    """
    import cv2

    src = Path(input_dir)
    out = Path(frames_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = sorted((p.name for p in src.iterdir() if p.is_file() and image_ext(p.name)),
                   key=natural_key)
    _check_count(len(names))
    frames = []
    priors: list[dict | None] = []
    sizes = set()
    for i, name in enumerate(names):
        img = cv2.imread(str(src / name), cv2.IMREAD_COLOR)  # applies EXIF orientation
        if img is None:
            raise _not_image(name, "it cannot be decoded")
        h, w = img.shape[:2]
        if max_image_size and max(h, w) > max_image_size:
            s = max_image_size / max(h, w)
            img = cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))),
                             interpolation=cv2.INTER_AREA)
        h, w = img.shape[:2]
        sizes.add((w, h))
        file = f"frame_{i:05d}.jpg"
        if not cv2.imwrite(str(out / file), img, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]):
            raise PipelineError("pipeline_error", details={"reason": f"cannot write {file}"})
        exif = exif_focal_px(src / name, w, h)
        priors.append(exif)
        frames.append({"file": file, "source": name, "width": w, "height": h,
                       "exif_focal_px": None if exif is None else round(exif["focal_px"], 3)})
    if len(sizes) != 1:
        raise PipelineError("invalid_request",
                            message="The photos have different sizes after orientation; one "
                                    "camera (same size, same zoom) is expected.",
                            hint="Upload photos from one camera at one resolution and zoom.",
                            details={"sizes": sorted(sizes)[:10]})
    w, h = sizes.pop()
    prior = shared_focal_prior(priors)
    return {"frames": frames, "num_decoded": len(frames), "input_kind": "images",
            "video": {"kind": "images", "images": len(frames), "width": w, "height": h},
            "focal_prior": prior, "focal_prior_px": None if prior is None else prior["focal_px"]}
