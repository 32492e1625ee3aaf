"""Files answered with the service's one JSON error shape for bad ``Range`` headers.

Starlette's ``FileResponse`` (1.10) serves byte ranges itself, but answers a malformed
``Range`` with a ``text/plain`` 400 and one past the end with an empty ``text/plain`` 416.
:class:`FileAnswer` checks the header first with the same parser and answers those two cases
as ``invalid_range`` (400) and ``range_not_satisfiable`` (416, with ``Content-Range: bytes
*/SIZE`` as RFC 9110 section 15.5.17 asks); everything else is Starlette's own answer.
"""
from __future__ import annotations

import os

import anyio
from fastapi.responses import FileResponse
from starlette.datastructures import Headers
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable
from starlette.types import Receive, Scope, Send

from .errors import error_response


class FileAnswer(FileResponse):
    """``FileResponse`` whose ``Range`` errors are JSON errors (module docstring). Same
    arguments; the file must exist (as for ``FileResponse``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a bad ``Range`` (GET/HEAD of a 200 answer) with the JSON error, else serve
        the file as ``FileResponse`` does."""
        http_range = Headers(scope=scope).get("range")
        if (http_range is not None and self.status_code == 200 and scope["type"] == "http"
                and scope["method"].upper() in ("GET", "HEAD")):
            st = await anyio.to_thread.run_sync(os.stat, self.path)
            self.stat_result = st  # FileResponse then serves without a second stat
            self.set_stat_headers(st)
            size = st.st_size
            try:
                self._parse_range_header(http_range, size)
            except MalformedRangeHeader:
                await error_response("invalid_range")(scope, receive, send)
                return
            except RangeNotSatisfiable:
                await error_response("range_not_satisfiable", headers={
                    "Content-Range": f"bytes */{size}"})(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
