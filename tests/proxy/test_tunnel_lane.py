"""The tunnel lane (``egresslock.proxy.tunnel_lane``): new CONNECT tunnels opened from callbacks.

Each test opens real tunnels through an in-process proxy to loopback upstreams the test starts,
and checks what the client and the upstream see, which path opened the tunnel (the server counts
the lane's), and the one audit row each tunnel writes. Whatever the lane cannot open must end as
on the coroutine path, with budgets and the session's mark charged once: those cases are here
too. Both event loops run each test: uvloop (what ``egresslock proxy`` uses) and asyncio's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import pytest
import uvloop

from egresslock.audit import AuditRecord
from egresslock.policy import compile_policy, parse_policy
from egresslock.proxy import tunnel_lane
from egresslock.proxy.context import Limits, PolicyHolder, ProxyContext
from egresslock.proxy.resolver import Resolver
from egresslock.proxy.server import ProxyServer, make_listener
from tests.proxy.servers import ThreadedServer, proxy_in_thread, read_head

pytestmark = pytest.mark.integration

HTTPS_PORT = 8443  # a port where a tunnel must begin with TLS, and that needs no root to bind


class Upstream(ThreadedServer):
    """A loopback TCP server: echoes what it receives (after a banner, if given) and records it.

    ``backlog=0`` with one connection left unaccepted fills its accept queue, so that the next
    connection attempt is dropped and retried by the kernel about a second later: a connect
    that does not complete at once, as to any upstream that is not next door."""

    def __init__(self, port: int = 0, banner: bytes = b"", backlog: int = 16) -> None:
        super().__init__(port, backlog)
        self.banner = banner
        self.received: list[bytes] = []

    def serve(self, conn: socket.socket) -> None:
        got = bytearray()
        self.received.append(b"")
        index = len(self.received) - 1
        with conn:
            try:
                if self.banner:
                    conn.sendall(self.banner)
                while data := conn.recv(65536):
                    got += data
                    self.received[index] = bytes(got)
                    conn.sendall(data)
            except OSError:
                return


@contextlib.contextmanager
def full_upstream() -> Iterator[Upstream]:
    """An upstream, not yet serving, whose accept queue one connection fills (backlog 0): a
    connect to it stays in progress until the kernel retries its SYN, about a second later,
    and completes then only if the upstream was started meanwhile."""
    upstream = Upstream(backlog=0)
    queued = socket.create_connection(("127.0.0.1", upstream.port))
    try:
        yield upstream
    finally:
        queued.close()
        upstream.close()


POLICY = """\
version: 1
network: {{allow_ranges: ['127.0.0.0/8']}}
levels: [public, confidential]
rules:
  - {{id: literal, host: 127.0.0.1, ports: [{ports}]}}
  - {{id: app, host: app.test, ports: [{ports}]}}
  - {{id: metered, host: metered.test, ports: [{ports}], budget: {{requests: 2, per: run}}}}
  - {{id: private, host: private.test, ports: [{ports}], reads: confidential}}
  - {{id: public, host: public.test, ports: [{ports}], level: public}}
  - {{id: several, host: several.test, ports: [{ports}]}}
"""

PINS = {"app.test": ["127.0.0.1"], "metered.test": ["127.0.0.1"],
        "private.test": ["127.0.0.1"], "public.test": ["127.0.0.1"],
        # The first address refuses (nothing listens on 127.0.0.2): the dial goes on to the next.
        "several.test": ["127.0.0.2", "127.0.0.1"]}


@dataclass
class Proxy:
    port: int
    rows: list[AuditRecord]
    ctx: ProxyContext
    server: ProxyServer
    upstream: Upstream
    extra_ports: list[int] = field(default_factory=list)

    def connect(self, target: str, first: bytes = b"", split: bool = False
                ) -> tuple[socket.socket, bytes]:
        """A client socket with CONNECT ``target`` sent (in two parts, a moment apart, with
        ``split``: the lane sees an incomplete head) and the proxy's answer head read."""
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
        if split:
            s.sendall(head[:20])
            time.sleep(0.1)
            s.sendall(head[20:] + first)
        else:
            s.sendall(head + first)
        return s, read_head(s)

    def wait_rows(self, count: int) -> list[AuditRecord]:
        deadline = time.monotonic() + 5
        while len(self.rows) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.rows)

    def idle(self) -> None:
        """Wait until the proxy holds no connection: every one was counted out again."""
        deadline = time.monotonic() + 5
        while self.ctx.active_connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.ctx.active_connections == 0


