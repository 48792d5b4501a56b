"""Every time limit of the plain-HTTP path, each held to its meaning: the first request (head
timeout), the keep-alive wait (idle timeout), a head that started but does not end (slowloris),
an upstream that does not answer (response timeout) and bodies that stall either way (body
timeout). The proxy runs in this process with limits of a fraction of a second; the peers are
raw sockets. Integration tests: they need sockets and real time.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from egresslock.audit import AuditRecord
from egresslock.policy import compile_policy, parse_policy
from egresslock.proxy.context import Limits, PolicyHolder, ProxyContext
from egresslock.proxy.resolver import Resolver
from egresslock.proxy.server import ProxyServer, make_listener
from tests.proxy.servers import proxy_in_thread, read_head

pytestmark = pytest.mark.integration

HEAD, IDLE, RESPONSE, BODY = 0.5, 1.5, 0.5, 0.5


@dataclass
class Upstream:
    """A loopback server that runs ``behave`` on each connection it accepts."""

    port: int
    listener: socket.socket


@contextmanager
def upstream(behave: Callable[[socket.socket], None]) -> Iterator[Upstream]:
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)
            threading.Thread(target=behave, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield Upstream(listener.getsockname()[1], listener)
    finally:
        listener.close()
        for conn in held:
            conn.close()


def answer_ok(conn: socket.socket) -> None:
    try:
        while read_head(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    except OSError:
        return


def read_ok(s: socket.socket) -> bytes:
    """One whole response of ``answer_ok`` (head and its two-byte body)."""
    data = b""
    while not data.endswith(b"\r\n\r\nok"):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def never_answer(conn: socket.socket) -> None:
    read_head(conn)
    time.sleep(30)


def stall_mid_body(conn: socket.socket) -> None:
    read_head(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
    time.sleep(30)


@dataclass
class Proxy:
    port: int
    rows: list[AuditRecord]


@contextmanager
def proxy_for(up: Upstream) -> Iterator[Proxy]:
    policy = parse_policy(
        "version: 1\nnetwork: {allow_ranges: ['127.0.0.1/32']}\nrules:\n"
        f"  - {{id: app, host: 127.0.0.1, ports: [{up.port}]}}\n")
    rows: list[AuditRecord] = []
    limits = Limits(head_timeout=HEAD, idle_timeout=IDLE, response_timeout=RESPONSE,
                    body_timeout=BODY)
    ctx = ProxyContext(PolicyHolder(None, compile_policy(policy)), rows.append, Resolver(),
                       limits)
    listener = make_listener("127.0.0.1", 0)
    try:
        with proxy_in_thread(ProxyServer(ctx), listener):
            yield Proxy(listener.getsockname()[1], rows)
    finally:
        listener.close()


def get(up: Upstream, extra: bytes = b"") -> bytes:
    return (b"GET http://127.0.0.1:%d/ HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n%s\r\n"
            % (up.port, up.port, extra))


def read_until_closed(s: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything until the proxy closes, and how long that took."""
    start = time.monotonic()
    s.settimeout(limit)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    return out, time.monotonic() - start


def test_first_request_that_never_comes_gets_408_after_the_head_timeout() -> None:
    with upstream(answer_ok) as up, proxy_for(up) as p, \
            socket.create_connection(("127.0.0.1", p.port)) as s:
        out, took = read_until_closed(s, 10)
    assert out.startswith(b"HTTP/1.1 408"), out
    assert b"no request within 0.5s" in out
    assert HEAD * 0.8 <= took < HEAD + 2
    assert [r.verdict for r in p.rows] == ["deny"]


