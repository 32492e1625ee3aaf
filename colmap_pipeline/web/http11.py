"""The HTTP/1.1 protocol the server runs: uvicorn's h11 protocol, except that a request it
cannot parse gets the JSON error shape.

A malformed request (a ``Content-Length`` that is not a number, a broken request line or
header) is refused by h11 before any application code runs, and uvicorn answers it with a
plain-text 400. :class:`JsonErrorH11Protocol` overrides only that answer
(``H11Protocol.send_400_response``): the same 400 and ``Connection: close`` (the framing of
the connection is lost), with a body of the one JSON error shape. ``main`` passes it to uvicorn
as ``http=``.
"""
from __future__ import annotations

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import PipelineError

#: the JSON body of a request h11 could not parse
MALFORMED_BODY = json.dumps({"error": PipelineError(
    "invalid_request",
    "The HTTP request is malformed (for example a Content-Length that is not a number); it "
    "was not processed.",
    "Send a well-formed HTTP/1.1 request; let the HTTP client set Content-Length.").to_dict()},
    separators=(",", ":")).encode()


class JsonErrorH11Protocol(H11Protocol):
    """uvicorn's ``H11Protocol`` answering unparsable requests with the JSON error shape."""

    def send_400_response(self, msg: str) -> None:
        """400 ``invalid_request`` as JSON, then close (``msg``, uvicorn's plain-text
        explanation, is logged by uvicorn already)."""
        headers = [(b"content-type", b"application/json"), (b"connection", b"close"),
                   (b"content-length", str(len(MALFORMED_BODY)).encode())]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=MALFORMED_BODY), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event) or b"")
        self.transport.close()
