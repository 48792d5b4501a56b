"""CONNECT tunnels: decided on host and port, checked on SNI, then relayed by the kernel.

The proxy answers ``200`` only after the upstream connection to a checked address is open, so a
client learns of a deny (403) or of an unreachable upstream (502/504) as a status, never as a
hung tunnel. Inside the tunnel the first bytes must be a TLS ClientHello on HTTPS ports, and its
SNI must name the CONNECT host: a mismatch (domain fronting) or a missing SNI resets the
connection before a byte reaches upstream, and the log says why.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from egresslock.audit import AuditRecord
from egresslock.errors import InputError
from egresslock.policy import Decision, Layer, Request, normalize_host
from egresslock.policy.loader import HTTPS_PORTS
from egresslock.policy.normalize import IPAddress, parse_ip_literal, split_authority
from egresslock.proxy.conn import Conn, Connecting
from egresslock.proxy.context import ProxyContext
from egresslock.proxy.forward import (
    Refused,
    bad_request,
    dial,
    host_header_problem,
    resolve_and_decide,
)
from egresslock.proxy.http1 import RequestHead, deny_response
from egresslock.proxy.inspect import inspect_tunnel
from egresslock.proxy.relay import RelayStats, relay
from egresslock.proxy.tls import ClientHello, NotTLS, looks_like_tls, parse_client_hello
from egresslock.proxy.tlsconn import TLSError

# CONNECT's answer once the upstream connection is open.
CONNECTED = b"HTTP/1.1 200 Connection established\r\n\r\n"


@dataclass(slots=True)
class TunnelResult:
    """What a tunnel did, for its audit row."""

    host: str | None = None
    port: int | None = None
    address: str | None = None
    sni: str | None = None
    bytes_out: int = 0
    bytes_in: int = 0
    ended: str = ""
    transparent: bool = False  # redirected by nftables, not asked for with CONNECT
    decision: Decision | None = None  # once the tunnel is allowed
    ended_at: float | None = None  # when it ended, if its row is written later (epoch seconds)


def parse_connect_target(head: RequestHead) -> tuple[str, int]:
    """CONNECT's authority-form target, ``host:port`` (RFC 9110 9.3.6): the port is required."""
    target = head.target
    if ":" not in target.rsplit("]", 1)[-1]:
        raise bad_request(f"CONNECT target {target!r} needs a port, like {target}:443")
    try:
        host, port = split_authority(target, 0)
    except InputError as exc:
        raise Refused(deny_response("default", f"refused as ambiguous: {exc}", True),
                      "deny", "default", f"refused as ambiguous: {exc}") from exc
    problem = host_header_problem(head, host, port, f"the CONNECT target {target}",
                                  required=False)
    if problem is not None:
        raise bad_request(problem)
    return host, port


async def read_hello(ctx: ProxyContext, client: Conn, tls_required: bool
                     ) -> ClientHello | None:
    """The ClientHello, or None for a non-TLS protocol where TLS is not required.

    Where TLS is required (HTTPS ports) anything else raises NotTLS. Elsewhere the client may
    speak first in another protocol, or wait for the server to speak (SSH, SMTP): a short wait
    (:func:`hello_wait`) decides which.
    """
    wait = hello_wait(ctx, tls_required)
    deadline = client.loop.time() + wait
    try:
        while True:
            if client.buf:
                complete, hello = hello_in(bytes(client.buf), tls_required)
                if complete:
                    return hello
            if not await client.fill(deadline):
                raise NotTLS("client closed the tunnel before its first bytes")
    except TimeoutError:
        if tls_required:
            raise NotTLS(f"no TLS ClientHello within {wait:g}s") from None
        return None


def hello_wait(ctx: ProxyContext, tls_required: bool) -> float:
    """How long a tunnel waits for the client's first bytes."""
    return ctx.limits.hello_timeout if tls_required else 0.25


def hello_in(data: bytes, tls_required: bool) -> tuple[bool, ClientHello | None]:
    """Whether the client's first bytes ``data`` are enough to tell, and the ClientHello they
    hold (None for another protocol where TLS is not required). Raises NotTLS where it is."""
    if not tls_required and not looks_like_tls(data[:3]):
        return True, None
    hello = parse_client_hello(data)
    return hello is not None, hello


