"""The proxy's accept callback and per-connection loop: the one place here that owns the event loop.

A new connection is offered to the tunnel lane first (:mod:`egresslock.proxy.tunnel_lane`),
which opens the common CONNECT from callbacks; any other connection gets a task that reads
request heads in a loop (keep-alive, pipelined requests served in order), hands each to the
plain-HTTP or CONNECT handler (or the fast lane, :mod:`egresslock.proxy.lane`), and writes
exactly one audit row per request or tunnel, whatever happened: allowed, denied, malformed,
upstream failure, the proxy stopping. Limits (connections, head size, head time) are answered
with a status and a row, never with silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

from egresslock.audit import AuditRecord
from egresslock.errors import InputError, ProxyError
from egresslock.policy import Decision, normalize_host
from egresslock.policy.normalize import split_authority
from egresslock.proxy.actions import ActionHandler, action_path, serve_action
from egresslock.proxy.conn import Conn, HeadTooLarge
from egresslock.proxy.context import ProxyContext
from egresslock.proxy.forward import (
    Exchange,
    Refused,
    audit_row,
    decision_row,
    handle_request,
)
from egresslock.proxy.http1 import (
    ProtocolError,
    RequestHead,
    deny_response,
    parse_request_head,
    simple_response,
)
from egresslock.proxy.lane import Lane, Slow
from egresslock.proxy.transparent import (
    Destination,
    NamesFor,
    check_destination,
    handle_transparent,
    original_destination,
    sniff,
)
from egresslock.proxy.tunnel import (
    TunnelDenied,
    TunnelResult,
    ended_row,
    handle_connect,
    tunnel_row,
)
from egresslock.proxy.tunnel_lane import TunnelLane

log = logging.getLogger("egresslock.proxy")


def make_listener(host: str, port: int, backlog: int = 1024,
                  defer_accept: bool = True) -> socket.socket:
    """A listening TCP socket; raises ProxyError naming the address when it cannot bind.

    With ``defer_accept`` (see :func:`defer_accept`) the kernel hands a connection over once its
    first bytes have come: right for a proxy's clients, which always speak first; not for a
    transparent listener, whose clients may wait for the server to speak."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        if defer_accept:
            defer_until_data(sock)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ProxyError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