@contextlib.contextmanager
def running_proxy(loop_kind: str, limits: Limits | None = None,
                  extra_ports: tuple[int, ...] = (), defer_accept: bool = True
                  ) -> Iterator[Proxy]:
    upstream = Upstream()
    upstream.start()
    ports = ", ".join(str(p) for p in (upstream.port, HTTPS_PORT, *extra_ports))
    policy = compile_policy(parse_policy(POLICY.format(ports=ports)))
    rows: list[AuditRecord] = []
    ctx = ProxyContext(PolicyHolder(None, policy), rows.append, Resolver(PINS),
                       limits or Limits())
    loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
    listener = make_listener("127.0.0.1", 0, defer_accept=defer_accept)
    server = ProxyServer(ctx)
    try:
        with proxy_in_thread(server, listener, loop):
            yield Proxy(listener.getsockname()[1], rows, ctx, server, upstream,
                        list(extra_ports))
    finally:
        upstream.close()
        listener.close()


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def proxy(loop_kind: str) -> Iterator[Proxy]:
    with running_proxy(loop_kind) as p:
        yield p


def echo_round(s: socket.socket, data: bytes) -> bytes:
    """Send ``data`` (from a thread: the echo comes back while it is sent) and read as much."""
    sender = threading.Thread(target=s.sendall, args=(data,), daemon=True)
    sender.start()
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    sender.join(5)
    return got


def comparable(row: AuditRecord) -> AuditRecord:
    return replace(row, time=0.0)


