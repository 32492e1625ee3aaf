"""Streaming receipt of ``multipart/form-data`` uploads straight to disk.

FastAPI's ``UploadFile`` (and Starlette's ``request.form()``) spool the whole request body to a
temporary file before the route runs, so a size limit checked in the route comes too late. This
module instead:

1. rejects a ``Content-Length`` above the limit before a single body byte is read;
2. feeds ``request.stream()`` chunk by chunk through python-multipart's streaming parser;
3. writes the one file part directly into ``dest_dir`` under a server-made name, hashing it on
   the way, with disk I/O and hashing off the event loop (``asyncio.to_thread``);
4. stops reading the moment the file (or the raw body) passes the limit;
5. removes the partial file on every failure, client disconnects included.

The client's file name is kept as metadata only and never touches the file system.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from uuid import uuid4

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header
from starlette.requests import Request

from colmap_pipeline.errors import PipelineError

#: Bytes allowed on top of ``max_bytes`` for the multipart framing and the text fields, both for
#: the ``Content-Length`` pre-check and for the raw-body cap of chunked uploads.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
#: Suffix of a file that is still being received; such a file is removed on any failure, and one
#: left behind by a hard crash (SIGKILL, power loss) is safe to sweep at start-up.
PARTIAL_SUFFIX = ".part"
#: Suffix of a completely received file (renamed from ``PARTIAL_SUFFIX`` on success).
UPLOAD_SUFFIX = ".upload"

_HINT_MULTIPART = ("Send the form as multipart/form-data (e.g. curl -F 'video=@clip.mp4' "
                   "-F 'project_id=…'); see /docs.")


@dataclass
class ReceivedUpload:
    """A completely received multipart upload.

    Attributes:
        fields: the text form fields, name -> value (UTF-8 decoded).
        file_field: name of the form field that carried the file (one of ``file_fields``).
        path: where the file body was written: ``dest_dir/<32 hex chars>.upload``, a name made by
            the server. The caller owns the file from now on (move it, or delete it).
        size_bytes: size of the file body in bytes.
        sha256: lowercase hex SHA-256 digest of the file body.
        client_filename: the ``filename`` the client sent, or ``None``; metadata only, never used
            on disk.
        client_content_type: the part's ``Content-Type`` as the client sent it, or ``None``;
            metadata only (do not trust it, probe the file).
    """

    fields: dict[str, str]
    file_field: str
    path: Path
    size_bytes: int
    sha256: str
    client_filename: str | None
    client_content_type: str | None = None


def _invalid(message: str, hint: str = "", **details: object) -> PipelineError:
    return PipelineError("invalid_request", message=message, hint=hint, details=details or None)


class _PartFile:
    """The file being received: an unbuffered handle plus its running SHA-256.

    Opening, closing and renaming happen on the event loop (single cheap metadata system calls,
    like the ``unlink`` of the cleanup path, and they must not race with it); the block writes
    and the hashing run in worker threads via :meth:`write`.
    """

    def __init__(self, path: Path) -> None:
        # "xb": never follow or overwrite an existing path; unbuffered, so close() writes nothing.
        self.fh = open(path, "xb", buffering=0)  # noqa: SIM115 - closed by close()/abandon()
        self.hasher = hashlib.sha256()
        self.busy = False  # True while a worker thread may still be using fh

    def write(self, data: bytes) -> None:
        """Hash and write one block, all of it (runs in a worker thread)."""
        try:
            self.hasher.update(data)
            view = memoryview(data)
            while view:
                view = view[self.fh.write(view):]
        finally:
            self.busy = False

    def abandon(self) -> None:
        """Close now unless a worker thread (orphaned by cancellation) still writes; in that
        case the handle is closed when the thread drops the last reference to it."""
        if not self.busy:
            with contextlib.suppress(OSError):
                self.fh.close()


class _FormReceiver:
    """python-multipart callbacks plus the state they build; no I/O happens here.

    The callbacks run synchronously inside ``MultipartParser.write``; file bytes are queued in
    ``pending`` for the async loop to write. Limit violations raise :class:`PipelineError`
    from inside the callback, which aborts the parser at once.
    """

    def __init__(self, file_fields: AbstractSet[str], max_bytes: int, max_field_bytes: int,
                 max_fields: int) -> None:
        self.file_fields = file_fields
        self.max_bytes = max_bytes
        self.max_field_bytes = max_field_bytes
        self.max_fields = max_fields

        self.fields: dict[str, str] = {}
        self.file_field: str | None = None
        self.client_filename: str | None = None
        self.client_content_type: str | None = None
        self.file_size = 0
        self.file_done = False
        self.ended = False
        self.pending: list[bytes] = []

        self._header_name = bytearray()
        self._header_value = bytearray()
        self._part_headers: dict[bytes, bytes] = {}
        self._part_name = ""
        self._part_is_file = False
        self._text = bytearray()

    # -- callbacks -------------------------------------------------------------------------
    def on_part_begin(self) -> None:
        self._part_headers = {}
        self._part_name = ""
        self._part_is_file = False
        self._text = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._part_headers[bytes(self._header_name).strip().lower()] = bytes(self._header_value)
        self._header_name = bytearray()
        self._header_value = bytearray()

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(
            self._part_headers.get(b"content-disposition", b"").decode("latin-1"))
        raw_name = options.get(b"name")
        if disposition != b"form-data" or raw_name is None:
            raise _invalid("A multipart part has no 'Content-Disposition: form-data; name=…' "
                           "header.", _HINT_MULTIPART)
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid("A form field name is not valid UTF-8.", _HINT_MULTIPART) from None
        self._part_name = name
        raw_filename = options.get(b"filename")

        if name in self.file_fields:
            if self.file_field is not None:
                raise _invalid(f"More than one file was sent (fields {self.file_field!r} and "
                               f"{name!r}); send exactly one.", field=name)
            self.file_field = name
            self._part_is_file = True
            if raw_filename is not None:
                self.client_filename = raw_filename.decode("utf-8", errors="replace")
            ctype = self._part_headers.get(b"content-type")
            if ctype is not None:
                self.client_content_type = ctype.decode("latin-1").strip()
        elif raw_filename is not None:
            raise _invalid(f"Unexpected file field {name!r}; the file goes in "
                           f"{_names(self.file_fields)}.", field=name)
        else:
            if name in self.fields:
                raise _invalid(f"Form field {name!r} was sent more than once.", field=name)
            if len(self.fields) >= self.max_fields:
                raise _invalid(f"Too many form fields (at most {self.max_fields}).",
                               max_fields=self.max_fields)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self._part_is_file:
            self.file_size += n
            if self.file_size > self.max_bytes:
                raise PipelineError("upload_too_large",
                                    message=f"The file is larger than the limit of "
                                            f"{self.max_bytes} bytes.",
                                    details={"max_bytes": self.max_bytes,
                                             "received_bytes": self.file_size})
            if n:
                self.pending.append(data[start:end])
        else:
            if len(self._text) + n > self.max_field_bytes:
                raise _invalid(f"Form field {self._part_name!r} is longer than "
                               f"{self.max_field_bytes} bytes.",
                               field=self._part_name, max_field_bytes=self.max_field_bytes)
            self._text += data[start:end]

    def on_part_end(self) -> None:
        if self._part_is_file:
            self.file_done = True
            return
        try:
            self.fields[self._part_name] = self._text.decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid(f"Form field {self._part_name!r} is not valid UTF-8.",
                           field=self._part_name) from None

    def on_end(self) -> None:
        self.ended = True

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_end": self.on_end,
        }


def _names(file_fields: AbstractSet[str]) -> str:
    return " or ".join(repr(f) for f in sorted(file_fields))


def _boundary(request: Request) -> bytes:
    ctype_header = request.headers.get("content-type", "")
    ctype, params = parse_options_header(ctype_header)
    boundary = params.get(b"boundary", b"")
    if ctype != b"multipart/form-data" or not boundary:
        raise _invalid("The request must be multipart/form-data with a boundary "
                       f"(got Content-Type {ctype_header or 'none'!r}).", _HINT_MULTIPART,
                       content_type=ctype_header or None)
    return boundary


def _check_content_length(request: Request, max_bytes: int) -> None:
    raw = request.headers.get("content-length")
    if raw is None:
        return
    try:
        content_length = int(raw)
    except ValueError:
        raise _invalid("The Content-Length header is not an integer.") from None
    if content_length > max_bytes + MULTIPART_OVERHEAD_BYTES:
        raise PipelineError(
            "upload_too_large",
            message=f"The upload ({content_length} bytes) is larger than the limit of "
                    f"{max_bytes} bytes.",
            details={"max_bytes": max_bytes, "content_length": content_length})


async def receive_upload(request: Request, dest_dir: Path, *, max_bytes: int,
                         file_fields: AbstractSet[str] = frozenset({"video"}),
                         max_field_bytes: int = 64 * 1024,
                         chunk_write_bytes: int = 1 << 20,
                         max_fields: int = 32) -> ReceivedUpload:
    """Stream a ``multipart/form-data`` request body to disk, enforcing size limits as it goes.

    The body must hold exactly one file part, named one of ``file_fields``, plus any number (up
    to ``max_fields``) of text fields. The file body is written to ``dest_dir`` (created if
    missing) under a server-made name; the client's file name is never used on disk. Do not
    read the body (``request.form()``, ``UploadFile``, body parameters) before calling this.

    Args:
        request: the Starlette/FastAPI request; its body stream must be unread.
        dest_dir: directory for the file; put it on the same file system as the file's final
            home so the caller can ``os.replace`` it there.
        max_bytes: largest accepted file body, in bytes. A ``Content-Length`` above
            ``max_bytes + MULTIPART_OVERHEAD_BYTES`` is refused before the body is read; a raw
            body (e.g. chunked, without ``Content-Length``) is cut off past that same total.
        file_fields: names of form fields that may carry the file.
        max_field_bytes: largest accepted text field value, in bytes.
        chunk_write_bytes: file bytes buffered in memory before each write to disk.
        max_fields: largest accepted number of text fields.

    Returns:
        The :class:`ReceivedUpload`; its ``path`` is ``dest_dir/<hex>.upload``.

    Raises:
        PipelineError: ``invalid_request`` (422) for a Content-Type that is not
            multipart/form-data with a boundary, a malformed or truncated body, a missing file
            field (``details={"field": name}``), a second file, a file in an unknown field, a
            text field over ``max_field_bytes``, duplicated, not UTF-8, or too many fields;
            ``upload_too_large`` (413, ``details["max_bytes"]`` plus ``content_length`` or
            ``received_bytes``); ``empty_file`` (400) for a 0-byte file body.
        starlette.requests.ClientDisconnect: the client went away mid-body (nothing to
            answer; the caller should just log it).
        OSError: the file could not be written (e.g. disk full).

        On every failure, nothing is left in ``dest_dir``.
    """
    if max_bytes < 1 or chunk_write_bytes < 1:
        raise ValueError("max_bytes and chunk_write_bytes must be positive")
    _check_content_length(request, max_bytes)
    boundary = _boundary(request)
    file_fields = set(file_fields)

    form = _FormReceiver(file_fields, max_bytes, max_field_bytes, max_fields)
    try:
        parser = MultipartParser(boundary, form.callbacks())
    except FormParserError as exc:
        raise _invalid(f"Invalid multipart boundary: {exc}", _HINT_MULTIPART) from None

    raw_limit = max_bytes + MULTIPART_OVERHEAD_BYTES
    stem = uuid4().hex
    partial = dest_dir / f"{stem}{PARTIAL_SUFFIX}"
    final = dest_dir / f"{stem}{UPLOAD_SUFFIX}"
    part_file: _PartFile | None = None
    buf = bytearray()
    raw_total = 0
    success = False

    async def flush() -> None:
        nonlocal part_file, buf
        if not buf:
            return
        if part_file is None:
            dest_dir.mkdir(parents=True, exist_ok=True)
            part_file = _PartFile(partial)
        block, buf = bytes(buf), bytearray()
        part_file.busy = True
        await asyncio.to_thread(part_file.write, block)

    try:
        async with contextlib.aclosing(request.stream()) as stream:
            async for chunk in stream:
                if not chunk:
                    continue
                raw_total += len(chunk)
                if raw_total > raw_limit:
                    raise PipelineError(
                        "upload_too_large",
                        message=f"The upload is larger than the limit of {max_bytes} bytes.",
                        details={"max_bytes": max_bytes, "received_bytes": raw_total})
                try:
                    parser.write(chunk)
                except FormParserError as exc:
                    raise _invalid(f"Malformed multipart body: {exc}", _HINT_MULTIPART) from None
                for piece in form.pending:
                    buf += piece
                    if len(buf) >= chunk_write_bytes:
                        await flush()
                form.pending.clear()
        parser.finalize()

        if not form.ended:
            raise _invalid("The multipart body ended before its closing boundary.",
                           _HINT_MULTIPART)
        if form.file_field is None:
            missing = sorted(file_fields)
            raise PipelineError("invalid_request",
                                message=f"Missing form field {_names(file_fields)}",
                                hint="Attach the video file as a multipart file field.",
                                details={"field": missing[0]} if len(missing) == 1
                                else {"fields": missing})
        if form.file_size == 0:
            raise PipelineError("empty_file", details={"field": form.file_field})
        await flush()
        if part_file is None:  # pragma: no cover - file_size > 0 implies a flushed block
            raise RuntimeError("file bytes counted but never written")
        part_file.fh.close()
        os.replace(partial, final)
        success = True
        return ReceivedUpload(fields=form.fields, file_field=form.file_field, path=final,
                              size_bytes=form.file_size, sha256=part_file.hasher.hexdigest(),
                              client_filename=form.client_filename,
                              client_content_type=form.client_content_type)
    finally:
        if not success:
            # Synchronous on purpose: this also runs when the task is being cancelled, and
            # closing plus unlinking one file are cheap metadata operations.
            if part_file is not None:
                part_file.abandon()
            for path in (partial, final):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


# --- several files in one form (POST /upload-images, issue 4) -------------------------------

@dataclass
class ReceivedFiles:
    """A completely received multipart upload holding one or more files.

    Attributes:
        fields: the text form fields, name -> value.
        files: one :class:`ReceivedUpload` per file part, in the order received (each with
            ``fields`` = the same dict). The caller owns the files (move or delete them).
        total_bytes: sum of the file sizes.
    """

    fields: dict[str, str]
    files: list[ReceivedUpload]
    total_bytes: int


class _MultiFormReceiver(_FormReceiver):
    """:class:`_FormReceiver` that accepts up to ``max_files`` file parts; ``max_bytes`` caps
    the files' total. ``pending`` holds ``(file index, bytes)`` pairs."""

    def __init__(self, file_fields: AbstractSet[str], max_bytes: int, max_field_bytes: int,
                 max_fields: int, max_files: int) -> None:
        super().__init__(file_fields, max_bytes, max_field_bytes, max_fields)
        self.max_files = max_files
        self.parts: list[dict] = []  # {"field", "filename", "content_type", "size"}
        self.pending_multi: list[tuple[int, bytes]] = []

    def on_headers_finished(self) -> None:
        # let the parent validate the part; reset its one-file guard first
        self.file_field = None
        super().on_headers_finished()
        if self._part_is_file:
            if len(self.parts) >= self.max_files:
                raise _invalid(f"Too many files (at most {self.max_files}).",
                               max_files=self.max_files)
            self.parts.append({"field": self._part_name, "filename": self.client_filename,
                               "content_type": self.client_content_type, "size": 0})
            self.client_filename = None
            self.client_content_type = None

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._part_is_file:
            super().on_part_data(data, start, end)
            return
        n = end - start
        self.file_size += n
        self.parts[-1]["size"] += n
        if self.file_size > self.max_bytes:
            raise PipelineError("upload_too_large",
                                message=f"The files are larger than the limit of "
                                        f"{self.max_bytes} bytes in total.",
                                details={"max_bytes": self.max_bytes,
                                         "received_bytes": self.file_size})
        if n:
            self.pending_multi.append((len(self.parts) - 1, data[start:end]))


