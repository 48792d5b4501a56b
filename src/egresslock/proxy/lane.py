"""The fast lane: a kept-alive client's plain requests served from readiness callbacks.

Most requests on a busy keep-alive connection are alike: a GET or HEAD without a body, to a
host the policy allows, whose name needs no lookup (an IP literal or a ``--resolve`` pin), over
an upstream connection already in the pool, answered with a small response that arrives whole.
The coroutine path serves such a request with two task wake-ups, a future per wait and a failed
``recv`` per read; here the loop calls :class:`Lane` when a socket is readable and the request
is checked, sent, answered and logged in two callbacks.

The lane runs the same checks as :func:`~egresslock.proxy.forward.handle_request`, through the
same functions and in the same order: the request's form and Host header, the decision on the
name, the name's content check, the decision on the addresses, then the content checks (which
charge budgets), the no-write-down check, and the upstream head rebuilt from the checked URL.

Whatever is not the common case leaves the lane at a point where nothing has happened twice:

- before the content checks (which have effects: budgets), the request's head goes back into
  the client's buffer and the coroutine path serves it from the start (``SLOW``): a body, an
  upgrade, CONNECT, a name to resolve, a deny (so every refusal is written by one path), a
  malformed or incomplete head;
- after them, the lane hands over what it has done as a continuation, a coroutine that the
  connection's task awaits: a refusal by the content checks, an upstream to dial, a pooled one
  found closed, a response that is not complete in one read, a timeout.

The connection's task waits on one future while the lane serves, not one per request. The
client socket stays registered while the lane has it, and is unregistered (and its bytes left
in the buffer) when the lane hands over; an upstream is registered only while its response is
awaited. One timer per lane serves both the idle timeout and the response timeout, re-armed when
it fires early.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple, TypeVar

from egresslock.content.engine import Prepared
from egresslock.policy import Decision
from egresslock.policy.normalize import IPAddress
from egresslock.proxy.actions import action_path
from egresslock.proxy.conn import RECV_SIZE, Conn
from egresslock.proxy.context import ProxyContext
from egresslock.proxy.forward import (
    Checked,
    Exchange,
    Refused,
    _final_response_head,
    address_texts,
    check_request,
    decide_addresses,
    decide_name,
    decision_row,
    forward_admitted,
    prepare_content,
    respond,
    response_head,
    upstream_failed,
    upstream_head,
)
from egresslock.proxy.http1 import (
    Framing,
    ProtocolError,
    RequestHead,
    ResponseHead,
    parse_request_head,
    parse_response_head,
    response_framing,
)

Outcome = tuple[bool, Decision]
K = TypeVar("K")
V = TypeVar("V")
# What the connection's task awaits for a request the lane handed over: the server wraps the
# work in its own answer-and-log step (``ProxyServer._settle``).
Settle = Callable[[RequestHead, Exchange, Coroutine[Any, Any, Outcome]],
                  Coroutine[Any, Any, bool]]


class Slow:
    """The next request's head is back in the client's buffer: the coroutine path serves it."""

    def __repr__(self) -> str:
        return "SLOW"


SLOW = Slow()
_WAIT = object()  # internal: the lane waits for a socket
_IDLE, _UPSTREAM, _OFF = 0, 1, 2

# What :meth:`Lane.next` returns: None (the connection is over), SLOW, or a continuation.
Step = Slow | Coroutine[Any, Any, bool] | None


class _Remembered(NamedTuple):
    """A request the lane admitted, as far as its bytes decide it."""

    head: RequestHead
    checked: Checked
    decision: Decision
    addresses: tuple[IPAddress, ...]
    prepared: Prepared
    data: bytes  # the head sent upstream


class TunnelPlan(NamedTuple):
    """A CONNECT the tunnel lane opens, as far as its head's bytes decide it."""

    host: str
    port: int
    decision: Decision
    address: IPAddress