def client_hello(server_name: str) -> bytes:
    """The bytes of a real TLS ClientHello naming ``server_name``, made without a network."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def was_reset(s: socket.socket) -> bool:
    """Whether the proxy ended the tunnel without answering (a reset, or a close)."""
    s.settimeout(5)
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


# -- what the lane opens ------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["127.0.0.1", "app.test"])
def test_a_tunnel_to_a_literal_or_pinned_host_is_opened_by_the_lane(proxy: Proxy,
                                                                    host: str) -> None:
    s, answer = proxy.connect(f"{host}:{proxy.upstream.port}")
    assert answer == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert echo_round(s, b"hello") == b"hello"
    assert echo_round(s, b"x" * 300_000) == b"x" * 300_000  # past the relay's switch to splice
    s.close()
    (row,) = proxy.wait_rows(1)
    assert proxy.server.lane_tunnels == 1
    assert (row.layer, row.verdict, row.method, row.host, row.port, row.address) == (
        "connect", "allow", "CONNECT", host, proxy.upstream.port, "127.0.0.1")
    assert row.rule_id == ("literal" if host == "127.0.0.1" else "app")
    assert (row.bytes_out, row.bytes_in) == (300_005, 300_005)
    assert row.extra == {"ended": "closed"}
    proxy.idle()


def test_the_lane_and_the_coroutine_path_write_the_same_row(proxy: Proxy) -> None:
    target = f"app.test:{proxy.upstream.port}"
    for split in (False, True):  # a head in two parts is not whole when the lane looks
        s, answer = proxy.connect(target, split=split)
        assert answer.startswith(b"HTTP/1.1 200")
        assert echo_round(s, b"same bytes") == b"same bytes"
        s.close()
        proxy.wait_rows(1 + split)
    assert proxy.server.lane_tunnels == 1
    lane_row, task_row = proxy.wait_rows(2)
    assert comparable(lane_row) == comparable(task_row)
    proxy.idle()


def test_bytes_sent_along_with_the_connect_reach_the_upstream_first(proxy: Proxy) -> None:
    s, answer = proxy.connect(f"127.0.0.1:{proxy.upstream.port}", first=b"early ")
    assert answer.startswith(b"HTTP/1.1 200")
    got = answer.partition(b"\r\n\r\n")[2]
    while len(got) < len(b"early "):
        got += s.recv(100)
    assert got == b"early "
    assert echo_round(s, b"later") == b"later"
    s.close()
    (row,) = proxy.wait_rows(1)
    assert proxy.upstream.received == [b"early later"]
    assert (row.bytes_out, row.bytes_in) == (11, 11)
    assert proxy.server.lane_tunnels == 1


def test_an_upstream_that_speaks_first_is_heard_after_the_short_wait(loop_kind: str) -> None:
    banner = Upstream(banner=b"220 ready\r\n")
    banner.start()
    try:
        with running_proxy(loop_kind, extra_ports=(banner.port,)) as proxy:
            started = time.monotonic()
            s, answer = proxy.connect(f"127.0.0.1:{banner.port}")
            assert answer.startswith(b"HTTP/1.1 200")
            assert s.recv(100) == b"220 ready\r\n"
            # A client that says nothing may be waiting for the server (SMTP, SSH): after a
            # quarter of a second without a ClientHello the relay starts anyway.
            assert time.monotonic() - started >= 0.2
            assert echo_round(s, b"EHLO x\r\n") == b"EHLO x\r\n"
            s.close()
            (row,) = proxy.wait_rows(1)
            assert (row.verdict, row.bytes_out, row.bytes_in) == ("allow", 8, 19)
            assert proxy.server.lane_tunnels == 1
            proxy.idle()
    finally:
        banner.close()


def test_a_client_that_leaves_before_its_first_bytes_is_logged(proxy: Proxy) -> None:
    s, answer = proxy.connect(f"127.0.0.1:{proxy.upstream.port}")
    assert answer.startswith(b"HTTP/1.1 200")
    s.close()
    (row,) = proxy.wait_rows(1)
    assert (row.layer, row.verdict) == ("tls", "deny")
    assert row.reason == "client closed the tunnel before its first bytes"
    proxy.idle()


def test_a_client_that_sends_nothing_gets_408_once_the_head_timeout_passes(
        loop_kind: str) -> None:
    # Accepted at once (no deferral), so that the lane waits for the head itself.
    with running_proxy(loop_kind, Limits(head_timeout=0.5), defer_accept=False) as proxy:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
            answer = s.recv(1000)
        waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408")
        # The lane waits for the head, then leaves the connection to the coroutine path,
        # whose wait counts from the connection's start: one head timeout, not two.
        assert 0.4 < waited < 0.9
        (row,) = proxy.wait_rows(1)
        assert row.reason == "no request within 0.5s"
        proxy.idle()


def test_a_silent_client_is_handed_over_by_the_kernel_and_refused(loop_kind: str) -> None:
    """With the accept deferred until the first bytes, the kernel still hands over a client
    that sends none (after about a second), and the head timeout runs from there."""
    with running_proxy(loop_kind, Limits(head_timeout=0.3)) as proxy:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            answer = s.recv(1000)
        assert answer.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < 5
        (row,) = proxy.wait_rows(1)
        assert row.reason == "no request within 0.3s"
        proxy.idle()


def test_the_listener_defers_the_accept_until_the_first_bytes() -> None:
    listener = make_listener("127.0.0.1", 0)
    try:
        with socket.create_connection(listener.getsockname()[:2], timeout=5) as s:
            time.sleep(0.2)
            with pytest.raises(BlockingIOError):
                listener.accept()  # connected, but nothing sent: not handed over yet
            s.sendall(b"CONNECT")
            time.sleep(0.2)
            accepted, _ = listener.accept()
            accepted.close()
    finally:
        listener.close()


# -- TLS on an HTTPS port -------------------------------------------------------------------------

@pytest.fixture
def https_proxy(loop_kind: str) -> Iterator[tuple[Proxy, Upstream]]:
    tls_port = Upstream(port=HTTPS_PORT)  # plain TCP: the proxy never lets TLS through
    tls_port.start()
    try:
        with running_proxy(loop_kind, Limits(hello_timeout=0.3)) as p:
            yield p, tls_port
    finally:
        tls_port.close()


def test_a_matching_client_hello_is_relayed_whole(https_proxy: tuple[Proxy, Upstream]) -> None:
    proxy, upstream = https_proxy
    hello = client_hello("app.test")
    s, answer = proxy.connect(f"app.test:{HTTPS_PORT}")
    assert answer.startswith(b"HTTP/1.1 200")
    assert echo_round(s, hello) == hello
    s.close()
    (row,) = proxy.wait_rows(1)
    assert upstream.received == [hello]
    assert (row.verdict, row.extra) == ("allow", {"sni": "app.test", "ended": "closed"})
    assert proxy.server.lane_tunnels == 1


@pytest.mark.parametrize(("first", "reason"), [
    (client_hello("evil.test"), "SNI evil.test differs from CONNECT host app.test "
                                "(domain fronting)"),
    (b"GET /exfil?d=c2VjcmV0 HTTP/1.1\r\n\r\n",
     "non-TLS bytes on HTTPS port 8443: first bytes are not a TLS handshake record"),
    (b"", "non-TLS bytes on HTTPS port 8443: no TLS ClientHello within 0.3s"),
])
def test_a_tunnel_whose_first_bytes_do_not_fit_is_reset(https_proxy: tuple[Proxy, Upstream],
                                                        first: bytes, reason: str) -> None:
    proxy, upstream = https_proxy
    s, answer = proxy.connect(f"app.test:{HTTPS_PORT}")
    assert answer.startswith(b"HTTP/1.1 200")
    if first:
        s.sendall(first)
    assert was_reset(s)
    s.close()
    (row,) = proxy.wait_rows(1)
    assert (row.layer, row.verdict, row.rule_id, row.reason) == ("tls", "deny", "default",
                                                                 reason)
    time.sleep(0.1)
    assert upstream.received in ([], [b""]), "bytes of a refused tunnel reached the upstream"
    assert proxy.server.lane_tunnels == 1
    proxy.idle()


# -- what the lane leaves to the coroutine path -------------------------------------------------

def test_budgets_levels_and_several_addresses_are_opened_on_the_coroutine_path(
        proxy: Proxy) -> None:
    """A budget or a level makes the checks before the dial have effects, and several
    addresses may need several dials: the coroutine path opens those. A rule that only reads
    (raises the mark as the tunnel begins) is the lane's."""
    port = proxy.upstream.port
    answers = []
    rows = 0
    for host in ("metered.test", "metered.test", "metered.test", "public.test",
                 "private.test", "public.test", "several.test"):
        s, answer = proxy.connect(f"{host}:{port}")
        if answer.startswith(b"HTTP/1.1 200"):
            assert echo_round(s, b"hi") == b"hi"
        answers.append(answer.split(b"\r\n")[0])
        s.close()
        rows += 2 if host == "private.test" else 1  # the raised mark has a row of its own
        proxy.wait_rows(rows)  # one tunnel's rows before the next one's
    ok, refused = b"HTTP/1.1 200 Connection established", b"HTTP/1.1 403 Forbidden"
    assert answers == [ok, ok, refused, ok, ok, refused, ok]
    logged = proxy.wait_rows(8)
    # The budget of two tunnels was charged once per tunnel; the confidential read raised the
    # mark, and the public destination was then refused as a write down.
    assert "budget of 2 requests" in logged[2].reason
    assert [r.layer for r in logged[4:6]] == ["flow", "connect"]
    assert logged[5].rule_id == "private"
    assert (logged[6].rule_id, logged[6].verdict) == ("public", "deny")
    assert "confidential" in logged[6].reason
    assert (logged[7].rule_id, logged[7].address) == ("several", "127.0.0.1")
    assert proxy.server.lane_tunnels == 1  # the tunnel to private.test
    proxy.idle()


