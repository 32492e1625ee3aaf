"""The request body as the intake sees it (:class:`UploadBody`): the headers it needs, the
byte stream and the caller's identity, so that no web framework's request type leaves ``web/``.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class UploadBody:
    """A request body as the intake sees it: the headers it needs, the byte stream, its owner.

    Attributes:
        content_type: the ``Content-Type`` header (``multipart/form-data; boundary=…``), or
            ``None`` when absent.
        content_length: the raw ``Content-Length`` header, or ``None`` (e.g. chunked).
        chunks: the body, chunk by chunk, not yet read (e.g. Starlette's ``request.stream()``);
            closed (``aclose``) by :func:`.multipart.receive_files` when it has one.
        idempotency_key: the ``Idempotency-Key`` header as sent, or ``None``.
        owner: the name of the API key that sent the request (``Principal.name``), or ``None``
            when authentication is off. The new job belongs to it, and its
            ``Idempotency-Key`` is looked up among its jobs only.
    """

    content_type: str | None
    content_length: str | None
    chunks: AsyncIterator[bytes]
    idempotency_key: str | None = None
    owner: str | None = None
