"""Name resolution for the proxy: once per request, with a timeout, pins first.

The proxy resolves a name once, checks every address it got, and connects only to those checked
addresses (DESIGN.md, hard rule 1). A second lookup by anyone (the client library, the upstream
connect) would let a rebinding DNS server answer a public address to the check and 127.0.0.1 to
the connect. ``--resolve HOST:ADDR`` pins a name, for tests and for split-horizon DNS.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping, Sequence

from egresslock.policy.normalize import IPAddress, normalize_host, parse_ip_literal


class ResolveError(Exception):
    """A name could not be resolved; the message is safe to show to the client."""


class Resolver:
    """Resolves names to addresses. Subclass and override :meth:`lookup` for other sources."""

    def __init__(self, pins: Mapping[str, Sequence[str]] | None = None,
                 timeout: float = 5.0) -> None:
        self.timeout = timeout
        self._pins: dict[str, tuple[IPAddress, ...]] = {
            normalize_host(host): tuple(ipaddress.ip_address(a) for a in addrs)
            for host, addrs in (pins or {}).items()
        }

    def known(self, host: str) -> tuple[IPAddress, ...] | None:
        """The addresses of a normalised host that need no lookup (an IP literal is itself, a
        pinned name its pins), or None when only :meth:`resolve` can say."""
        literal = parse_ip_literal(host) if (":" in host or host[-1:].isdigit()) else None
        if literal is not None:
            return (literal,)
        return self._pins.get(host)

    async def resolve(self, host: str, port: int) -> tuple[IPAddress, ...]:
        """Addresses for a normalised host; an IP literal resolves to itself."""
        known = self.known(host)
        if known is not None:
            return known
        try:
            return await asyncio.wait_for(self.lookup(host, port), self.timeout)
        except TimeoutError as exc:
            raise ResolveError(f"resolving {host} timed out after {self.timeout:g}s") from exc

    async def lookup(self, host: str, port: int) -> tuple[IPAddress, ...]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ResolveError(f"cannot resolve {host}: {exc.strerror}") from exc
        out: list[IPAddress] = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
                if address not in out:
                    out.append(address)
        if not out:
            raise ResolveError(f"{host} has no IPv4 or IPv6 address")
        return tuple(out)


def parse_pins(values: Sequence[str]) -> dict[str, list[str]]:
    """``["api.example:10.0.0.5", "v6.example:[::1]"]`` → ``{"api.example": ["10.0.0.5"], ...}``.

    Raises ValueError naming the bad item and the form that would be valid.
    """
    out: dict[str, list[str]] = {}
    for item in values:
        host, sep, addr = item.partition(":")
        addr = addr.strip()
        if addr.startswith("[") and addr.endswith("]"):
            addr = addr[1:-1]
        if not sep or not host or not addr:
            raise ValueError(f"{item!r} must be HOST:ADDRESS, like api.example:10.0.0.5")
        try:
            ipaddress.ip_address(addr)
        except ValueError as exc:
            raise ValueError(f"{item!r}: {addr!r} is not an IP address") from exc
        out.setdefault(host, []).append(addr)
    return out
