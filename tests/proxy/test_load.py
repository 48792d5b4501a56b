"""Load: 1,000 concurrent tunnels and 20,000 keep-alive requests, all allowed, none lost.

Every request must succeed, appear exactly once in the audit log, and the log's hash chain must
verify afterwards. Servers and clients are asyncio code in this process; the proxy is the real
``egresslock proxy`` process.
"""

from __future__ import annotations

import asyncio
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.audit.helpers import running, wait_gone
from tests.proxy.conftest import RunningProxy, start_proxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TUNNELS = 1000
CONNECTIONS = 50
REQUESTS = 20000
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Upstream:
    """A tiny asyncio HTTP server (fixed keep-alive response) and a TCP echo server."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.http_port = self.echo_port = 0
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(RESPONSE)
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()

        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            writer.close()

        async def start() -> None:
            h = await asyncio.start_server(http, "127.0.0.1", 0, backlog=2048)
            e = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=2048)
            self.http_port = h.sockets[0].getsockname()[1]
            self.echo_port = e.sockets[0].getsockname()[1]
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningProxy, Upstream]]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    up = Upstream()
    d = tmp_path_factory.mktemp("load")
    policy = d / "policy.yaml"
    policy.write_text(
        "version: 1\nnetwork: {allow_ranges: ['127.0.0.1/32']}\nrules:\n"
        f"  - id: web\n    host: web.test\n    ports: [{up.http_port}]\n    methods: [GET]\n"
        f"  - id: echo\n    host: echo.test\n    ports: [{up.echo_port}]\n")
    p = start_proxy(policy, d / "audit.db", "--resolve", "web.test:127.0.0.1",
                    "--resolve", "echo.test:127.0.0.1")
    yield p, up
    p.stop()
    up.stop()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def _tunnel(port: int, target: bytes, errors: list[str], opened: list[int],
                  gate: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target))
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        errors.append(head.decode("latin-1"))
    opened.append(1)
    await gate.wait()  # hold every tunnel open at once
    writer.write(b"ping")
    if await reader.readexactly(4) != b"ping":
        errors.append("echo mismatch")
    writer.close()


async def _requests(port: int, target: bytes, count: int, errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(count):
        writer.write(b"GET http://%s/x HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target))
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.readexactly(2)
        if not head.startswith(b"HTTP/1.1 200") or body != b"ok":
            errors.append(head.decode("latin-1"))
    writer.close()


def test_thousand_concurrent_tunnels(loaded: tuple[RunningProxy, Upstream]) -> None:
    proxy, up = loaded
    errors: list[str] = []

    async def run() -> None:
        gate = asyncio.Event()
        opened: list[int] = []
        target = b"echo.test:%d" % up.echo_port
        tasks = [asyncio.ensure_future(_tunnel(proxy.port, target, errors, opened, gate))
                 for _ in range(TUNNELS)]
        async with asyncio.timeout(120):
            while len(opened) < TUNNELS:
                await asyncio.sleep(0.05)
        gate.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 120)

    asyncio.run(run())
    assert errors == []
    rows = [r for r in proxy.rows(expect=TUNNELS) if r["method"] == "CONNECT"]
    assert len(rows) == TUNNELS
    assert all(r["verdict"] == "allow" and r["bytes_out"] == 4 and r["bytes_in"] == 4
               for r in rows)


def test_twenty_thousand_requests_each_logged_once(loaded: tuple[RunningProxy, Upstream]
                                                   ) -> None:
    proxy, up = loaded
    errors: list[str] = []
    target = b"web.test:%d" % up.http_port

    async def run() -> None:
        per = REQUESTS // CONNECTIONS
        await asyncio.wait_for(asyncio.gather(
            *(_requests(proxy.port, target, per, errors) for _ in range(CONNECTIONS))), 300)

    asyncio.run(run())
    assert errors == []
    rows = [r for r in proxy.rows(expect=TUNNELS + REQUESTS, timeout=30)
            if r["method"] == "GET"]
    assert len(rows) == REQUESTS
    assert len({r["id"] for r in rows}) == REQUESTS
    verify = subprocess.run([sys.executable, "-m", "egresslock", "audit", "verify", "--db",
                             str(Path(proxy.audit))], capture_output=True, text=True,
                            timeout=300, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(") ", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def test_a_proxy_killed_while_its_database_is_locked_loses_no_row(tmp_path: Path) -> None:
    """The audit writer is a process of its own: rows the proxy has passed to it outlive a
    SIGKILL of the proxy, even while another process holds the database's write lock."""
    up = Upstream()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nnetwork: {allow_ranges: ['127.0.0.1/32']}\nrules:\n"
        f"  - id: web\n    host: web.test\n    ports: [{up.http_port}]\n    methods: [GET]\n")
    db = tmp_path / "audit.db"
    proxy = start_proxy(policy, db, "--resolve", "web.test:127.0.0.1")
    errors: list[str] = []
    try:
        (writer,) = _children(proxy.proc.pid)
        lock = sqlite3.connect(db, isolation_level=None, timeout=10)
        lock.execute("BEGIN IMMEDIATE")  # nothing can be committed until it is released

        async def run() -> None:
            target = b"web.test:%d" % up.http_port
            await asyncio.wait_for(asyncio.gather(
                *(_requests(proxy.port, target, 200, errors) for _ in range(10))), 120)

        asyncio.run(run())
        time.sleep(0.5)  # ten flush intervals: every row has been passed to the writer
        proxy.proc.send_signal(signal.SIGKILL)
        proxy.proc.wait(10)
        assert running(writer)  # it outlives the proxy, waiting for the lock
        lock.execute("ROLLBACK")
        lock.close()
        assert wait_gone(writer, 60)
    finally:
        proxy.stop()
        up.stop()
    assert errors == []
    rows = [r for r in proxy.rows() if r["method"] == "GET"]
    assert len(rows) == 2000
    verify = subprocess.run([sys.executable, "-m", "egresslock", "audit", "verify", "--db",
                             str(db)], capture_output=True, text=True, timeout=300, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr

