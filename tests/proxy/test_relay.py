"""The tunnel relay on real loopback sockets: bytes both ways, half-close, backpressure, the idle
timeout and resets, with splice and with the portable copy, on asyncio's loop and on uvloop.

Integration tests: each needs sockets, and the peers are plain blocking sockets in threads.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

from egresslock.proxy.relay import RelayStats, relay

pytestmark = pytest.mark.integration

LOOPS = ["asyncio"]
try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency of the proxy where it installs
    uvloop = None  # type: ignore[assignment]
else:
    LOOPS.append("uvloop")
MODES = ["splice", "copy"] if hasattr(os, "splice") else ["copy"]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


def run(loop_kind: str, coro: Coroutine[Any, Any, str]) -> str:
    if loop_kind == "uvloop":
        return uvloop.run(coro)
    return asyncio.run(coro)


def in_thread(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while data := sock.recv(1 << 16):
        out += data
    return bytes(out)


@pytest.fixture(params=LOOPS)
def loop_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=MODES)
def splice(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "splice")


Sockets = tuple[socket.socket, socket.socket, socket.socket, socket.socket]


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    """(client app, proxy's client side, proxy's upstream side, upstream app)."""
    client_app, client_side = tcp_pair()
    upstream_side, upstream_app = tcp_pair()
    socks = (client_app, client_side, upstream_side, upstream_app)
    yield socks
    for s in socks:
        s.close()



def exchange_through_relay(loop_kind: str, sockets: Sockets, request: bytes, response: bytes,
                           use_splice: bool) -> tuple[str, dict[str, bytes], RelayStats]:
    """The client sends ``request`` and half-closes; the upstream reads it all, answers
    ``response`` and half-closes. Returns how the relay ended, what each side received, and
    the relay's counts."""
    client_app, client_side, upstream_side, upstream_app = sockets
    got: dict[str, bytes] = {}

    def client() -> None:
        client_app.sendall(request)
        client_app.shutdown(socket.SHUT_WR)  # the client is done sending, still reading
        got["client"] = read_all(client_app)

    def upstream() -> None:
        got["upstream"] = read_all(upstream_app)  # ends only when the relay passed the FIN on
        upstream_app.sendall(response)
        upstream_app.shutdown(socket.SHUT_WR)

    threads = [in_thread(client), in_thread(upstream)]
    stats = RelayStats()
    ended = run(loop_kind, relay(client_side, upstream_side, stats, 10.0,
                                 use_splice=use_splice))
    for t in threads:
        t.join(10)
    return ended, got, stats


def test_bytes_both_ways_with_half_close(loop_kind: str, splice: bool, sockets: Sockets) -> None:
    request = os.urandom(3 * 1024 * 1024 + 17)
    response = os.urandom(5 * 1024 * 1024 + 3)
    ended, got, stats = exchange_through_relay(loop_kind, sockets, request, response, splice)
    assert ended == "closed"
    assert got["upstream"] == request
    assert got["client"] == response
    assert (stats.bytes_up, stats.bytes_down) == (len(request), len(response))


def test_a_slow_reader_holds_back_the_writer_without_loss(loop_kind: str, splice: bool,
                                                          sockets: tuple[socket.socket, ...]
                                                          ) -> None:
    client_app, client_side, upstream_side, upstream_app = sockets
    payload = os.urandom(8 * 1024 * 1024)
    got: dict[str, bytes] = {}

    def upstream() -> None:
        upstream_app.sendall(payload)
        upstream_app.close()

    def client() -> None:
        client_app.shutdown(socket.SHUT_WR)
        out = bytearray()
        while data := client_app.recv(4096):  # small reads, with pauses: the relay must wait
            out += data
            if len(out) % (1 << 20) < 4096:
                time.sleep(0.01)
        got["client"] = bytes(out)

    threads = [in_thread(upstream), in_thread(client)]
    stats = RelayStats()
    ended = run(loop_kind, relay(client_side, upstream_side, stats, 10.0, use_splice=splice))
    for t in threads:
        t.join(10)
    assert ended == "closed"
    assert got["client"] == payload
    assert stats.bytes_down == len(payload)


