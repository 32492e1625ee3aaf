"""Where a webhook may be sent (issue 16): the SSRF guard, run at upload on the form's
``webhook_url`` and again before every delivery try, after DNS resolution.

A target must be ``http`` or ``https`` with a host name or address, and (unless
``WEBHOOK_ALLOW_PRIVATE``) every address its host resolves to must be public: loopback,
private (RFC 1918, ULA), link-local (cloud metadata at 169.254.169.254), multicast, reserved,
unspecified, shared (100.64/10) and other non-global ranges are refused, IPv4-mapped IPv6
addresses judged as their IPv4 address. Resolution is ``loop.getaddrinfo`` (a thread of the
loop's executor, never blocking the event loop). Standard library only (:mod:`ipaddress`).
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import SplitResult, urlsplit

#: longest accepted webhook URL (characters)
MAX_URL_LEN = 2000
#: schemes a webhook may use
SCHEMES = frozenset({"http", "https"})

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: ``resolve(host, port)`` -> the addresses (text) the host resolves to
Resolver = Callable[[str, int], Awaitable[list[str]]]


class TargetRefused(ValueError):
    """A webhook URL that may not be used; ``reason`` says why without repeating the URL."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_target(url: str) -> SplitResult:
    """``url`` split, when it is an absolute ``http``/``https`` URL with a host.

    Raises: TargetRefused for anything else (over :data:`MAX_URL_LEN` characters, another
    scheme, no host, a bad port, whitespace or control characters).
    """
    if len(url) > MAX_URL_LEN:
        raise TargetRefused(f"the URL is longer than {MAX_URL_LEN} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise TargetRefused("the URL holds whitespace or control characters")
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. "http://[::1": an unclosed IPv6 literal
        raise TargetRefused("the URL cannot be parsed") from None
    if parts.scheme.lower() not in SCHEMES:
        raise TargetRefused("only http and https URLs are allowed")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        raise TargetRefused("the URL's port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise TargetRefused("the URL has no host")
    return parts


def refusal(address: IpAddress) -> str | None:
    """Why ``address`` is not a public internet address (``"loopback"``, ``"private"`` …), or
    ``None`` when it is one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for name in ("loopback", "link_local", "unspecified", "multicast", "reserved",
                 "private"):
        if getattr(address, f"is_{name}"):
            return name.replace("_", "-")
    if not address.is_global:
        return "not globally routable"
    return None


async def system_resolve(host: str, port: int) -> list[str]:
    """The addresses ``host`` resolves to (``loop.getaddrinfo``, TCP).

    Raises: OSError (``socket.gaierror``) when it does not resolve.
    """
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


async def check_target(url: str, *, allow_private: bool,
                       resolve: Resolver = system_resolve) -> list[IpAddress]:
    """Check a webhook target: :func:`parse_target`, then resolve its host and refuse any
    non-public address (:func:`refusal`) unless ``allow_private``.

    Returns: the addresses the host resolved to (an address literal: itself).
    Raises: TargetRefused naming the rule that refused it (never the URL).
    """
    parts = parse_target(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    addresses = await _addresses(host, port, resolve)
    if not allow_private:
        for address in addresses:
            why = refusal(address)
            if why is not None:
                raise TargetRefused(f"the URL's host resolves to a non-public address ({why}); "
                                    "webhooks go to public addresses only")
    return addresses


async def _addresses(host: str, port: int, resolve: Resolver) -> list[IpAddress]:
    """``host`` as an address, or the addresses it resolves to (zone ids dropped).

    Raises: TargetRefused when it does not resolve."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        found = await resolve(host, port)
    except (OSError, UnicodeError):  # UnicodeError: not a valid IDNA name (a label > 63 chars)
        found = []
    if not found:
        raise TargetRefused("the URL's host name does not resolve")
    return [ipaddress.ip_address(a.split("%", 1)[0]) for a in found]
