"""The fast lane (``egresslock.proxy.lane``): a kept-alive client's requests after the first.

Every test here sends its requests on one client connection, so that all but the first go
through the lane, against a loopback upstream whose answers the test scripts: whole, chunked,
large, late, interim, never, or on a connection it then closes. Each case must end as it does
on the coroutine path: the same bytes to the client, one audit row per request, and budgets and
the session's mark applied to every request, remembered or not. Both event loops run each test:
uvloop (what ``egresslock proxy`` uses) and asyncio's own.
"""

from __future__ import annotations

import asyncio
import http.client
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import pytest
import uvloop

from egresslock.audit import AuditRecord
from egresslock.policy import compile_policy, parse_policy
from egresslock.proxy.context import Limits, PolicyHolder, ProxyContext
from egresslock.proxy.resolver import Resolver
from egresslock.proxy.server import ProxyServer, make_listener
from tests.proxy.servers import ThreadedServer, proxy_in_thread

pytestmark = pytest.mark.integration

BIG = bytes(range(256)) * 4096  # 1 MiB


def _ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


class ScriptedUpstream(ThreadedServer):
    """A loopback HTTP/1.1 server answering by path; it records every head it receives and
    counts its connections."""

    def __init__(self) -> None:
        super().__init__()
        self.heads: list[bytes] = []
        self.start()

    def serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        data = conn.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buf) < length:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                buf = buf[length:]
                self.heads.append(head)
                path = head.split(b" ")[1].decode()
                if not self._answer(conn, path):
                    return

    def _answer(self, conn: socket.socket, path: str) -> bool:
        """Send the scripted answer; False to close the connection."""
        name = path.split("/")[1]
        if name == "ok":
            conn.sendall(_ok(f"ok {path}".encode()))
        elif name == "close-after":  # answers as if it kept the connection, then closes it
            conn.sendall(_ok(b"closing"))
            return False
        elif name == "chunked":
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        elif name == "big":
            conn.sendall(_ok(BIG))
        elif name == "interim":
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + _ok(b"final"))
        elif name == "split":  # the head, then the body a little later: two reads
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
            time.sleep(0.1)
            conn.sendall(b"56789")
        elif name == "silent":
            time.sleep(3)
            return False
        elif name == "late":
            time.sleep(0.3)
            conn.sendall(_ok(b"late"))
        else:
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        return True



POLICY = """\
version: 1
network: {{allow_ranges: ['127.0.0.1/32']}}
levels: [public, confidential]
rules:
  - {{id: app, host: app.test, ports: [{port}]}}
  - {{id: metered, host: metered.test, ports: [{port}], budget: {{requests: 3, per: run}}}}
  - {{id: private, host: private.test, ports: [{port}], reads: confidential}}
  - {{id: public, host: public.test, ports: [{port}], level: public}}
  - {{id: literal, host: 127.0.0.1, ports: [{port}]}}
"""

HOSTS = ["app.test", "metered.test", "private.test", "public.test", "other.test"]


