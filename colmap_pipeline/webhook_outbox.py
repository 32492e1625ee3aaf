"""The webhook outbox (issue 16): the ``webhook_deliveries`` row a store writes with a job's
transition to a terminal status (in the transition's own transaction), and the record of each
try. A light leaf like :mod:`.jobs`: no web, database or pycolmap import.
"""
from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from .jobs import COLUMNS, JobStatus


class DeliveryState(StrEnum):
    """Where a webhook delivery is (column ``webhook_deliveries.state``)."""

    PENDING = "pending"      #: waiting for its next try (``next_try_at``)
    DELIVERED = "delivered"  #: a try got a 2xx answer
    FAILED = "failed"        #: every try failed, or the target was refused (SSRF check)


#: the webhook event of each terminal status (Standard Webhooks ``type``)
WEBHOOK_EVENTS: Mapping[JobStatus, str] = MappingProxyType({
    JobStatus.COMPLETED: "job.completed", JobStatus.FAILED: "job.failed",
    JobStatus.CANCELLED: "job.cancelled"})


@dataclass(frozen=True)
class WebhookDelivery:
    """One row of ``webhook_deliveries``: one terminal event of one job for one URL.

    ``delivery_id`` is the Standard Webhooks message id (header ``webhook-id``; the same on
    every try, so a receiver can drop a repeat). ``payload`` is the job row as it was at the
    transition (:data:`.jobs.COLUMNS`, JSON decoded), written in the transition's own transaction;
    the body is made from it at each try. ``tries`` counts claimed tries; ``attempts`` holds
    one :func:`webhook_attempt` per finished try. Times are ISO-8601 UTC.
    """

    delivery_id: str
    job_id: str
    event_type: str
    url: str
    payload: dict[str, Any]
    state: DeliveryState
    tries: int
    next_try_at: str | None
    attempts: list[dict[str, Any]]
    created_at: str
    updated_at: str


#: columns of ``webhook_deliveries`` in :class:`WebhookDelivery`'s field order
DELIVERY_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(WebhookDelivery))


def webhook_delivery_row(job: Mapping[str, Any], delivery_id: str,
                         now: str) -> dict[str, Any] | None:
    """The ``webhook_deliveries`` row a store inserts with a transition to a terminal status
    (JSON values not encoded), or ``None`` when the job has no ``webhook_url`` or is not in a
    terminal status.

    Args:
        job: the job row after the transition (every column of :data:`COLUMNS`, decoded).
        delivery_id: a new unique id (``msg_`` + hex, :func:`new_delivery_id`).
        now: the transition's time; the first try is due at once.
    """
    event = WEBHOOK_EVENTS.get(JobStatus(job["status"]))
    if event is None or not job.get("webhook_url"):
        return None
    return {"delivery_id": delivery_id, "job_id": job["job_id"], "event_type": event,
            "url": job["webhook_url"], "payload": {c: job[c] for c in COLUMNS},
            "state": DeliveryState.PENDING.value, "tries": 0, "next_try_at": now,
            "attempts": [], "created_at": now, "updated_at": now}


def new_delivery_id() -> str:
    """A new webhook message id: ``msg_`` and 32 hex digits (a random UUID)."""
    return f"msg_{uuid.uuid4().hex}"


def webhook_attempt(try_number: int, at: str, *, http_status: int | None,
                    error: str | None, duration_ms: float) -> dict[str, Any]:
    """One finished try as ``webhook_deliveries.attempts`` stores it and
    ``GET /jobs/{id}/webhooks`` lists it: its number (from 1), when it started, the HTTP status
    answered (``None``: no answer), the error (``None`` after a 2xx) and its duration (ms)."""
    return {"try": try_number, "at": at, "http_status": http_status, "error": error,
            "duration_ms": round(duration_ms, 1)}
