"""Plain HTTP through the proxy: absolute-form requests, decided, then forwarded.

The order is the security argument. The URL is parsed strictly and refused when ambiguous; the
Host header must name the same host and port; the policy decides on what the request says
*before* any name is resolved (a denied name must not even reach DNS, where its labels could
carry data); the name is resolved once and every address decided; the proxy connects only to a
checked address; the request it sends is rebuilt from the normalised URL, so what was checked
is what is sent. Redirects are relayed to the client, never followed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from egresslock.audit import AuditRecord
from egresslock.errors import InputError
from egresslock.policy import URL, Decision, Layer, Request, parse_url
from egresslock.policy.normalize import IPAddress, split_authority
from egresslock.proxy.conn import Conn, Connecting, finish_connect, start_connect
from egresslock.proxy.context import ProxyContext
from egresslock.proxy.http1 import (
    LAST_CHUNK,
    ChunkedDecoder,
    Framing,
    Headers,
    ProtocolError,
    RequestHead,
    ResponseHead,
    deny_response,
    encode_chunk,
    parse_response_head,
    request_framing,
    response_framing,
    serialize_headers,
    simple_response,
    strip_hop_by_hop,
)
from egresslock.proxy.resolver import ResolveError

if TYPE_CHECKING:
    from egresslock.content.credentials import Binding
    from egresslock.content.engine import BodyFilter, Prepared

_BODY_CHUNK = 1 << 18


class Refused(Exception):
    """The request ends here with ``response``; ``keep_alive`` says if the connection may stay."""

    def __init__(self, response: bytes, verdict: str, rule_id: str, reason: str,
                 keep_alive: bool = False) -> None:
        super().__init__(reason)
        self.response = response
        self.verdict = verdict
        self.rule_id = rule_id
        self.reason = reason
        self.keep_alive = keep_alive


def bad_request(reason: str) -> Refused:
    return Refused(simple_response(400, "Bad Request", f"egresslock: {reason}", close=True),
                   "deny", "default", reason)


def denied(decision: Decision, keep_alive: bool) -> Refused:
    return Refused(deny_response(decision.rule_id, decision.reason, close=not keep_alive),
                   "deny", decision.rule_id, decision.reason, keep_alive)


def upstream_failed(status: int, decision: Decision, reason: str) -> Refused:
    text = {502: "Bad Gateway", 504: "Gateway Timeout"}[status]
    return Refused(simple_response(status, text, f"egresslock: {reason}", close=True),
                   decision.verdict.value, decision.rule_id, reason)


@dataclass(slots=True)
class Exchange:
    """What one forwarded request did, for its audit row."""

    url: URL | None = None
    address: str | None = None
    bytes_out: int = 0
    bytes_in: int = 0
    status: int = 0
    cut_reason: str | None = None  # why an allowed exchange was cut short (a limit hit)
    prepared: Prepared | None = None  # what the content checks changed or reported


def request_for(head: RequestHead, url: URL, framing: Framing,
                addresses: tuple[IPAddress, ...]) -> Request:
    """What the policy is asked about one HTTP request (plain, or inside an inspected tunnel)."""
    body_size = framing.length if framing.kind == "length" else (
        0 if framing.kind == "none" else None)  # chunked: counted as it streams
    return Request(url.host, url.port, url.scheme, head.method, url.path, url.query,
                   tuple(n.decode("latin-1").lower() for n, _ in head.headers), body_size,
                   addresses, Layer.HTTP, upgrade_token(head))


def upgrade_token(head: RequestHead) -> str | None:
    """The protocol an Upgrade request asks for (lower-case), or None for a plain request."""
    if not head.upgrade:
        return None
    value = (head.get(b"upgrade") or b"").split(b",")[0].strip().lower()
    return value.decode("ascii", "replace") or "unknown"


def host_header_problem(head: RequestHead, host: str, port: int, named_by: str,
                        required: bool) -> str | None:
    """Why the Host header does not name exactly ``host:port`` (RFC 9112 3.2), or None.

    ``named_by`` says what named the host first (the request URL, the CONNECT target), for the
    message; ``required`` makes a missing Host header a problem too.
    """
    hosts = head.get_all(b"host")
    if len(hosts) > 1:
        return "more than one Host header"
    if not hosts:
        return f"HTTP/{head.version} request without a Host header" if required else None
    try:
        named = split_authority(hosts[0].decode("ascii"), port)
    except (InputError, UnicodeDecodeError) as exc:
        return f"Host header {hosts[0]!r} is invalid: {exc}"
    if named != (host, port):
        return (f"Host header {hosts[0].decode('ascii', 'replace')!r} disagrees with "
                f"{named_by}")
    return None


def check_host_header(head: RequestHead, url: URL) -> None:
    """An absolute-form request's Host header must name the URL's host and port."""
    problem = host_header_problem(head, url.host, url.port,
                                  f"the request URL host {url.authority}",
                                  required=head.version == "1.1")
    if problem is not None:
        raise bad_request(problem)


def decision_row(ex: Exchange, head: RequestHead, decision: Decision) -> AuditRecord:
    """The audit row of a request that was decided and forwarded (or cut short by a limit)."""
    if ex.cut_reason is not None:
        return audit_row(ex, head, "http", "deny", decision.rule_id, ex.cut_reason)
    if ex.prepared is not None and ex.prepared.reported:
        return audit_row(ex, head, "http", "report", decision.rule_id,
                         f"report mode, enforce would deny: {ex.prepared.reported[0]}")
    return audit_row(ex, head, "http", decision.verdict.value, decision.rule_id, decision.reason)


def content_refused(rule_id: str, reason: str, keep_alive: bool) -> Refused:
    return Refused(deny_response(rule_id, reason, close=not keep_alive), "deny", rule_id,
                   reason, keep_alive)


def prepare_content(ctx: ProxyContext, decision: Decision, url: URL, head: RequestHead,
                    framing: Framing, keep_alive: bool) -> Prepared:
    """Run the content checks and transforms of a readable request (plain or inspected), and
    the no-write-down check of its destination."""
    from egresslock.content.engine import ContentRefusal

    try:
        prepared = ctx.content.prepare(decision.rule_id, url.host, url.path, url.query,
                                   head.headers, head.get(b"content-encoding"),
                                   framing.kind != "none",
                                   framing.length if framing.kind == "length" else None)
    except ContentRefusal as exc:
        raise content_refused(exc.rule_id, exc.reason, keep_alive) from exc
    why = ctx.flow_refusal(decision.rule_id, url.host)
    if why is not None:
        if not ctx.policy.current.report_only:
            raise content_refused(decision.rule_id, why, keep_alive)
        prepared.reported.append(why)
    return prepared


def decide_name(ctx: ProxyContext, request: Request, keep_alive: bool) -> Decision:
    """Decide a request before its name is resolved; raises :class:`Refused` when denied."""
    decision = ctx.decide(request)
    if not decision.allowed:
        raise denied(decision, keep_alive)
    # Before any lookup: a name whose labels carry a secret or data must not reach a resolver.
    why = ctx.content.check_name(request.host, decision.rule_id)
    if why is not None:
        raise content_refused(decision.rule_id, why, keep_alive)
    return decision


def decide_addresses(ctx: ProxyContext, request: Request, addresses: tuple[IPAddress, ...],
                     keep_alive: bool) -> Decision:
    """Decide a request again on every address its name resolved to."""
    decision = ctx.decide(request.with_addresses(addresses))
    if not decision.allowed:
        raise denied(decision, keep_alive)
    return decision


async def resolve_and_decide(ctx: ProxyContext, request: Request, keep_alive: bool
                             ) -> tuple[Decision, tuple[IPAddress, ...]]:
    """Decide without addresses, then resolve (only if allowed) and decide on every address."""
    decision = decide_name(ctx, request, keep_alive)
    try:
        addresses = await ctx.resolver.resolve(request.host, request.port)
    except ResolveError as exc:
        raise upstream_failed(502, decision, str(exc)) from exc
    return decide_addresses(ctx, request, addresses, keep_alive), addresses


async def dial(ctx: ProxyContext, addresses: tuple[IPAddress, ...], port: int,
               decision: Decision, first: Connecting | None = None) -> tuple[Conn, str]:
    """Connect to the first checked address that answers; ``first`` is an attempt already
    begun on the first address (by the tunnel lane)."""
    last = ""
    timed_out = False
    start = time.perf_counter()
    for address in addresses:
        try:
            attempt = first if first is not None else start_connect(str(address), port)
            first = None
            conn = await finish_connect(attempt, ctx.limits.connect_timeout)
        except TimeoutError:
            timed_out, last = True, f"connecting to {address}:{port} timed out"
            continue
        except OSError as exc:
            last = f"cannot connect to {address}:{port}: {exc.strerror or exc}"
            continue
        if ctx.metrics is not None:
            ctx.metrics.dial_seconds.observe(time.perf_counter() - start)
        return conn, str(address)
    raise upstream_failed(504 if timed_out else 502, decision, last or "no address to connect to")


@dataclass(frozen=True, slots=True)
class Checked:
    """A request whose form, URL and Host header passed, not yet decided."""

    url: URL
    framing: Framing
    request: Request
    keep_alive: bool  # whether the client connection may carry another request if refused


def check_request(head: RequestHead, ex: Exchange) -> Checked:
    """The checks of an absolute-form request that need neither policy nor network: form,
    framing, the URL (refused when ambiguous) and the Host header. Raises :class:`Refused`."""
    if head.target.startswith("/"):
        raise bad_request("egresslock is a forward proxy: send absolute-form requests "
                          "(GET http://host/path); use CONNECT for https")
    try:
        framing = request_framing(head)
    except ProtocolError as exc:
        raise bad_request(str(exc)) from exc
    keep_alive = head.keep_alive and framing.kind == "none"
    try:
        url = parse_url(head.target)
    except InputError as exc:
        raise Refused(deny_response("default", f"refused as ambiguous: {exc}", not keep_alive),
                      "deny", "default", f"refused as ambiguous: {exc}", keep_alive) from exc
    ex.url = url
    if url.scheme != "http":
        raise bad_request(f"absolute-form {url.scheme}:// is not forwarded; use CONNECT")
    check_host_header(head, url)
    return Checked(url, framing, request_for(head, url, framing, ()), keep_alive)


async def handle_request(ctx: ProxyContext, head: RequestHead, client: Conn,
                         ex: Exchange) -> tuple[bool, Decision]:
    """Forward one absolute-form request. Returns (keep the client connection, decision).

    Raises :class:`Refused` when the request ends in a response the proxy writes itself.
    """
    checked = check_request(head, ex)
    decision, addresses = await resolve_and_decide(ctx, checked.request, checked.keep_alive)
    ex.prepared = prepare_content(ctx, decision, checked.url, head, checked.framing,
                                  checked.keep_alive)
    return await forward_admitted(ctx, head, client, ex, checked, decision, addresses)


async def forward_admitted(ctx: ProxyContext, head: RequestHead, client: Conn, ex: Exchange,
                           checked: Checked, decision: Decision,
                           addresses: tuple[IPAddress, ...], fresh: bool = False
                           ) -> tuple[bool, Decision]:
    """Forward a request that was decided and whose content checks ran (``ex.prepared``):
    over a pooled upstream connection, and once more over a fresh one if the pooled one turns
    out to be closed; only over a fresh one with ``fresh``."""
    url, framing = checked.url, checked.framing
    if (head.get(b"expect") or b"").lower() == b"100-continue" and framing.kind != "none":
        await client.send(b"HTTP/1.1 100 Continue\r\n\r\n")
    for attempt in (2,) if fresh else (1, 2):
        upstream, address, reused = await _upstream(ctx, addresses, url.port, decision,
                                                    fresh=attempt == 2)
        ex.address = address
        try:
            keep = await exchange(ctx, head, url, framing, decision, client, upstream, ex,
                                   retryable=reused and framing.kind == "none")
        except _Stale:
            upstream.close()
            continue
        except BaseException:
            upstream.close()
            raise
        return keep and head.keep_alive, decision
    raise upstream_failed(502, decision, f"upstream {ex.address} closed the connection")


class _Stale(Exception):
    """A pooled upstream connection had been closed by the server; dial a fresh one."""


async def _upstream(ctx: ProxyContext, addresses: tuple[IPAddress, ...], port: int,
                    decision: Decision, fresh: bool) -> tuple[Conn, str, bool]:
    found = None if fresh else ctx.pooled_any(address_texts(addresses), port)
    if found is not None:
        return found[0], found[1], True
    conn, dialled = await dial(ctx, addresses, port, decision)
    return conn, dialled, False


@functools.lru_cache(maxsize=1024)
def address_texts(addresses: tuple[IPAddress, ...]) -> tuple[str, ...]:
    """The addresses as text, as the pool keys them (``str`` of an address is not cheap)."""
    return tuple(str(a) for a in addresses)


def upstream_head(head: RequestHead, url: URL, framing: Framing,
                   prepared: Prepared | None) -> bytes:
    """The request head sent upstream: rebuilt from the checked URL (and what the content
    transforms made of target and headers), never copied from the client."""
    headers: Headers = [(b"Host", url.authority.encode("ascii"))]
    source = prepared.headers if prepared is not None else head.headers
    for name, value in strip_hop_by_hop(source):
        low = name.lower()
        if low in (b"host", b"expect") or (low == b"content-length"
                                             and framing.kind != "length"):
            continue
        headers.append((name, str(framing.length).encode("ascii")
                        if low == b"content-length" else value))
    if framing.kind == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
    elif framing.kind == "length" and not any(n.lower() == b"content-length"
                                              for n, _ in headers):
        headers.append((b"Content-Length", str(framing.length).encode("ascii")))
    upgrade = head.get(b"upgrade")
    if head.upgrade and upgrade is not None:  # decided already: the rule allows this protocol
        headers += [(b"Connection", b"Upgrade"), (b"Upgrade", upgrade)]
    target = prepared.target if prepared is not None else url.target
    return b"%s %s HTTP/1.1\r\n%s\r\n" % (
        head.method.encode("ascii"), target.encode("ascii"), serialize_headers(headers))


def _filter(body: BodyFilter | None, data: bytes, final: bool = False) -> bytes:
    """``data`` through the content filter (or the filter's rest when ``final``); a content
    refusal in the middle of a body ends the exchange and the client connection."""
    if body is None:
        return b"" if final else data
    from egresslock.content.engine import ContentRefusal

    try:
        return body.finish() if final else body.feed(data)
    except ContentRefusal as exc:
        raise content_refused(exc.rule_id, exc.reason, keep_alive=False) from exc


async def _send_body(ctx: ProxyContext, client: Conn, upstream: Conn | None,
                     framing: Framing, decision: Decision, ex: Exchange) -> bytes:
    """Relay the request body through the content filter. With ``upstream`` None the body is
    only read and filtered, and what the filter released is returned (a transformed body)."""
    limit = decision.body_limit
    body = ex.prepared.body if ex.prepared is not None else None
    kept: list[bytes] = []

    async def send(data: bytes) -> None:
        if upstream is None:
            kept.append(data)
        elif data:
            await upstream.send(data)

    if framing.kind == "length":
        remaining = framing.length
        while remaining:
            data = await client.read_some(min(remaining, _BODY_CHUNK),
                                          client.loop.time() + ctx.limits.body_timeout)
            if not data:
                raise ProtocolError("client closed the connection inside the request body")
            remaining -= len(data)
            ex.bytes_out += len(data)
            await send(_filter(body, data))
        await send(_filter(body, b"", final=True))
        return b"".join(kept)
    if framing.kind != "chunked":
        return b""
    decoder = ChunkedDecoder()
    while not decoder.done:
        data = await client.read_some(_BODY_CHUNK,
                                      client.loop.time() + ctx.limits.body_timeout)
        if not data:
            raise ProtocolError("client closed the connection inside a chunked body")
        chunks = decoder.feed(data)
        size = sum(len(c) for c in chunks)
        if limit is not None and ex.bytes_out + size > limit:
            reason = (f"body over max_body_bytes {limit} by rule {decision.rule_id} "
                      "(chunked upload stopped before the excess was sent)")
            raise Refused(deny_response(decision.rule_id, reason, close=True), "deny",
                          decision.rule_id, reason)
        ex.bytes_out += size
        released = [_filter(body, c) for c in chunks if c]
        if upstream is None:
            kept.extend(released)
        elif any(released):
            await upstream.send(b"".join(encode_chunk(c) for c in released if c))
    # Bytes after the body belong to the client's next (pipelined) request.
    client.buf[:0] = decoder.leftover()
    rest = _filter(body, b"", final=True)
    if upstream is None:
        return b"".join(kept) + rest
    await upstream.send((encode_chunk(rest) if rest else b"") + LAST_CHUNK)
    return b""


async def exchange(ctx: ProxyContext, head: RequestHead, url: URL, framing: Framing,
                    decision: Decision, client: Conn, upstream: Conn, ex: Exchange,
                    retryable: bool, pool: bool = True) -> bool:
    """Send one decided request upstream and relay its response. True when both sides may
    carry another request; ``pool`` returns the upstream connection to the shared pool."""
    prepared = ex.prepared
    whole = b""
    if prepared is not None and prepared.body is not None and prepared.body.whole:
        # A transformed body changes length: read and transform it before the head is sent.
        whole = await _send_body(ctx, client, None, framing, decision, ex)
        framing = dataclasses.replace(framing, kind="length", length=len(whole))
    try:
        await upstream.send(upstream_head(head, url, framing, prepared) + whole)
    except OSError as exc:
        if retryable:
            raise _Stale from exc
        raise upstream_failed(502, decision, f"upstream {ex.address}: {exc}") from exc
    if not whole:
        await _send_body(ctx, client, upstream, framing, decision, ex)
    resp = await _final_response_head(ctx, upstream, decision, ex, retryable)
    return await respond(ctx, head, url, decision, client, upstream, ex, resp, pool)


async def respond(ctx: ProxyContext, head: RequestHead, url: URL, decision: Decision,
                  client: Conn, upstream: Conn, ex: Exchange, resp: ResponseHead,
                  pool: bool = True) -> bool:
    """Relay the response whose final head ``resp`` was read from ``upstream``. True when both
    sides may carry another request; ``pool`` returns the upstream connection to the pool."""
    prepared = ex.prepared
    if resp.status < 400:  # data reached the agent: a reads rule raises the session's mark
        ctx.flow_read(decision.rule_id, f"{head.method} {url.host}{url.path}")
    if resp.status == 101:
        if not head.upgrade:
            raise upstream_failed(502, decision, "upstream switched protocols, but the request "
                                                 "asked for no upgrade")
        headers = strip_hop_by_hop(resp.headers)
        headers += [(b"Connection", b"Upgrade"), (b"Upgrade", resp.get(b"upgrade") or b"")]
        ex.status = 101
        await client.send(b"HTTP/1.1 101 %s\r\n%s\r\n" % (resp.reason,
                                                            serialize_headers(headers)))
        await relay_upgraded(ctx, client, upstream, decision, ex)
        upstream.close()
        return False
    rframing = response_framing(resp, head.method)
    keep = resp.keep_alive and rframing.kind != "close"
    ex.status = resp.status
    redact = prepared.redact if prepared is not None else ()
    out = _Out(client, response_head(resp, rframing, keep and head.keep_alive, redact), redact)
    try:
        complete = await _relay_response(ctx, upstream, out, rframing, ex)
    finally:
        await out.flush()
    if keep and complete:
        if pool:
            ctx.release(ex.address or "", url.port, upstream)
    else:
        upstream.close()
    return keep and complete


def response_head(resp: ResponseHead, framing: Framing, keep: bool,
                  redact: tuple[Binding, ...] = ()) -> bytes:
    """The head the client gets for ``resp``: hop-by-hop headers dropped, the framing the
    proxy relays with, ``Connection: close`` unless both sides stay open (``keep``), and
    values that hold a real credential redacted."""
    headers = strip_hop_by_hop(resp.headers)
    if framing.kind == "chunked":
        headers.append((b"Transfer-Encoding", b"chunked"))
    if not keep:
        headers.append((b"Connection", b"close"))
    if redact:
        headers = [(n, _redact_all(redact, v)) for n, v in headers]
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (resp.status, resp.reason, serialize_headers(headers))


async def _final_response_head(ctx: ProxyContext, upstream: Conn, decision: Decision,
                               ex: Exchange, retryable: bool) -> ResponseHead:
    """The upstream's final response head, skipping interim 1xx (the proxy answered
    100 Continue itself); 502/504 for a broken or silent upstream."""
    sent = True  # the request just left: no response can be waiting for a first read yet
    while True:
        deadline = upstream.loop.time() + ctx.limits.response_timeout
        try:
            if sent:
                sent = False
                await upstream.readable(deadline)
            raw = await upstream.read_head(ctx.limits.max_head_bytes, deadline)
        except TimeoutError as exc:  # before OSError, of which it is a subclass
            raise upstream_failed(504, decision, f"upstream {ex.address} sent no response "
                                  f"within {ctx.limits.response_timeout:g}s") from exc
        except OSError as exc:
            if retryable:
                raise _Stale from exc
            raise upstream_failed(502, decision, f"upstream {ex.address}: {exc}") from exc
        except ProtocolError as exc:
            raise upstream_failed(502, decision, str(exc)) from exc
        if raw is None and retryable:
            raise _Stale
        if raw is None:
            raise upstream_failed(502, decision, f"upstream {ex.address} closed the "
                                                 "connection without a response")
        try:
            resp = parse_response_head(raw)
        except ProtocolError as exc:
            raise upstream_failed(502, decision, str(exc)) from exc
        if not (100 <= resp.status < 200 and resp.status != 101):
            return resp


async def relay_upgraded(ctx: ProxyContext, client: Conn, upstream: Conn, decision: Decision,
                         ex: Exchange) -> None:
    """Relay an upgraded connection (WebSocket) both ways, counting what the client sends
    against the rule's ``max_body_bytes``: past it the connection is cut."""
    limit = decision.body_limit

    async def up() -> None:
        while True:
            data = await client.read_some(_BODY_CHUNK,
                                          client.loop.time() + ctx.limits.tunnel_idle_timeout)
            if not data:
                return
            if limit is not None and ex.bytes_out + len(data) > limit:
                ex.cut_reason = (f"upgraded connection cut: client sent over max_body_bytes "
                                 f"{limit} of rule {decision.rule_id}")
                return
            ex.bytes_out += len(data)
            await upstream.send(data)

    async def down() -> None:
        while True:
            data = await upstream.read_some(_BODY_CHUNK,
                                            upstream.loop.time() + ctx.limits.tunnel_idle_timeout)
            if not data:
                return
            ex.bytes_in += len(data)
            await client.send(data)

    tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _redact_all(bindings: tuple[Binding, ...], data: bytes) -> bytes:
    for b in bindings:
        data = b.redact(data)
    return data


