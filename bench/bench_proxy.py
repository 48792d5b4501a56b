#!/usr/bin/env python3
"""Proxy benchmark: egresslock side by side with no proxy, Squid, tinyproxy and mitmproxy.

Run from the repository root (after ``bash bench/setup_proxies.sh``)::

    .venv/bin/python bench/bench_proxy.py            # full run, a few minutes
    .venv/bin/python bench/bench_proxy.py --quick    # smoke run, well under a minute
    .venv/bin/python bench/bench_proxy.py --json     # the results as JSON instead of the table

Everything runs on 127.0.0.1. One run starts, each as its own foreground process with its own
config in a temp dir: the upstream (nginx for HTTP if installed, else a Python server; a Python
source/echo server for tunnels), egresslock, Squid, tinyproxy and two mitmdump instances (one
plain for HTTP, one with ``--ignore-hosts '.*'`` so CONNECT tunnels pass through uninspected).
The load generators are separate processes (wrk, and this file re-run as a tunnel client), so
nothing competes with the proxies inside one interpreter. Measured, for each target:

1. small keep-alive GETs: requests/s and p50/p99 latency (wrk, absolute-form requests for the
   proxies), and the proxy's CPU time per request;
2. one CONNECT tunnel moving 1 GiB upstream → client: MB/s, and the proxy's CPU-seconds per GiB
   (utime+stime from /proc of the proxy and all its descendants, before and after);
3. new-tunnel latency over sequential tunnels: connect, CONNECT, ``200``, one echo round trip;
   minus the same without a proxy (connect, echo) gives the latency a proxy adds. Each proxy is
   measured in a phase of its own, its tunnels interleaved in blocks with direct ones, so that
   its baseline is taken under the same machine state and no other proxy is busy meanwhile;
4. small keep-alive GETs over HTTPS (an nginx ``ssl`` server with a certificate from a test CA
   made here), through an uninspected CONNECT tunnel, and with the TLS intercepted (egresslock with
   an ``inspect: true`` rule, and a third mitmdump that intercepts): requests/s, p50/p99 latency
   and the proxy's CPU time per request. The client is this file re-run (``_https``): one uvloop
   process with many connections, each CONNECT, ``200``, TLS, then GETs until the time is up.

A tool that is not installed gets "not installed" in its column instead of numbers. Every loop
is bounded in count and in time; every process this file starts is stopped by its pid.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import selectors
import shutil
import signal
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOOPBACK = "127.0.0.1"
GIB = 1 << 30
MIB = 1 << 20
HTTP_BODY = b"egresslock bench: small keep-alive response body, 64 bytes long.\n"[:64]
SBIN = ("/usr/sbin", "/usr/local/sbin", "/sbin")

# The latency client's blocks (see latency_main): tunnels counted in a row through one route,
# after LATENCY_SKIP uncounted ones (about 7 ms of tunnels: longer than egresslock's 5 ms
# settling of a closed tunnel).
LATENCY_BLOCK = 35
LATENCY_SKIP = 15
TARGET_NAMES = ("direct", "egresslock", "squid", "tinyproxy", "mitmproxy")
# HTTPS: the upstream certificate names both; egresslock's policy has a host-only rule for the
# first (an opaque tunnel) and an `inspect: true` rule for the second.
TLS_TUNNEL_HOST = "tunnel.bench.test"
TLS_INSPECT_HOST = "inspect.bench.test"
TITLES = {"direct": "direct (no proxy)", "egresslock": "egresslock", "squid": "Squid",
          "tinyproxy": "tinyproxy", "mitmproxy": "mitmproxy (mitmdump)"}


# --------------------------------------------------------------------------------------------
# Upstream servers (run as a separate process: `bench_proxy.py _upstream`)
# --------------------------------------------------------------------------------------------

async def _tunnel_server_conn(reader: Any, writer: Any) -> None:
    """One tunnel-side connection. First line ``SRC n``: send n bytes and close. Otherwise echo."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        line = await reader.readline()
        if line.startswith(b"SRC "):
            remaining = min(int(line[4:].strip()), 64 * GIB)
            chunk = bytes(MIB)
            view = memoryview(chunk)
            while remaining > 0:
                k = min(remaining, MIB)
                writer.write(view[:k] if k < MIB else chunk)
                await writer.drain()
                remaining -= k
        else:
            writer.write(line)
            await writer.drain()
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
    except (OSError, ValueError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _http_protocol_factory() -> Any:
    import asyncio

    response = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                b"Connection: keep-alive\r\n\r\n" % len(HTTP_BODY)) + HTTP_BODY

    class HttpProto(asyncio.Protocol):
        """GETs without bodies only: one canned response per request head, pipelining kept."""

        def __init__(self) -> None:
            self.buf = b""
            self.transport: Any = None

        def connection_made(self, transport: Any) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data
            n = buf.count(b"\r\n\r\n")
            if n:
                self.transport.write(response * n)
                buf = buf[buf.rfind(b"\r\n\r\n") + 4:]
            if len(buf) > 65536:
                self.transport.close()
            self.buf = buf

    return HttpProto


def upstream_main(http: bool, tls_cert: str | None = None, tls_key: str | None = None) -> None:
    """Serve the tunnel source/echo (and, without nginx, HTTP and HTTPS) until stdin closes."""
    import asyncio
    import ssl

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        tunnel = await asyncio.start_server(_tunnel_server_conn, LOOPBACK, 0, backlog=1024)
        ports = {"tunnel": tunnel.sockets[0].getsockname()[1]}
        if http:
            hs = await loop.create_server(_http_protocol_factory(), LOOPBACK, 0, backlog=1024)
            ports["http"] = hs.sockets[0].getsockname()[1]
        if http and tls_cert and tls_key:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls_cert, tls_key)
            ts = await loop.create_server(_http_protocol_factory(), LOOPBACK, 0, ssl=ctx,
                                          backlog=1024)
            ports["https"] = ts.sockets[0].getsockname()[1]
        with contextlib.suppress(OSError, ValueError):
            if stat.S_ISFIFO(os.fstat(sys.stdin.fileno()).st_mode):
                loop.add_reader(sys.stdin.fileno(), stop.set)  # the bench closing the pipe ends us
        print(json.dumps(ports), flush=True)
        async with asyncio.timeout(4 * 3600):  # bounded even if nobody stops us
            await stop.wait()

    _run_loop(main())


def _run_loop(coro: Any) -> None:
    import asyncio

    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


# --------------------------------------------------------------------------------------------
# Tunnel clients (run as a separate process: `bench_proxy.py _throughput` / `_latency`)
# --------------------------------------------------------------------------------------------

def _open_tunnel(proxy: tuple[str, int] | None, target: tuple[str, int],
                 timeout: float) -> tuple[socket.socket, bytes]:
    """A socket to ``target``, through ``proxy`` by CONNECT when given; returns leftover bytes."""
    sock = socket.create_connection(proxy or target, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if proxy is None:
        return sock, b""
    authority = f"{target[0]}:{target[1]}"
    sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode("ascii"))
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(4096)
        if not data or len(buf) > 65536:
            sock.close()
            raise ConnectionError(f"proxy closed before answering CONNECT: {buf[:200]!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200" not in status:
        sock.close()
        raise ConnectionError(f"CONNECT refused: {head[:300]!r}")
    return sock, rest


def throughput_main(proxy: tuple[str, int] | None, target: tuple[str, int], nbytes: int,
                    timeout: float) -> None:
    """Read ``nbytes`` from the upstream source through one tunnel; print JSON with the time."""
    sock, rest = _open_tunnel(proxy, target, timeout)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MIB)
    buf = bytearray(4 * MIB)
    view = memoryview(buf)
    deadline = time.monotonic() + timeout
    t0 = time.perf_counter()
    sock.sendall(b"SRC %d\n" % nbytes)
    got = len(rest)
    while got < nbytes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {got} of {nbytes} bytes within {timeout:g}s")
        n = sock.recv_into(view)
        if n == 0:
            break
        got += n
    elapsed = time.perf_counter() - t0
    sock.close()
    print(json.dumps({"bytes": got, "seconds": elapsed}), flush=True)


