"""An artifact served from the bucket (bucket mode, ``STORAGE_BUCKET``): a redirect to a V4
signed URL when the credentials can sign, else the object streamed through this service; and
the small JSON objects routes read from the bucket when this replica's disk lacks them.

``GET /jobs/{id}/artifacts/{name}`` (:mod:`.routes_jobs`) checks the job and the name first;
the embedded mode serves the workspace's file there and never comes here.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from ..config import Settings
from ..errors import PipelineError
from ..layout import ObjectKeys
from ..storage import Storage, StorageError, open_storage


def request_storage(request: Request, settings: Settings) -> Storage:
    """``app.state.storage`` when the app has one (tests inject fakes), else the store of the
    settings (:func:`..storage.open_storage`)."""
    storage = getattr(request.app.state, "storage", None)
    return storage if isinstance(storage, Storage) else open_storage(settings)


async def _chunks(blocks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """The blocking iterator's chunks, each read in a thread (the event loop never waits on
    the bucket)."""
    done = object()
    while True:
        chunk = await asyncio.to_thread(next, blocks, done)
        if chunk is done:
            return
        assert isinstance(chunk, bytes)
        yield chunk


async def bucket_artifact(storage: Storage, job_id: str, name: str, media_type: str | None,
                          *, ttl_s: int, head: bool) -> Response:
    """The answer for artifact ``name`` of job ``job_id`` from ``storage``.

    Returns: 307 to a signed URL valid ``ttl_s`` seconds; or 200 streaming the object
        (``HEAD``: the same headers, no body) with ``Content-Length`` and a
        ``Content-Disposition`` naming ``name``.
    Raises: PipelineError: ``artifact_not_found`` (404) when the object is gone; ``not_ready``
        (503, naming ``storage``) when the bucket fails.
    """
    key = ObjectKeys(job_id).artifact(name)
    try:
        info = await asyncio.to_thread(storage.info, key)
        if info is None:
            raise PipelineError("artifact_not_found", f"The file of {name!r} is gone.")
        url = await asyncio.to_thread(storage.signed_url, key, ttl_s, filename=name,
                                      media_type=media_type)
    except StorageError as exc:
        raise PipelineError("not_ready", "The file store is unavailable.",
                            details={"failing": ["storage"]}) from exc
    if url is not None:
        return RedirectResponse(url, status_code=307,
                                headers={"Cache-Control": "private, max-age=0"})
    headers = {"Content-Length": str(info.size),
               "Content-Disposition": f'attachment; filename="{name}"'}
    media = media_type or info.content_type or "application/octet-stream"
    if head:
        return Response(status_code=200, media_type=media, headers=headers)
    return StreamingResponse(_chunks(storage.stream(key)), media_type=media, headers=headers)


async def bucket_json(storage: Storage, key: str) -> dict[str, Any] | None:
    """The JSON object stored as ``key`` in bucket mode; ``None`` in the embedded mode, when
    absent or not a JSON object.

    Raises: PipelineError("not_ready") (503, naming ``storage``) when the bucket fails.
    """
    if not storage.remote:
        return None
    try:
        data = await asyncio.to_thread(storage.read_bytes, key)
    except StorageError as exc:
        raise PipelineError("not_ready", "The file store is unavailable.",
                            details={"failing": ["storage"]}) from exc
    try:
        doc = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
