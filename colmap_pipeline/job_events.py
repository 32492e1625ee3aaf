"""A job's events (issue 16): what ``job_events`` records with each change of a job, written by
every store in the change's own transaction, and the subscription a stream waits on
(:class:`EventWaiter`). A light leaf like :mod:`.jobs`: no web, database or pycolmap import.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from .jobs import TERMINAL, Intent, JobStatus


class EventKind(StrEnum):
    """What an event in ``job_events`` records (every one carries the job's state after it)."""

    STATUS = "status"      #: created, or moved along a transition (:data:`.jobs.TRANSITIONS`)
    PROGRESS = "progress"  #: progress, stage or message of a processing job
    ATTEMPT = "attempt"    #: an attempt record was appended, or an attempt began in place
    WARNING = "warning"    #: a warning of a completed job's results (before its status event)


#: the job's fields every event's ``data`` carries, named as in ``GET /jobs/{id}``
EVENT_STATE: tuple[str, ...] = ("status", "progress", "current_stage", "message", "attempt",
                                "updated_at")
#: transitions after which a job keeps only its newest event (its files are gone; this bounds
#: ``job_events`` to one row per expired or deleted job)
PRUNE_EVENTS_ON: frozenset[Intent] = frozenset({Intent.EXPIRE, Intent.DELETE})
#: statuses after which a job's event stream ends (nothing follows until a client acts)
STREAM_END: frozenset[JobStatus] = TERMINAL | {JobStatus.EXPIRED, JobStatus.DELETED}


@dataclass(frozen=True)
class JobEvent:
    """One row of ``job_events``: ``event_id`` only grows (across all jobs: the SSE ``id``),
    ``created_at`` is ISO-8601 UTC, ``data`` a JSON object: :data:`EVENT_STATE` plus the
    kind's own fields (:func:`transition_events`)."""

    event_id: int
    job_id: str
    created_at: str
    kind: EventKind
    data: dict[str, Any]


class EventWaiter(Protocol):
    """A subscription to one job's new events (:meth:`.jobs.JobStore.event_waiter`)."""

    async def wait(self, after_id: int, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` seconds for an event newer than ``after_id``; True when one
        may have come (the caller then reads :meth:`.jobs.JobStore.events_after`), False on
        time-out. Never blocks the event loop."""


def event_state(row: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`EVENT_STATE` of a job row (a mapping or a :class:`.jobs.Job`'s ``__dict__``),
    the status as its text."""
    state = {c: row[c] for c in EVENT_STATE}
    state["status"] = str(JobStatus(state["status"]))
    return state


def transition_events(row: Mapping[str, Any], *, intent: Intent | None,
                      record: Mapping[str, Any] | None = None,
                      ) -> list[tuple[EventKind, dict[str, Any]]]:
    """The events a store writes with a status change, in order, in the change's transaction.

    Args:
        row: the job after the change: :data:`EVENT_STATE` plus ``error_code``,
            ``error_message``, ``error_hint`` and ``results`` (decoded JSON or ``None``).
        intent: the transition (``None``: the job was created, ``pending``).
        record: the attempt record appended in the same write, if any.
    Returns: ``[(kind, data)]``: the attempt record (``attempt``, data ``record``), then on
        ``complete`` each of the results' warnings (``warning``, data ``warning``), then the
        status (``status``, data ``intent``; ``error`` {code, message, hint} when failed).
    """
    state = event_state(row)
    out: list[tuple[EventKind, dict[str, Any]]] = []
    if record is not None:
        out.append((EventKind.ATTEMPT, {**state, "record": dict(record)}))
    results = row.get("results")
    if intent == Intent.COMPLETE and isinstance(results, Mapping):
        warnings = results.get("warnings") or []
        out += [(EventKind.WARNING, {**state, "warning": w})
                for w in (warnings if isinstance(warnings, Sequence) else [])
                if isinstance(w, Mapping)]
    status: dict[str, Any] = {**state, "intent": str(intent) if intent else "create"}
    if state["status"] == JobStatus.FAILED and row.get("error_code"):
        status["error"] = {"code": row["error_code"], "message": row.get("error_message") or "",
                           "hint": row.get("error_hint") or ""}
    out.append((EventKind.STATUS, status))
    return out


def attempt_event(row: Mapping[str, Any],
                  record: Mapping[str, Any] | None) -> tuple[EventKind, dict[str, Any]]:
    """The event of an attempt record appended without a status change, or (``record``
    ``None``) of a new attempt begun in place (``bump_attempt``)."""
    return EventKind.ATTEMPT, {**event_state(row),
                               "record": dict(record) if record is not None else None}
