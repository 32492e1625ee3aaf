"""Streaming receipt of ``multipart/form-data`` uploads straight to disk: one receiver,
:func:`receive_files`, for the one video of ``POST /upload-video`` (``max_files=1``) and the
photos of ``POST /upload-images``.

FastAPI's ``UploadFile`` (and Starlette's ``request.form()``) spool the whole request body to a
temporary file before the route runs, so a size limit checked in the route comes too late. This
module instead:

1. rejects a ``Content-Length`` above the limit before a single body byte is read;
2. feeds the body chunk by chunk through python-multipart's streaming parser, waiting at most
   ``read_timeout_s`` for each chunk (a stalled client gets 408 ``upload_timeout``);
3. writes each file part directly into ``dest_dir`` under a server-made name, hashing it on
   the way, with disk I/O and hashing off the event loop (``asyncio.to_thread``);
4. stops reading the moment the files (or the raw body) pass the limit;
5. removes every partial file on every failure, client disconnects and timeouts included.

The client's file name is kept as metadata only and never touches the file system, nor an
error answer: the parts' limits and errors are :mod:`.form_parts`', and no parser message is
passed on (they quote the body). No web framework here: the body comes in as an
:class:`.upload_body.UploadBody` (headers plus an async byte stream), so the web layer's
request type stays in ``web/``.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from uuid import uuid4

from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from ..errors import PipelineError
from ..layout import PARTIAL_SUFFIX, UPLOAD_SUFFIX
from .form_parts import HINT_MULTIPART, FormReceiver, field_names, invalid, too_large
from .upload_body import UploadBody  # its home; imported from here too

#: Bytes allowed on top of ``max_bytes`` for the multipart framing and the text fields, both for
#: the ``Content-Length`` pre-check and for the raw-body cap of chunked uploads.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
#: seconds :func:`receive_files` waits for the next chunk when no ``read_timeout_s`` is given
DEFAULT_READ_TIMEOUT_S = 60.0

#: ``empty_file`` hint by file field (other fields: the catalog's, which names a video)
_EMPTY_HINTS = {"images": "Upload non-empty JPEG or PNG photos.", "zip": "Upload a non-empty zip."}


@dataclass
class ReceivedFile:
    """One completely received file part.

    Attributes:
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

    file_field: str
    path: Path
    size_bytes: int
    sha256: str
    client_filename: str | None
    client_content_type: str | None = None


@dataclass
class ReceivedFiles:
    """A completely received multipart upload.

    Attributes:
        fields: the text form fields, name -> value (UTF-8 decoded).
        files: one :class:`ReceivedFile` per file part, in the order received (at least one).
        total_bytes: sum of the file sizes (bytes).
    """

    fields: dict[str, str]
    files: list[ReceivedFile]
    total_bytes: int


class _PartFile:
    """One file being written: an unbuffered handle plus its running SHA-256.

    Opening, closing and renaming happen on the event loop (single cheap metadata system calls,
    like the ``unlink`` of the cleanup path, and they must not race with it); the block writes
    and the hashing run in worker threads via :meth:`write`.
    """

    def __init__(self, dest_dir: Path) -> None:
        stem = uuid4().hex
        self.partial = dest_dir / f"{stem}{PARTIAL_SUFFIX}"
        self.final = dest_dir / f"{stem}{UPLOAD_SUFFIX}"
        # "xb": never follow or overwrite an existing path; unbuffered, so close() writes nothing.
        self.fh = open(self.partial, "xb", buffering=0)  # noqa: SIM115 - closed by finish()/abandon()
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

    def finish(self) -> Path:
        """Close and rename ``.part`` -> ``.upload``; returns the final path."""
        self.fh.close()
        os.replace(self.partial, self.final)
        return self.final

    def abandon(self) -> None:
        """Close now unless a worker thread (orphaned by cancellation) still writes (then the
        handle closes when the thread drops the last reference to it), and remove both names."""
        if not self.busy:
            with contextlib.suppress(OSError):
                self.fh.close()
        for path in (self.partial, self.final):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@dataclass