async def receive_files(request: Request, dest_dir: Path, *, max_bytes: int,
                        file_fields: AbstractSet[str] = frozenset({"images"}),
                        max_files: int = 300, max_field_bytes: int = 64 * 1024,
                        max_fields: int = 32) -> ReceivedFiles:
    """Stream a ``multipart/form-data`` body with one or more file parts to disk.

    Like :func:`receive_upload` (same checks, same errors, same guarantees: server-made
    names ``dest_dir/<hex>.upload``, nothing left in ``dest_dir`` on failure, disk writes off
    the event loop), except that up to ``max_files`` file parts, each named one of
    ``file_fields`` (the same name may repeat), are accepted and ``max_bytes`` caps their total.

    Raises:
        PipelineError: as :func:`receive_upload`; ``invalid_request`` also for more than
            ``max_files`` files; ``empty_file`` when any file is empty.
        starlette.requests.ClientDisconnect, OSError: as :func:`receive_upload`.
    """
    if max_bytes < 1 or max_files < 1:
        raise ValueError("max_bytes and max_files must be positive")
    _check_content_length(request, max_bytes)
    boundary = _boundary(request)
    form = _MultiFormReceiver(set(file_fields), max_bytes, max_field_bytes, max_fields,
                              max_files)
    try:
        parser = MultipartParser(boundary, form.callbacks())
    except FormParserError as exc:
        raise _invalid(f"Invalid multipart boundary: {exc}", _HINT_MULTIPART) from None
    raw_limit = max_bytes + MULTIPART_OVERHEAD_BYTES
    handles: list[tuple[Path, Path, _PartFile | None]] = []  # partial, final, file
    raw_total = 0
    success = False

    async def write(index: int, block: bytes) -> None:
        while len(handles) <= index:
            stem = uuid4().hex
            handles.append((dest_dir / f"{stem}{PARTIAL_SUFFIX}",
                            dest_dir / f"{stem}{UPLOAD_SUFFIX}", None))
        partial, final, pf = handles[index]
        if pf is None:
            dest_dir.mkdir(parents=True, exist_ok=True)
            pf = _PartFile(partial)
            handles[index] = (partial, final, pf)
        pf.busy = True
        await asyncio.to_thread(pf.write, block)

    try:
        async with contextlib.aclosing(request.stream()) as stream:
            async for chunk in stream:
                if not chunk:
                    continue
                raw_total += len(chunk)
                if raw_total > raw_limit:
                    raise PipelineError(
                        "upload_too_large",
                        message=f"The upload is larger than the limit of {max_bytes} bytes.",
                        details={"max_bytes": max_bytes, "received_bytes": raw_total})
                try:
                    parser.write(chunk)
                except FormParserError as exc:
                    raise _invalid(f"Malformed multipart body: {exc}", _HINT_MULTIPART) from None
                # coalesce consecutive blocks of the same file into one write
                merged: list[tuple[int, bytearray]] = []
                for idx, piece in form.pending_multi:
                    if merged and merged[-1][0] == idx:
                        merged[-1][1].extend(piece)
                    else:
                        merged.append((idx, bytearray(piece)))
                form.pending_multi.clear()
                for idx, block in merged:
                    await write(idx, bytes(block))
        parser.finalize()
        if not form.ended:
            raise _invalid("The multipart body ended before its closing boundary.",
                           _HINT_MULTIPART)
        if not form.parts:
            missing = sorted(file_fields)
            raise PipelineError("invalid_request",
                                message=f"Missing form field {_names(file_fields)}",
                                hint="Attach the photos as multipart file fields.",
                                details={"field": missing[0]} if len(missing) == 1
                                else {"fields": missing})
        empty = [i for i, p in enumerate(form.parts) if p["size"] == 0]
        if empty:
            raise PipelineError("empty_file", message="An uploaded file is empty.",
                                details={"field": form.parts[empty[0]]["field"],
                                         "file_index": empty[0]})
        out = []
        for i, part in enumerate(form.parts):
            partial, final, pf = handles[i]
            pf.fh.close()
            os.replace(partial, final)
            out.append(ReceivedUpload(fields=form.fields, file_field=part["field"], path=final,
                                      size_bytes=part["size"], sha256=pf.hasher.hexdigest(),
                                      client_filename=part["filename"],
                                      client_content_type=part["content_type"]))
        success = True
        return ReceivedFiles(fields=form.fields, files=out, total_bytes=form.file_size)
    finally:
        if not success:
            for partial, final, pf in handles:
                if pf is not None:
                    pf.abandon()
                for path in (partial, final):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