def test_idle_tunnel_is_ended_after_the_idle_timeout(loop_kind: str, splice: bool,
                                                     sockets: tuple[socket.socket, ...]) -> None:
    _, client_side, upstream_side, _ = sockets
    start = time.monotonic()
    ended = run(loop_kind, relay(client_side, upstream_side, RelayStats(), 0.3,
                                 use_splice=splice))
    elapsed = time.monotonic() - start
    assert ended == "idle for 0.3s"
    assert 0.25 <= elapsed < 2.0


def test_traffic_keeps_a_tunnel_past_its_idle_timeout(loop_kind: str, splice: bool,
                                                      sockets: tuple[socket.socket, ...]
                                                      ) -> None:
    client_app, client_side, upstream_side, upstream_app = sockets
    got: dict[str, bytes] = {}

    def client() -> None:
        for _ in range(8):  # 8 x 0.1 s: twice the idle timeout, never idle for long
            client_app.sendall(b"ping")
            time.sleep(0.1)
        client_app.shutdown(socket.SHUT_WR)
        got["client"] = read_all(client_app)

    def upstream() -> None:
        got["upstream"] = read_all(upstream_app)
        upstream_app.shutdown(socket.SHUT_WR)

    threads = [in_thread(client), in_thread(upstream)]
    ended = run(loop_kind, relay(client_side, upstream_side, RelayStats(), 0.4,
                                 use_splice=splice))
    for t in threads:
        t.join(10)
    assert ended == "closed"
    assert got["upstream"] == b"ping" * 8


def test_a_reset_ends_the_tunnel_at_once(loop_kind: str, splice: bool,
                                          sockets: tuple[socket.socket, ...]) -> None:
    client_app, client_side, upstream_side, upstream_app = sockets

    def upstream() -> None:
        upstream_app.recv(4)
        upstream_app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        upstream_app.close()  # RST

    t = in_thread(upstream)
    client_app.sendall(b"ping")
    start = time.monotonic()
    ended = run(loop_kind, relay(client_side, upstream_side, RelayStats(), 30.0,
                                 use_splice=splice))
    t.join(10)
    assert ended.startswith("reset")
    # At once: the client has not closed its side, and the idle timeout is far away.
    assert time.monotonic() - start < 5


def test_cancelling_the_relay_unregisters_its_sockets(loop_kind: str, splice: bool,
                                                      sockets: tuple[socket.socket, ...]) -> None:
    _, client_side, upstream_side, _ = sockets

    async def cancel_then_reuse() -> str:
        task = asyncio.ensure_future(relay(client_side, upstream_side, RelayStats(), 10.0,
                                           use_splice=splice))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The loop must no longer watch the sockets: waiting on one again works.
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def writable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(client_side.fileno(), writable)
        await asyncio.wait_for(ready, 2)
        loop.remove_writer(client_side.fileno())
        return "ok"

    assert run(loop_kind, cancel_then_reuse()) == "ok"


@pytest.mark.skipif(not hasattr(os, "splice"), reason="splice(2) is Linux-only")
@pytest.mark.parametrize(("size", "spliced"), [(4096, False), (4 * 1024 * 1024 + 5, True)])
def test_a_direction_takes_a_pipe_only_once_it_carries_volume(
        loop_kind: str, size: int, spliced: bool, monkeypatch: pytest.MonkeyPatch,
        sockets: Sockets) -> None:
    """A short exchange is copied (no pipe to set up); a long one moves to splice after
    SPLICE_AFTER bytes, without losing or reordering a byte at the switch."""
    calls = []
    real_splice = os.splice

    def counting_splice(*args: int, **kwargs: int) -> int:
        calls.append(args)
        return real_splice(*args, **kwargs)

    monkeypatch.setattr("egresslock.proxy.relay.os.splice", counting_splice)
    data = os.urandom(size)
    ended, got, stats = exchange_through_relay(loop_kind, sockets, data, b"", use_splice=True)
    assert ended == "closed"
    assert got["upstream"] == data
    assert stats.bytes_up == size
    assert bool(calls) is spliced