def check_sni(hello: ClientHello | None, host: str, port: int) -> str | None:
    """Why the tunnel's SNI does not fit its CONNECT host, or None when it does."""
    if hello is None:
        return None
    if hello.server_name is None:
        if parse_ip_literal(host) is not None:
            return None  # clients send no SNI for IP literals (RFC 6066 3)
        return f"TLS ClientHello has no SNI; CONNECT named {host}"
    try:
        sni = normalize_host(hello.server_name)
    except InputError as exc:
        return f"SNI {hello.server_name!r} is invalid: {exc}"
    if sni != host:
        return f"SNI {sni} differs from CONNECT host {host} (domain fronting)"
    return None


async def handle_connect(ctx: ProxyContext, head: RequestHead, client: Conn,
                         result: TunnelResult) -> Decision:
    """Run one CONNECT tunnel to its end. Raises Refused for a deny or upstream failure."""
    host, port = parse_connect_target(head)
    result.host, result.port = host, port
    request = Request(host, port, "https" if port in HTTPS_PORTS else "tcp", layer=Layer.CONNECT)
    decision, addresses = await resolve_and_decide(ctx, request, keep_alive=False)
    result.decision = decision
    return await run_tunnel(ctx, client, host, port, decision, addresses, result, CONNECTED)


async def run_tunnel(ctx: ProxyContext, client: Conn, host: str, port: int, decision: Decision,
                     addresses: tuple[IPAddress, ...], result: TunnelResult, reply: bytes
                     ) -> Decision:
    """Dial a decided tunnel, send ``reply`` (CONNECT's 200; nothing when transparent), check
    the ClientHello against ``host``, then inspect or relay until either side ends."""
    why = refusal_before_dial(ctx, host, decision)
    if why is not None:
        raise Refused(deny_response(decision.rule_id, why, True), "deny", decision.rule_id, why)
    return await dial_and_run(ctx, client, host, port, decision, addresses, result, reply)


async def dial_and_run(ctx: ProxyContext, client: Conn, host: str, port: int,
                       decision: Decision, addresses: tuple[IPAddress, ...],
                       result: TunnelResult, reply: bytes, first: Connecting | None = None
                       ) -> Decision:
    """:func:`run_tunnel` after its checks: ``first`` is an attempt the tunnel lane began."""
    upstream, address = await dial(ctx, addresses, port, decision, first)
    result.address = address
    return await run_dialed(ctx, client, upstream, host, port, decision, addresses, result,
                            reply)


async def run_dialed(ctx: ProxyContext, client: Conn, upstream: Conn, host: str, port: int,
                     decision: Decision, addresses: tuple[IPAddress, ...],
                     result: TunnelResult, reply: bytes) -> Decision:
    """:func:`run_tunnel` once connected: send ``reply``, check the first bytes, then inspect
    or relay. Closes ``upstream``."""
    try:
        if reply:
            await client.send(reply)
        try:
            hello = await read_hello(ctx, client, port in HTTPS_PORTS)
        except NotTLS as exc:
            raise not_tls(port, exc) from exc
        except OSError as exc:
            raise TunnelDenied("default", f"client failed before TLS: {exc}") from exc
        admit_hello(ctx, result, hello, host, port, decision)
        if decision.inspect:
            if hello is None:
                raise TunnelDenied(decision.rule_id, "an inspected tunnel must begin with TLS")
            try:
                result.bytes_out, result.bytes_in = await inspect_tunnel(
                    ctx, client, upstream, host, port, addresses, ctx.log)
            except TLSError as exc:
                raise TunnelDenied(decision.rule_id, f"inspection failed: {exc}") from exc
            result.ended = "inspected"
            return decision
        stats = RelayStats()
        # The relay takes the registrations over.
        registered = (client.forget_reading(), upstream.forget_reading())
        if ctx.metrics is not None:
            ctx.metrics.tunnels.inc()
        try:
            result.ended = await relay(client.sock, upstream.sock, stats,
                                       ctx.limits.tunnel_idle_timeout,
                                       first=client.take_buffer(), registered=registered)
        except asyncio.CancelledError:
            result.ended = "proxy stopped"
            raise
        finally:
            if ctx.metrics is not None:
                ctx.metrics.tunnels.dec()
            result.bytes_out += stats.bytes_up
            result.bytes_in += stats.bytes_down
    finally:
        upstream.close()
    return decision


