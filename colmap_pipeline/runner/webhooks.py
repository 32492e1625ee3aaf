"""Webhook delivery (issue 16): the dispatcher that sends the outbox rows the job store writes
with every transition to ``completed``, ``failed`` or ``cancelled`` of a job with a
``webhook_url`` (``webhook_deliveries``, written in the transition's own transaction, so a
server dying right after the commit loses nothing).

Every replica has one :class:`WebhookDispatcher` (made by the lifespan next to housekeeping;
its passes run in its own loop, or as queue tasks in PostgreSQL mode). Each pass claims due
rows one by one (the store's compare-and-set: ``tries`` + 1 and a lease of
:data:`LEASE_S`; PostgreSQL takes rows ``FOR UPDATE SKIP LOCKED``), so two replicas never
send the same try; a try is recorded only while the claim still holds. Per try:

1. the SSRF check again, after DNS resolution (:func:`.webhook_targets.check_target`); a
   refused target fails the delivery at once;
2. the body: ``{"type": "job.completed", "timestamp": …, "data": <the job's public view>}``
   (the Standard Webhooks payload shape; ``data`` is ``GET /jobs/{id}``'s model, made by the
   ``render`` callback the web layer passes in, from the job as it was at the transition);
3. signed with the ``standardwebhooks`` package (headers ``webhook-id``: the delivery id,
   the same on every try; ``webhook-timestamp``; ``webhook-signature``: ``v1,`` HMAC-SHA256
   with ``WEBHOOK_SECRET``), POSTed with httpx to the address just checked (:func:`pinned`:
   no second DNS lookup) within ``WEBHOOK_TIMEOUT_S``; redirects are not followed, proxies
   from the environment not used, the answer's body not read;
4. a 2xx answer delivers it; anything else is retried after a wait drawn with full jitter
   (:func:`retry_wait`) from ``WEBHOOK_RETRY_SCHEDULE_S`` (default bounds 10 s, 1, 3, 7, 15,
   25 and 40 min: 8 tries over about an hour), then the delivery fails.

Retries are rows, so they survive a restart: a try due while the server was down runs at the
next start, and a try whose server died mid-send is due again when its lease ends (the
receiver may then see that try twice, with the same ``webhook-id``). Embedded, :meth:`
WebhookDispatcher.start` runs a pass every :data:`POLL_S`; in PostgreSQL mode the passes run
through the queue instead (:meth:`.worker.QueueRunner.deliver_webhooks`: a periodic
procrastinate task).
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from standardwebhooks import Webhook

from ..config import Settings
from ..jobs import COLUMNS, Job, JobStatus, JobStore, StoreError, utc_iso
from ..webhook_outbox import DeliveryState, WebhookDelivery, webhook_attempt
from .webhook_targets import Resolver, TargetRefused, check_target, system_resolve

log = logging.getLogger("colmap_worker.webhooks")

#: seconds between passes over the due deliveries
POLL_S = 1.0
#: seconds a claimed try holds its row: due again after this if never recorded (its process
#: died); longer than any try (``WEBHOOK_TIMEOUT_S`` <= 60)
LEASE_S = 120.0
#: deliveries one pass sends at most (the rest wait for the next pass)
PASS_LIMIT = 50
#: characters of an error kept in an attempt record
MAX_ERROR_LEN = 300
#: the ``User-Agent`` of deliveries
USER_AGENT = "colmap-worker-webhooks"

#: turns the job (as at its transition) into the body's ``data`` (the public view, JSON-ready)
Render = Callable[[Job], Awaitable[dict[str, Any]]]


def retry_wait(retry: int, schedule: tuple[float, ...],
               rand: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait before retry number ``retry`` (1-based): full jitter,
    ``uniform(0.1 * bound, bound)`` with ``bound = schedule[retry - 1]`` (after M. Brooker,
    "Exponential Backoff And Jitter", AWS Architecture Blog 2015; as the runner's storage
    retries, :func:`.attempt.backoff_delay`).

    Raises: IndexError past the schedule's end (no retry left).
    """
    bound = schedule[retry - 1]
    return rand(0.1 * bound, bound)


def job_at_transition(delivery: WebhookDelivery) -> Job:
    """The job as the store saw it at the transition (the delivery's ``payload``)."""
    data: dict[str, Any] = {c: delivery.payload[c] for c in COLUMNS if c in delivery.payload}
    data["status"] = JobStatus(data["status"])
    data["attempts"] = data.get("attempts") or []
    return Job(**data)


