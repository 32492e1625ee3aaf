"""Per-client upload rate limit: ``MAX_REQUESTS_PER_MINUTE`` uploads per client address, in a
fixed one-minute window (the ``limits`` library, in-memory counters, one set per app).

Over the limit: 429 ``rate_limited`` with ``Retry-After``. Every counted answer carries
``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset`` (epoch seconds), the
headers slowapi sent before.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from fastapi import Request, Response
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter

from ..errors import PipelineError
from .errors import ApiError


@dataclass(frozen=True)
class RateVerdict:
    """One counted request: allowed or not, and the window's numbers."""

    allowed: bool
    limit: int
    remaining: int
    reset_at: float  #: epoch seconds when the window ends

    def headers(self) -> dict[str, str]:
        """The ``X-RateLimit-*`` headers (and ``Retry-After`` when refused, s, at least 1)."""
        reset = 1 + int(self.reset_at)
        out = {"X-RateLimit-Limit": str(self.limit), "X-RateLimit-Remaining": str(self.remaining),
               "X-RateLimit-Reset": str(reset)}
        if not self.allowed:
            out["Retry-After"] = str(max(1, min(60, int(reset - time.time()))))
        return out


class UploadRateLimiter:
    """``per_minute`` requests per key in each fixed one-minute window."""

    def __init__(self, per_minute: int) -> None:
        self._item = RateLimitItemPerMinute(per_minute)
        self._limiter = FixedWindowRateLimiter(MemoryStorage())

    def hit(self, key: str) -> RateVerdict:
        """Count one request of ``key``; cheap and in memory (safe on the event loop)."""
        allowed = self._limiter.hit(self._item, key)
        stats = self._limiter.get_window_stats(self._item, key)
        return RateVerdict(allowed, self._item.amount, stats.remaining, stats.reset_time)

    def __str__(self) -> str:
        return str(self._item)


def client_key(request: Request) -> str:
    """The client's address (as slowapi's ``get_remote_address``)."""
    return request.client.host if request.client and request.client.host else "127.0.0.1"


async def upload_rate_limit(request: Request, response: Response) -> None:
    """Dependency of the upload routes: count the request before its body is read.

    Raises: ApiError 429 ``rate_limited`` with ``Retry-After`` over the limit.
    """
    limiter: UploadRateLimiter = request.app.state.upload_limiter
    verdict = limiter.hit(client_key(request))
    if not verdict.allowed:
        raise ApiError(PipelineError("rate_limited", f"Rate limit exceeded: {limiter}."),
                       headers=verdict.headers())
    response.headers.update(verdict.headers())
