"""Watching a job (issue 16): ``GET /jobs/{id}/events``, its changes as Server-Sent Events
(:mod:`.events`), and ``GET /jobs/{id}/log``, the tail of its stage logs as text lines (like
NodeODM's ``output?line=``). Both go through :func:`.views.live_job` (another key's job is "not
found") and take a signed link's ``token`` instead of a key (:func:`.auth.link_or_caller`): an
``EventSource`` cannot send a header, so the job view carries a signed ``events_url``.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import PlainTextResponse, Response
from fastapi.sse import EventSourceResponse

from ..errors import PipelineError
from ..jobs import JobStatus
from ..layout import DataDir, Workspace
from ..protocol import STAGES
from .auth import AUTH_RESPONSES, LinkOrCallerDep
from .deps import SettingsDep, StoreDep, is_draining
from .events import MAX_EVENT_ID, finished_before, parse_last_event_id, stream
from .schemas import ErrorResponse
from .views import live_job

router = APIRouter(tags=["jobs"], responses=AUTH_RESPONSES)

#: most lines one ``GET /jobs/{id}/log`` answers
MAX_LOG_LINES = 1000
#: characters kept of one log line (the rest is cut, marked with …)
MAX_LOG_LINE_CHARS = 2000
#: the header naming the ``since`` of the next call
NEXT_LINE_HEADER = "X-Next-Line"

_STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_EVENTS_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": "text/event-stream: one message per event, id = event_id, data = "
                         "JSON {kind, job_id, event_id, created_at, status, progress, "
                         "current_stage, message, attempt, updated_at, …}",
          # the schema of one event of the stream (OpenAPI 3.2's ``itemSchema`` convention)
          "content": {"text/event-stream": {"schema": {
              "type": "object", "required": ["data"],
              "properties": {"data": {"type": "string", "contentMediaType": "application/json",
                                      "description": "the event as JSON"},
                             "event": {"type": "string"}, "id": {"type": "string"},
                             "retry": {"type": "integer", "minimum": 0}}}}}},
    204: {"description": "resumed (Last-Event-ID) after the job's last event, and the job is "
                         "done: nothing more will come (an EventSource stops reconnecting)"},
    404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}}


# Not ``response_class=EventSourceResponse``: FastAPI then expects a generator and streams it
# at once, while this route answers 404/422/204 before the stream starts (and returns the
# stream itself, an EventSourceResponse of our own heartbeat-aware generator).
@router.get("/jobs/{job_id}/events", responses=_EVENTS_DOC,
            summary="Live events of a job (Server-Sent Events)")
async def job_events(
        job_id: str, request: Request, store: StoreDep, caller: LinkOrCallerDep,
        last_event_id_header: Annotated[str | None, Header(
            alias="Last-Event-ID", description="resume after this event id (an EventSource "
            "sends it when it reconnects)")] = None,
        last_event_id: Annotated[int | None, Query(
            ge=0, le=MAX_EVENT_ID, description="the same as the Last-Event-ID header, for "
            "clients that cannot set it (the header wins)")] = None) -> Response:
    """Every change of the job as it happens: status, progress, stage and message, ladder
    attempts, warnings. The first message is a ``snapshot`` of the job's state unless the
    client resumes with ``Last-Event-ID``; then only later events come. A ``: heartbeat``
    comment comes every 15 s without events. The stream ends after the event that leaves the
    job completed, failed or cancelled (and when the server shuts down: reconnect with
    ``Last-Event-ID``). 404 ``not_found`` as ``GET /jobs/{job_id}``; 422 ``invalid_request``
    for a ``Last-Event-ID`` that is not an event id. ``curl -N URL`` shows it live."""
    job = await live_job(store, job_id, caller)
    after = parse_last_event_id(last_event_id_header, last_event_id)
    if after is not None and await finished_before(store, job, after):
        return Response(status_code=204)
    return EventSourceResponse(stream(store, job, after, draining=lambda: is_draining(request)),
                               headers=_STREAM_HEADERS)


@router.head("/jobs/{job_id}/events", include_in_schema=False)
async def job_events_head(job_id: str, store: StoreDep, caller: LinkOrCallerDep) -> Response:
    """``HEAD``: the stream's status and headers at once (run as ``GET`` by ``HeadAsGet``, the
    stream of a running job would keep the answer open until the job ends)."""
    await live_job(store, job_id, caller)
    return Response(media_type=EventSourceResponse.media_type, headers=_STREAM_HEADERS)


def read_log_lines(ws: Workspace, since: int, limit: int) -> tuple[list[str], bool]:
    """Lines ``since .. since+limit`` of the job's stage logs, the stages in pipeline order,
    each line prefixed ``[stage] `` and cut at :data:`MAX_LOG_LINE_CHARS`; and whether any
    stage log exists. Blocking (call in a thread). Bytes that are not UTF-8 are replaced, and
    the workspace's path on this server is written ``WORKSPACE`` (no server path leaves)."""
    out: list[str] = []
    n, found = 0, False
    root = str(ws.root)
    for stage in STAGES:
        path: Path = ws.log(stage)
        try:
            f = open(path, encoding="utf-8", errors="replace", newline=None)  # noqa: SIM115
        except FileNotFoundError:
            continue
        found = True
        with f:
            for line in f:
                if n >= since:
                    text = line.rstrip("\n").replace(root, "WORKSPACE")
                    if len(text) > MAX_LOG_LINE_CHARS:
                        text = text[:MAX_LOG_LINE_CHARS] + "…"
                    out.append(f"[{stage}] {text}")
                    if len(out) >= limit:
                        return out, found
                n += 1
    return out, found


