"""Every exception -> the one JSON error shape, ``{"error": {"code", "message", "hint",
"details"?}}`` (:class:`.schemas.ErrorResponse`), with the HTTP status of the code in
:data:`..errors.ERROR_CATALOG`. Never a stack trace to the client.

Unhandled exceptions are answered by :class:`UnhandledErrors`, a middleware inside
Starlette's ``ServerErrorMiddleware``: that one would send the 500 and then re-raise, so that
uvicorn logs the error a second time and drops the keep-alive connection. Here the error is
logged once, with its traceback, and the connection stays usable.

No answer echoes request bytes (issue 13): not the path, the method, a parameter's value or a
validator's text that quotes it (:func:`..intake.problems.validation_problems`), nor a
framework's ``detail``; and none carries a stack trace.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import PipelineError
from ..intake.problems import validation_problems
from ..jobs import StoreUnavailable
from .head import with_head

log = logging.getLogger("colmap_worker.api")

#: headers every answer with this code carries: a stalled upload's connection is closed (its
#: body may still be on its way, or never come)
CODE_HEADERS: Mapping[str, Mapping[str, str]] = {"upload_timeout": {"Connection": "close"}}
#: seconds a client is told to wait (Retry-After) when the job store is unreachable
STORE_RETRY_AFTER_S = 5


class ApiError(Exception):
    """A :class:`PipelineError` answered with extra headers (``Retry-After``, ``Allow``) or
    another HTTP status than its code's."""

    def __init__(self, error: PipelineError, *, status: int | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.status = status or error.http_status
        self.headers = dict(headers or {})


def error_response(code: str, message: str | None = None, hint: str | None = None,
                   details: dict[str, Any] | None = None, status: int | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The one JSON error shape, with the catalog's HTTP status unless ``status`` is given."""
    err = PipelineError(code, message or "", hint or "", details)
    return _answer(err, status, headers)


def _answer(err: PipelineError, status: int | None = None,
            headers: Mapping[str, str] | None = None) -> JSONResponse:
    merged = {**CODE_HEADERS.get(err.code, {}), **(headers or {})}
    return JSONResponse({"error": err.to_dict()}, status_code=status or err.http_status,
                        headers=merged or None)


async def _pipeline_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, PipelineError)
    if exc.http_status >= 500:
        log.warning("answered %s: %s", exc.code, exc.message)
    return _answer(exc)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return _answer(exc.error, exc.status, exc.headers)


async def _validation(_: Request, exc: Exception) -> JSONResponse:
    """422 naming each bad parameter and its limits or allowed values, never the value."""
    assert isinstance(exc, RequestValidationError)
    problems = validation_problems(exc.errors())
    return error_response("invalid_request", "Invalid request parameters.",
                          "Check the path and query parameters against /docs.",
                          details={"fields": problems})


def method_table(routers: Iterable[APIRouter]) -> list[tuple[re.Pattern[str], frozenset[str]]]:
    """``[(path regex, methods)]`` of every route of ``routers`` (for :func:`_allowed_methods`;
    ``build_app`` keeps it in ``app.state.route_methods``); a ``GET`` route also answers
    ``HEAD`` (:mod:`.head`)."""
    return [(r.path_regex, with_head(r.methods or ())) for router in routers for r in router.routes
            if isinstance(r, APIRoute)]


def _allowed_methods(request: Request) -> list[str]:
    """Every method some route answers at this path (Starlette's own ``Allow`` names only the
    first route that matched the path, and FastAPI makes one route per method)."""
    table = getattr(request.app.state, "route_methods", [])
    path = request.url.path
    return sorted({m for regex, methods in table if regex.match(path) for m in methods})


async def _http(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own 404 (no such route) and 405 (route without that method)."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:  # neither method nor path is echoed (no request bytes back)
        return error_response("not_found", "No route answers this path.",
                              "GET /docs lists the routes of this API.")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        allow = ", ".join(_allowed_methods(request)) or headers.get("Allow", "")
        headers["Allow"] = allow
        return error_response("invalid_request", "This method is not allowed on this path.",
                              f"This path answers {allow or 'other methods'}; see /docs.",
                              details={"allow": [m.strip() for m in allow.split(",") if m]},
                              status=405, headers=headers)
    try:  # a framework's detail may quote the request: only the status's own phrase
        phrase = HTTPStatus(exc.status_code).phrase
    except ValueError:
        phrase = "Refused"
    return error_response("invalid_request", f"The request was refused ({phrase}).",
                          status=exc.status_code, headers=headers)


async def _gone(request: Request, _: Exception) -> JSONResponse:
    log.info("client disconnected during %s %s", request.method, request.url.path)
    return error_response("invalid_request", "The client disconnected mid-request.",
                          status=400)


async def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error("job store unavailable during %s %s: %s", request.method, request.url.path, exc)
    return error_response("not_ready", "The job store is unavailable.",
                          headers={"Retry-After": str(STORE_RETRY_AFTER_S)})


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers of every expected exception on ``app``, and
    :class:`UnhandledErrors` for the rest (call before adding outer middleware such as CORS,
    so that a 500 carries the CORS headers too)."""
    app.add_exception_handler(PipelineError, _pipeline_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(ClientDisconnect, _gone)
    app.add_exception_handler(StoreUnavailable, _store_unavailable)
    app.add_middleware(UnhandledErrors)


class UnhandledErrors:
    """ASGI middleware: an exception no handler took becomes the JSON 500 ``internal_error``,
    logged once with its traceback; the connection stays open for the next request.

    When the response had already started, nothing can be sent any more: the exception is
    re-raised (uvicorn logs it and closes the connection, the only way to end a broken body).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            log.error("unhandled error in %s %s", scope.get("method"), scope.get("path"),
                      exc_info=exc)
            await error_response("internal_error")(scope, receive, send)
