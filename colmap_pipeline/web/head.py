"""``HEAD`` on every ``GET`` route: answered like ``GET`` without a body (RFC 9110 section
9.3.2: the same status and headers, ``Content-Length`` included, as the ``GET`` would send).

FastAPI makes one route per method and, unlike Starlette's ``Route``, does not add ``HEAD``
to a ``GET`` route, so ``HEAD /health`` answered 405. :class:`HeadAsGet` runs a ``HEAD``
request as ``GET`` when some route answers ``GET`` at that path and none answers ``HEAD``
itself (a route with its own ``HEAD``, like an artifact's, keeps it), and drops the body.
:func:`with_head` adds ``HEAD`` to the methods the ``Allow`` header of a 405 names.
"""
from __future__ import annotations

from collections.abc import Iterable

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def with_head(methods: Iterable[str]) -> frozenset[str]:
    """``methods`` plus ``HEAD`` when they hold ``GET`` (what :class:`HeadAsGet` answers)."""
    out = frozenset(methods)
    return out | {"HEAD"} if "GET" in out else out


def _answers(routes: Iterable[BaseRoute], scope: Scope, method: str) -> bool:
    """Whether some route fully matches ``scope`` (path and method) with ``method``."""
    probe = {**scope, "method": method}
    return any(r.matches(probe)[0] == Match.FULL for r in routes)


class HeadAsGet:
    """ASGI middleware: a ``HEAD`` request that only a ``GET`` route answers runs as that
    ``GET``; the response's start message (status, headers) passes unchanged, its body is
    replaced by one empty final chunk. Every other request passes through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request (``scope["app"]``, set by Starlette, gives the routes)."""
        routes = getattr(getattr(scope.get("app"), "router", None), "routes", [])
        if (scope["type"] != "http" or scope["method"] != "HEAD"
                or _answers(routes, scope, "HEAD") or not _answers(routes, scope, "GET")):
            await self.app(scope, receive, send)
            return

        async def send_without_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_without_body)
