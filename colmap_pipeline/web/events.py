"""A job's events as Server-Sent Events (``GET /jobs/{id}/events``, issue 16): the wire format
and the stream, on any :class:`~..jobs.JobStore`.

Every event goes out as one SSE message with ``id:`` = its ``event_id`` (only grows) and
``data:`` = one JSON object: ``kind`` (``status``, ``progress``, ``attempt``, ``warning``, or
``snapshot`` for the state on connect), ``job_id``, ``event_id``, ``created_at``, the job's
``status``, ``progress``, ``current_stage``, ``message``, ``attempt`` and ``updated_at`` as in
``GET /jobs/{id}``, and the kind's own field (``record``, ``warning``, ``intent``, ``error``).
No ``event:`` name is sent, so a browser's ``EventSource.onmessage`` gets every one.

- Without ``Last-Event-ID`` the stream starts with a ``snapshot`` (the state of the job's newest
  event, with that event's id), so a late client sees where the job is.
- With ``Last-Event-ID: N`` (or ``?last_event_id=N``) it sends only the events after ``N``.
- A comment (``: heartbeat``) goes out after :data:`HEARTBEAT_S` seconds without a message.
- The stream ends after the job's last event when that leaves the job terminal (completed,
  failed, cancelled; or expired/deleted). A reconnect after that answers ``204 No Content``,
  which tells an ``EventSource`` to stop reconnecting.
- A draining server ends its streams (checked every :data:`DRAIN_CHECK_S` s); the client
  reconnects with ``Last-Event-ID`` to another replica, or after the restart, and misses none.

New events are waited for through the store's :meth:`~..jobs.JobStore.event_waiter`
(PostgreSQL: ``LISTEN/NOTIFY``; SQLite: polling on its reader threads): the event loop never
blocks.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.sse import ServerSentEvent, format_sse_event

from ..errors import PipelineError
from ..job_events import STREAM_END, EventKind, JobEvent, event_state
from ..jobs import EVENT_PAGE, Job, JobStore

#: seconds without a message after which a heartbeat comment is sent (tests lower it)
HEARTBEAT_S = 15.0
#: longest wait (s) on the store before the stream looks again whether the server drains
DRAIN_CHECK_S = 1.0
#: reconnection delay (ms) the first message tells an ``EventSource``
RETRY_MS = 3000
#: the largest ``Last-Event-ID`` accepted (a signed 64-bit integer)
MAX_EVENT_ID = 2**63 - 1
#: the ``kind`` of the message that carries the state on connect
SNAPSHOT = "snapshot"


def parse_last_event_id(header: str | None, query: int | None) -> int | None:
    """The event id to resume after: the ``Last-Event-ID`` header, else the query parameter,
    else ``None`` (start with a snapshot). An empty header counts as absent (an
    ``EventSource`` sends one when it had no id).

    Raises: PipelineError ``invalid_request`` (422) for a header that is not an integer in
        ``0 .. 2**63-1``.
    """
    text = (header or "").strip()
    if not text:
        return query
    if not text.isascii() or not text.isdigit() or int(text) > MAX_EVENT_ID:
        raise PipelineError("invalid_request", "Last-Event-ID must be an event id (an integer "
                            "sent as an event's id).",
                            "Send the id of the last event received, or no Last-Event-ID "
                            "header to start with the job's current state.",
                            details={"field": "Last-Event-ID"})
    return int(text)


def event_message(event: JobEvent, *, kind: str | None = None,
                  retry_ms: int | None = None) -> ServerSentEvent:
    """``event`` as an SSE message (module docstring); ``kind`` overrides its kind (the
    snapshot)."""
    data: dict[str, Any] = {"kind": kind or str(event.kind), "job_id": event.job_id,
                            "event_id": event.event_id, "created_at": event.created_at,
                            **event.data}
    if kind == SNAPSHOT:  # the state only, not the newest event's own fields
        data = {k: data[k] for k in ("kind", "job_id", "event_id", "created_at")} | \
            event_state(event.data)
    return ServerSentEvent(data=data, id=str(event.event_id), retry=retry_ms)


def encode(message: ServerSentEvent) -> bytes:
    """The wire bytes of ``message`` (FastAPI's :func:`~fastapi.sse.format_sse_event`; the
    data as compact JSON)."""
    data = None if message.data is None else json.dumps(message.data, separators=(",", ":"))
    return format_sse_event(data_str=data, id=message.id, retry=message.retry,
                            comment=message.comment)


def heartbeat() -> bytes:
    """The heartbeat comment."""
    return encode(ServerSentEvent(comment="heartbeat"))


def ends_stream(event: JobEvent) -> bool:
    """Whether the job is done after ``event`` (its status in :data:`~..job_events.STREAM_END`)."""
    return event.data.get("status") in STREAM_END


def legacy_snapshot(job: Job) -> JobEvent:
    """A snapshot for a job without events (stored before they existed): id 0."""
    return JobEvent(event_id=0, job_id=job.job_id, created_at=job.updated_at,
                    kind=EventKind.STATUS, data=event_state(vars(job)))


async def finished_before(store: JobStore, job: Job, after_id: int) -> bool:
    """Whether a client resuming after ``after_id`` has everything: the job's newest event is
    not newer and leaves it terminal, or a job without events is terminal (the route then
    answers 204)."""
    latest = await store.latest_event(job.job_id)
    if latest is None:
        return job.status in STREAM_END
    return latest.event_id <= after_id and ends_stream(latest)


async def stream(store: JobStore, job: Job, after_id: int | None, *,
                 draining: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic) -> AsyncIterator[bytes]:
    """The SSE bytes of ``job``'s events (module docstring): a snapshot when ``after_id`` is
    ``None``, else the events after it; heartbeats; ends after a terminal state or when
    ``draining()``. Raises what the store raises (the response then ends)."""
    async with store.event_waiter(job.job_id) as waiter:  # subscribed before the first read
        retry: int | None = RETRY_MS
        if after_id is None:
            latest = await store.latest_event(job.job_id) or legacy_snapshot(job)
            yield encode(event_message(latest, kind=SNAPSHOT, retry_ms=retry))
            retry, after_id = None, latest.event_id
            if ends_stream(latest):
                return
        last_sent = clock()
        while True:
            batch = await store.events_after(job.job_id, after_id)
            for event in batch:
                yield encode(event_message(event, retry_ms=retry))
                retry, after_id = None, event.event_id
            if batch:
                last_sent = clock()
                if ends_stream(batch[-1]) and len(batch) < EVENT_PAGE:
                    return  # one transaction's events are committed (and read) together
                continue
            while True:
                if draining():
                    return
                left = HEARTBEAT_S - (clock() - last_sent)
                if left <= 0:
                    yield heartbeat()
                    last_sent = clock()
                    continue
                if await waiter.wait(after_id, min(left, DRAIN_CHECK_S)):
                    break
