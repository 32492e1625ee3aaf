"""Who is calling: API keys (``API_KEYS``, ``ADMIN_API_KEYS``) and the caller of a request.

A key travels in ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``. Keys are held only as
SHA-256 digests and every presented key is compared with all of them with
:func:`hmac.compare_digest`, so neither the answer nor its timing says which key came close.
Logs name a key by its ``name``, never by its value. With no key configured the service runs
open (a laptop): every caller is :data:`OPEN` and sees every job.

A job belongs to the key that created it (``Job.owner`` = the key's name). Another key gets 404
for it (not 403: whether the job exists does not leak); an admin key sees and acts on all.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from ..config import Settings
from ..errors import PipelineError
from ..jobs import Job
from .errors import ApiError
from .schemas import ErrorResponse
from .signing import LinkSigner

log = logging.getLogger("colmap_worker.auth")

#: the ``WWW-Authenticate`` challenge of every 401 (RFC 6750 section 3)
CHALLENGE = 'Bearer realm="colmap-worker"'
#: longest key accepted (longer ones are refused before hashing)
MAX_KEY_LEN = 512


class ConfigError(ValueError):
    """A setting is malformed (``API_KEYS``, CORS); the server refuses to start."""


@dataclass(frozen=True)
class Principal:
    """The caller of a request.

    ``name`` is the key's name (``None`` when authentication is off); ``admin`` holders (and
    everyone when authentication is off) see and act on every job.
    """

    name: str | None
    admin: bool

    @property
    def open(self) -> bool:
        """Authentication is off (no key configured)."""
        return self.name is None

    def may_see(self, job: Job) -> bool:
        """Whether this caller may see and act on ``job`` (its owner, an admin, or open)."""
        return self.admin or job.owner == self.name

    def sees_email(self, job: Job) -> bool:
        """``user_email`` is shown to the job's owner only (to everyone when open)."""
        return self.open or job.owner == self.name

    def owner_filter(self, requested: str | None) -> tuple[bool, str | None]:
        """``GET /jobs``'s owner filter: ``(any_match, owner)``. An admin (or an open server)
        lists ``requested`` (``None``: all owners); a plain key only its own jobs, so a
        ``requested`` other than its name matches nothing (``any_match`` False)."""
        if self.admin:
            return True, requested
        return requested in (None, self.name), self.name


#: the caller of every request while no key is configured
OPEN = Principal(name=None, admin=True)


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def parse_keys(text: str, setting: str) -> list[tuple[str, str]]:
    """``"name:key,name2:key2"`` -> ``[(name, key), …]``.

    Raises: ConfigError naming ``setting`` (never the key) for an entry without a name or key,
    or a name used twice.
    """
    pairs: list[tuple[str, str]] = []
    for n, entry in enumerate(e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, key = entry.partition(":")
        name, key = name.strip(), key.strip()
        if not sep or not name or not key:
            raise ConfigError(f"{setting}: entry {n + 1} is not 'name:key'")
        if len(key) > MAX_KEY_LEN:
            raise ConfigError(f"{setting}: the key of {name!r} is longer than {MAX_KEY_LEN}")
        pairs.append((name, key))
    return pairs


class KeyRing:
    """The configured keys, as digests; :meth:`identify` finds a presented key's holder."""

    def __init__(self, keys: list[tuple[str, str]], admin_keys: list[tuple[str, str]]) -> None:
        names = [n for n, _ in keys + admin_keys]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"API_KEYS/ADMIN_API_KEYS: names used twice: {dupes}")
        self._entries = [(_digest(k), Principal(n, False)) for n, k in keys]
        self._entries += [(_digest(k), Principal(n, True)) for n, k in admin_keys]
        digests = [d for d, _ in self._entries]
        shared = sorted({p.name or "" for d, p in self._entries if digests.count(d) > 1})
        if shared:
            raise ConfigError(f"API_KEYS/ADMIN_API_KEYS: one key is given under several names "
                              f"{shared}; every name needs its own key")

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The keys of ``API_KEYS`` and ``ADMIN_API_KEYS``.

        Raises: ConfigError for a malformed entry or a name used twice.
        """
        return cls(parse_keys(settings.api_keys.get_secret_value(), "API_KEYS"),
                   parse_keys(settings.admin_api_keys.get_secret_value(), "ADMIN_API_KEYS"))

    @property
    def enabled(self) -> bool:
        """At least one key is configured."""
        return bool(self._entries)

    @property
    def names(self) -> list[str]:
        """Every key's name (for the start-up log)."""
        return [p.name or "" for _, p in self._entries]

    def identify(self, presented: str) -> Principal | None:
        """The holder of ``presented``, or ``None``. Compares against every key in constant
        time per key (no early exit)."""
        if len(presented) > MAX_KEY_LEN:
            return None
        digest = _digest(presented)
        found: Principal | None = None
        for stored, principal in self._entries:
            if hmac.compare_digest(stored, digest):
                found = principal
        return found


