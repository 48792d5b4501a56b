"""Inside an ``inspect: true`` tunnel: decrypt, decide every request, re-encrypt.

The client's TLS ends at the proxy with a leaf minted for the CONNECT host; the proxy opens its
own TLS to the checked upstream address with full verification. Each request inside is decided
like a plain-HTTP one (method, normalised path, query, body size) and must name the CONNECT host
in Host, so one tunnel cannot carry requests for another host (domain fronting, DESIGN.md rule
2). A denied request gets a 403 inside the tunnel, which stays usable for the next request: a
body the denied request carried is read and discarded first, up to :data:`DISCARD_LIMIT` bytes.
A larger body (or one the client holds back for ``Expect: 100-continue``) is not waited for: the
403 closes the tunnel, since the client's next bytes would be the rest of that body.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from egresslock.audit import AuditRecord
from egresslock.errors import InputError
from egresslock.policy import Decision, parse_url
from egresslock.policy.normalize import IPAddress, join_authority
from egresslock.proxy.conn import Conn
from egresslock.proxy.context import ProxyContext
from egresslock.proxy.forward import (
    Exchange,
    Refused,
    audit_row,
    decision_row,
    dial,
    exchange,
    host_header_problem,
    prepare_content,
    request_for,
    upstream_failed,
)
from egresslock.proxy.http1 import (
    ChunkedDecoder,
    Framing,
    ProtocolError,
    RequestHead,
    deny_response,
    parse_request_head,
    request_framing,
    simple_response,
)
from egresslock.proxy.tlsconn import TLSConn, TLSError

# The most body bytes of a denied request the tunnel reads and drops to stay usable.
DISCARD_LIMIT = 64 * 1024


async def inspect_tunnel(ctx: ProxyContext, client: Conn, upstream: Conn, host: str, port: int,
                         addresses: tuple[IPAddress, ...],
                         log: Callable[[AuditRecord], None]) -> tuple[int, int]:
    """Serve decrypted requests until the client is done. Returns (bytes out, bytes in)."""
    assert ctx.minter is not None
    client_tls = TLSConn(client, ctx.minter.context(host), server_side=True)
    try:
        async with asyncio.timeout(ctx.limits.hello_timeout):
            await client_tls.handshake()
    except TimeoutError as exc:
        raise TLSError("client TLS handshake timed out") from exc
    state = _Upstream(ctx, upstream, host, port, addresses)
    totals = [0, 0]
    try:
        while True:
            try:
                async with asyncio.timeout(ctx.limits.idle_timeout):
                    raw = await client_tls.read_head(ctx.limits.max_head_bytes)
            except (TimeoutError, ProtocolError):
                return totals[0], totals[1]
            if raw is None:
                return totals[0], totals[1]
            ex = Exchange()
            head: RequestHead | None = None
            try:
                head = parse_request_head(raw)
                keep, decision = await _one(ctx, head, client_tls, state, host, port, addresses,
                                            ex)
            except Refused as r:
                kept = r.keep_alive and head is not None and await _discard_body(
                    ctx, client_tls, request_framing(head))
                await client_tls.send(r.response if kept or not r.keep_alive
                                      else _closing(r.response))
                log(audit_row(ex, head, "http", r.verdict, r.rule_id, r.reason))
                if not kept:
                    client_tls.linger = True
                    return totals[0], totals[1]
                continue
            except ProtocolError as exc:
                client_tls.linger = True
                reason = f"malformed request inside tunnel: {exc}"
                await client_tls.send(simple_response(400, "Bad Request",
                                                      f"egresslock: {reason}", close=True))
                log(audit_row(ex, head, "http", "deny", "default", reason))
                return totals[0], totals[1]
            totals[0] += ex.bytes_out
            totals[1] += ex.bytes_in
            log(decision_row(ex, head, decision))
            if not keep:
                return totals[0], totals[1]
    finally:
        state.close()
        await client_tls.finish()


class _Upstream:
    """The tunnel's TLS connection to the checked upstream, opened on first use."""

    def __init__(self, ctx: ProxyContext, raw: Conn, host: str, port: int,
                 addresses: tuple[IPAddress, ...]) -> None:
        self.ctx, self.raw, self.host, self.port, self.addresses = ctx, raw, host, port, addresses
        self.tls: TLSConn | None = None

    async def get(self, decision: Decision) -> TLSConn:
        if self.tls is not None:
            if not self.tls.closed:
                return self.tls
            # The server ended the last exchange: the tunnel goes on over a new connection.
            self.raw, _ = await dial(self.ctx, self.addresses, self.port, decision)
            self.tls = None
        tls = TLSConn(self.raw, self.ctx.upstream_tls, server_side=False,
                      server_hostname=self.host)
        try:
            async with asyncio.timeout(self.ctx.limits.connect_timeout):
                await tls.handshake()
        except (TLSError, TimeoutError, OSError) as exc:
            self.raw.close()
            raise upstream_failed(502, decision, f"upstream {self.host}:{self.port}: "
                                  f"{exc or 'TLS handshake timed out'}") from exc
        self.tls = tls
        return tls

    def close(self) -> None:
        if self.tls is not None:
            self.tls.close()
        self.raw.close()


