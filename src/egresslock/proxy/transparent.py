"""Transparent capture: connections nftables redirected to the proxy without the client knowing.

A program that ignores HTTP_PROXY (Node's fetch, a Go binary, a raw socket) still gets its TCP
connections redirected by the sandbox's nftables rules to the proxy's transparent port. The proxy
then learns three things before it decides:

- where the client meant to go: the original destination that conntrack kept, read with
  ``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` (``IPPROTO_IPV6`` for IPv6; linux/netfilter_ipv4.h);
- which name it meant: the TLS SNI, the HTTP Host header, or, for a protocol that carries
  neither, the name the sandbox's DNS stub answered with that address;
- that the two agree: the destination must be an address of that name, as the stub handed out
  or as the proxy resolves it now. Otherwise a client could name an allowed host in SNI while
  connecting to any address it likes.

The decision is then the same as for CONNECT to that name and port, and the tunnel is dialled to
the checked original destination. A denied transparent connection is reset (there is no HTTP
exchange in which to say 403); plain HTTP on the transparent port is served request by request,
with 403s, by the server loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from egresslock.errors import InputError
from egresslock.policy import Decision, Layer, Request, normalize_host
from egresslock.policy.loader import HTTPS_PORTS
from egresslock.policy.normalize import IPAddress, join_authority
from egresslock.proxy.conn import Conn
from egresslock.proxy.context import ProxyContext
from egresslock.proxy.resolver import ResolveError
from egresslock.proxy.tls import ClientHello, NotTLS
from egresslock.proxy.tunnel import TunnelDenied, TunnelResult, read_hello, run_tunnel

NamesFor = Callable[[IPAddress], tuple[str, ...]]

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same number

# Request methods that mark a plain HTTP/1.x client (RFC 9110 9.3 plus the common extensions).
_HTTP_STARTS = (b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE ", b"OPTIONS ", b"PATCH ",
                b"TRACE ", b"CONNECT ", b"PROPFIND ", b"MKCOL ", b"COPY ", b"MOVE ", b"LOCK ",
                b"UNLOCK ", b"PROPPATCH ", b"REPORT ", b"SEARCH ", b"PURGE ")

# How long a client may stay silent before the proxy treats the protocol as server-speaks-first
# (SSH, SMTP): the decision then rests on the DNS name alone.
_SILENT_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class Destination:
    address: IPAddress
    port: int

    def __str__(self) -> str:
        return join_authority(str(self.address), self.port)


def original_destination(sock: socket.socket) -> Destination:
    """Where a redirected connection was going. Raises OSError when it was not redirected."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)  # sockaddr_in6
        port = struct.unpack_from("!H", raw, 2)[0]
        address: IPAddress = ipaddress.IPv6Address(raw[8:24])
    else:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)  # sockaddr_in
        port = struct.unpack_from("!H", raw, 2)[0]
        address = ipaddress.IPv4Address(raw[4:8])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return Destination(address, port)


def looks_like_http(data: bytes) -> bool:
    return data.startswith(_HTTP_STARTS) or any(m.startswith(data) for m in _HTTP_STARTS)


async def sniff(ctx: ProxyContext, client: Conn) -> tuple[str, ClientHello | None]:
    """What the client speaks first: ``tls`` (with its ClientHello), ``http``, ``other``, or
    ``silent`` when it waits for the server."""
    try:
        async with asyncio.timeout(_SILENT_WAIT):
            if not client.buf and not await client.fill():
                return "silent", None
    except TimeoutError:
        return "silent", None
    first = bytes(client.buf[:16])
    if first[:1] == b"\x16":
        try:
            return "tls", await read_hello(ctx, client, tls_required=True)
        except NotTLS:
            return "other", None
    if looks_like_http(first):
        return "http", None
    return "other", None


async def check_destination(ctx: ProxyContext, names_for: NamesFor, host: str,
                            dest: Destination) -> str | None:
    """Why ``dest`` is not an address of ``host``, or None when it is."""
    if host in names_for(dest.address):
        return None
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        return None if literal == dest.address else \
            f"connection to {dest} but the request names {host}"
    try:
        addresses = await ctx.resolver.resolve(host, dest.port)
    except ResolveError as exc:
        return f"connection to {dest} names {host}, which does not resolve: {exc}"
    if dest.address in addresses:
        return None
    shown = ", ".join(str(a) for a in addresses[:4])
    return f"connection to {dest} but {host} resolves to {shown} (name and address disagree)"


async def handle_transparent(ctx: ProxyContext, client: Conn, dest: Destination,
                             kind: str, hello: ClientHello | None, names_for: NamesFor,
                             result: TunnelResult) -> Decision:
    """Decide and run one redirected non-HTTP connection. Raises TunnelDenied (reset)."""
    result.port = dest.port
    result.address = str(dest.address)
    names: tuple[str, ...]
    if hello is not None and hello.server_name is not None:
        result.sni = hello.server_name
        try:
            names = (normalize_host(hello.server_name),)
        except InputError as exc:
            raise TunnelDenied("default", f"SNI {hello.server_name!r} is invalid: {exc}") from exc
    else:
        names = names_for(dest.address)
    if not names:
        raise TunnelDenied("default", f"connection to {dest} names no host: no TLS SNI, and the "
                                      "sandbox's DNS gave that address for no name")
    if dest.port in HTTPS_PORTS and kind != "tls":
        result.host = names[0]
        raise TunnelDenied("default", f"{'no bytes' if kind == 'silent' else 'non-TLS bytes'} "
                                      f"on HTTPS port {dest.port}")
    decision: Decision | None = None
    for name in names:
        result.host = name
        why = await check_destination(ctx, names_for, name, dest)
        if why is not None:
            raise TunnelDenied("default", why)
        layer = Layer.TLS if kind == "tls" else Layer.CONNECT
        decision = ctx.decide(Request(name, dest.port,
                                      "https" if dest.port in HTTPS_PORTS else "tcp",
                                      addresses=(dest.address,), layer=layer))
        if decision.allowed:
            break
    assert decision is not None
    assert result.host is not None
    if not decision.allowed:
        raise TunnelDenied(decision.rule_id, decision.reason)
    result.decision = decision
    return await run_tunnel(ctx, client, result.host, dest.port, decision, (dest.address,),
                            result, b"")