def test_a_connect_still_in_progress_is_finished_on_a_task(loop_kind: str) -> None:
    with full_upstream() as slow, running_proxy(loop_kind, extra_ports=(slow.port,)) as proxy:
        threading.Timer(0.3, slow.start).start()  # room again before the kernel retries
        s, answer = proxy.connect(f"127.0.0.1:{slow.port}")
        assert answer.startswith(b"HTTP/1.1 200")
        assert echo_round(s, b"late but there") == b"late but there"
        s.close()
        (row,) = proxy.wait_rows(1)
        assert (row.verdict, row.rule_id, row.bytes_out) == ("allow", "literal", 14)
        assert proxy.server.lane_tunnels == 1
        proxy.idle()


def test_bytes_that_come_while_a_connect_is_in_progress_are_the_tunnel_s(
        loop_kind: str) -> None:
    """The lane hands a connect in progress to a task; bytes the client sends meanwhile are the
    tunnel's first bytes, even when they look like another CONNECT, never a second tunnel."""
    with full_upstream() as slow, running_proxy(loop_kind, extra_ports=(slow.port,)) as proxy:
        threading.Timer(0.3, slow.start).start()
        target = f"127.0.0.1:{slow.port}".encode()
        head = b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
            time.sleep(0.1)  # the lane waits for the head
            s.sendall(head)
            time.sleep(0.1)  # the lane has dialled and handed the connect over
            s.sendall(head)  # early bytes, not a request to the proxy
            ok = b"HTTP/1.1 200 Connection established\r\n\r\n"
            got = b""
            while len(got) < len(ok) + len(head):
                data = s.recv(100)
                if not data:
                    break
                got += data
            assert got == ok + head  # the 200, then the bytes echoed: they were relayed
        rows = proxy.wait_rows(1)
        assert [(r.verdict, r.bytes_out) for r in rows] == [("allow", len(head))]
        assert slow.connections == 2  # the queued connection and the tunnel's, no other
        assert proxy.server.lane_tunnels == 1
        proxy.idle()