def latency_main(routes: list[tuple[str, tuple[str, int] | None]], target: tuple[str, int],
                 count: int, warmup: int, block: int, timeout: float) -> None:
    """``count`` new tunnels per route, each with one echo round trip; print the µs of each.

    After ``warmup`` uncounted tunnels per route, the routes take turns: ``block`` sequential
    tunnels through one, then the next, in a new random order every round. So every route is
    measured under the same machine state, and the difference between a proxy and the direct
    route is what the proxy adds, not how the machine drifted between two phases of the run (on
    the 2-CPU test machine the direct route's p50 moved by half from one second to the next).
    Each block measures a proxy in its steady state: the first ``LATENCY_SKIP`` tunnels of a
    block are not counted, so that every counted one has the work the proxy deferred from its
    own earlier tunnels behind it, as in a long run of tunnels, and none has another route's.
    The client never pauses: after an idle moment the machine is slower for a while (on the
    test machine a 50 ms pause before each block added about 140 µs to every proxy's p50).
    """
    import random

    ping = b"PING egresslock-bench\n"

    def one(name: str, proxy: tuple[str, int] | None) -> float:
        t0 = time.perf_counter_ns()
        sock, rest = _open_tunnel(proxy, target, 10.0)
        sock.sendall(ping)
        echo = rest
        while len(echo) < len(ping):
            data = sock.recv(4096)
            if not data:
                raise ConnectionError(f"{name}: tunnel closed before the echo")
            echo += data
        t1 = time.perf_counter_ns()
        sock.close()
        return (t1 - t0) / 1000.0

    samples: dict[str, list[float]] = {name: [] for name, _ in routes}
    errors: dict[str, str] = {}
    order = list(routes)
    for name, proxy in routes:
        try:
            for _ in range(warmup):
                one(name, proxy)
        except OSError as exc:  # one failing route must not end the others' measurement
            errors[name] = str(exc)[:200]
            order.remove((name, proxy))
    rng = random.Random(0x5EED)  # the same sequence of orders in every run
    deadline = time.monotonic() + timeout
    while order and time.monotonic() < deadline:
        rng.shuffle(order)
        for name, proxy in list(order):
            try:
                for i in range(LATENCY_SKIP + block):
                    took = one(name, proxy)
                    if i >= LATENCY_SKIP:
                        samples[name].append(took)
            except OSError as exc:
                errors[name] = str(exc)[:200]
                order.remove((name, proxy))
            if len(samples[name]) >= count and (name, proxy) in order:
                order.remove((name, proxy))
    print(json.dumps({"samples_us": samples, "errors": errors}), flush=True)