class _Sink:
    """The files of one upload on disk: buffers each file's bytes up to ``block_bytes`` and
    hashes and writes them in a worker thread while the next block arrives (one block in
    flight at most: memory stays under ``2 * block_bytes`` per upload, and receipt and disk
    overlap instead of taking turns)."""

    dest_dir: Path
    block_bytes: int
    files: list[_PartFile | None] = field(default_factory=list)
    _index: int = -1
    _buf: bytearray = field(default_factory=bytearray)
    _inflight: asyncio.Task[None] | None = None

    async def add(self, index: int, data: bytes) -> None:
        if index != self._index:
            await self.flush()
            self._index = index
        self._buf += data
        if len(self._buf) >= self.block_bytes:
            await self.flush()

    async def flush(self) -> None:
        if not self._buf:
            return
        while len(self.files) <= self._index:
            self.files.append(None)
        pf = self.files[self._index]
        if pf is None:
            self.dest_dir.mkdir(parents=True, exist_ok=True)
            pf = self.files[self._index] = _PartFile(self.dest_dir)
        block, self._buf = bytes(self._buf), bytearray()
        await self.drain()  # the previous block is on disk before this one starts
        pf.busy = True
        self._inflight = asyncio.create_task(asyncio.to_thread(pf.write, block))

    async def drain(self) -> None:
        """Wait until the block in flight is written.

        Raises: OSError of that write (e.g. disk full).
        """
        task, self._inflight = self._inflight, None
        if task is not None:
            await task

    def abandon(self) -> None:
        """Remove every file (synchronous: also runs while the task is being cancelled); a
        write still in flight finishes in its thread, and its error is dropped."""
        if self._inflight is not None:
            self._inflight.add_done_callback(
                lambda t: None if t.cancelled() else t.exception())
            self._inflight = None
        for pf in filter(None, self.files):
            pf.abandon()


