"""``GET /jobs/{job_id}/webhooks``: a job's webhook deliveries and each try with its HTTP status
and time (issue 16); and :func:`webhook_renderer`, the body's ``data`` the dispatcher
(:mod:`..runner.webhooks`) sends: the job's public view, as ``GET /jobs/{id}`` shows it.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, Field

from ..jobs import Job
from ..webhook_outbox import DeliveryState, WebhookDelivery
from .auth import AUTH_RESPONSES, CallerDep
from .deps import StoreDep
from .schemas import ErrorResponse, JobPublic
from .views import live_job

router = APIRouter(tags=["jobs"], responses=AUTH_RESPONSES)


class WebhookTry(BaseModel):
    """One try of a delivery."""

    try_number: int = Field(alias="try", description="1 for the first try")
    at: str = Field(description="when the try started (ISO-8601 UTC)")
    http_status: int | None = Field(description="the receiver's HTTP status; null: no answer "
                                    "(refused connection, time-out, refused target)")
    error: str | None = Field(description="why the try failed; null after a 2xx answer")
    duration_ms: float = Field(description="time the try took (ms)")

    model_config = {"populate_by_name": True}


class WebhookDeliveryPublic(BaseModel):
    """One terminal event of the job sent to one URL, with its tries."""

    webhook_id: str = Field(description="the header webhook-id of every try (receivers drop "
                            "repeats by it)")
    event_type: str = Field(description="job.completed, job.failed or job.cancelled")
    url: str = Field(description="the target")
    state: DeliveryState = Field(description="pending (more tries to come), delivered (a 2xx "
                                 "answer) or failed (no try left, or the target was refused)")
    tries: int = Field(description="tries made or running")
    next_try_at: str | None = Field(description="when the next try is due (pending only)")
    created_at: str = Field(description="when the event happened (ISO-8601 UTC)")
    attempts: list[WebhookTry] = Field(description="every finished try, oldest first")

    @classmethod
    def from_delivery(cls, d: WebhookDelivery) -> WebhookDeliveryPublic:
        """The public form of a stored delivery."""
        pending = d.state == DeliveryState.PENDING
        return cls(webhook_id=d.delivery_id, event_type=d.event_type, url=d.url, state=d.state,
                   tries=d.tries, next_try_at=d.next_try_at if pending else None,
                   created_at=d.created_at,
                   attempts=[WebhookTry.model_validate(a) for a in d.attempts])


class WebhookList(BaseModel):
    """``GET /jobs/{job_id}/webhooks``."""

    job_id: str
    deliveries: list[WebhookDeliveryPublic] = Field(description="oldest first")


@router.get("/jobs/{job_id}/webhooks", response_model=WebhookList,
            responses={404: {"model": ErrorResponse}},
            summary="The job's webhook deliveries and their tries")
async def list_webhooks(job_id: str, store: StoreDep, caller: CallerDep) -> WebhookList:
    """Each webhook delivery of the job (one per terminal event: ``job.completed``,
    ``job.failed``, ``job.cancelled``; a retried job can have several) with every try's HTTP
    status, time, error and duration. 404 ``not_found`` for an unknown or deleted job, and for
    another API key's job."""
    job = await live_job(store, job_id, caller)
    found = await store.webhook_deliveries(job.job_id)
    return WebhookList(job_id=job.job_id,
                       deliveries=[WebhookDeliveryPublic.from_delivery(d) for d in found])


def webhook_renderer(app: FastAPI) -> Callable[[Job], Awaitable[dict[str, Any]]]:
    """The dispatcher's ``render``: the job's public view (:meth:`.schemas.JobPublic.from_job`,
    without ``user_email`` and queue position) as JSON, with artifact links signed while API
    keys are on (valid ``SIGNED_URL_TTL_S`` from the try) and absolute when
    ``PUBLIC_BASE_URL`` is set."""
    async def render(job: Job) -> dict[str, Any]:
        base = app.state.settings.public_base_url.rstrip("/")
        sign: Callable[[str], str] = (app.state.signer.sign if app.state.keyring.enabled
                                      else (lambda path: path))
        view = JobPublic.from_job(job, None, link=lambda path: base + sign(path),
                                  show_email=False)
        return view.model_dump(mode="json", exclude_unset=True)
    return render