def test_a_connect_that_never_completes_gets_504_at_the_connect_timeout(loop_kind: str) -> None:
    # Never started: its queue stays full, the SYN unanswered.
    with full_upstream() as full, running_proxy(loop_kind, Limits(connect_timeout=0.5),
                                                extra_ports=(full.port,)) as proxy:
        started = time.monotonic()
        s, answer = proxy.connect(f"127.0.0.1:{full.port}")
        s.close()
        assert answer.startswith(b"HTTP/1.1 504")
        assert 0.4 < time.monotonic() - started < 5
        (row,) = proxy.wait_rows(1)
        assert row.reason == f"connecting to 127.0.0.1:{full.port} timed out"
        assert proxy.server.lane_tunnels == 1
        proxy.idle()


def test_an_upstream_that_refuses_gets_502(loop_kind: str) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    port = closed.getsockname()[1]
    try:
        with running_proxy(loop_kind, extra_ports=(port,)) as proxy:
            s, answer = proxy.connect(f"127.0.0.1:{port}")
            s.close()
            assert answer.startswith(b"HTTP/1.1 502")
            assert b"Connection refused" in answer
            (row,) = proxy.wait_rows(1)
            assert (row.verdict, row.rule_id) == ("allow", "literal")
            assert row.reason == f"cannot connect to 127.0.0.1:{port}: Connection refused"
            assert proxy.server.lane_tunnels == 1
            proxy.idle()
    finally:
        closed.close()


def test_a_proxy_that_stops_logs_its_open_tunnels(loop_kind: str) -> None:
    with running_proxy(loop_kind) as proxy:
        target = f"app.test:{proxy.upstream.port}"
        lane, _ = proxy.connect(target)
        assert echo_round(lane, b"a") == b"a"
        task, _ = proxy.connect(target, split=True)
        assert echo_round(task, b"bc") == b"bc"
    assert proxy.server.lane_tunnels == 1
    rows = sorted(proxy.rows, key=lambda r: r.bytes_out)
    assert [(r.verdict, r.bytes_out, r.extra) for r in rows] == [
        ("allow", 1, {"ended": "proxy stopped"}), ("allow", 2, {"ended": "proxy stopped"})]
    for s in (lane, task):
        assert was_reset(s)
        s.close()


def test_a_closed_tunnel_is_settled_a_moment_later_with_the_time_it_ended(
        loop_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Long enough to look at the tunnel between its end and its settling.
    monkeypatch.setattr(tunnel_lane, "SETTLE_SECONDS", 30.0)
    with running_proxy(loop_kind) as proxy:
        s, _ = proxy.connect(f"127.0.0.1:{proxy.upstream.port}")
        assert echo_round(s, b"bye") == b"bye"
        s.shutdown(socket.SHUT_WR)
        assert s.recv(10) == b""  # both sides closed: the tunnel has ended
        ended = time.time()
        s.close()
        time.sleep(0.2)
        assert proxy.rows == []  # not yet written: the descriptors are still held
        assert proxy.ctx.active_connections == 1
        time.sleep(0.3)
    # The proxy stopped before the tunnel settled: the row says how it really ended, and when.
    (row,) = proxy.rows
    assert (row.verdict, row.bytes_out, row.extra) == ("allow", 3, {"ended": "closed"})
    assert abs(row.time - ended) < 0.1  # not the time it was stopped, half a second later
    assert proxy.ctx.active_connections == 0