def _boundary(content_type: str | None) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type (never echoed in an error)."""
    ctype, params = parse_options_header(content_type or "")
    boundary = params.get(b"boundary", b"")
    if ctype != b"multipart/form-data" or not boundary:
        got = "has no Content-Type" if content_type is None else "has another Content-Type"
        raise invalid(f"The request must be multipart/form-data with a boundary; it {got}.",
                      HINT_MULTIPART, expected="multipart/form-data")
    return boundary


def _check_content_length(raw: str | None, max_bytes: int) -> None:
    """Refuse a Content-Length that is not a decimal number, or over the limit (the error
    gives the limit, not the client's number: no answer echoes a header)."""
    if raw is None:
        return
    if not raw.strip().isascii() or not raw.strip().isdigit():
        raise invalid("The Content-Length header is not an integer.")
    if int(raw) > max_bytes + MULTIPART_OVERHEAD_BYTES:
        raise PipelineError("upload_too_large", message="The upload's Content-Length is "
                            f"larger than the limit of {max_bytes} bytes.",
                            details={"max_bytes": max_bytes})


async def _next_chunk(it: AsyncIterator[bytes], timeout_s: float, received: int) -> bytes | None:
    """The next chunk, ``None`` at the end; 408 ``upload_timeout`` after ``timeout_s`` idle."""
    try:
        async with asyncio.timeout(timeout_s):
            return await anext(it)
    except StopAsyncIteration:
        return None
    except TimeoutError:
        raise PipelineError(
            "upload_timeout",
            message=f"No part of the upload arrived for {timeout_s:g} s "
                    f"(after {received} bytes).",
            details={"read_timeout_s": timeout_s, "received_bytes": received}) from None


async def _pump(body: UploadBody, parser: MultipartParser, form: FormReceiver, sink: _Sink,
                raw_limit: int, read_timeout_s: float) -> None:
    """Feed the whole body through the parser into ``sink``."""
    raw_total = 0
    it = aiter(body.chunks)
    try:
        while (chunk := await _next_chunk(it, read_timeout_s, raw_total)) is not None:
            raw_total += len(chunk)
            if raw_total > raw_limit:
                raise too_large(raw_limit - MULTIPART_OVERHEAD_BYTES, raw_total,
                                "The upload is")
            try:
                parser.write(chunk)
            except FormParserError:  # its text quotes the body: not passed on
                raise invalid("The multipart body is malformed.", HINT_MULTIPART,
                              received_bytes=raw_total) from None
            for index, piece in form.pending:
                await sink.add(index, piece)
            form.pending.clear()
        parser.finalize()
        await sink.flush()
        await sink.drain()
    finally:
        aclose = getattr(body.chunks, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


def _check_complete(form: FormReceiver, file_fields: AbstractSet[str]) -> None:
    if not form.ended:
        raise invalid("The multipart body ended before its closing boundary.",
                      HINT_MULTIPART)
    if not form.parts:
        missing = sorted(file_fields)
        raise PipelineError("invalid_request",
                            message=f"Missing form field {field_names(file_fields)}",
                            hint=f"Attach the file(s) as the multipart file field "
                                 f"{field_names(file_fields)}.",
                            details={"field": missing[0]} if len(missing) == 1
                            else {"fields": missing})
    empty = [i for i, p in enumerate(form.parts) if p.size == 0]
    if empty:
        details: dict[str, object] = {"field": form.parts[empty[0]].field}
        if form.max_files > 1:
            details["file_index"] = empty[0]
        raise PipelineError("empty_file", hint=_EMPTY_HINTS.get(form.parts[empty[0]].field, ""),
                            details=details)


async def receive_files(body: UploadBody, dest_dir: Path, *, max_bytes: int,
                        file_fields: AbstractSet[str] = frozenset({"video"}),
                        text_fields: AbstractSet[str] = frozenset(), max_files: int = 1,
                        max_field_bytes: int = 64 * 1024,
                        max_fields: int = 32, chunk_write_bytes: int = 1 << 20,
                        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S) -> ReceivedFiles:
    """Stream a ``multipart/form-data`` body to disk, enforcing size limits as it goes.

    The body must hold 1 to ``max_files`` file parts, each named one of ``file_fields`` (a
    name may repeat), plus up to ``max_fields`` text fields. Each file is written to
    ``dest_dir`` (created if missing) under a server-made name; the client's file name is never
    used on disk. Nothing else may have read ``body.chunks`` before.

    Args:
        body: headers and byte stream of the request.
        dest_dir: directory for the files; put it on the same file system as the files' final
            home so the caller can ``os.replace`` them there.
        max_bytes: largest accepted total of the file bodies, in bytes. A ``Content-Length``
            above ``max_bytes + MULTIPART_OVERHEAD_BYTES`` is refused before the body is read;
            a raw body (e.g. chunked, without ``Content-Length``) is cut off past that total.
        file_fields: names of form fields that may carry a file.
        text_fields: names of the text fields the form defines; an error names these and
            ``file_fields``, and any other part by its position (``details.part_index``, from
            0), never by the client's name.
        max_files: most file parts accepted (1 for a video).
        max_field_bytes: largest accepted text field value, in bytes.
        max_fields: largest accepted number of text fields.
        chunk_write_bytes: file bytes buffered in memory before each write to disk.
        read_timeout_s: longest wait for the next chunk of the body (s).

    Returns:
        The :class:`ReceivedFiles`; each file's ``path`` is ``dest_dir/<hex>.upload``.

    Raises:
        PipelineError: ``invalid_request`` (422) for a Content-Type that is not
            multipart/form-data with a boundary, a non-integer Content-Length, a malformed or
            truncated body, no file (``details={"field": name}``), more than ``max_files``
            files, a file in an unknown field, a text field over ``max_field_bytes``,
            duplicated, not UTF-8, or too many fields; ``upload_too_large`` (413,
            ``details["max_bytes"]``, plus ``received_bytes`` once the body was read);
            ``empty_file`` (400) for a 0-byte file; ``upload_timeout`` (408) when no chunk
            arrived for ``read_timeout_s``.
        starlette.requests.ClientDisconnect: (from Starlette's stream) the client went away
            mid-body; nothing to answer.
        OSError: a file could not be written (e.g. disk full).

        On every failure, nothing is left in ``dest_dir``.
    """
    if max_bytes < 1 or max_files < 1 or chunk_write_bytes < 1 or read_timeout_s <= 0:
        raise ValueError("max_bytes, max_files, chunk_write_bytes and read_timeout_s must be "
                         "positive")
    _check_content_length(body.content_length, max_bytes)
    boundary = _boundary(body.content_type)
    form = FormReceiver(frozenset(file_fields), frozenset(text_fields), max_bytes=max_bytes,
                         max_files=max_files, max_field_bytes=max_field_bytes,
                         max_fields=max_fields)
    try:
        parser = MultipartParser(boundary, form.callbacks())
    except FormParserError:
        raise invalid("The multipart boundary is invalid.", HINT_MULTIPART) from None
    sink = _Sink(dest_dir, chunk_write_bytes)
    try:
        await _pump(body, parser, form, sink, max_bytes + MULTIPART_OVERHEAD_BYTES,
                    read_timeout_s)
        _check_complete(form, file_fields)
        out = []
        for part, pf in zip(form.parts, sink.files, strict=True):
            if pf is None:  # pragma: no cover - size > 0 implies a flushed block
                raise RuntimeError("file bytes counted but never written")
            out.append(ReceivedFile(file_field=part.field, path=pf.finish(),
                                    size_bytes=part.size, sha256=pf.hasher.hexdigest(),
                                    client_filename=part.filename,
                                    client_content_type=part.content_type))
    except BaseException:
        sink.abandon()
        raise
    return ReceivedFiles(fields=form.fields, files=out, total_bytes=form.file_bytes)
