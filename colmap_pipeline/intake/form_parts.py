"""The parts of a ``multipart/form-data`` body as python-multipart's callbacks see them:
:class:`FormReceiver` collects the text fields and the file parts' bytes (no I/O) and enforces
the per-part limits; and the receiver's errors (:func:`invalid`, :func:`too_large`).

No error echoes request bytes: a part is named by its field name only when the form defines
that name (``file_fields``, ``text_fields``), else by its position (:func:`part_label`).
:mod:`.multipart` drives the parser and writes the files.
"""
from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from python_multipart.multipart import parse_options_header

from ..errors import PipelineError

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

HINT_MULTIPART = ("Send the form as multipart/form-data (e.g. curl -F 'video=@clip.mp4' "
                  "-F 'project_id=…'); see /docs.")


def invalid(message: str, hint: str = "", /, **details: object) -> PipelineError:
    """``invalid_request`` (422) with ``details`` (none when empty)."""
    return PipelineError("invalid_request", message=message, hint=hint, details=details or None)


def part_label(name: str, index: int, known: AbstractSet[str]) -> tuple[str, dict[str, object]]:
    """How an error names the form part ``index`` (from 0) called ``name``: by its name when
    the form defines it (``known``), else by its position (the name is the client's)."""
    if name in known:
        return f"Form field {name!r}", {"field": name}
    return f"Part {index + 1} of the form", {"part_index": index}


def field_names(file_fields: AbstractSet[str]) -> str:
    """``'images' or 'zip'``: the file fields as a message names them."""
    return " or ".join(repr(f) for f in sorted(file_fields))


def too_large(max_bytes: int, received: int, what: str) -> PipelineError:
    """``upload_too_large`` (413): "``what`` larger than the limit", with ``max_bytes`` and the
    ``received`` byte count in details."""
    return PipelineError("upload_too_large",
                         message=f"{what} larger than the limit of {max_bytes} bytes.",
                         details={"max_bytes": max_bytes, "received_bytes": received})


@dataclass
class Part:
    """A file part: its field, client name and type, and its running size (bytes)."""

    field: str
    filename: str | None
    content_type: str | None
    size: int = 0


class FormReceiver:
    """python-multipart callbacks plus the state they build; no I/O happens here.

    The callbacks run synchronously inside ``MultipartParser.write``; file bytes are queued in
    ``pending`` as ``(file index, bytes)`` for the async loop to write. Limit violations raise
    :class:`PipelineError` from inside the callback, which aborts the parser at once.
    """

    def __init__(self, file_fields: AbstractSet[str], text_fields: AbstractSet[str], *,
                 max_bytes: int, max_files: int, max_field_bytes: int, max_fields: int) -> None:
        self.file_fields = file_fields
        self.known = file_fields | text_fields
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.max_field_bytes = max_field_bytes
        self.max_fields = max_fields

        self.fields: dict[str, str] = {}
        self.parts: list[Part] = []
        self.file_bytes = 0
        self.ended = False
        self.pending: list[tuple[int, bytes]] = []

        self._header_name = bytearray()
        self._header_value = bytearray()
        self._part_headers: dict[bytes, bytes] = {}
        self._part_name = ""
        self._part_index = -1
        self._part_is_file = False
        self._text = bytearray()

    def _label(self) -> tuple[str, dict[str, object]]:
        return part_label(self._part_name, self._part_index, self.known)

    # -- callbacks -------------------------------------------------------------------------
    def on_part_begin(self) -> None:
        self._part_index += 1
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
            raise invalid("A multipart part has no 'Content-Disposition: form-data; name=…' "
                          "header.", HINT_MULTIPART)
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid("A form field name is not valid UTF-8.", HINT_MULTIPART) from None
        self._part_name = name
        raw_filename = options.get(b"filename")
        if name in self.file_fields:
            self._begin_file(name, raw_filename)
        elif raw_filename is not None:
            what, details = self._label()
            raise invalid(f"{what} carries a file, but this form takes files only in "
                          f"{field_names(self.file_fields)}.", **details)
        elif name in self.fields:
            what, details = self._label()
            raise invalid(f"{what} repeats the name of an earlier field; send each field "
                          "once.", **details)
        elif len(self.fields) >= self.max_fields:
            raise invalid(f"Too many form fields (at most {self.max_fields}).",
                          max_fields=self.max_fields)

    def _begin_file(self, name: str, raw_filename: bytes | None) -> None:
        if len(self.parts) >= self.max_files:
            if self.max_files == 1:
                raise invalid(f"More than one file was sent (fields {self.parts[0].field!r} "
                              f"and {name!r}); send exactly one.", field=name)
            raise invalid(f"Too many files (at most {self.max_files}).",
                          max_files=self.max_files)
        ctype = self._part_headers.get(b"content-type")
        self._part_is_file = True
        self.parts.append(Part(
            field=name,
            filename=None if raw_filename is None else raw_filename.decode("utf-8", "replace"),
            content_type=None if ctype is None else ctype.decode("latin-1").strip()))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        if self._part_is_file:
            self.file_bytes += n
            self.parts[-1].size += n
            if self.file_bytes > self.max_bytes:
                what = "The file is" if self.max_files == 1 else "The files are in total"
                raise too_large(self.max_bytes, self.file_bytes, what)
            if n:
                self.pending.append((len(self.parts) - 1, data[start:end]))
            return
        if len(self._text) + n > self.max_field_bytes:
            what, details = self._label()
            raise invalid(f"{what} is longer than {self.max_field_bytes} bytes.", **details,
                          max_field_bytes=self.max_field_bytes)
        self._text += data[start:end]

    def on_part_end(self) -> None:
        if self._part_is_file:
            return
        try:
            self.fields[self._part_name] = self._text.decode("utf-8")
        except UnicodeDecodeError:
            what, details = self._label()
            raise invalid(f"{what} is not valid UTF-8.", **details) from None

    def on_end(self) -> None:
        self.ended = True

    def callbacks(self) -> MultipartCallbacks:
        """The ``on_*`` methods as python-multipart's ``callbacks`` mapping."""
        names = ("on_part_begin", "on_part_data", "on_part_end", "on_header_field",
                 "on_header_value", "on_header_end", "on_headers_finished", "on_end")
        return cast("MultipartCallbacks", {n: getattr(self, n) for n in names})
