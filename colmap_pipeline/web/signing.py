"""Signed links: a path a browser can follow without a header (``<a href>``, ``<img>``,
``EventSource``), carrying a short-lived HMAC token in its query string.

``token = EXPIRES "." base64url(HMAC-SHA256(secret, "v1\\n" EXPIRES "\\n" PATH))``, with
``EXPIRES`` in epoch seconds and ``PATH`` the exact request path (``/jobs/{id}/artifacts/{name}``),
so a token is bound to one job, one file and one expiry; changing any byte of the path, the
expiry or the signature breaks it. The secret is ``URL_SIGNING_SECRET``; without it a random
one is made per start (links then die on restart and differ between replicas). The scheme is
the one of S3/GCS presigned URLs, reduced to what one service signing its own links needs.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from collections.abc import Callable
from urllib.parse import quote

log = logging.getLogger("colmap_worker.auth")

#: query parameter holding the token
TOKEN_PARAM = "token"
#: longest token accepted (an expiry of 10 digits, a dot, 43 characters of signature)
MAX_TOKEN_LEN = 64


class LinkSigner:
    """Signs and checks link tokens with one secret.

    Args:
        secret: the HMAC key (``URL_SIGNING_SECRET``); empty: 32 random bytes for this process.
        ttl_s: lifetime of a new link (``SIGNED_URL_TTL_S``), seconds.
        clock: epoch seconds now (tests pass a controllable one).
    """

    def __init__(self, secret: str, ttl_s: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.ephemeral = not secret
        self._key = secret.encode() if secret else secrets.token_bytes(32)
        self.ttl_s = ttl_s
        self._clock = clock

    def _mac(self, path: str, expires: int) -> str:
        msg = f"v1\n{expires}\n{path}".encode("utf-8", "surrogatepass")
        digest = hmac.new(self._key, msg, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def token(self, path: str) -> str:
        """A token for ``path`` valid ``ttl_s`` seconds from now."""
        expires = int(self._clock()) + self.ttl_s
        return f"{expires}.{self._mac(path, expires)}"

    def sign(self, path: str) -> str:
        """``path`` with ``?token=…`` appended (``path`` must have no query of its own)."""
        return f"{path}?{TOKEN_PARAM}={quote(self.token(path), safe='')}"

    def valid(self, path: str, token: str) -> bool:
        """Whether ``token`` was made by this signer for ``path`` and has not expired."""
        if len(token) > MAX_TOKEN_LEN:
            return False
        expires_text, _, mac = token.partition(".")
        if not expires_text.isascii() or not expires_text.isdigit() or not mac:
            return False
        expires = int(expires_text)
        good = hmac.compare_digest(self._mac(path, expires).encode(),
                                   mac.encode("utf-8", "surrogatepass"))
        return good and self._clock() < expires