class _Out:
    """The client side of a response: the head waits to leave with the first body bytes, so a
    small response is one send and one packet, not two.

    With ``redact`` set (a response from a host that was sent a real credential), the body
    passes a :class:`~egresslock.content.credentials.Redactor`, which holds back the last
    bytes of each piece until the next shows they do not begin the real value.
    """

    __slots__ = ("conn", "pending", "redactor")

    def __init__(self, conn: Conn, head: bytes, redact: tuple[Binding, ...] = ()) -> None:
        self.conn = conn
        self.pending = head
        if redact:
            from egresslock.content.credentials import Redactor

            self.redactor: Redactor | None = Redactor(redact)
        else:
            self.redactor = None

    async def send(self, data: bytes, chunked: bool = False) -> None:
        if self.redactor is not None:
            data = self.redactor.feed(data)
            if chunked:
                data = encode_chunk(data) if data else b""
        elif chunked:
            data = encode_chunk(data)
        if self.pending:
            data, self.pending = self.pending + data, b""
        if data:
            await self.conn.send(data)

    async def end_body(self, chunked: bool = False) -> None:
        """The redactor's held-back bytes (a chunk of them when ``chunked``)."""
        if self.redactor is not None:
            rest = self.redactor.finish()
            if rest:
                await self.conn.send(encode_chunk(rest) if chunked else rest)

    async def flush(self) -> None:
        if self.pending:
            data, self.pending = self.pending, b""
            await self.conn.send(data)


