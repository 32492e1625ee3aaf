"""Upload rate limit: ``MAX_REQUESTS_PER_MINUTE`` uploads per API key (per client address when
the caller has no key, i.e. authentication is off), in a fixed one-minute window (the
``limits`` library).

The counters live where ``RATE_LIMIT_STORAGE_URI`` says: ``memory://`` (default) counts in this
process; ``redis://HOST:6379/DB`` shares the counts between replicas. A networked storage is
called in a worker thread, never on the event loop. When it fails (Redis down), the limiter
fails open: the upload goes through without ``X-RateLimit-*`` headers, and a warning naming the
storage (never its password) is logged at most once a minute.

Behind a proxy the client address is the one uvicorn's proxy-headers handling took from
``X-Forwarded-For`` (only from the proxies in ``FORWARDED_ALLOW_IPS``; ``main.server_config``).

Over the limit: 429 ``rate_limited`` with ``Retry-After``. The 429 and the 202 of an accepted
upload carry ``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and ``X-RateLimit-Reset`` (epoch
seconds); a refused upload (4xx) counts as well, but its error answer has none of them.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request, Response
from limits import RateLimitItemPerMinute
from limits.errors import ConfigurationError, StorageError
from limits.storage import MemoryStorage, Storage, storage_from_string
from limits.strategies import FixedWindowRateLimiter

from ..errors import PipelineError
from .auth import CallerDep, Principal
from .errors import ApiError

log = logging.getLogger("colmap_worker.rate_limit")

#: seconds a networked storage gets to connect, and to answer one command, before the limiter
#: fails open for that request
STORAGE_TIMEOUT_S = 2.0
#: at most one "storage unreachable" warning per this many seconds
WARN_INTERVAL_S = 60.0
_REDIS_SCHEMES = ("redis", "rediss", "valkey", "valkeys")


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


def storage_name(uri: str) -> str:
    """``uri`` without its user and password (``redis://:pw@host:6379/0`` ->
    ``redis://host:6379/0``): what logs and error messages may show."""
    parts = urlsplit(uri)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}"


def open_storage(uri: str) -> Storage:
    """The ``limits`` storage of ``uri`` (``memory://``, ``redis://…``, ``memcached://…``); a
    Redis client gets :data:`STORAGE_TIMEOUT_S` for connecting and for each command. Nothing
    is connected yet (the first ``hit`` connects).

    Raises: ValueError naming the storage (without its password) for an unknown scheme, a
    missing client library, an ``async+`` scheme, or an unparsable URI.
    """
    name = storage_name(uri)
    scheme = urlsplit(uri).scheme
    if scheme.startswith("async+"):  # limits.aio storages need an async limiter
        raise ValueError(f"RATE_LIMIT_STORAGE_URI {name}: use the synchronous scheme "
                         "(redis://…, not async+redis://…); the limiter calls it in a thread")
    options: dict[str, float | str | bool] = {}
    if scheme.partition("+")[0] in _REDIS_SCHEMES:
        options = {"socket_connect_timeout": STORAGE_TIMEOUT_S, "socket_timeout": STORAGE_TIMEOUT_S}
    try:
        storage = storage_from_string(uri, wrap_exceptions=True, **options)
    except (ConfigurationError, ValueError) as exc:
        reason = str(exc).replace(uri, name)
        raise ValueError(f"RATE_LIMIT_STORAGE_URI {name}: {reason}") from None
    if not isinstance(storage, Storage):
        raise ValueError(f"RATE_LIMIT_STORAGE_URI {name}: not a synchronous limits storage")
    return storage


class UploadRateLimiter:
    """``per_minute`` requests per key in each fixed one-minute window, counted in the
    storage of ``storage_uri`` (:func:`open_storage`; raises its ValueError).

    ``clock`` (monotonic seconds) only paces the "storage unreachable" warning.
    """

    def __init__(self, per_minute: int, storage_uri: str = "memory://",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._item = RateLimitItemPerMinute(per_minute)
        storage = open_storage(storage_uri)
        self._in_memory = isinstance(storage, MemoryStorage)
        self._limiter = FixedWindowRateLimiter(storage)
        self.storage = storage_name(storage_uri)
        self._password = urlsplit(storage_uri).password or ""
        self._clock = clock
        self._warned_at: float | None = None

    def _count(self, key: str) -> RateVerdict:
        allowed = self._limiter.hit(self._item, key)
        stats = self._limiter.get_window_stats(self._item, key)
        return RateVerdict(allowed, self._item.amount, stats.remaining, stats.reset_time)

    async def hit(self, key: str) -> RateVerdict | None:
        """Count one request of ``key``: in the loop for ``memory://`` (cheap), in a worker
        thread for a networked storage. None when the storage failed (fail open; a warning
        at most every :data:`WARN_INTERVAL_S`)."""
        try:
            if self._in_memory:
                return self._count(key)
            return await asyncio.to_thread(self._count, key)
        except StorageError as exc:
            self._warn(exc)
            return None

    def _warn(self, exc: StorageError) -> None:
        now = self._clock()
        if self._warned_at is not None and now - self._warned_at < WARN_INTERVAL_S:
            return
        self._warned_at = now
        cause = exc.storage_error
        reason = f"{type(cause).__name__}: {cause}"
        if self._password:
            reason = reason.replace(self._password, "***")
        log.warning("upload rate limit storage %s unreachable (%s): uploads are not limited "
                    "until it answers (this warning repeats at most once a minute)",
                    self.storage, reason)

    def __str__(self) -> str:
        return str(self._item)


def client_address(request: Request) -> str:
    """The client's address: the connection's peer, or the ``X-Forwarded-For`` client when
    the peer is a trusted proxy (uvicorn's proxy headers, ``FORWARDED_ALLOW_IPS``)."""
    return request.client.host if request.client and request.client.host else "127.0.0.1"


def limiter_key(request: Request, caller: Principal) -> str:
    """``key:<name>`` for a caller with an API key (one budget per key, whatever its
    address), else ``ip:<client address>``."""
    if caller.name is not None:
        return f"key:{caller.name}"
    return f"ip:{client_address(request)}"


async def upload_rate_limit(request: Request, response: Response, caller: CallerDep) -> None:
    """Dependency of the upload routes: count the request before its body is read (after
    authentication: a request without a valid key is not counted).

    Raises: ApiError 429 ``rate_limited`` with ``Retry-After`` over the limit (the message
    names the limit only, never anything of the request).
    """
    limiter: UploadRateLimiter = request.app.state.upload_limiter
    verdict = await limiter.hit(limiter_key(request, caller))
    if verdict is None:  # storage down: fail open, no X-RateLimit-* headers
        return
    if not verdict.allowed:
        raise ApiError(PipelineError("rate_limited", f"Rate limit exceeded: {limiter}."),
                       headers=verdict.headers())
    response.headers.update(verdict.headers())