# Not ``response_class=PlainTextResponse``: FastAPI would then document the JSON error answers
# (401, 404, 422) as text/plain too; the route returns its PlainTextResponse itself.
@router.get("/jobs/{job_id}/log",
            responses={200: {"description": f"text/plain, one log line per line; the header "
                             f"{NEXT_LINE_HEADER} is the since of the next call",
                             "content": {"text/plain": {"schema": {"type": "string"}}},
                             "headers": {NEXT_LINE_HEADER: {"schema": {"type": "integer"}}}},
                       404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
            summary="The tail of the job's stage logs (text lines)")
async def job_log(
        job_id: str, store: StoreDep, settings: SettingsDep, caller: LinkOrCallerDep,
        since: Annotated[int, Query(ge=0, le=10**9, description="first line to return "
                                    "(0-based; the previous answer's X-Next-Line)")] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_LOG_LINES,
                                    description="most lines to return")] = MAX_LOG_LINES,
) -> PlainTextResponse:
    """The stage children's logs (their stderr: COLMAP's and the pipeline's messages), the
    stages in pipeline order, one line per line prefixed with its stage (``[features] …``),
    from line ``since`` on, at most ``limit`` (1000) lines of at most 2000 characters. Poll
    with ``since`` = the answer's ``X-Next-Line`` header for the new lines, like NodeODM's
    ``output?line=``. A job whose stages have not started yet answers no line. In bucket mode
    (``STORAGE_BUCKET``) a replica has only the logs of the stages it ran or restored: 404
    ``log_not_available`` when it has none (follow ``/events`` there instead). 404
    ``not_found`` as ``GET /jobs/{job_id}``."""
    job = await live_job(store, job_id, caller)
    ws = DataDir(settings.data_dir).job(job_id).work
    lines, found = await asyncio.to_thread(read_log_lines, ws, since, limit)
    if not found and settings.storage_bucket and job.status != JobStatus.PENDING:
        raise PipelineError("log_not_available")
    body = "".join(f"{line}\n" for line in lines)
    return PlainTextResponse(body, headers={NEXT_LINE_HEADER: str(since + len(lines)),
                                            "Cache-Control": "no-store"})