def signed_request(secret: str, delivery: WebhookDelivery, data: dict[str, Any],
                   now: datetime) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one try: the Standard Webhooks envelope
    (``type``, ``timestamp``, ``data``) as compact JSON, signed at ``now``
    (``standardwebhooks.Webhook.sign``)."""
    envelope = {"type": delivery.event_type, "timestamp": utc_iso(now), "data": data}
    body = json.dumps(envelope, separators=(",", ":"), ensure_ascii=False)
    signature = Webhook(secret).sign(delivery.delivery_id, now, body)
    return body.encode("utf-8"), {
        "webhook-id": delivery.delivery_id, "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature, "content-type": "application/json",
        "user-agent": USER_AGENT}


def pinned(url: str, address: str,
           headers: dict[str, str]) -> tuple[httpx.URL, dict[str, Any]]:
    """``url`` sent to the checked ``address`` itself, so no second DNS answer (rebinding)
    can redirect the try: the URL's host becomes the address, ``headers`` get the original
    ``Host``, and HTTPS keeps the host name for SNI and certificate checks (httpx's
    ``sni_hostname`` request extension). Returns the URL and the request extensions."""
    original = httpx.URL(url)
    headers["host"] = original.netloc.decode("ascii")
    extensions = {"sni_hostname": original.host} if original.scheme == "https" else {}
    return original.copy_with(host=address), extensions


class WebhookDispatcher:
    """Sends the due webhook deliveries of the store (module docstring).

    Args:
        store: the job store (its ``webhooks`` block: claim, record).
        settings: ``WEBHOOK_SECRET``, ``WEBHOOK_ALLOW_PRIVATE``, ``WEBHOOK_RETRY_SCHEDULE_S``,
            ``WEBHOOK_TIMEOUT_S``.
        render: the job's public view (:data:`Render`).
        client: the HTTP client (tests pass one on ``httpx.MockTransport``); default: one of
            its own, closed by :meth:`close`.
        resolve: the DNS lookup of the SSRF check (tests pass a fake).
    """

    def __init__(self, store: JobStore, settings: Settings, render: Render, *,
                 client: httpx.AsyncClient | None = None,
                 resolve: Resolver = system_resolve) -> None:
        self.store = store
        self.settings = settings
        self.render = render
        self.schedule = settings.webhook_retry_delays_s
        self._own_client = client is None
        self.client = client or httpx.AsyncClient(
            timeout=settings.webhook_timeout_s, follow_redirects=False, trust_env=False)
        self.resolve = resolve
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        """Whether deliveries can be signed (``WEBHOOK_SECRET`` is set)."""
        return bool(self.settings.webhook_secret.get_secret_value())

    def wake(self) -> None:
        """Start the next pass now instead of after :data:`POLL_S`."""
        self._wake.set()

    def start(self) -> None:
        """Run :meth:`loop` in a background task until :meth:`stop`."""
        self._stopping = False
        self._task = asyncio.create_task(self.loop(lambda: self._stopping), name="webhooks")

    async def stop(self, grace_s: float) -> None:
        """Stop the loop after the try in flight (cancelled after ``grace_s`` s: that try is
        due again when its lease ends), then close the HTTP client if it is the dispatcher's."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace_s)
            except TimeoutError:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._own_client:
            await self.client.aclose()

    async def loop(self, stopping: Callable[[], bool]) -> None:
        """Run passes every :data:`POLL_S` s (or when woken) until ``stopping()``; a store
        error is logged and the pass repeated later. Cancel the task to stop at once."""
        while not stopping():
            try:
                await self.run_once()
            except StoreError as exc:
                log.warning("webhook pass stopped by a store error: %s", exc)
            except Exception:  # our own bug: keep the loop (the row is due again after LEASE_S)
                log.exception("webhook pass failed")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), POLL_S)
            except TimeoutError:
                pass

    async def run_once(self, now: datetime | None = None) -> int:
        """Claim and send every delivery due at ``now`` (default: the clock), at most
        :data:`PASS_LIMIT`; the number of tries made."""
        if not self.enabled:
            return 0
        made = 0
        while made < PASS_LIMIT and not self._stopping:
            at = now or datetime.now(UTC)
            delivery = await self.store.claim_webhook_delivery(
                utc_iso(at), utc_iso(at + timedelta(seconds=LEASE_S)))
            if delivery is None:
                break
            await self.deliver(delivery)
            made += 1
        return made

    async def deliver(self, delivery: WebhookDelivery) -> DeliveryState:
        """Make the claimed try of ``delivery`` (try number ``delivery.tries``) and record it:
        delivered on a 2xx, else pending with the next try's time, or failed after the last
        try or on a refused target. Returns the state recorded."""
        started, t0 = datetime.now(UTC), time.monotonic()
        status, error, refused = None, None, False
        try:
            addresses = await check_target(
                delivery.url, allow_private=self.settings.webhook_allow_private,
                resolve=self.resolve)
            data = await self.render(job_at_transition(delivery))
            body, headers = signed_request(self.settings.webhook_secret.get_secret_value(),
                                           delivery, data, datetime.now(UTC))
            url, extensions = pinned(delivery.url, str(addresses[0]), headers)
            async with self.client.stream("POST", url, content=body, headers=headers,
                                          extensions=extensions) as answer:
                status = answer.status_code  # the body is never read
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except TargetRefused as exc:
            refused, error = True, f"refused: {exc.reason}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_LEN] or type(exc).__name__
        state, next_at = self._next(delivery.tries, ok=error is None, refused=refused)
        attempt = webhook_attempt(delivery.tries, utc_iso(started), http_status=status,
                                  error=error, duration_ms=(time.monotonic() - t0) * 1000)
        if not await self.store.record_webhook_try(delivery.delivery_id, delivery.tries,
                                                   attempt, state=state.value,
                                                   next_try_at=next_at):
            log.warning("webhook %s: try %d was taken over by another claim; not recorded",
                        delivery.delivery_id, delivery.tries)
        elif state is DeliveryState.FAILED:
            log.warning("webhook %s of job %s (%s) failed after %d tries: %s",
                        delivery.delivery_id, delivery.job_id, delivery.event_type,
                        delivery.tries, error)
        return state

    def _next(self, tries: int, *, ok: bool, refused: bool) -> tuple[DeliveryState, str | None]:
        """The state after try ``tries`` and when the next try is due (``None``: none)."""
        if ok:
            return DeliveryState.DELIVERED, None
        if refused or tries > len(self.schedule):
            return DeliveryState.FAILED, None
        wait = retry_wait(tries, self.schedule)
        return DeliveryState.PENDING, utc_iso(datetime.now(UTC) + timedelta(seconds=wait))
