"""The upload form's ``webhook_url`` (issue 16): checked before the job is created, so a
target the server would refuse to call is refused at once with 422 and a stable code.

The job's target is the form's URL, else the global ``WEBHOOK_URL`` (the operator's, not
checked here; every delivery re-checks its target after DNS resolution,
:mod:`..runner.webhooks`).
"""
from __future__ import annotations

from ..config import Settings
from ..errors import PipelineError
from ..runner.webhook_targets import Resolver, TargetRefused, check_target, system_resolve


async def job_webhook_url(form_value: str | None, settings: Settings, *,
                          resolve: Resolver = system_resolve) -> str | None:
    """The ``webhook_url`` to store on the new job: ``form_value`` once checked
    (:func:`..runner.webhook_targets.check_target`: http/https, and with
    ``WEBHOOK_ALLOW_PRIVATE`` off a host resolving only to public addresses; the lookup runs
    off the event loop), else ``WEBHOOK_URL`` (``None`` when neither is set).

    Raises: PipelineError ``webhooks_not_configured`` (422) when the form names a URL but
    ``WEBHOOK_SECRET`` is empty; ``webhook_url_not_allowed`` (422) naming the rule that
    refused the URL (never echoing it).
    """
    if not form_value:
        return settings.webhook_url or None
    if not settings.webhook_secret.get_secret_value():
        raise PipelineError("webhooks_not_configured", details={"field": "webhook_url"})
    try:
        await check_target(form_value, allow_private=settings.webhook_allow_private,
                           resolve=resolve)
    except TargetRefused as exc:
        raise PipelineError("webhook_url_not_allowed", f"webhook_url refused: {exc.reason}.",
                            details={"field": "webhook_url"}) from None
    return form_value