@dataclass
class Lane:
    port: int
    rows: list[AuditRecord]
    ctx: ProxyContext
    upstream: ScriptedUpstream
    loop: asyncio.AbstractEventLoop

    def client(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def url(self, host: str, path: str) -> str:
        return f"http://{host}:{self.upstream.port}{path}"

    def get(self, conn: http.client.HTTPConnection, host: str, path: str,
            method: str = "GET", body: bytes | None = None) -> tuple[int, bytes, str | None]:
        conn.request(method, self.url(host, path), body=body,
                     headers={"Host": f"{host}:{self.upstream.port}"})
        resp = conn.getresponse()
        return resp.status, resp.read(), resp.getheader("X-Egresslock-Deny")

    def raw_head(self, path: str) -> bytes:
        """A GET of ``path`` on app.test as a forward-proxy client writes it."""
        port = self.upstream.port
        return b"GET http://app.test:%d%s HTTP/1.1\r\nHost: app.test:%d\r\n\r\n" % (
            port, path.encode(), port)

    @contextmanager
    def kept(self) -> Iterator[socket.socket]:
        """A raw client connection whose first request was answered: the lane serves the next."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(self.raw_head("/ok/1"))
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
            yield s

    def wait_rows(self, count: int) -> list[AuditRecord]:
        deadline = time.monotonic() + 5
        while len(self.rows) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return list(self.rows)


@pytest.fixture(params=["uvloop", "asyncio"])
def lane(request: pytest.FixtureRequest) -> Iterator[Lane]:
    marker = request.node.get_closest_marker("limits")
    limits = Limits(**marker.kwargs) if marker is not None else Limits()
    upstream = ScriptedUpstream()
    policy = compile_policy(parse_policy(POLICY.format(port=upstream.port)))
    rows: list[AuditRecord] = []
    ctx = ProxyContext(PolicyHolder(None, policy), rows.append,
                       Resolver({h: ["127.0.0.1"] for h in HOSTS}), limits)
    loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    listener = make_listener("127.0.0.1", 0)
    with proxy_in_thread(ProxyServer(ctx), listener, loop):
        yield Lane(listener.getsockname()[1], rows, ctx, upstream, loop)
    loop.close()
    listener.close()
    upstream.close()


def test_kept_alive_requests_are_answered_remembered_and_logged_once(lane: Lane) -> None:
    conn = lane.client()
    for i in range(40):
        status, body, _ = lane.get(conn, "app.test", f"/ok/{i % 4}")
        assert (status, body) == (200, f"ok /ok/{i % 4}".encode())
    rows = lane.wait_rows(40)
    assert len(rows) == 40
    assert all(r.verdict == "allow" and r.rule_id == "app" for r in rows)
    assert [r.path for r in rows] == [f"/ok/{i % 4}" for i in range(40)]
    assert all(r.bytes_in == len(f"ok /ok/{i % 4}") for i, r in enumerate(rows))
    assert all((r.extra or {}).get("status") == 200 for r in rows)
    # One upstream connection, reused; each head rebuilt by the proxy, not the client's.
    assert lane.upstream.connections == 1
    assert all(h.startswith(b"GET /ok/") and b"\r\nHost: app.test:" in h
               for h in lane.upstream.heads)
    # The lane served the requests after the first, and remembered the four distinct heads.
    assert lane.ctx.head_memo is not None
    assert len(lane.ctx.head_memo.requests) == 4


def test_pipelined_requests_are_answered_in_order(lane: Lane) -> None:
    heads = b"".join(lane.raw_head(f"/ok/{i}") for i in range(6))
    with socket.create_connection(("127.0.0.1", lane.port), timeout=10) as s:
        s.sendall(heads)
        f = s.makefile("rb")
        for i in range(6):
            status, body = read_response(f)
            assert (status, body) == (200, f"ok /ok/{i}".encode())
    assert len(lane.wait_rows(6)) == 6


def read_response(f: BinaryIO) -> tuple[int, bytes]:
    """One response with a Content-Length body from a buffered socket file."""
    status = int(f.readline().split(b" ")[1])
    length = 0
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return status, f.read(length)


def test_a_pooled_connection_the_upstream_closed_is_replaced(lane: Lane) -> None:
    conn = lane.client()
    assert lane.get(conn, "app.test", "/close-after")[:2] == (200, b"closing")
    time.sleep(0.1)  # the upstream's close has arrived; the pool does not know yet
    assert lane.get(conn, "app.test", "/ok/after")[:2] == (200, b"ok /ok/after")
    assert lane.upstream.connections == 2
    rows = lane.wait_rows(2)
    assert [r.verdict for r in rows] == ["allow", "allow"]
    assert [r.path for r in rows] == ["/close-after", "/ok/after"]


@pytest.mark.parametrize(("path", "expected"), [
    ("/chunked", b"hello world"),
    ("/big", BIG),
    ("/interim", b"final"),
    ("/split", b"0123456789"),
])
def test_responses_the_lane_hands_over_arrive_whole(lane: Lane, path: str,
                                                     expected: bytes) -> None:
    conn = lane.client()
    assert lane.get(conn, "app.test", "/ok/first")[0] == 200
    for _ in range(3):
        status, body, _ = lane.get(conn, "app.test", path)
        assert status == 200
        assert body == expected
    assert lane.get(conn, "app.test", "/ok/last")[:2] == (200, b"ok /ok/last")
    rows = lane.wait_rows(5)
    assert len(rows) == 5
    assert [r.bytes_in for r in rows[1:4]] == [len(expected)] * 3
    assert lane.upstream.connections == 1


def test_head_requests_get_no_body(lane: Lane) -> None:
    conn = lane.client()
    for _ in range(3):
        status, body, _ = lane.get(conn, "app.test", "/ok/x", method="HEAD")
        assert (status, body) == (200, b"")
    assert lane.get(conn, "app.test", "/ok/y")[:2] == (200, b"ok /ok/y")


def test_denied_and_bodied_requests_between_lane_requests(lane: Lane) -> None:
    conn = lane.client()
    assert lane.get(conn, "app.test", "/ok/1")[0] == 200
    status, _, deny = lane.get(conn, "other.test", "/ok/2")
    assert status == 403
    assert deny is not None
    assert deny.startswith("default;")
    assert lane.get(conn, "app.test", "/ok/3")[0] == 200
    # A body goes the coroutine way; the connection stays in the lane after it.
    assert lane.get(conn, "app.test", "/ok/4", method="POST", body=b"x" * 100)[0] == 200
    assert lane.get(conn, "app.test", "/ok/5")[:2] == (200, b"ok /ok/5")
    rows = lane.wait_rows(5)
    assert [r.verdict for r in rows] == ["allow", "deny", "allow", "allow", "allow"]
    assert [h.split(b" ")[0] for h in lane.upstream.heads] == [b"GET", b"GET", b"POST", b"GET"]


def test_a_budget_counts_every_request_even_remembered_ones(lane: Lane) -> None:
    conn = lane.client()
    answers = [lane.get(conn, "metered.test", "/ok/same") for _ in range(5)]
    assert [a[0] for a in answers] == [200, 200, 200, 403, 403]
    assert "budget of 3 requests" in (answers[3][2] or "")
    assert len(lane.upstream.heads) == 3
    assert [r.verdict for r in lane.wait_rows(5)] == ["allow"] * 3 + ["deny"] * 2


def test_the_session_mark_binds_lane_requests(lane: Lane) -> None:
    conn = lane.client()
    assert lane.get(conn, "public.test", "/ok/before")[0] == 200
    assert lane.get(conn, "public.test", "/ok/before")[0] == 200
    # A read from a confidential source, on the lane, raises the mark ...
    assert lane.get(conn, "private.test", "/ok/secret")[0] == 200
    # ... and the same public request as before is now a write down, refused.
    status, _, deny = lane.get(conn, "public.test", "/ok/before")
    assert status == 403
    assert deny is not None
    assert "confidential" in deny
    verdicts = [(r.layer, r.verdict) for r in lane.wait_rows(5)]
    # The mark's row comes as the confidential response arrives, before that request's row.
    assert verdicts == [("http", "allow"), ("http", "allow"), ("flow", "allow"),
                        ("http", "allow"), ("http", "deny")]


def test_a_new_policy_forgets_what_the_lane_remembered(lane: Lane) -> None:
    conn = lane.client()
    for _ in range(3):
        assert lane.get(conn, "app.test", "/ok/r")[0] == 200
    stricter = POLICY.format(port=lane.upstream.port).replace(
        "  - {id: app, host: app.test", "  - {id: app, action: deny, host: app.test")
    lane.ctx.policy.current = compile_policy(parse_policy(stricter))
    status, _, deny = lane.get(conn, "app.test", "/ok/r")
    assert status == 403
    assert deny is not None
    assert deny.startswith("app;")


@pytest.mark.limits(response_timeout=0.5)
def test_an_upstream_silent_past_the_response_timeout_gets_504(lane: Lane) -> None:
    conn = lane.client()
    assert lane.get(conn, "app.test", "/ok/1")[0] == 200
    started = time.monotonic()
    status, body, _ = lane.get(conn, "app.test", "/silent")
    assert status == 504
    assert b"sent no response within 0.5s" in body
    assert time.monotonic() - started < 2.5
    rows = lane.wait_rows(2)
    assert "sent no response within 0.5s" in rows[1].reason


@pytest.mark.limits(idle_timeout=0.5)
def test_an_idle_kept_connection_is_closed(lane: Lane) -> None:
    with lane.kept() as s:
        started = time.monotonic()
        assert s.recv(65536) == b""  # closed by the proxy, quietly
        assert 0.3 < time.monotonic() - started < 3


@pytest.mark.limits(head_timeout=0.5)
def test_a_slow_head_on_a_kept_connection_gets_408(lane: Lane) -> None:
    with lane.kept() as s:
        s.sendall(lane.raw_head("/ok/2")[:-20])  # the head stops inside its Host line
        out = s.recv(65536)
        assert out.startswith(b"HTTP/1.1 408"), out
    rows = lane.wait_rows(2)
    assert rows[1].verdict == "deny"
    assert "not complete within 0.5s" in rows[1].reason


def test_a_client_gone_before_its_answer_leaves_the_proxy_serving(lane: Lane) -> None:
    with lane.kept() as s:
        s.sendall(lane.raw_head("/late"))
    time.sleep(0.6)
    conn = lane.client()
    assert lane.get(conn, "app.test", "/ok/again")[:2] == (200, b"ok /ok/again")
    rows = lane.wait_rows(3)
    assert len(rows) == 3
    assert rows[1].path == "/late"


def test_ip_literal_hosts_take_the_lane_too(lane: Lane) -> None:
    conn = lane.client()
    for _ in range(3):
        assert lane.get(conn, "127.0.0.1", "/ok/lit")[:2] == (200, b"ok /ok/lit")
    assert [r.rule_id for r in lane.wait_rows(3)] == ["literal"] * 3
    assert lane.upstream.connections == 1