def test_idle_keep_alive_connection_is_closed_silently_after_the_idle_timeout() -> None:
    with upstream(answer_ok) as up, proxy_for(up) as p, \
            socket.create_connection(("127.0.0.1", p.port)) as s:
        s.sendall(get(up))
        assert read_ok(s).startswith(b"HTTP/1.1 200")
        # Longer than the head timeout but within the idle timeout: the connection stays.
        time.sleep(HEAD * 2)
        s.sendall(get(up))
        assert read_ok(s).startswith(b"HTTP/1.1 200")
        out, took = read_until_closed(s, 10)
    assert out == b""  # no 408 on a keep-alive connection: it simply ends
    assert IDLE * 0.8 <= took < IDLE + 2
    assert [r.verdict for r in p.rows] == ["allow", "allow"]


def test_head_clock_starts_at_the_first_byte_and_is_not_the_idle_clock() -> None:
    """After a long idle wait (its timer armed for the idle deadline), a head that starts and
    stalls is cut at the head deadline, well before the idle one."""
    with upstream(answer_ok) as up, proxy_for(up) as p, \
            socket.create_connection(("127.0.0.1", p.port)) as s:
        s.sendall(get(up))
        assert read_ok(s).startswith(b"HTTP/1.1 200")
        time.sleep(0.2)
        s.sendall(get(up)[:20])  # half a head, then nothing
        out, took = read_until_closed(s, 10)
    assert out.startswith(b"HTTP/1.1 408"), out
    assert b"request head not complete within 0.5s" in out
    assert HEAD * 0.8 <= took < IDLE
    assert [r.verdict for r in p.rows] == ["allow", "deny"]


def test_slowloris_head_dribbled_byte_by_byte_is_cut_at_the_head_timeout() -> None:
    with upstream(answer_ok) as up, proxy_for(up) as p, \
            socket.create_connection(("127.0.0.1", p.port)) as s:
        stop = threading.Event()

        def dribble() -> None:
            for byte in get(up):
                if stop.is_set():
                    return
                try:
                    s.send(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.05)  # the whole head would take about 3 s

        sender = threading.Thread(target=dribble, daemon=True)
        start = time.monotonic()
        sender.start()
        s.settimeout(10)
        first = s.recv(65536)
        took = time.monotonic() - start
        stop.set()
        sender.join(5)
    assert first.startswith(b"HTTP/1.1 408"), first
    assert HEAD * 0.8 <= took < HEAD + 1
    assert [r.verdict for r in p.rows] == ["deny"]


def test_upstream_that_never_answers_gets_504_after_the_response_timeout() -> None:
    with upstream(never_answer) as up, proxy_for(up) as p, \
            socket.create_connection(("127.0.0.1", p.port)) as s:
        s.sendall(get(up))
        out, took = read_until_closed(s, 10)
    assert out.startswith(b"HTTP/1.1 504"), out
    assert b"sent no response within 0.5s" in out
    assert RESPONSE * 0.8 <= took < RESPONSE + 2
    assert len(p.rows) == 1
    assert "sent no response" in p.rows[0].reason


def test_response_body_that_stalls_is_cut_after_the_body_timeout() -> None:
    with upstream(stall_mid_body) as up, proxy_for(up) as p, \
            socket.create_connection(("127.0.0.1", p.port)) as s:
        s.sendall(get(up))
        out, took = read_until_closed(s, 10)
    assert out.startswith(b"HTTP/1.1 200")
    assert out.endswith(b"only ten b")
    assert BODY * 0.8 <= took < BODY + 2
    assert len(p.rows) == 1
    assert "mid-exchange" in p.rows[0].reason


def test_request_body_that_stalls_is_cut_after_the_body_timeout() -> None:
    with upstream(answer_ok) as up, proxy_for(up) as p, \
            socket.create_connection(("127.0.0.1", p.port)) as s:
        s.sendall(get(up, b"Content-Length: 100\r\n") + b"only ten b")
        out, took = read_until_closed(s, 10)
    assert b"HTTP/1.1 200" not in out
    assert BODY * 0.8 <= took < BODY + 2
    assert len(p.rows) == 1
    assert "mid-exchange" in p.rows[0].reason