class HeadMemo:
    """What the lane worked out from a head's exact bytes, to reuse for the same bytes.

    From a request head's bytes to the bytes sent upstream, every step is a function of those
    bytes and of the policy, except three: a budget to charge, report mode's notes, and the
    session's mark (a rule with a level). For a request whose rule has none of these, the same
    bytes always get the same answer, so the lane remembers it: a client that repeats a request
    on its kept-alive connection has it parsed, decided and checked once. Responses likewise:
    parsing a head and writing the one the client gets depend on the bytes alone (and on whether
    the request was a HEAD). So do CONNECT heads the tunnel lane opens (it opens only those under
    such rules): the host, port, decision and address they come to. A memo serves one policy and
    is replaced with it; it keeps heads up to 2 KiB, and is cleared when it holds 1,024 of any
    kind, which bounds its memory.
    """

    __slots__ = ("content", "policy", "requests", "responses", "tunnels")

    MAX_HEAD = 2048
    MAX_ENTRIES = 1024

    def __init__(self, ctx: ProxyContext) -> None:
        self.policy = ctx.policy.current
        self.content = ctx.content
        self.requests: dict[bytes, _Remembered] = {}
        self.responses: dict[tuple[bytes, bool], tuple[ResponseHead, Framing, bytes, bytes]] = {}
        self.tunnels: dict[bytes, TunnelPlan] = {}

    @classmethod
    def of(cls, ctx: ProxyContext) -> HeadMemo:
        memo = ctx.head_memo
        if memo is None or memo.policy is not ctx.policy.current or memo.content is not (
                ctx.content):
            memo = ctx.head_memo = cls(ctx)
        return memo

    def remember(self, raw: bytes, answer: _Remembered) -> None:
        self._keep(self.requests, raw, raw, answer)

    def remember_tunnel(self, raw: bytes, plan: TunnelPlan) -> None:
        self._keep(self.tunnels, raw, raw, plan)

    def _keep(self, table: dict[K, V], raw: bytes, key: K, value: V) -> None:
        """Store a head's answer within the memo's bounds (see the class docstring)."""
        if len(raw) <= self.MAX_HEAD:
            if len(table) >= self.MAX_ENTRIES:
                table.clear()
            table[key] = value

    def response(self, raw: bytes, head_method: bool
                 ) -> tuple[ResponseHead, Framing, bytes, bytes]:
        """The parsed head, its framing, and the head the client gets with the connection kept
        and with it closed. Raises ProtocolError."""
        key = (raw, head_method)
        found = self.responses.get(key)
        if found is None:
            resp = parse_response_head(raw)
            framing = response_framing(resp, "HEAD" if head_method else "GET")
            found = (resp, framing, response_head(resp, framing, True),
                     response_head(resp, framing, False))
            self._keep(self.responses, raw, key, found)
        return found


async def _raise(exc: BaseException) -> Outcome:
    raise exc


