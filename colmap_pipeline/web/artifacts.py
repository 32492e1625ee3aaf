"""``GET /jobs/{id}/artifacts/{name}``: one artifact of a completed job, for its owner's key
or a signed link (:func:`.auth.link_or_caller`), always as a download (``Content-Disposition:
attachment``, a media type from :data:`SAFE_MEDIA_TYPES`, ``nosniff``). The embedded mode
serves the workspace's file; bucket mode (``STORAGE_BUCKET``) redirects to a V4 signed URL of
the bucket when the credentials can sign, else streams the object through this service.

Also the small JSON objects routes read from the bucket when this replica's disk lacks them.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from ..config import Settings
from ..errors import PipelineError
from ..jobs import JobStatus
from ..layout import DataDir, ObjectKeys
from ..storage import Storage, StorageError, open_storage
from .auth import AUTH_RESPONSES, LinkOrCallerDep
from .deps import SettingsDep, StoreDep
from .file_answer import FileAnswer
from .schemas import ErrorResponse
from .views import live_job

router = APIRouter(tags=["jobs"], responses=AUTH_RESPONSES)

#: media types an artifact may be served as; anything else goes out as octet-stream
SAFE_MEDIA_TYPES = frozenset({"application/octet-stream", "application/zip",
                              "application/json", "model/gltf-binary", "image/jpeg",
                              "image/png"})
#: caching of a download: one user's file, never kept by a shared cache
DOWNLOAD_CACHE = "private, max-age=0"


def safe_media_type(media_type: str | None) -> str:
    """``media_type`` when it is in :data:`SAFE_MEDIA_TYPES`, else
    ``application/octet-stream`` (a download never renders as a page)."""
    return media_type if media_type in SAFE_MEDIA_TYPES else "application/octet-stream"


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
            raise PipelineError("artifact_not_found", "The file of this artifact is gone.")
        url = await asyncio.to_thread(storage.signed_url, key, ttl_s, filename=name,
                                      media_type=media_type)
    except StorageError as exc:
        raise PipelineError("not_ready", "The file store is unavailable.",
                            details={"failing": ["storage"]}) from exc
    if url is not None:
        return RedirectResponse(url, status_code=307,
                                headers={"Cache-Control": "private, max-age=0"})
    headers = {"Content-Length": str(info.size), "Cache-Control": DOWNLOAD_CACHE,
               "Content-Disposition": f'attachment; filename="{name}"'}
    media = safe_media_type(media_type or info.content_type)
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


@router.head("/jobs/{job_id}/artifacts/{name}", include_in_schema=False)
@router.get("/jobs/{job_id}/artifacts/{name}",
            responses={404: {"model": ErrorResponse}, 409: {"model": ErrorResponse},
                       307: {"description": "bucket mode: a V4 signed URL of the object"}},
            response_class=FileResponse, summary="Download one artifact")
async def get_artifact(job_id: str, name: str, request: Request, store: StoreDep,
                       settings: SettingsDep, caller: LinkOrCallerDep) -> Response:
    """The file of one of the job's ``artifacts`` (``HEAD``: its headers only), as an
    attachment. While API keys are on, the job's owner key or the signed ``url`` of the
    artifact (no header needed; 401 ``link_expired`` once expired). In bucket mode
    (``STORAGE_BUCKET``): a 307 redirect to a V4 signed URL valid ``ARTIFACT_URL_TTL_S`` when
    the credentials can sign, else the object streamed."""
    job = await live_job(store, job_id, caller)
    if job.status != JobStatus.COMPLETED:
        raise PipelineError("job_not_completed", f"The job is {job.status.value}.")
    arts = {a.get("name"): a for a in (job.results or {}).get("artifacts", [])
            if isinstance(a, dict)}
    if name not in arts:
        raise PipelineError("artifact_not_found", "The job has no artifact of this name.",
                            details={"available": sorted(str(n) for n in arts)})
    media_type = safe_media_type(arts[name].get("media_type"))
    storage = request_storage(request, settings)
    if storage.remote:
        return await bucket_artifact(storage, job_id, name, media_type,
                                     ttl_s=settings.artifact_url_ttl_s,
                                     head=request.method == "HEAD")
    path = DataDir(settings.data_dir).job(job_id).work.artifact(name)
    if not await asyncio.to_thread(path.is_file):
        raise PipelineError("artifact_not_found", "The file of this artifact is gone.")
    return FileAnswer(path, media_type=media_type, filename=name,
                      content_disposition_type="attachment",
                      headers={"Cache-Control": DOWNLOAD_CACHE})
