"""The tunnel lane: a new connection's CONNECT, opened from readiness callbacks.

A new tunnel is four events: the connection arrives, its CONNECT head is decided and the
upstream dialled, the client's first bytes (its TLS ClientHello) are checked, and the relay runs
until both sides close. The coroutine path spends a task, a future per wait and a failed
``recv`` per read on these; a new tunnel's latency is mostly such overhead, so the lane serves
the common case from callbacks:

- the accept callback reads the connection's first bytes at once: the head is usually waiting
  by the time the connection is accepted;
- a CONNECT to a host that needs no lookup (an IP literal or a ``--resolve`` pin, one address),
  allowed without inspection under a rule whose checks have no effect (no budget, no level,
  enforce mode), is checked with the functions of :func:`~egresslock.proxy.tunnel.run_tunnel`,
  in the same order;
- the upstream is connected with one non-blocking ``connect`` and the ``200`` sent; the client's
  socket is registered once, for its first bytes, and the relay takes that registration over.

Whatever is not the common case goes to the coroutine path at a point where nothing has
happened twice. Until the upstream is dialled nothing has had an effect: the lane leaves the
head in the client's buffer and the connection's task serves it from the start (another method,
an incomplete or malformed head, a name to resolve, several addresses, a deny, inspection, a
budget or a level). Once it has dialled, the lane hands over what it has done as a continuation:
a connect still in progress (an upstream that is not next door) or failed, or a ``200`` that
could not be sent whole. Every end (denied after the first bytes, failed, closed, stopped with
the proxy) writes the audit row the coroutine path writes, built by the same function. A tunnel
whose both sides closed is settled a few milliseconds later (its descriptors closed, its row
written with the time it ended): a client opening tunnels one after another has its next one
opened by then, instead of waiting behind that work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from egresslock.policy import Decision, Layer, Request
from egresslock.policy.loader import HTTPS_PORTS
from egresslock.policy.normalize import IPAddress
from egresslock.proxy.actions import action_path
from egresslock.proxy.conn import RECV_SIZE, Conn, start_connect
from egresslock.proxy.context import ProxyContext
from egresslock.proxy.forward import Refused, decide_addresses, decide_name
from egresslock.proxy.http1 import ProtocolError, parse_request_head
from egresslock.proxy.lane import HeadMemo, TunnelPlan
from egresslock.proxy.relay import Relay, RelayStats, start_relay
from egresslock.proxy.tls import NotTLS
from egresslock.proxy.tunnel import (
    CONNECTED,
    TunnelDenied,
    TunnelResult,
    admit_hello,
    dial_and_run,
    ended_row,
    hello_in,
    hello_wait,
    not_tls,
    parse_connect_target,
    refusal_before_dial,
    run_dialed,
)

log = logging.getLogger("egresslock.proxy")

# How long a tunnel whose both sides closed keeps its descriptors and row (see _on_relay_end).
SETTLE_SECONDS = 0.005

# The server's side: a continuation to await on a task of its own, which writes the row and
# closes the connection (None: serve the connection from its start); and the news that the lane
# closed the connection and wrote its row.
HandOver = Callable[["TunnelLane", Coroutine[Any, Any, Decision] | None], None]
Ended = Callable[["TunnelLane"], None]


class TunnelLane:
    """Opens one connection's tunnel from callbacks; see the module docstring."""

    __slots__ = ("action_port", "client", "ctx", "decision", "ended", "finished", "hand_over",
                 "loop", "relay", "result", "stats", "timer", "tls_required", "upstream")

    def __init__(self, ctx: ProxyContext, client: Conn, hand_over: HandOver,
                 ended: Ended) -> None:
        self.ctx = ctx
        self.client = client
        self.loop = client.loop
        self.hand_over = hand_over
        self.ended = ended
        self.result = TunnelResult()
        self.decision: Decision | None = None
        self.upstream: Conn | None = None
        self.relay: Relay | None = None
        self.stats: RelayStats | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tls_required = False
        self.finished = False  # the connection is closed or handed over
        self.action_port: int | None = None

    def open(self, action_port: int | None) -> bool:
        """Take the new connection, unless its first bytes are already here and are not a
        CONNECT the lane opens: False then, and the coroutine path serves it (nothing done, what
        was read left in the buffer). ``action_port``: the proxy's own port when it serves the
        actions endpoint."""
        self.action_port = action_port
        taken = self._read_head()
        if taken is None:  # nothing yet: wait for the head, for as long as the head may take
            self.client.handler = self._on_head
            self.client.start_reading()
            self.timer = self.loop.call_later(self.ctx.limits.head_timeout, self._to_task)
            return True
        return taken

    def _read_head(self) -> bool | None:
        """Read; open the tunnel if the head is a CONNECT the lane opens (True), or not (False:
        for the coroutine path), or None when nothing has come yet."""
        client = self.client
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:  # the coroutine path meets it again, and ends the connection
            return False
        if not data:
            return False
        client.buf += data
        end = client.buf.find(b"\r\n\r\n")
        if end < 0 or end + 4 > self.ctx.limits.max_head_bytes:
            return False  # incomplete or over the limit: the coroutine path waits or refuses
        plan = self._plan(bytes(client.buf[: end + 4]), self.action_port)
        if plan is None:
            return False
        del client.buf[: end + 4]
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        try:
            self._dial(*plan)
        except Exception as exc:  # a bug: the tunnel ends, the log says why
            log.exception("opening a tunnel failed")
            self._end(exc)
        return True

    def _on_head(self) -> None:
        try:
            taken = self._read_head()
        except Exception:  # a bug: the coroutine path serves the connection
            log.exception("reading a head in the tunnel lane failed")
            taken = False
        if taken is False:
            self._to_task()

    def _to_task(self) -> None:
        """Leave the connection, as it is, to the coroutine path: its first request's head
        timeout counts from the connection's start, so time spent here is not given twice."""
        if not self.finished:
            self.finished = True
            self.client.handler = None
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.hand_over(self, None)

    def _plan(self, raw: bytes, action_port: int | None) -> TunnelPlan | None:
        """The checks up to the dial, all without effect: the host, port, decision and address
        of a tunnel the lane opens, or None. Remembered per head (see :class:`HeadMemo`)."""
        if action_port is not None:  # whether it is an action depends on the port as well
            return self._work_out(raw, action_port)
        memo = HeadMemo.of(self.ctx)
        plan = memo.tunnels.get(raw)
        if plan is None:
            plan = self._work_out(raw, action_port)
            if plan is not None:
                memo.remember_tunnel(raw, plan)
        return plan

    def _work_out(self, raw: bytes, action_port: int | None) -> TunnelPlan | None:
        ctx = self.ctx
        try:
            head = parse_request_head(raw)
        except ProtocolError:
            return None
        if head.method != "CONNECT" or (action_port is not None
                                        and action_path(head, action_port) is not None):
            return None
        try:
            host, port = parse_connect_target(head)
            request = Request(host, port, "https" if port in HTTPS_PORTS else "tcp",
                              layer=Layer.CONNECT)
            decision = decide_name(ctx, request, keep_alive=False)
            addresses = ctx.resolver.known(host)
            if addresses is None or len(addresses) != 1:
                return None
            decision = decide_addresses(ctx, request, addresses, keep_alive=False)
        except Refused:
            return None
        rule = ctx.policy.current.by_id.get(decision.rule_id)
        if (decision.inspect or (rule is not None and rule.level is not None)
                or not ctx.content.repeatable(decision.rule_id)
                or refusal_before_dial(ctx, host, decision) is not None):
            return None
        return TunnelPlan(host, port, decision, addresses[0])

    # -- dial, 200 --------------------------------------------------------------------------

    def _dial(self, host: str, port: int, decision: Decision, address: IPAddress) -> None:
        ctx, client, result = self.ctx, self.client, self.result
        result.host, result.port = host, port
        self.decision = result.decision = decision
        self.tls_required = port in HTTPS_PORTS
        start = time.perf_counter()
        try:
            attempt = start_connect(str(address), port)
        except OSError:  # no socket (out of descriptors): the coroutine path tries and says
            attempt = None
        if attempt is None or attempt.error:
            self._continue(dial_and_run(ctx, client, host, port, decision, (address,), result,
                                        CONNECTED, attempt))
            return
        dialled = time.perf_counter()
        # The client waits for this answer: it goes first, the bookkeeping after it.
        failed: OSError | None = None
        try:
            sent = client.sock.send(CONNECTED)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            sent, failed = 0, exc
        self.upstream = upstream = Conn(attempt.sock)
        result.address = str(address)
        if ctx.metrics is not None:
            ctx.metrics.dial_seconds.observe(dialled - start)
        if failed is not None:
            self._end(failed)
            return
        if sent < len(CONNECTED):
            self.upstream = None
            self._continue(run_dialed(ctx, client, upstream, host, port, decision, (address,),
                                      result, CONNECTED[sent:]))
            return
        if client.buf:  # the client sent its first bytes along with the CONNECT
            self._first_bytes()
        if not self.finished and self.relay is None:
            client.handler = self._on_client
            client.start_reading()
            self.timer = self.loop.call_later(hello_wait(ctx, self.tls_required),
                                              self._on_hello_timeout)

    def _continue(self, work: Coroutine[Any, Any, Decision]) -> None:
        self.finished = True
        self.client.handler = None  # the task reads the client from now on
        self.hand_over(self, work)

    # -- the client's first bytes ------------------------------------------------------------

    def _on_client(self) -> None:
        try:
            try:
                data = self.client.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._end(TunnelDenied("default", f"client failed before TLS: {exc}"))
                return
            if not data:
                self._end(not_tls(self.result.port or 0,
                                  NotTLS("client closed the tunnel before its first bytes")))
                return
            self.client.buf += data
            self._first_bytes()
        except Exception as exc:  # a bug: the tunnel ends, the log says why
            log.exception("a tunnel failed")
            self._end(exc)

    def _first_bytes(self) -> None:
        try:
            complete, hello = hello_in(bytes(self.client.buf), self.tls_required)
        except NotTLS as exc:
            self._end(not_tls(self.result.port or 0, exc))
            return
        if complete:
            self._start_relay(hello)

    def _on_hello_timeout(self) -> None:
        self.timer = None
        if self.finished or self.relay is not None:
            return
        try:
            if self.tls_required:
                wait = hello_wait(self.ctx, True)
                self._end(not_tls(self.result.port or 0,
                                  NotTLS(f"no TLS ClientHello within {wait:g}s")))
            else:
                self._start_relay(None)
        except Exception as exc:  # a bug: the tunnel ends, the log says why
            log.exception("a tunnel failed")
            self._end(exc)

    # -- the relay ---------------------------------------------------------------------------

    def _start_relay(self, hello: Any) -> None:
        ctx, client, upstream, decision = self.ctx, self.client, self.upstream, self.decision
        assert upstream is not None
        assert decision is not None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        try:
            admit_hello(ctx, self.result, hello, self.result.host or "", self.result.port or 0,
                        decision)
        except TunnelDenied as d:
            self._end(d)
            return
        # The first bytes go upstream at once; the relay is set up while the server reads them.
        first = client.take_buffer()
        sent = 0
        if first:
            try:
                sent = upstream.sock.send(first)
            except OSError:  # the relay meets the error again and ends
                sent = 0
        client.handler = None
        registered = (client.forget_reading(), upstream.forget_reading())
        if ctx.metrics is not None:
            ctx.metrics.tunnels.inc()
        self.stats = RelayStats(bytes_up=sent)
        relay = start_relay(client.sock, upstream.sock, self.stats,
                            ctx.limits.tunnel_idle_timeout, self._on_relay_end,
                            first=first[sent:], registered=registered)
        if not self.finished:
            self.relay = relay

    def _on_relay_end(self, how: str, exc: Exception | None) -> None:
        self.result.ended = how
        if exc is not None:
            log.error("a tunnel to %s:%s failed", self.result.host, self.result.port,
                      exc_info=exc)
        if how == "closed":
            # Both sides closed, and each was told: closing the descriptors and writing the row
            # changes nothing either peer can see. They wait a moment, so that a client opening
            # tunnels one after another does not have its next CONNECT wait behind them.
            self.result.ended_at = time.time()
            self.timer = self.loop.call_later(SETTLE_SECONDS, self._end, self.decision)
            return
        self._end(self.decision)

    # -- the end -----------------------------------------------------------------------------

    def _end(self, outcome: Decision | Exception | None) -> None:
        """Close both sides and write the tunnel's row; the server forgets the lane."""
        if self.finished:
            return
        self.finished = True
        ctx, client, result = self.ctx, self.client, self.result
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        client.handler = None
        if self.stats is not None:  # the relay ran (it may have ended before it returned)
            if self.relay is not None:
                self.relay.close()
                self.relay = None
            if ctx.metrics is not None:
                ctx.metrics.tunnels.dec()
            result.bytes_out += self.stats.bytes_up
            result.bytes_in += self.stats.bytes_down
            self.stats = None
        if self.upstream is not None:
            self.upstream.close()
        if isinstance(outcome, TunnelDenied):
            client.abort()
        else:
            client.close()
        if not isinstance(outcome, Decision | TunnelDenied | OSError):
            outcome = OSError(f"internal error: {outcome!r}")  # a bug, logged where it was met
        ctx.log(ended_row(result, outcome))
        self.ended(self)

    def close(self) -> None:
        """The proxy is stopping: end the tunnel now (its row says so)."""
        if self.finished:
            return
        if self.decision is None:  # still waiting for a head: nothing was decided
            self.finished = True
            if self.timer is not None:
                self.timer.cancel()
            self.client.handler = None
            self.client.close()
            self.ended(self)
            return
        if not self.result.ended:  # else it ended by itself, and waits to be closed
            self.result.ended = "proxy stopped"
        self._end(self.decision)