async def _one(ctx: ProxyContext, head: RequestHead, client: TLSConn, upstream: _Upstream,
               host: str, port: int, addresses: tuple[IPAddress, ...], ex: Exchange
               ) -> tuple[bool, Decision]:
    framing = request_framing(head)
    keep_alive = head.keep_alive and _discardable(head, framing)
    authority = join_authority(host)
    target = head.target
    if not target.startswith("/"):
        raise Refused(deny_response("default", f"request target {target[:200]!r} inside a "
                                    "tunnel must be a path", not keep_alive), "deny",
                      "default", "request target inside a tunnel must be a path", keep_alive)
    try:
        url = parse_url(f"https://{authority}:{port}{target}")
    except InputError as exc:
        reason = f"refused as ambiguous: {exc}"
        raise Refused(deny_response("default", reason, not keep_alive), "deny", "default",
                      reason, keep_alive) from exc
    ex.url = url
    if host_header_problem(head, host, port, "the CONNECT target", required=True) is not None:
        shown = b", ".join(head.get_all(b"host")).decode("ascii", "replace") or "none"
        reason = (f"Host {shown} differs from CONNECT host {host}:{port} inside the tunnel "
                  "(domain fronting)")
        raise Refused(deny_response("default", reason, not keep_alive), "deny", "default",
                      reason, keep_alive)
    decision = ctx.decide(request_for(head, url, framing, addresses))
    if not decision.allowed:
        raise Refused(deny_response(decision.rule_id, decision.reason, not keep_alive), "deny",
                      decision.rule_id, decision.reason, keep_alive)
    ex.prepared = prepare_content(ctx, decision, url, head, framing, keep_alive)
    if (head.get(b"expect") or b"").lower() == b"100-continue" and framing.kind != "none":
        await client.send(b"HTTP/1.1 100 Continue\r\n\r\n")
    tls = await upstream.get(decision)
    ex.address = str(addresses[0]) if addresses else None
    try:
        keep = await exchange(ctx, head, url, framing, decision, client, tls, ex,
                              retryable=False, pool=False)
    except BaseException:
        tls.close()
        raise
    if not keep:
        tls.close()
    return keep and head.keep_alive, decision


def _discardable(head: RequestHead, framing: Framing) -> bool:
    """Whether a refusal of this request can leave the tunnel usable: the body the client sends
    along is small enough to read and drop (a chunked one is judged as it arrives)."""
    if framing.kind == "none":
        return True
    if (head.get(b"expect") or b"").lower() == b"100-continue":
        return False  # the client waits for a 100 that a refusal never sends
    return framing.kind == "chunked" or framing.length <= DISCARD_LIMIT


async def _discard_body(ctx: ProxyContext, client: TLSConn, framing: Framing) -> bool:
    """Read and drop a refused request's body; False when it was over :data:`DISCARD_LIMIT`,
    malformed, or too slow to arrive, and the tunnel must close instead."""
    if framing.kind == "none":
        return True
    timeout = ctx.limits.body_timeout
    try:
        if framing.kind == "length":  # _discardable checked the length against the limit
            remaining = framing.length
            while remaining:
                data = await client.read_some(remaining, client.loop.time() + timeout)
                if not data:
                    return False
                remaining -= len(data)
            return True
        decoder, read = ChunkedDecoder(), 0
        while not decoder.done:
            data = await client.read_some(DISCARD_LIMIT, client.loop.time() + timeout)
            read += len(data)
            if not data or read > DISCARD_LIMIT:
                return False
            decoder.feed(data)
        client.buf[:0] = decoder.leftover()  # the next request's first bytes
    except (ProtocolError, TimeoutError, OSError):
        return False
    return True


def _closing(response: bytes) -> bytes:
    """A keep-alive refusal turned into one that closes (its body could not be discarded)."""
    head, sep, body = response.partition(b"\r\n\r\n")
    return head + b"\r\nConnection: close" + sep + body