class Lane:
    """Serves one client connection's common requests; see the module docstring."""

    __slots__ = ("_fut", "_reading", "_timer", "_timer_at", "action_port", "addresses", "checked",
                 "client", "client_eof", "ctx", "decision", "ex", "head", "loop", "settle",
                 "since", "state", "upstream")

    def __init__(self, ctx: ProxyContext, client: Conn, settle: Settle,
                 action_port: int | None = None) -> None:
        self.ctx = ctx
        self.client = client
        self.loop = client.loop
        self.settle = settle
        # The proxy's own port when it serves the actions endpoint: those requests go slow.
        self.action_port = action_port
        self.state = _OFF
        self.client_eof = False
        self._reading = False
        self._fut: asyncio.Future[Step] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.since = 0.0  # when the current wait began (idle, or for the response)
        # The request in flight while state is _UPSTREAM.
        self.upstream: Conn | None = None
        self.head: RequestHead | None = None
        self.ex: Exchange | None = None
        self.checked: Checked | None = None
        self.decision: Decision | None = None
        self.addresses: tuple[IPAddress, ...] = ()

    async def next(self) -> Step:
        """Serve requests until one needs the coroutine path or the connection ends."""
        step = self._serve()
        if step is not _WAIT:
            return step  # type: ignore[return-value]
        fut: asyncio.Future[Step] = self.loop.create_future()
        self._fut = fut
        self._read_client()
        self._arm()
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                result = fut.result()
                if isinstance(result, Coroutine):
                    result.close()  # a hand-over the cancelled task will never await
            raise
        finally:
            self._fut = None
            self._detach()

    # -- the client side ---------------------------------------------------------------------

    def _serve(self) -> object:
        """Serve the next complete head in the client's buffer: a step, or _WAIT (for more
        bytes from the client, or for the upstream's answer to the request just sent)."""
        self.state = _IDLE
        buf = self.client.buf
        if not buf:
            if self.client_eof:
                return None
            self.since = self.loop.time()
            return _WAIT
        end = buf.find(b"\r\n\r\n")
        if end < 0 or end + 4 > self.ctx.limits.max_head_bytes:
            return SLOW  # incomplete or over the limit: the coroutine path times or refuses it
        raw = bytes(buf[: end + 4])
        del buf[: end + 4]
        return self._request(raw)

    def _serve_next(self) -> None:
        """From a callback, with nothing in flight: serve what the client sent next, and end
        the connection's wait when that is a step for it."""
        step = self._serve()
        if step is not _WAIT:
            self._resolve(step)

    def _on_client(self) -> None:
        try:
            try:
                data = self.client.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if data:
                self.client.buf += data
            else:
                self.client_eof = True
                self._stop_client()
            if self.state == _IDLE:
                self._serve_next()
            elif len(self.client.buf) > self.ctx.limits.max_head_bytes:
                self._stop_client()  # a pipelining client waits until this response is out
        except Exception as exc:  # a bug: the connection's task raises it
            self._fail(exc)

    def _read_client(self) -> None:
        if not self._reading and not self.client_eof:
            self.client.handler = self._on_client
            self.client.start_reading()
            self._reading = True

    def _stop_client(self, unregister: bool = True) -> None:
        """Stop serving the client's readiness; ``unregister`` when nobody may read it now
        (epoll is level-triggered: an end of stream or a full buffer would be reported at
        every turn of the loop)."""
        if self._reading:
            self._reading = False
            self.client.handler = None
            if unregister:
                self.client.stop_reading()

    # -- one request -------------------------------------------------------------------------

    def _request(self, raw: bytes) -> object:
        """Check one request and send it upstream (then _WAIT for the answer), or the step that
        serves it elsewhere (SLOW, or a continuation)."""
        ctx = self.ctx
        memo = HeadMemo.of(ctx)
        known = memo.requests.get(raw)
        if known is not None:
            return self._send(known.head, Exchange(url=known.checked.url,
                                                   prepared=known.prepared),
                              known.checked, known.decision, known.addresses, known.data)
        try:
            head = parse_request_head(raw)
        except ProtocolError:
            return self._slow(raw)
        if (head.method == "CONNECT" or head.upgrade or head.target.startswith("/")
                or (self.action_port is not None
                    and action_path(head, self.action_port) is not None)):
            return self._slow(raw)
        ex = Exchange()
        try:
            checked = check_request(head, ex)
            if checked.framing.kind != "none":
                return self._slow(raw)
            decision = decide_name(ctx, checked.request, checked.keep_alive)
            addresses = ctx.resolver.known(checked.request.host)
            if addresses is None:
                return self._slow(raw)
            decision = decide_addresses(ctx, checked.request, addresses, checked.keep_alive)
        except Refused:
            return self._slow(raw)
        # From here on the checks have effects (budgets): nothing may run twice.
        try:
            prepared = prepare_content(ctx, decision, checked.url, head, checked.framing,
                                       checked.keep_alive)
        except Refused as r:
            return self.settle(head, ex, _raise(r))
        ex.prepared = prepared
        if prepared.redact or prepared.body is not None:  # a response to redact
            return self.settle(head, ex, forward_admitted(ctx, head, self.client, ex, checked,
                                                          decision, addresses))
        data = upstream_head(head, checked.url, checked.framing, prepared)
        rule = ctx.policy.current.by_id.get(decision.rule_id)
        if ctx.content.repeatable(decision.rule_id) and (rule is None or rule.level is None):
            memo.remember(raw, _Remembered(head, checked, decision, addresses, prepared, data))
        return self._send(head, ex, checked, decision, addresses, data)

    def _send(self, head: RequestHead, ex: Exchange, checked: Checked, decision: Decision,
              addresses: tuple[IPAddress, ...], data: bytes) -> object:
        """Send an admitted request's head over a pooled connection, then _WAIT for the answer;
        without one, the coroutine path dials."""
        ctx = self.ctx
        found = ctx.pooled_any(address_texts(addresses), checked.url.port)
        if found is None:
            return self.settle(head, ex, forward_admitted(ctx, head, self.client, ex, checked,
                                                          decision, addresses))
        upstream, ex.address = found
        try:
            sent = upstream.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the pooled connection was closed: dial a fresh one
            upstream.close()
            return self.settle(head, ex, forward_admitted(ctx, head, self.client, ex, checked,
                                                          decision, addresses, fresh=True))
        self.head, self.ex, self.checked, self.decision = head, ex, checked, decision
        self.addresses = addresses
        if sent < len(data):  # the socket is full: the coroutine path sends the rest
            return self._hand_over(upstream, data[sent:], None)
        self.upstream = upstream
        self.state = _UPSTREAM
        self.since = self.loop.time()
        upstream.handler = self._on_upstream
        upstream.start_reading()
        self._arm()  # a response timeout shorter than the idle timeout needs an earlier timer
        return _WAIT

    def _slow(self, raw: bytes) -> Slow:
        self.client.buf[:0] = raw
        return SLOW

    # -- the upstream side -------------------------------------------------------------------

    def _on_upstream(self) -> None:
        upstream = self.upstream
        if upstream is None or self.state != _UPSTREAM:
            return
        try:
            try:
                data = upstream.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop_upstream()
                if upstream.buf:
                    self._refuse(upstream_failed(502, self._decision(), "connection closed in "
                                                 "the middle of a head"))
                else:  # nothing of an answer: a pooled connection the server had closed
                    self._resolve(self._continue(forward_admitted(
                        self.ctx, self._head(), self.client, self._ex(), self._checked(),
                        self._decision(), self.addresses, fresh=True)))
                return
            buf = upstream.buf
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > self.ctx.limits.max_head_bytes:
                    self._drop_upstream()
                    self._refuse(upstream_failed(
                        502, self._decision(),
                        f"request head over {self.ctx.limits.max_head_bytes} bytes"))
                return
            raw = bytes(buf[: end + 4])
            del buf[: end + 4]
            try:
                answer = HeadMemo.of(self.ctx).response(raw, self._head().method == "HEAD")
            except ProtocolError as exc:
                self._drop_upstream()
                self._refuse(upstream_failed(502, self._decision(), str(exc)))
                return
            self._answer(upstream, *answer)
        except Exception as exc:  # a bug: the connection's task raises it
            self._fail(exc)

    def _answer(self, upstream: Conn, resp: ResponseHead, framing: Framing, kept: bytes,
                closed: bytes) -> None:
        """Relay a response whose body is all here; hand over any other. ``kept`` and
        ``closed`` are the heads the client gets with the connection kept, and closed."""
        head, ex, decision = self._head(), self._ex(), self._decision()
        self.upstream = None
        upstream.handler = None  # it stays registered: the next request here needs no epoll_ctl
        status = resp.status
        if 100 <= status < 200 or framing.kind not in ("length", "none") or (
                framing.kind == "length" and len(upstream.buf) < framing.length):
            self._resolve(self._hand_over(upstream, b"", None if 100 <= status < 200 and
                                          status != 101 else resp))
            return
        body = upstream.take(framing.length) if framing.kind == "length" else b""
        ctx = self.ctx
        url = self._checked().url
        if status < 400:  # data reached the agent: a reads rule raises the session's mark
            ctx.flow_read(decision.rule_id, f"{head.method} {url.host}{url.path}")
        keep = resp.keep_alive and head.keep_alive
        ex.status, ex.bytes_in = status, len(body)
        data = (kept if keep else closed) + body
        if resp.keep_alive:
            ctx.release(ex.address or "", url.port, upstream)
        else:
            upstream.close()
        try:
            sent = self.client.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._resolve(self.settle(head, ex, _raise(exc)))
            return
        if sent < len(data):
            self._resolve(self.settle(head, ex, _send_rest(self.client, data[sent:], keep,
                                                           decision)))
            return
        ctx.log(decision_row(ex, head, decision))
        if not keep:
            self._resolve(None)
            return
        if not self._reading:
            self._read_client()  # paused while a pipelining client's bytes piled up
        self._serve_next()

    def _hand_over(self, upstream: Conn, pending: bytes, resp: ResponseHead | None
                   ) -> Coroutine[Any, Any, bool]:
        """The rest of this exchange on the coroutine path: send ``pending``, read the final
        response head unless ``resp`` is it, relay the response."""
        return self._continue(_rest_of_exchange(self.ctx, self._head(), self.client, self._ex(),
                                                self._checked(), self._decision(), upstream,
                                                pending, resp))

    def _continue(self, work: Coroutine[Any, Any, Outcome]) -> Coroutine[Any, Any, bool]:
        return self.settle(self._head(), self._ex(), work)

    def _refuse(self, refused: Refused) -> None:
        self._resolve(self._continue(_raise(refused)))

    def _drop_upstream(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.handler = None
            upstream.close()  # unregisters it from the loop too

    # -- the timer, and leaving --------------------------------------------------------------

    def _arm(self) -> None:
        limits = self.ctx.limits
        deadline = self.since + (limits.idle_timeout if self.state == _IDLE
                                 else limits.response_timeout)
        if self._timer is None or self._timer_at > deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        if self._fut is None or self._fut.done():
            return
        limits = self.ctx.limits
        now = self.loop.time()
        if self.state == _IDLE and now >= self.since + limits.idle_timeout:
            self._resolve(None)  # as on the coroutine path: an idle client is closed quietly
        elif self.state == _UPSTREAM and now >= self.since + limits.response_timeout:
            address = self._ex().address
            self._drop_upstream()
            self._refuse(upstream_failed(504, self._decision(), f"upstream {address} sent no "
                                         f"response within {limits.response_timeout:g}s"))
        else:
            self._arm()

    def _resolve(self, step: object) -> None:
        self.state = _OFF
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(step)  # type: ignore[arg-type]

    def _fail(self, exc: Exception) -> None:
        self.state = _OFF
        self._drop_upstream()
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_exception(exc)

    def _detach(self) -> None:
        """Give the client's socket back to the coroutine path (or to its closing). It stays
        registered: the coroutine path reads it next, mostly at once."""
        self._stop_client(unregister=False)
        self._drop_upstream()  # only a cancelled wait leaves one here
        self.state = _OFF
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # The request in flight; set whenever state is _UPSTREAM or a hand-over is being built.
    def _head(self) -> RequestHead:
        assert self.head is not None
        return self.head

    def _ex(self) -> Exchange:
        assert self.ex is not None
        return self.ex

    def _checked(self) -> Checked:
        assert self.checked is not None
        return self.checked

    def _decision(self) -> Decision:
        assert self.decision is not None
        return self.decision


async def _rest_of_exchange(ctx: ProxyContext, head: RequestHead, client: Conn, ex: Exchange,
                            checked: Checked, decision: Decision, upstream: Conn,
                            pending: bytes, resp: ResponseHead | None) -> Outcome:
    try:
        if pending:
            try:
                await upstream.send(pending)
            except OSError as exc:
                raise upstream_failed(502, decision, f"upstream {ex.address}: {exc}") from exc
        if resp is None:
            resp = await _final_response_head(ctx, upstream, decision, ex, retryable=False)
        keep = await respond(ctx, head, checked.url, decision, client, upstream, ex, resp)
    except BaseException:
        upstream.close()
        raise
    return keep and head.keep_alive, decision


async def _send_rest(client: Conn, data: bytes, keep: bool, decision: Decision) -> Outcome:
    await client.send(data)
    return keep, decision