def check_cors(settings: Settings, ring: KeyRing) -> None:
    """Refuse CORS ``*`` together with credentials while keys are set.

    Raises: ConfigError with what to change.
    """
    if ring.enabled and settings.cors_allow_credentials and "*" in settings.cors_origin_list:
        raise ConfigError("CORS_ORIGINS=* with CORS_ALLOW_CREDENTIALS=true while API keys are "
                          "set would let any web site act with a visitor's credentials: list "
                          "the allowed origins in CORS_ORIGINS, or set "
                          "CORS_ALLOW_CREDENTIALS=false")


_api_key = APIKeyHeader(name="X-API-Key", auto_error=False,
                        description="an API key (API_KEYS / ADMIN_API_KEYS)")
_bearer = HTTPBearer(auto_error=False, description="the same API key as a bearer token")


def unauthorized(message: str = "A valid API key is required.") -> ApiError:
    """401 ``unauthorized`` with the ``WWW-Authenticate`` challenge."""
    return ApiError(PipelineError("unauthorized", message),
                    headers={"WWW-Authenticate": CHALLENGE})


async def caller(request: Request,
                 api_key: Annotated[str | None, Depends(_api_key)] = None,
                 bearer: Annotated[HTTPAuthorizationCredentials | None,
                                   Depends(_bearer)] = None) -> Principal:
    """Dependency: the request's :class:`Principal` (:data:`OPEN` without configured keys),
    also kept in ``request.state.principal`` for logs.

    Raises: ApiError 401 ``unauthorized`` (with ``WWW-Authenticate``) when keys are set and
    the request carries none, one that matches no key, or two different ones.
    """
    ring: KeyRing = request.app.state.keyring
    if not ring.enabled:
        principal = OPEN
    else:
        presented = api_key if api_key else (bearer.credentials if bearer else None)
        if not presented:
            raise unauthorized()
        if api_key and bearer and bearer.credentials != api_key:
            raise unauthorized("X-API-Key and Authorization carry different keys; send one.")
        found = ring.identify(presented)
        if found is None:
            raise unauthorized("The API key is not valid.")
        principal = found
    request.state.principal = principal
    return principal


CallerDep = Annotated[Principal, Depends(caller)]


async def link_or_caller(
        request: Request,
        token: Annotated[str | None, Query(
            description="signed-link token from the job's artifact URL (while API keys are "
            "on); instead of a key")] = None,
        api_key: Annotated[str | None, Depends(_api_key)] = None,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> Principal | None:
    """Dependency of the routes a browser follows from a link: ``None`` when a valid signed
    ``token`` for this exact path grants access (:mod:`.signing`), else :func:`caller`.

    Raises: ApiError 401 ``link_expired`` for a token that is expired, altered or for another
    path; 401 ``unauthorized`` as :func:`caller` without a token.
    """
    ring: KeyRing = request.app.state.keyring
    if ring.enabled and token is not None:
        signer: LinkSigner = request.app.state.signer
        if not signer.valid(request.url.path, token):
            raise ApiError(PipelineError("link_expired"),
                           headers={"WWW-Authenticate": CHALLENGE})
        return None
    return await caller(request, api_key, bearer)


LinkOrCallerDep = Annotated[Principal | None, Depends(link_or_caller)]

#: the OpenAPI answer of a route that needs a key
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {401: {
    "model": ErrorResponse, "description": "no API key, or a wrong one (only while API_KEYS "
    "is set): code unauthorized; an expired or altered signed link: code link_expired",
    "headers": {"WWW-Authenticate": {"description": "the Bearer challenge",
                                     "schema": {"type": "string"}}}}}