def not_tls(port: int, exc: NotTLS) -> TunnelDenied:
    """The deny of a tunnel whose first bytes are not the ClientHello its port requires, or
    that ended before they came."""
    if port in HTTPS_PORTS:
        return TunnelDenied("default", f"non-TLS bytes on HTTPS port {port}: {exc}")
    return TunnelDenied("default", str(exc))


def admit_hello(ctx: ProxyContext, result: TunnelResult, hello: ClientHello | None, host: str,
                port: int, decision: Decision) -> None:
    """Check the client's first bytes against the CONNECT host (raises TunnelDenied); for a
    tunnel the proxy cannot see into, raise the session mark to what its rule reads."""
    result.sni = hello.server_name if hello else None
    why = check_sni(hello, host, port)
    if why is not None:
        raise TunnelDenied("default", why)
    if not decision.inspect:
        # Whatever this tunnel returns reaches the agent unseen: a reads rule raises the mark.
        ctx.flow_read(decision.rule_id, f"tunnel to {host}:{port}")


def refusal_before_dial(ctx: ProxyContext, host: str, decision: Decision) -> str | None:
    """Why an allowed tunnel may not be dialled: no CA to inspect with, data in its name, the
    no-write-down rule, or a budget (which this charges: call it once per tunnel)."""
    if decision.inspect and ctx.minter is None:
        return (f"rule {decision.rule_id} needs TLS inspection (inspect: true), but the proxy "
                "has no CA; create one with 'egresslock ca init' and restart the proxy")
    why = ctx.content.check_name(host, decision.rule_id)
    if why is None and not decision.inspect:
        # A tunnel the proxy cannot see into is one write to its destination (no write down)
        # and counts as one request against the budgets.
        why = ctx.flow_refusal(decision.rule_id, host) or ctx.content.admit_tunnel(
            decision.rule_id)
    return why


class TunnelDenied(Exception):
    """A tunnel refused after ``200`` (bad SNI, not TLS): the client connection is reset."""

    def __init__(self, rule_id: str, reason: str) -> None:
        super().__init__(reason)
        self.rule_id = rule_id
        self.reason = reason


def ended_row(result: TunnelResult, outcome: Decision | TunnelDenied | OSError) -> AuditRecord:
    """The row of a CONNECT tunnel that was allowed and dialled: relayed to its end (the
    decision), denied after its first bytes, or failed (a TimeoutError is an OSError)."""
    if isinstance(outcome, TunnelDenied):
        return tunnel_row(result, "tls", "deny", outcome.rule_id, outcome.reason)
    if isinstance(outcome, OSError):
        return tunnel_row(result, "connect", "allow", "default",
                          f"tunnel failed: {outcome or type(outcome).__name__}")
    return tunnel_row(result, "connect", outcome.verdict.value, outcome.rule_id,
                      outcome.reason)


def tunnel_row(result: TunnelResult, layer: str, verdict: str, rule_id: str, reason: str
               ) -> AuditRecord:
    extra: dict[str, object] = {}
    if result.sni is not None:
        extra["sni"] = result.sni
    if result.ended:
        extra["ended"] = result.ended
    if result.transparent:
        extra["capture"] = "transparent"
    return AuditRecord(layer=layer, verdict=verdict, rule_id=rule_id, reason=reason,
                       method=None if result.transparent else "CONNECT", host=result.host,
                       port=result.port,
                       address=result.address, bytes_out=result.bytes_out,
                       bytes_in=result.bytes_in, protocol="tcp", extra=extra or None,
                       time=result.ended_at or time.time())