def defer_until_data(listener: socket.socket) -> None:
    """Have the kernel hand a new connection over only once its first bytes have come (Linux's
    TCP_DEFER_ACCEPT; a connection that stays silent is handed over after about a second, and
    the head timeout runs from there). The proxy is then woken once per new connection, with the
    head already there, instead of once to accept and again to read: measured on a new tunnel,
    about 25 µs less latency. Elsewhere a no-op."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is not None:
        with contextlib.suppress(OSError):  # a kernel without it accepts at once, as before
            listener.setsockopt(socket.IPPROTO_TCP, option, 1)


class ProxyServer:
    """Serves the proxy on listening sockets it is given (so a sandbox can pass them in)."""

    def __init__(self, ctx: ProxyContext, names_for: NamesFor | None = None,
                 actions: ActionHandler | None = None) -> None:
        self.ctx = ctx
        # The courier's endpoint (/actions on the proxy's own address); None: no such endpoint.
        self.actions = actions
        # For transparent capture: the names the sandbox's DNS stub gave for an address.
        self.names_for: NamesFor = names_for or (lambda _address: ())
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[socket.socket] = []
        # Tunnels the lane serves from callbacks (no task to cancel): closed by close().
        self._lanes: set[TunnelLane] = set()
        # How many tunnels the lane opened (decided and dialled), whether it finished them or
        # handed them over: for the tests, which must know which path ran.
        self.lane_tunnels = 0

    def serve(self, listener: socket.socket, transparent: bool = False) -> None:
        """Start accepting on ``listener`` (non-blocking, already listening). A transparent
        listener takes connections nftables redirected (see :mod:`egresslock.proxy.transparent`).
        The listener stays registered with the loop (its sock_accept would register and
        unregister it for every connection)."""
        self._listeners.append(listener)
        asyncio.get_running_loop().add_reader(listener.fileno(), self._on_listener, listener,
                                              transparent)

    def _on_listener(self, listener: socket.socket, transparent: bool) -> None:
        for _ in range(64):  # a flood of connections must not starve the others
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept failed: %s", exc)
                loop = asyncio.get_running_loop()
                loop.remove_reader(listener.fileno())
                loop.call_later(0.1, self._listen_again, listener, transparent)
                return
            try:
                self._accepted(sock, transparent)
            except Exception:  # a bug must not stop the proxy from accepting
                log.exception("serving a new connection failed")
                sock.close()

    def _listen_again(self, listener: socket.socket, transparent: bool) -> None:
        if listener in self._listeners and listener.fileno() >= 0:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._on_listener,
                                                  listener, transparent)

    def _accepted(self, sock: socket.socket, transparent: bool) -> None:
        """A new connection: the tunnel lane opens it when it can, else a task serves it."""
        ctx = self.ctx
        try:  # noqa: SIM105 - suppress() is three calls, on every new connection
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        client = Conn(sock)
        if ctx.active_connections >= ctx.limits.max_connections:
            self._spawn(self._refuse_busy(client))
            return
        self._opened()
        if not transparent:
            lane = TunnelLane(ctx, client, self._hand_over, self._lane_ended)
            self._lanes.add(lane)
            if lane.open(self._action_port(client)):
                return
            self._lanes.discard(lane)
        self._spawn(self._connection(client, transparent))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _action_port(self, client: Conn) -> int | None:
        return client.sock.getsockname()[1] if self.actions is not None else None

    def _opened(self) -> None:
        self.ctx.active_connections += 1
        if self.ctx.metrics is not None:
            self.ctx.metrics.connections.inc()

    def _closed(self) -> None:
        self.ctx.active_connections -= 1
        if self.ctx.metrics is not None:
            self.ctx.metrics.connections.dec()

    def _lane_ended(self, lane: TunnelLane) -> None:
        self._lanes.discard(lane)
        self.lane_tunnels += lane.decision is not None
        self._closed()

    def _hand_over(self, lane: TunnelLane, work: Coroutine[Any, Any, Decision] | None) -> None:
        self._lanes.discard(lane)
        self.lane_tunnels += lane.decision is not None
        if work is None:
            self._spawn(self._connection(lane.client))
        else:
            self._spawn(self._continue_tunnel(lane.client, lane.result, work))

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for listener in self._listeners:
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                loop.remove_reader(listener.fileno())
        self._listeners.clear()
        for lane in list(self._lanes):
            lane.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conns in self.ctx.pool.values():
            for c in conns:
                c.close()
        self.ctx.pool.clear()

    async def _refuse_busy(self, client: Conn) -> None:
        ctx = self.ctx
        reason = f"too many connections (limit {ctx.limits.max_connections})"
        with contextlib.suppress(OSError):
            await client.send(simple_response(503, "Service Unavailable",
                                              f"egresslock: {reason}", close=True))
        ctx.log(AuditRecord(layer="http", verdict="deny", rule_id="default", reason=reason,
                            protocol="tcp"))
        client.close()

    async def _connection(self, client: Conn, transparent: bool = False) -> None:
        try:
            if transparent:
                await self._transparent(client)
            else:
                await self._serve(client)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            try:
                await client.finish()
            finally:
                self._closed()

    async def _continue_tunnel(self, client: Conn, result: TunnelResult,
                               work: Coroutine[Any, Any, Decision]) -> None:
        """A tunnel the lane began and handed over (see :mod:`egresslock.proxy.tunnel_lane`)."""
        try:
            await self._settle_tunnel(client, result, work)
        finally:
            try:
                await client.finish()
            finally:
                self._closed()

    async def _serve(self, client: Conn) -> None:
        """A forward-proxy client: its first request on the coroutine path (which dials the
        upstream the next ones find pooled), then the fast lane, which hands back what it
        does not serve itself (see :mod:`egresslock.proxy.lane`)."""
        if not await self._one_request(client, True):
            return
        action_port = client.sock.getsockname()[1] if self.actions is not None else None
        lane = Lane(self.ctx, client,
                    lambda head, ex, work: self._settle(head, client, ex, work), action_port)
        while True:
            step = await lane.next()
            if step is None:
                return
            if not await (self._one_request(client, False) if isinstance(step, Slow)
                          else step):
                return

    async def _read_head(self, client: Conn, first: bool) -> bytes | None:
        """The next head; None when the client is done. Answers 408/431/400 itself."""
        limits = self.ctx.limits
        loop = client.loop
        if not client.buf:
            # Waiting for a next request is idle time; once a byte arrives the head clock runs.
            # The first request's wait counts from the connection's start (the tunnel lane may
            # have waited already).
            wait = limits.head_timeout if first else limits.idle_timeout
            try:
                if not await client.fill((client.opened if first else loop.time()) + wait):
                    return None
            except TimeoutError:
                if first:
                    self._refuse_raw(client, 408, "Request Timeout",
                                     f"no request within {limits.head_timeout:g}s")
                return None
        try:
            return await client.read_head(limits.max_head_bytes,
                                          loop.time() + limits.head_timeout)
        except TimeoutError:
            self._refuse_raw(client, 408, "Request Timeout",
                             f"request head not complete within {limits.head_timeout:g}s")
        except HeadTooLarge as exc:
            self._refuse_raw(client, 431, "Request Header Fields Too Large", str(exc))
        except ProtocolError as exc:
            self._refuse_raw(client, 400, "Bad Request", f"malformed request: {exc}")
        return None

    def _refuse_raw(self, client: Conn, status: int, text: str, reason: str) -> None:
        client.linger = True
        client.stop_reading()
        with contextlib.suppress(OSError):
            client.sock.setblocking(True)
            client.sock.settimeout(1.0)
            client.sock.sendall(simple_response(status, text, f"egresslock: {reason}", close=True))
        self.ctx.log(AuditRecord(layer="http", verdict="deny", rule_id="default", reason=reason,
                                 protocol="tcp"))

    async def _transparent(self, client: Conn) -> None:
        """A connection nftables redirected: plain HTTP is served request by request, anything
        else is decided once as a tunnel to its original destination."""
        ctx = self.ctx
        result = TunnelResult(transparent=True)
        try:
            dest = original_destination(client.sock)
            if (str(dest.address), dest.port) == client.sock.getsockname()[:2]:
                raise OSError("not redirected")
        except OSError:
            client.abort()
            ctx.log(tunnel_row(result, "connect", "deny", "default",
                               "connection to the transparent port that nftables did not "
                               "redirect (no original destination)"))
            return
        kind, hello = await sniff(ctx, client)
        if kind == "http":
            first = True
            while await self._one_request(client, first, dest):
                first = False
            return
        layer = "tls" if kind == "tls" else "connect"
        try:
            decision = await handle_transparent(ctx, client, dest, kind, hello, self.names_for,
                                                result)
        except TunnelDenied as d:
            client.abort()
            ctx.log(tunnel_row(result, layer, "deny", d.rule_id, d.reason))
            return
        except Refused as r:
            client.abort()
            ctx.log(tunnel_row(result, layer, r.verdict, r.rule_id, r.reason))
            return
        except (TimeoutError, OSError) as exc:
            ctx.log(tunnel_row(result, layer, "allow", "default",
                               f"tunnel failed: {exc or type(exc).__name__}"))
            return
        except asyncio.CancelledError:  # the proxy stops: an allowed tunnel still gets its row
            if result.decision is not None:
                allowed = result.decision
                result.ended = result.ended or "proxy stopped"
                ctx.log(tunnel_row(result, layer, allowed.verdict.value, allowed.rule_id,
                                   allowed.reason))
            raise
        ctx.log(tunnel_row(result, layer, decision.verdict.value, decision.rule_id,
                           decision.reason))

    async def _as_forwarded(self, head: RequestHead, dest: Destination) -> RequestHead | str:
        """A redirected origin-form request as the absolute-form request it stands for, or
        why it cannot be one (Host missing, or naming another port or address)."""
        hosts = head.get_all(b"host")
        if len(hosts) != 1:
            return "a redirected HTTP request needs exactly one Host header"
        authority = hosts[0].decode("ascii", "replace")
        try:
            host, port = split_authority(authority, 80)
            host = normalize_host(host)
        except InputError as exc:
            return f"Host {authority!r} refused as ambiguous: {exc}"
        if port != dest.port:
            return f"Host {authority} names port {port}, but the connection went to {dest}"
        why = await check_destination(self.ctx, self.names_for, host, dest)
        if why is not None:
            return why
        target = head.target
        if not target.startswith("/"):
            return f"a redirected request must have an origin-form target, not {target[:200]!r}"
        return replace(head, target=f"http://{authority}{target}")

    async def _one_request(self, client: Conn, first: bool,
                           dest: Destination | None = None) -> bool:
        raw = await self._read_head(client, first)
        if raw is None:
            return False
        try:
            head = parse_request_head(raw)
        except ProtocolError as exc:
            await self._write(client, simple_response(400, "Bad Request", f"egresslock: {exc}",
                                                      close=True))
            self.ctx.log(AuditRecord(layer="http", verdict="deny", rule_id="default",
                                     reason=str(exc), path=_printable(raw), protocol="tcp"))
            return False
        if self.actions is not None and dest is None:
            path = action_path(head, client.sock.getsockname()[1])
            if path is not None:
                return await serve_action(self.ctx, self.actions, head, client, path)
        if dest is not None:
            forwarded = await self._as_forwarded(head, dest)
            if isinstance(forwarded, str):
                client.linger = True
                await self._write(client, deny_response("default", forwarded, True))
                host = (head.get(b"host") or b"").decode("ascii", "replace") or None
                self.ctx.log(replace(audit_row(Exchange(), head, "http", "deny", "default",
                                               forwarded),
                                     host=host, port=dest.port, address=str(dest.address)))
                return False
            return await self._forward(forwarded, client)
        if head.method == "CONNECT":
            await self._connect(head, client)
            return False
        return await self._forward(head, client)

    async def _forward(self, head: RequestHead, client: Conn) -> bool:
        ex = Exchange()
        return await self._settle(head, client, ex, handle_request(self.ctx, head, client, ex))

    async def _settle(self, head: RequestHead, client: Conn, ex: Exchange,
                      work: Awaitable[tuple[bool, Decision]]) -> bool:
        """Await the forwarding of one request, write the answer of a refusal or failure, and
        log its one audit row; True when the client connection may carry another request."""
        try:
            keep, decision = await work
        except Refused as r:
            await self._write(client, r.response)
            self.ctx.log(audit_row(ex, head, "http", r.verdict, r.rule_id, r.reason))
            client.linger = not r.keep_alive
            return r.keep_alive
        except ProtocolError as exc:
            client.linger = True
            reason = f"malformed request: {exc}"
            self.ctx.log(audit_row(ex, head, "http", "deny", "default", reason))
            await self._write(client, simple_response(400, "Bad Request", f"egresslock: {reason}",
                                                      close=True))
            return False
        except (TimeoutError, OSError) as exc:
            reason = f"connection failed mid-exchange: {exc or type(exc).__name__}"
            self.ctx.log(audit_row(ex, head, "http", "allow", "default", reason))
            return False
        self.ctx.log(decision_row(ex, head, decision))
        return keep

    async def _connect(self, head: RequestHead, client: Conn) -> None:
        result = TunnelResult()
        await self._settle_tunnel(client, result, handle_connect(self.ctx, head, client, result))

    async def _settle_tunnel(self, client: Conn, result: TunnelResult,
                             work: Awaitable[Decision]) -> None:
        """Await a CONNECT tunnel to its end, write the answer of a refusal or failure, and
        log its one audit row (also when the proxy stops while it runs)."""
        try:
            decision = await work
        except Refused as r:
            await self._write(client, r.response)
            self.ctx.log(tunnel_row(result, "connect", r.verdict, r.rule_id, r.reason))
            return
        except TunnelDenied as d:
            client.abort()
            self.ctx.log(ended_row(result, d))
            return
        except OSError as exc:  # TimeoutError too
            self.ctx.log(ended_row(result, exc))
            return
        except asyncio.CancelledError:
            if result.decision is not None:
                result.ended = result.ended or "proxy stopped"
                self.ctx.log(ended_row(result, result.decision))
            raise
        self.ctx.log(ended_row(result, decision))

    @staticmethod
    async def _write(client: Conn, data: bytes) -> None:
        with contextlib.suppress(OSError):
            async with asyncio.timeout(5):
                await client.send(data)


def _printable(raw: bytes) -> str:
    line = raw.split(b"\r\n", 1)[0][:512]
    return line.decode("latin-1").encode("unicode_escape").decode("ascii")


def install_reload(ctx: ProxyContext, on_result: Callable[[str | None], None],
                   poll_seconds: float = 1.0) -> asyncio.Task[None]:
    """Reload the policy on SIGHUP and when its file changes; a bad file keeps the old policy."""
    loop = asyncio.get_running_loop()

    def reload() -> None:
        on_result(ctx.reload_policy())

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        loop.add_signal_handler(signal.SIGHUP, reload)

    async def watch() -> None:
        while True:
            await asyncio.sleep(poll_seconds)
            if ctx.policy.changed():
                reload()

    return asyncio.ensure_future(watch())