def make_test_ca(directory: Path, hosts: list[str]) -> tuple[Path, Path, Path]:
    """A throwaway CA and a leaf for ``hosts`` (and 127.0.0.1): (ca.pem, leaf.pem, leaf.key)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "egresslock bench test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    sans.append(x509.IPAddress(ipaddress.ip_address(LOOPBACK)))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    ca_path, leaf_path = directory / "ca.pem", directory / "leaf.pem"
    key_path = directory / "leaf.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return ca_path, leaf_path, key_path


def https_main(proxy: tuple[str, int] | None, target: tuple[str, int], sni: str, cafile: str,
               connections: int, warmup: float, duration: float, timeout: float) -> None:
    """Keep-alive GETs over HTTPS on ``connections`` connections (through ``proxy`` by CONNECT).

    Prints ``START`` when the measured window opens and ``STOP`` when it closes (the parent reads
    the proxy's CPU time at each), then one JSON line: responses completed in the window, and the
    latency of each.
    """
    import asyncio
    import ssl

    ctx = ssl.create_default_context(cafile=cafile)
    ctx.set_alpn_protocols(["http/1.1"])
    request = (f"GET / HTTP/1.1\r\nHost: {sni}:{target[1]}\r\nUser-Agent: egresslock-bench\r\n"
               "Accept: */*\r\n\r\n").encode("ascii")
    state = {"measuring": False, "stop": False}
    samples: list[int] = []
    errors: dict[str, int] = {}
    first_error: list[str] = []

    def note(kind: str, exc: BaseException | str) -> None:
        errors[kind] = errors.get(kind, 0) + 1
        if not first_error:
            first_error.append(f"{kind}: {exc}"[:300])

    async def open_one() -> tuple[Any, Any]:
        reader, writer = await asyncio.open_connection(*(proxy or target))
        with contextlib.suppress(OSError):
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if proxy is not None:
            authority = f"{target[0]}:{target[1]}"
            writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 200" not in head.split(b"\r\n", 1)[0]:
                writer.close()
                raise ConnectionError(f"CONNECT refused: {head[:300]!r}")
        await writer.start_tls(ctx, server_hostname=sni)
        return reader, writer

    async def worker(reader: Any, writer: Any) -> None:
        buf = b""
        while not state["stop"]:
            t0 = time.perf_counter_ns()
            writer.write(request)
            while True:  # one response: head, then Content-Length bytes of body
                end = buf.find(b"\r\n\r\n")
                if end >= 0:
                    head = buf[:end]
                    cl = 0
                    for line in head.split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"content-length":
                            cl = int(value)
                    if len(buf) >= end + 4 + cl:
                        buf = buf[end + 4 + cl:]
                        break
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("connection closed before the response ended")
                buf += data
            t1 = time.perf_counter_ns()
            if not head.startswith(b"HTTP/1.1 200"):
                note("status", head.split(b"\r\n", 1)[0].decode("latin-1"))
                if len(errors) > 1000:
                    return
                continue
            if state["measuring"]:
                samples.append(t1 - t0)

    async def main() -> None:
        opened = await asyncio.wait_for(
            asyncio.gather(*(open_one() for _ in range(connections)), return_exceptions=True),
            timeout)
        conns = [c for c in opened if not isinstance(c, BaseException)]
        for c in opened:
            if isinstance(c, BaseException):
                note("connect", f"{type(c).__name__}: {c}")
        tasks = [asyncio.ensure_future(worker(r, w)) for r, w in conns]
        if tasks:
            await asyncio.sleep(warmup)
            print("START", flush=True)
            t_start = time.perf_counter()
            state["measuring"] = True
            await asyncio.sleep(duration)
            state["measuring"] = False
            elapsed = time.perf_counter() - t_start
            print("STOP", flush=True)
            state["stop"] = True
            done, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:
                task.cancel()
                note("timeout", "no response within 10 s of the end")
            for task in done:
                exc = task.exception()
                if exc is not None:
                    note("read", f"{type(exc).__name__}: {exc}")
        else:
            print("START", flush=True)
            print("STOP", flush=True)
            elapsed = 0.0
        for _, w in conns:
            w.close()
        samples.sort()
        print(json.dumps({
            "connections": len(conns), "requests": len(samples), "seconds": elapsed,
            "rps": len(samples) / elapsed if elapsed else 0.0,
            "p50_us": _pct(samples, 50) / 1000 if samples else None,
            "p99_us": _pct(samples, 99) / 1000 if samples else None,
            "errors": sum(errors.values()), "error_kinds": errors,
            "first_error": first_error[0] if first_error else None}), flush=True)

    _run_loop(main())


# --------------------------------------------------------------------------------------------
# Process handling
# --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any] | None, timeout: float = 20.0,
              log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            why = ""
            with contextlib.suppress(OSError):
                lines = log.read_text(errors="replace").strip().splitlines() if log else []
                why = f": {lines[-1].strip()[:160]}" if lines else ""
            raise RuntimeError(f"exited with {proc.returncode} before listening on {port}{why}")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {LOOPBACK}:{port} after {timeout:g}s")


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """The first stdout line of ``proc``, waiting at most ``timeout`` seconds."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    fd = proc.stdout.fileno()
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise RuntimeError(f"no output within {timeout:g}s")
            data = os.read(fd, 4096)
            if not data:
                raise RuntimeError(f"exited ({proc.wait(5)}) before printing its address")
            buf += data
    finally:
        sel.close()
    return buf.split(b"\n", 1)[0].decode("utf-8", "replace").strip()


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM this one pid, then SIGKILL if it has not gone in 5 s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def tree_cpu_seconds(root: int) -> float:
    """utime+stime (and reaped children's) of ``root`` and every live descendant, in seconds."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            f = _stat_fields(int(entry.name))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(entry.name))
    total = 0
    todo = [root]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        f = _stat_fields(pid)
        if f is None:
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
        todo.extend(children.get(pid, []))
    return total / _TICK


def find_tool(name: str, *extra: Path) -> str | None:
    for p in extra:
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN:
        cand = Path(d) / name
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def tool_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "?"


# --------------------------------------------------------------------------------------------
# The targets
# --------------------------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    port: int | None = None            # proxy port for HTTP; None = direct
    tunnel_port: int | None = None     # proxy port for CONNECT (mitmproxy: the passthrough one)
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    http_pid: int | None = None        # the process whose CPU counts for the HTTP test
    tunnel_pid: int | None = None      # ... and for the tunnel test
    missing: str | None = None         # "not installed" / "failed to start: ..."
    version: str = ""
    notes: list[str] = field(default_factory=list)
    tls_tunnel: TlsRoute | None = None   # HTTPS through an uninspected tunnel (direct: no proxy)
    tls_inspect: TlsRoute | None = None  # HTTPS with the proxy intercepting the TLS


@dataclass
class TlsRoute:
    """How the HTTPS client reaches the upstream through one proxy instance."""

    port: int | None     # proxy port; None = straight to the upstream
    pid: int | None      # the process whose CPU counts
    connect_host: str    # CONNECT host (a name pinned with --resolve, or the IP literal)
    sni: str             # TLS server name and Host header
    cafile: Path         # what the client trusts: the test CA, or the proxy's CA


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.tmp = Path(tempfile.mkdtemp(prefix="egresslock-bench-"))
        if os.geteuid() == 0:  # squid and tinyproxy drop root: let their users reach their dirs
            os.chmod(self.tmp, 0o755)  # noqa: S103 (read-only for others, as /tmp itself)
        self.procs: list[subprocess.Popen[Any]] = []
        self.upstream_http = 0
        self.upstream_tunnel = 0
        self.upstream_tls = 0                 # HTTPS upstream port (0: no HTTPS tests)
        self.test_ca: Path | None = None      # the CA that signed the HTTPS upstream's cert
        self.http_server = ""
        self.wrk = find_tool("wrk")
        self.results: dict[str, dict[str, Any]] = {n: {} for n in TARGET_NAMES}
        self.direct_tunnels: list[float] = []  # the latency test's direct tunnels, all phases
        self.targets: dict[str, Target] = {}
        self.load_before = _loadavg()
        self.time_wait_before = _time_wait()
        self.cpu0 = (_busy_seconds(), _own_cpu_seconds(), time.monotonic())
        self.foreign = ""

    # ---- lifecycle ---------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    def spawn(self, argv: list[str], name: str, stdout: Any = None,
              **kw: Any) -> subprocess.Popen[Any]:
        logf = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 (closed with the temp dir)
        proc = subprocess.Popen(argv, stdin=kw.pop("stdin", subprocess.DEVNULL),
                                stdout=stdout if stdout is not None else logf, stderr=logf,
                                cwd=str(self.tmp), **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc)
        busy0, own0, wall0 = self.cpu0
        busy, own, wall = _busy_seconds() - busy0, _own_cpu_seconds() - own0, \
            time.monotonic() - wall0
        if busy > 0:
            self.foreign = (f"{max(0.0, busy - own):.1f} CPU-s of other processes during the "
                            f"{wall:.0f} s run ({max(0.0, busy - own) / wall * 100:.0f}% of one "
                            "core; approximate)")
        if self.args.keep:
            self.log(f"kept {self.tmp} (configs and logs)")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- upstream ----------------------------------------------------------------------------

    def start_upstream(self) -> None:
        nginx = find_tool("nginx")
        use_nginx = nginx is not None and not self.args.python_upstream
        tls_args: list[str] = []
        leaf = key = None
        if self.args.https:
            self.test_ca, leaf, key = make_test_ca(self.tmp / "test-ca",
                                                   [TLS_TUNNEL_HOST, TLS_INSPECT_HOST])
            if not use_nginx:
                tls_args = ["--tls-cert", str(leaf), "--tls-key", str(key)]
        proc = self.spawn([sys.executable, str(Path(__file__).resolve()), "_upstream",
                           *([] if use_nginx else ["--http", *tls_args])], "upstream",
                          stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        ports = json.loads(read_line(proc, 20))
        self.upstream_tunnel = ports["tunnel"]
        if use_nginx:
            assert nginx is not None
            self.upstream_http = free_port()
            d = self.tmp / "nginx"
            d.mkdir()
            body = HTTP_BODY.decode("ascii").replace('"', "'").strip()
            ssl_server = ""
            if self.args.https:
                self.upstream_tls = free_port()
                ssl_server = f"""
    server {{
        listen {LOOPBACK}:{self.upstream_tls} ssl backlog=1024;
        server_name {TLS_TUNNEL_HOST} {TLS_INSPECT_HOST};
        ssl_certificate {leaf};
        ssl_certificate_key {key};
        ssl_session_cache shared:bench:1m;
        location / {{ default_type text/plain; return 200 "{body}\\n"; }}
    }}"""
            (d / "nginx.conf").write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen {LOOPBACK}:{self.upstream_http} backlog=1024;
        location / {{ default_type text/plain; return 200 "{body}\\n"; }}
    }}{ssl_server}
}}
""")
            ng = self.spawn([nginx, "-p", str(d), "-e", str(d / "error.log"), "-c",
                             str(d / "nginx.conf")], "nginx")
            wait_port(self.upstream_http, ng)
            if self.upstream_tls:
                wait_port(self.upstream_tls, ng)
            self.http_server = tool_version([nginx, "-v"])
        else:
            self.upstream_http = ports["http"]
            self.upstream_tls = ports.get("https", 0)
            self.http_server = "Python asyncio server (nginx not installed)"
        self.log(f"upstream: HTTP {self.upstream_http} ({self.http_server}), "
                 f"HTTPS {self.upstream_tls or 'off'}, tunnel source/echo {self.upstream_tunnel}")

    # ---- proxies -----------------------------------------------------------------------------

    def start_all(self) -> None:
        self.targets["direct"] = Target("direct", version=self.http_server)
        if self.upstream_tls and self.test_ca:
            self.targets["direct"].tls_tunnel = TlsRoute(None, None, LOOPBACK, TLS_TUNNEL_HOST,
                                                         self.test_ca)
        for name, start in (("egresslock", self.start_egresslock), ("squid", self.start_squid),
                            ("tinyproxy", self.start_tinyproxy),
                            ("mitmproxy", self.start_mitmproxy)):
            if name not in self.args.only:
                self.targets[name] = Target(name, missing="skipped")
                continue
            try:
                self.targets[name] = start()
            except Exception as exc:  # one proxy failing to start must not end the run
                self.log(f"{name} failed to start: {exc}")
                self.targets[name] = Target(name, missing=f"failed to start: {exc}")
            t = self.targets[name]
            self.log(f"{name}: " + (t.missing or f"port {t.port}, tunnel port {t.tunnel_port}"))

    def start_egresslock(self) -> Target:
        exe = ROOT / ".venv" / "bin" / "egresslock"
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "egresslock"]
        d = self.tmp / "egresslock"
        d.mkdir()
        (d / "policy.yaml").write_text(f"""version: 1
network: {{allow_ranges: ["{LOOPBACK}/32"]}}
rules:
  - {{id: bench, host: {LOOPBACK}, ports: [{self.upstream_http}, {self.upstream_tunnel}]}}
""")
        proc = self.spawn([*argv, "proxy", "-p", str(d / "policy.yaml"), "--listen",
                           f"{LOOPBACK}:0", "--audit", str(d / "audit.db")],
                          "egresslock", stdout=subprocess.PIPE)
        line = read_line(proc, 30)
        if not line.startswith("listening on "):
            raise RuntimeError(f"unexpected first line {line!r}")
        port = int(line.rsplit(":", 1)[1])
        version = tool_version([*argv, "--version"])
        t = Target("egresslock", port, port, [proc], proc.pid, proc.pid, version=version,
                   notes=["audit log on (SQLite, one row per request/tunnel)"])
        if self.upstream_tls and self.test_ca:
            try:
                self.start_egresslock_tls(argv, t)
            except Exception as exc:  # the HTTPS rows say so; the rest still runs
                self.log(f"egresslock (HTTPS instance) failed to start: {exc}")
                self.results["egresslock"]["https_tunnel_error"] = f"failed to start: {exc}"
                self.results["egresslock"]["https_inspect_error"] = f"failed to start: {exc}"
        return t

    def start_egresslock_tls(self, argv: list[str], t: Target) -> None:
        """A second egresslock for HTTPS, with its own CA: one host-only and one inspected rule.

        Its own process, so the HTTP and tunnel numbers above come from the same one-rule policy
        as before, and its CPU time is only the HTTPS work.
        """
        assert self.test_ca is not None
        d = self.tmp / "egresslock-tls"
        d.mkdir()
        ca_dir = d / "ca"
        out = subprocess.run([*argv, "ca", "init", "--dir", str(ca_dir)], capture_output=True,
                             text=True, timeout=60, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"ca init: {_one_line(out.stderr or out.stdout)}")
        port = self.upstream_tls
        (d / "policy.yaml").write_text(f"""version: 1
network: {{allow_ranges: ["{LOOPBACK}/32"]}}
rules:
  - {{id: tls-tunnel, host: {TLS_TUNNEL_HOST}, ports: [{port}]}}
  - {{id: tls-inspect, host: {TLS_INSPECT_HOST}, ports: [{port}], methods: [GET],
     paths: ["/**"], inspect: true}}
""")
        env = {**os.environ, "EGRESSLOCK_CA_DIR": str(ca_dir)}
        proc = self.spawn([*argv, "proxy", "-p", str(d / "policy.yaml"), "--listen",
                           f"{LOOPBACK}:0", "--audit", str(d / "audit.db"),
                           "--resolve", f"{TLS_TUNNEL_HOST}:{LOOPBACK}",
                           "--resolve", f"{TLS_INSPECT_HOST}:{LOOPBACK}",
                           "--upstream-ca", str(self.test_ca)],
                          "egresslock-tls", stdout=subprocess.PIPE, env=env)
        line = read_line(proc, 30)
        if not line.startswith("listening on "):
            raise RuntimeError(f"unexpected first line {line!r}")
        tls_port = int(line.rsplit(":", 1)[1])
        t.procs.append(proc)
        t.tls_tunnel = TlsRoute(tls_port, proc.pid, TLS_TUNNEL_HOST, TLS_TUNNEL_HOST,
                                self.test_ca)
        t.tls_inspect = TlsRoute(tls_port, proc.pid, TLS_INSPECT_HOST, TLS_INSPECT_HOST,
                                 ca_dir / "ca.pem")
        t.notes.append("HTTPS: a second instance (audit log on, names pinned with --resolve), "
                       f"rule `{TLS_TUNNEL_HOST}` host-only, rule `{TLS_INSPECT_HOST}` "
                       "`inspect: true` with methods [GET], paths [\"/**\"]")

    def start_squid(self) -> Target:
        squid = find_tool("squid")
        if squid is None:
            return Target("squid", missing="not installed")
        d = self.tmp / "squid"
        d.mkdir()
        port = free_port()
        h, t = self.upstream_http, self.upstream_tunnel
        tls = f" {self.upstream_tls}" if self.upstream_tls else ""
        (d / "squid.conf").write_text(f"""
http_port {LOOPBACK}:{port}
visible_hostname egresslock-bench
pid_filename {d}/squid.pid
cache_log {d}/cache.log
access_log stdio:{d}/access.log
coredump_dir {d}
netdb_filename none
pinger_enable off
logfile_rotate 0
shutdown_lifetime 0 seconds
max_filedescriptors 8192
cache deny all
cache_mem 8 MB
# Allowlist: only the bench upstream (an IP literal, so `dst`; a name would be `dstdomain`),
# only its two ports, CONNECT only to the tunnel port.
acl bench_dst dst {LOOPBACK}/32
acl bench_ports port {h} {t}{tls}
acl tunnel_port port {t}{tls}
acl CONNECT method CONNECT
http_access deny CONNECT !tunnel_port
http_access allow bench_dst bench_ports
http_access deny all
""")
        if os.geteuid() == 0:  # squid drops root to cache_effective_user (Debian: proxy)
            with contextlib.suppress(KeyError, OSError):
                import pwd

                pw = pwd.getpwnam("proxy")
                os.chown(d, pw.pw_uid, pw.pw_gid)
        proc = self.spawn([squid, "-N", "-f", str(d / "squid.conf")], "squid")
        wait_port(port, proc, 30, self.tmp / "squid.log")
        return Target("squid", port, port, [proc], proc.pid, proc.pid,
                      version=tool_version([squid, "-v"]),
                      notes=["no cache (cache deny all), access log on"],
                      tls_tunnel=self._ip_route(port, proc.pid))

    def _ip_route(self, port: int, pid: int) -> TlsRoute | None:
        """HTTPS through a plain CONNECT tunnel to the upstream's IP literal."""
        if not (self.upstream_tls and self.test_ca):
            return None
        return TlsRoute(port, pid, LOOPBACK, TLS_TUNNEL_HOST, self.test_ca)

    def start_tinyproxy(self) -> Target:
        tp = find_tool("tinyproxy")
        if tp is None:
            return Target("tinyproxy", missing="not installed")
        d = self.tmp / "tinyproxy"
        d.mkdir()
        port = free_port()
        (d / "filter").write_text(f"^{LOOPBACK.replace('.', chr(92) + '.')}$\n")
        user = ""
        if os.geteuid() == 0:  # tinyproxy drops root to User/Group
            user = "User nobody\nGroup nogroup\n"
            with contextlib.suppress(KeyError, OSError):
                import grp
                import pwd

                os.chown(d, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
        (d / "tinyproxy.conf").write_text(f"""{user}Port {port}
Listen {LOOPBACK}
Timeout 600
LogFile "{d}/tinyproxy.log"
LogLevel Connect
PidFile "{d}/tinyproxy.pid"
MaxClients 1024
Allow {LOOPBACK}
ConnectPort {self.upstream_tunnel}
{f"ConnectPort {self.upstream_tls}" if self.upstream_tls else ""}
Filter "{d}/filter"
FilterType ere
FilterDefaultDeny Yes
DisableViaHeader Yes
""")
        proc = self.spawn([tp, "-d", "-c", str(d / "tinyproxy.conf")], "tinyproxy")
        wait_port(port, proc, 30, self.tmp / "tinyproxy.log")
        return Target("tinyproxy", port, port, [proc], proc.pid, proc.pid,
                      version=tool_version([tp, "-v"]),
                      notes=["filter allowlist on, connection log on"],
                      tls_tunnel=self._ip_route(port, proc.pid))

    def start_mitmproxy(self) -> Target:
        md = find_tool("mitmdump", HERE / ".venv-mitm" / "bin" / "mitmdump")
        if md is None:
            return Target("mitmproxy", missing="not installed")
        d = self.tmp / "mitmproxy"
        d.mkdir()
        common = ["--mode", "regular", "--listen-host", LOOPBACK, "--set",
                  "connection_strategy=lazy", "--set", "termlog_verbosity=error",
                  "--set", "flow_detail=0", "-q"]
        # One confdir each: two instances creating the same CA files at once can fail.
        (d / "http").mkdir()
        (d / "tunnel").mkdir()
        http_port, tun_port = free_port(), free_port()
        p1 = self.spawn([md, *common, "--set", f"confdir={d / 'http'}",
                         "--listen-port", str(http_port)], "mitmdump-http")
        p2 = self.spawn([md, *common, "--set", f"confdir={d / 'tunnel'}",
                         "--listen-port", str(tun_port), "--ignore-hosts", ".*"],
                        "mitmdump-tunnel")
        p3 = None
        if self.upstream_tls and self.test_ca:
            # A third one intercepts HTTPS: its CA (made in its confdir) is what the client
            # trusts, and it verifies the upstream against the bench's test CA.
            (d / "inspect").mkdir()
            inspect_port = free_port()
            p3 = self.spawn([md, *common, "--set", f"confdir={d / 'inspect'}",
                             "--set", f"ssl_verify_upstream_trusted_ca={self.test_ca}",
                             "--listen-port", str(inspect_port)], "mitmdump-inspect")
        wait_port(http_port, p1, 60, self.tmp / "mitmdump-http.log")
        wait_port(tun_port, p2, 60, self.tmp / "mitmdump-tunnel.log")
        t = Target("mitmproxy", http_port, tun_port, [p1, p2], p1.pid, p2.pid,
                   version=tool_version([md, "--version"]),
                   notes=["tunnels through a second mitmdump with --ignore-hosts '.*' "
                          "(passthrough, no interception)"],
                   tls_tunnel=self._ip_route(tun_port, p2.pid))
        if p3 is not None:
            t.procs.append(p3)
            try:
                wait_port(inspect_port, p3, 60, self.tmp / "mitmdump-inspect.log")
                ca = d / "inspect" / "mitmproxy-ca-cert.pem"
                deadline = time.monotonic() + 10
                while not ca.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                if not ca.exists():
                    raise RuntimeError(f"{ca.name} not created")
                t.tls_inspect = TlsRoute(inspect_port, p3.pid, LOOPBACK, TLS_INSPECT_HOST, ca)
                t.notes.append("HTTPS interception: a third mitmdump (own confdir; client trusts "
                               "its mitmproxy-ca-cert.pem; ssl_verify_upstream_trusted_ca = the "
                               "bench's test CA)")
            except Exception as exc:  # the inspected row says so; the rest still runs
                self.log(f"mitmproxy (intercepting instance) failed to start: {exc}")
                self.results["mitmproxy"]["https_inspect_error"] = f"failed to start: {exc}"
        return t

    # ---- measurements ------------------------------------------------------------------------

    def run_wrk(self, t: Target, seconds: float) -> dict[str, Any]:
        assert self.wrk is not None
        seconds = max(1, round(seconds))  # wrk takes whole seconds
        script = self.tmp / f"wrk-{t.name}.lua"
        authority = f"{LOOPBACK}:{self.upstream_http}"
        path = "/" if t.port is None else f"http://{authority}/"
        script.write_text(f"""
wrk.method = "GET"
wrk.path = "{path}"
wrk.headers["Host"] = "{authority}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%f}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
""")
        url = f"http://{LOOPBACK}:{t.port or self.upstream_http}/"
        conns = self.args.connections
        argv = [self.wrk, "-t1", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "5s",
                "-s", str(script), url]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                             check=False, cwd=str(self.tmp))
        for line in out.stdout.splitlines():
            if line.startswith("BENCHJSON "):
                r: dict[str, Any] = json.loads(line[len("BENCHJSON "):])
                r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
                r["errors"] = r["connect"] + r["read"] + r["write"] + r["status"] + r["timeout"]
                return r
        raise RuntimeError(f"wrk printed no result: {_one_line(out.stderr or out.stdout)}")

    def client(self, mode: str, t: Target | None, *extra: str, timeout: float) -> dict[str, Any]:
        """Run this file as the ``mode`` client (through ``t``'s tunnel port when given)."""
        argv = [sys.executable, str(Path(__file__).resolve()), mode,
                "--target", f"{LOOPBACK}:{self.upstream_tunnel}", "--timeout", f"{timeout:g}"]
        if t is not None and t.tunnel_port is not None:
            argv += ["--proxy", f"{LOOPBACK}:{t.tunnel_port}"]
        out = subprocess.run(argv + list(extra), capture_output=True, text=True,
                             timeout=timeout + 30, check=False)
        if out.returncode != 0:
            tail = out.stderr.strip().splitlines()[-1:] or [f"exit {out.returncode}"]
            raise RuntimeError(tail[0])
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result

    def measure_http(self, t: Target) -> None:
        res = self.results[t.name]
        if self.wrk is None:
            res["http_error"] = "wrk not installed"
            return
        seconds = self.args.duration
        self.run_wrk(t, 1)  # warm up connection pools and caches
        pid = t.http_pid
        cpu0 = tree_cpu_seconds(pid) if pid else 0.0
        r = self.run_wrk(t, seconds)
        cpu1 = tree_cpu_seconds(pid) if pid else 0.0
        res["http"] = r
        if pid and r["requests"]:
            res["http"]["cpu_us_per_req"] = (cpu1 - cpu0) / r["requests"] * 1e6
        self.log(f"{t.name}: HTTP {r['rps']:.0f} req/s, p50 {r['p50_us'] / 1000:.2f} ms, "
                 f"p99 {r['p99_us'] / 1000:.2f} ms, errors {r['errors']}")

    def measure_throughput(self, t: Target) -> None:
        res = self.results[t.name]
        nbytes = self.args.tunnel_mib * MIB
        timeout = max(60.0, nbytes / (20 * MIB))  # at worst 20 MB/s, then give up
        self.client("_throughput", t, "--bytes", str(16 * MIB), timeout=30)  # warm-up
        pid = t.tunnel_pid
        cpu0 = tree_cpu_seconds(pid) if pid else 0.0
        r = self.client("_throughput", t, "--bytes", str(nbytes), timeout=timeout)
        cpu1 = tree_cpu_seconds(pid) if pid else 0.0
        if r["bytes"] < nbytes:
            raise RuntimeError(f"tunnel ended after {r['bytes']} of {nbytes} bytes")
        r["mb_s"] = r["bytes"] / r["seconds"] / 1e6
        if pid:
            r["cpu_s"] = cpu1 - cpu0
            r["cpu_s_per_gib"] = (cpu1 - cpu0) * GIB / r["bytes"]
        res["tunnel"] = r
        self.log(f"{t.name}: tunnel {r['mb_s']:.0f} MB/s"
                 + (f", {r['cpu_s_per_gib']:.3f} CPU-s/GiB" if pid else ""))

    def measure_latency(self, t: Target) -> None:
        """New-tunnel latency of one proxy, its tunnels interleaved with direct ones (see
        ``latency_main``): the baseline is taken under the same machine state, and no other
        proxy is busy meanwhile. The direct column pools the direct tunnels of every phase."""
        if t.tunnel_port is None:
            return  # measured alongside each proxy
        n = self.args.tunnels
        r = self.client("_latency", None, "--count", str(n), "--warmup",
                        str(min(50, n // 5 + 1)), "--block", str(LATENCY_BLOCK),
                        "--route", "direct", "--route", f"{t.name}={LOOPBACK}:{t.tunnel_port}",
                        timeout=max(60.0, n * 0.1))
        if r["errors"]:
            raise RuntimeError("; ".join(f"{k}: {v}" for k, v in r["errors"].items()))
        s, d = sorted(r["samples_us"][t.name]), sorted(r["samples_us"]["direct"])
        if not s or not d:
            raise RuntimeError("no tunnel completed")
        self.direct_tunnels += d
        self.results[t.name]["latency"] = {
            "count": len(s), "p50_us": _pct(s, 50), "p99_us": _pct(s, 99),
            "mean_us": statistics.fmean(s),
            "added_p50_us": _pct(s, 50) - _pct(d, 50), "added_p99_us": _pct(s, 99) - _pct(d, 99),
            "direct_p50_us": _pct(d, 50)}
        self.log(f"{t.name}: new tunnel p50 {_pct(s, 50):.0f} µs, p99 {_pct(s, 99):.0f} µs "
                 f"({len(s)} tunnels; direct alongside: p50 {_pct(d, 50):.0f} µs)")

    def measure_https(self, t: Target, phase: str) -> None:
        """Keep-alive GETs over HTTPS by the ``_https`` client; the proxy's CPU in its window."""
        route = t.tls_tunnel if phase == "https_tunnel" else t.tls_inspect
        if route is None:
            return
        seconds = self.args.duration
        argv = [sys.executable, str(Path(__file__).resolve()), "_https",
                "--target", f"{route.connect_host}:{self.upstream_tls}", "--sni", route.sni,
                "--cafile", str(route.cafile), "--connections", str(self.args.https_connections),
                "--warmup-s", "1", "--duration", f"{seconds:g}", "--timeout", "30"]
        if route.port is not None:
            argv += ["--proxy", f"{LOOPBACK}:{route.port}"]
        errlog = open(self.tmp / f"https-{t.name}-{phase}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=errlog)
        self.procs.append(proc)
        lines = _Lines(proc)
        cpu0 = cpu1 = 0.0
        try:
            if lines.next(60) != "START":
                raise RuntimeError("client did not start")
            cpu0 = tree_cpu_seconds(route.pid) if route.pid else 0.0
            if lines.next(seconds + 30) != "STOP":
                raise RuntimeError("client did not stop")
            cpu1 = tree_cpu_seconds(route.pid) if route.pid else 0.0
            r: dict[str, Any] = json.loads(lines.next(40))
            proc.wait(10)
        except Exception as exc:
            stop_process(proc)
            errlog.close()
            tail = (self.tmp / f"https-{t.name}-{phase}.log").read_text(
                errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"{exc}{': ' + tail[0] if tail else ''}") from exc
        errlog.close()
        if proc.stdout is not None:
            proc.stdout.close()
        if not r["requests"]:
            raise RuntimeError(f"no response: {r.get('first_error') or 'no connection'}")
        if route.pid:
            r["cpu_us_per_req"] = (cpu1 - cpu0) / r["requests"] * 1e6
        self.results[t.name][phase] = r
        what = "HTTPS tunnel" if phase == "https_tunnel" else "HTTPS inspected"
        self.log(f"{t.name}: {what} {r['rps']:.0f} req/s, p50 {r['p50_us'] / 1000:.2f} ms, "
                 f"p99 {r['p99_us'] / 1000:.2f} ms, errors {r['errors']}"
                 + (f" (first: {r['first_error']})" if r["first_error"] else "")
                 + (f", {r['cpu_us_per_req']:.0f} µs CPU/req" if route.pid else ""))

    def measure_https_tunnel(self, t: Target) -> None:
        self.measure_https(t, "https_tunnel")

    def measure_https_inspect(self, t: Target) -> None:
        self.measure_https(t, "https_inspect")

    def run(self) -> None:
        self.start_upstream()
        self.start_all()
        phases = (("http", self.measure_http), ("tunnel", self.measure_throughput),
                  ("latency", self.measure_latency),
                  ("https_tunnel", self.measure_https_tunnel),
                  ("https_inspect", self.measure_https_inspect))
        for phase, fn in phases:
            for name in TARGET_NAMES:
                t = self.targets[name]
                if t.missing or f"{phase}_error" in self.results[name]:
                    continue
                try:
                    fn(t)
                except Exception as exc:  # one failed measurement must not end the run
                    self.log(f"{name}: {phase} failed: {exc}")
                    self.results[name][f"{phase}_error"] = str(exc)[:200]
        d = sorted(self.direct_tunnels)
        if d:
            self.results["direct"]["latency"] = {"count": len(d), "p50_us": _pct(d, 50),
                                                 "p99_us": _pct(d, 99),
                                                 "mean_us": statistics.fmean(d)}


class _Lines:
    """stdout lines of a child, each awaited with a timeout (no line is lost between calls)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.buf = b""

    def next(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.fd, selectors.EVENT_READ)
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise RuntimeError(f"no output within {timeout:g}s")
                data = os.read(self.fd, 65536)
                if not data:
                    raise RuntimeError(f"client exited ({self.proc.wait(5)})")
                self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode("utf-8", "replace").strip()


def _time_wait() -> int:
    """Sockets in TIME-WAIT (state 06) in /proc/net/tcp and tcp6."""
    n = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            n += sum(1 for line in Path(name).read_text().splitlines()[1:]
                     if line.split()[3:4] == ["06"])
    return n


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent in user and system mode (not interrupts)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0
    user, nice, system = (int(x) for x in fields[1:4])
    return (user + nice + system) / _TICK


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (every process the bench ran)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def _pct(sorted_values: Sequence[float], p: float) -> float:
    k = (len(sorted_values) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def _one_line(text: str) -> str:
    return " ".join(text.replace("|", "/").split())[:120]


def _get(res: dict[str, Any], *keys: str) -> Any:
    cur: Any = res
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def build_table(bench: Bench) -> tuple[str, dict[str, str]]:
    res = bench.results
    names = list(TARGET_NAMES)

    def cell(name: str, phase: str, *keys: str, fmt: str = "{:.0f}", scale: float = 1.0,
             proxy_only: bool = False) -> str:
        t = bench.targets.get(name)
        if t is not None and t.missing:
            return t.missing
        if proxy_only and name == "direct":
            return "—"
        v = _get(res[name], phase, *keys)
        if v is None:
            err = res[name].get(f"{phase}_error") or (
                None if phase.startswith("https") else res[name].get("http_error"))
            if err is None and phase == "https_inspect" and name != "direct" \
                    and t is not None and t.tls_inspect is None and keys == ("rps",):
                return "no interception set up"
            return f"error: {_one_line(err)}" if err else "—"
        text = fmt.format(v * scale)
        if phase == "http" and keys == ("rps",) and _get(res[name], "http", "errors"):
            h = res[name]["http"]
            kinds = ", ".join(f"{h[k]} {k}" for k in ("connect", "read", "write", "status",
                                                        "timeout") if h.get(k))
            text += f" (errors: {kinds})"
        if phase.startswith("https") and keys == ("rps",) and _get(res[name], phase, "errors"):
            h = res[name][phase]
            kinds = ", ".join(f"{n} {k}" for k, n in h["error_kinds"].items())
            text += f" (errors: {kinds}; first: {_one_line(h['first_error'] or '')[:60]})"
        return text

    def val(name: str, phase: str, *keys: str) -> float | None:
        t = bench.targets.get(name)
        if t is None or t.missing:
            return None
        v = _get(res[name], phase, *keys)
        return float(v) if v is not None else None

    verdicts: dict[str, str] = {}
    el = bench.targets.get("egresslock")
    if el is not None and el.missing:
        na = f"n/a (egresslock {el.missing})"
        return _render(bench, names, cell, {"rps": na, "cpu": na, "lat": na, "tls": na})
    el_rps, sq_rps, mi_rps = (val(n, "http", "rps") for n in ("egresslock", "squid", "mitmproxy"))
    if el_rps is None:
        verdicts["rps"] = "MISS (egresslock not measured)"
    else:
        parts, ok = [], True
        if sq_rps is None:
            parts.append("Squid n/a")
        else:
            ok &= el_rps >= sq_rps
            parts.append(f"{el_rps / sq_rps:.2f}× Squid")
        if mi_rps is None:
            parts.append("mitmproxy n/a")
        else:
            ok &= el_rps >= 5 * mi_rps
            parts.append(f"{el_rps / mi_rps:.1f}× mitmproxy")
        word = ("PASS" if ok else "MISS") if (sq_rps, mi_rps) != (None, None) else "n/a"
        verdicts["rps"] = word + " (" + ", ".join(parts) + ")"
    el_cpu, sq_cpu = val("egresslock", "tunnel", "cpu_s_per_gib"), val("squid", "tunnel",
                                                                        "cpu_s_per_gib")
    if el_cpu is None:
        verdicts["cpu"] = "MISS (egresslock not measured)"
    elif sq_cpu is None:
        verdicts["cpu"] = "n/a (Squid not measured)"
    else:
        ratio = f"{el_cpu / sq_cpu:.2f}× Squid" if sq_cpu > 0 else "Squid 0"
        verdicts["cpu"] = ("PASS" if el_cpu <= sq_cpu else "MISS") + f" ({ratio})"
    el_add = val("egresslock", "latency", "added_p50_us")
    if el_add is None:
        verdicts["lat"] = "MISS (not measured)"
    else:
        verdicts["lat"] = ("PASS" if el_add < 250 else "MISS") + f" ({el_add:.0f} µs)"
    el_tls, mi_tls = (val(n, "https_inspect", "rps") for n in ("egresslock", "mitmproxy"))
    if not bench.args.https:
        verdicts["tls"] = "n/a (--no-https)"
    elif el_tls is None:
        verdicts["tls"] = "MISS (egresslock not measured)"
    elif not mi_tls:
        verdicts["tls"] = "n/a (mitmproxy not measured)"
    else:
        verdicts["tls"] = ("PASS" if el_tls >= 3 * mi_tls else "MISS") + \
            f" ({el_tls / mi_tls:.1f}× mitmproxy)"

    return _render(bench, names, cell, verdicts)


def _render(bench: Bench, names: list[str], cell: Any, verdicts: dict[str, str]
            ) -> tuple[str, dict[str, str]]:
    a = bench.args
    res = bench.results
    size = f"{a.tunnel_mib} MiB" if a.tunnel_mib < 1024 else f"{a.tunnel_mib / 1024:g} GiB"
    rows: list[tuple[str, list[str], str, str]] = [
        (f"HTTP keep-alive GET, req/s (wrk -t1 -c{a.connections} -d{a.duration:g}s)",
         [cell(n, "http", "rps") for n in names], "egresslock ≥ Squid and ≥ 5× mitmproxy",
         verdicts["rps"]),
        ("HTTP latency p50, ms", [cell(n, "http", "p50_us", fmt="{:.2f}", scale=1e-3)
                                  for n in names], "", ""),
        ("HTTP latency p99, ms", [cell(n, "http", "p99_us", fmt="{:.2f}", scale=1e-3)
                                  for n in names], "", ""),
        ("proxy CPU per HTTP request, µs", [cell(n, "http", "cpu_us_per_req", fmt="{:.1f}",
                                                 proxy_only=True) for n in names], "", ""),
        (f"CONNECT tunnel, {size} upstream→client, MB/s",
         [cell(n, "tunnel", "mb_s") for n in names], "", ""),
        ("proxy CPU-seconds per GiB tunnelled",
         [cell(n, "tunnel", "cpu_s_per_gib", fmt="{:.3f}", proxy_only=True) for n in names],
         "egresslock ≤ Squid", verdicts["cpu"]),
        (f"new tunnel + 1 echo, p50 µs ({a.tunnels} per proxy, interleaved with direct)",
         [cell(n, "latency", "p50_us") for n in names], "", ""),
        ("new tunnel + 1 echo, p99 µs", [cell(n, "latency", "p99_us") for n in names], "", ""),
        ("added new-tunnel latency p50, µs (vs the direct tunnels alongside)",
         [cell(n, "latency", "added_p50_us", proxy_only=True) for n in names],
         "egresslock < 250 µs", verdicts["lat"]),
        ("added new-tunnel latency p99, µs (vs the direct tunnels alongside)",
         [cell(n, "latency", "added_p99_us", proxy_only=True) for n in names], "", ""),
    ]
    if a.https:
        c = a.https_connections
        rows += [
            (f"HTTPS keep-alive GET via CONNECT tunnel, not inspected, req/s (c{c}, "
             f"{a.duration:g}s)", [cell(n, "https_tunnel", "rps") for n in names], "", ""),
            ("HTTPS tunnel latency p50, ms", [cell(n, "https_tunnel", "p50_us", fmt="{:.2f}",
                                                   scale=1e-3) for n in names], "", ""),
            ("HTTPS tunnel latency p99, ms", [cell(n, "https_tunnel", "p99_us", fmt="{:.2f}",
                                                   scale=1e-3) for n in names], "", ""),
            ("proxy CPU per HTTPS request (tunnel), µs",
             [cell(n, "https_tunnel", "cpu_us_per_req", fmt="{:.1f}", proxy_only=True)
              for n in names], "", ""),
            (f"HTTPS keep-alive GET, TLS intercepted (inspected), req/s (c{c}, "
             f"{a.duration:g}s)", [cell(n, "https_inspect", "rps", proxy_only=True)
                                   for n in names],
             "egresslock ≥ 3× mitmproxy", verdicts["tls"]),
            ("HTTPS inspected latency p50, ms",
             [cell(n, "https_inspect", "p50_us", fmt="{:.2f}", scale=1e-3, proxy_only=True)
              for n in names], "", ""),
            ("HTTPS inspected latency p99, ms",
             [cell(n, "https_inspect", "p99_us", fmt="{:.2f}", scale=1e-3, proxy_only=True)
              for n in names], "", ""),
            ("proxy CPU per HTTPS request (inspected), µs",
             [cell(n, "https_inspect", "cpu_us_per_req", fmt="{:.1f}", proxy_only=True)
              for n in names], "", ""),
        ]
    header = ["metric", *(TITLES[n] for n in names), "target", "PASS/MISS"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([m, *cells, tgt, v]) + " |" for m, cells, tgt, v in rows]
    notes = []
    for n in names:
        t = bench.targets.get(n)
        if t is None:
            continue
        desc = t.missing or t.version
        if t.notes and not t.missing:
            desc += "; " + "; ".join(t.notes)
        h = _get(res[n], "http")
        if h and h.get("read") and h["read"] == h["errors"]:
            desc += ("; HTTP read errors: the proxy closed the client connection after "
                     "responses (no keep-alive), and wrk reconnected")
        notes.append(f"- {TITLES[n]}: {desc}")
    notes.append(f"- upstream: HTTP {bench.http_server}, {len(HTTP_BODY)}-byte body; tunnels to a "
                 "Python (uvloop) source/echo server; load: wrk (absolute-form requests through "
                 "the proxies) and separate Python client processes")
    if a.https and bench.upstream_tls:
        notes.append("- HTTPS: the same upstream over TLS (certificate from a test CA made by the "
                     "bench, names "
                     f"{TLS_TUNNEL_HOST} and {TLS_INSPECT_HOST}); load: one Python (uvloop) "
                     f"client process, {a.https_connections} connections, each CONNECT + TLS "
                     "then keep-alive GETs, 1 s warm-up; the direct column is bound by that "
                     "client's CPU. egresslock CONNECTs by name (pinned with --resolve), the "
                     "others by the IP literal with the same SNI")
    notes.append(f"- machine: {os.cpu_count()} CPUs, {platform.platform()}, "
                 f"Python {platform.python_version()}; load average before/after the run: "
                 f"{bench.load_before} / {_loadavg()} (other work on the machine skews results)")
    if bench.foreign:
        notes.append(f"- interference: {bench.foreign}")
    if bench.time_wait_before > 2000:
        notes.append(f"- {bench.time_wait_before} loopback sockets were in TIME-WAIT at the start "
                     "(an earlier run?): proxies that close connections (tinyproxy) measure "
                     "lower; wait a minute between runs")
    return "\n".join(lines) + "\n\n" + "\n".join(notes), verdicts


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _addr(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("_upstream", "_throughput", "_latency", "_https"):
        return internal_main(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 128 MiB tunnel, 2 s of HTTP load, 100 tunnels")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--duration", type=float, help="seconds of HTTP load per target "
                   "(default 10, quick 2)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--tunnel-mib", type=int, help="MiB through the tunnel (default 1024, "
                   "quick 128)")
    p.add_argument("--tunnels", type=int, help="sequential tunnels for the latency test "
                   "(default 500, quick 100)")
    p.add_argument("--only", default=",".join(TARGET_NAMES[1:]),
                   help="comma-separated proxies to run (default: all)")
    p.add_argument("--python-upstream", action="store_true",
                   help="serve HTTP from the Python upstream even if nginx is installed")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--https-connections", type=int, default=32,
                   help="connections of the HTTPS client (default 32)")
    p.add_argument("--no-https", dest="https", action="store_false",
                   help="skip the HTTPS rows (tunnelled and inspected)")
    args = p.parse_args(argv)
    args.duration = args.duration or (2.0 if args.quick else 10.0)
    args.tunnel_mib = args.tunnel_mib or (128 if args.quick else 1024)
    args.tunnels = args.tunnels or (100 if args.quick else 500)
    args.only = {s.strip() for s in args.only.split(",") if s.strip()}
    args.duration = float(min(max(round(args.duration), 1), 120))
    args.tunnel_mib = min(max(args.tunnel_mib, 1), 16 * 1024)
    args.tunnels = min(max(args.tunnels, 1), 20000)
    args.https_connections = min(max(args.https_connections, 1), 256)

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    bench = Bench(args)
    t0 = time.monotonic()
    try:
        bench.run()
    finally:
        bench.close()
    table, verdicts = build_table(bench)
    if args.json:
        out = {"results": bench.results, "verdicts": verdicts, "table": table,
               "targets": {n: {"missing": t.missing, "version": t.version, "notes": t.notes}
                           for n, t in bench.targets.items()},
               "settings": {"quick": args.quick, "duration_s": args.duration,
                            "connections": args.connections, "tunnel_mib": args.tunnel_mib,
                            "tunnels": args.tunnels, "https": args.https,
                            "https_connections": args.https_connections},
               "seconds": time.monotonic() - t0}
        print(json.dumps(out, indent=2))
    else:
        print(table)
    return 0


def internal_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode")
    p.add_argument("--http", action="store_true")
    p.add_argument("--proxy", type=_addr)
    p.add_argument("--target", type=_addr)
    p.add_argument("--bytes", type=int, default=GIB)
    p.add_argument("--count", type=int, default=500)
    p.add_argument("--block", type=int, default=LATENCY_BLOCK)
    p.add_argument("--route", action="append", default=[],
                   help="NAME=HOST:PORT of a proxy, or NAME alone for no proxy (_latency)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--sni")
    p.add_argument("--cafile")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--warmup-s", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=10.0)
    a = p.parse_args(argv)
    if a.mode == "_upstream":
        upstream_main(a.http, a.tls_cert, a.tls_key)
    elif a.mode == "_https":
        https_main(a.proxy, a.target, a.sni, a.cafile, min(max(a.connections, 1), 512),
                   min(max(a.warmup_s, 0.0), 30.0), min(max(a.duration, 0.5), 120.0),
                   min(max(a.timeout, 1.0), 120.0))
    elif a.mode == "_throughput":
        throughput_main(a.proxy, a.target, a.bytes, a.timeout)
    else:
        routes = [(name, _addr(addr) if addr else None)
                  for name, _, addr in (r.partition("=") for r in a.route)]
        latency_main(routes, a.target, a.count, a.warmup, max(a.block, 1), a.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