async def _relay_response(ctx: ProxyContext, upstream: Conn, client: _Out, framing: Framing,
                          ex: Exchange) -> bool:
    """Relay a response body by its framing; True when it ended cleanly."""
    timeout = ctx.limits.body_timeout
    if framing.kind == "none":
        return True
    if framing.kind == "length":
        remaining = framing.length
        while remaining:
            if upstream.buf:  # already read with the head: no wait, so no deadline either
                data = upstream.take(min(remaining, _BODY_CHUNK))
            else:
                data = await upstream.read_some(min(remaining, _BODY_CHUNK),
                                                upstream.loop.time() + timeout)
            if not data:
                return False
            remaining -= len(data)
            ex.bytes_in += len(data)
            await client.send(data)
        await client.end_body()
        return True
    if framing.kind == "close":
        while True:
            data = await upstream.read_some(_BODY_CHUNK, upstream.loop.time() + timeout)
            if not data:
                await client.end_body()
                return False
            ex.bytes_in += len(data)
            await client.send(data)
    decoder = ChunkedDecoder()
    while not decoder.done:
        data = await upstream.read_some(_BODY_CHUNK, upstream.loop.time() + timeout)
        if not data:
            return False
        chunks = [c for c in decoder.feed(data) if c]
        ex.bytes_in += sum(len(c) for c in chunks)
        if chunks:
            await client.send(b"".join(chunks), chunked=True)
    await client.end_body(chunked=True)
    await client.send(LAST_CHUNK)
    # Bytes after the last chunk were never asked for: do not reuse that connection.
    return not decoder.leftover()


def audit_row(ex: Exchange, head: RequestHead | None, layer: str, verdict: str, rule_id: str,
              reason: str) -> AuditRecord:
    url = ex.url
    extra: dict[str, object] = {"status": ex.status} if ex.status else {}
    note = ex.prepared.note() if ex.prepared is not None else None
    if note:
        extra.update(note)
    return AuditRecord(
        layer=layer, verdict=verdict, rule_id=rule_id, reason=reason,
        method=head.method if head else None,
        host=url.host if url else None, port=url.port if url else None,
        path=url.target if url else (head.target[:2048] if head else None),
        address=ex.address, bytes_out=ex.bytes_out, bytes_in=ex.bytes_in, protocol="tcp",
        extra=extra or None,
    )
