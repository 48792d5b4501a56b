"""Servers the proxy tests talk to, all on loopback: an echo HTTP server, a TLS server signed
by a test CA, and a recorder that counts what reached it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import http.server
import io
import json
import socket
import socketserver
import ssl
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

if TYPE_CHECKING:
    from egresslock.proxy.server import ProxyServer


class EchoHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request with JSON describing it; a few paths do special things."""

    protocol_version = "HTTP/1.1"
    server: EchoServer

    def log_message(self, format: str, *args: object) -> None:
        return

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._body()
        self.server.seen.append((self.command, self.path, body))
        if self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path.startswith("/big"):
            size = int(self.path.split("=")[-1])
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            self.wfile.write(b"x" * size)
            return
        if self.path.startswith("/chunked"):
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for part in (b"hello ", b"chunked ", b"world"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\n\r\n")
            return
        payload = json.dumps({
            "method": self.command, "path": self.path, "body": body.decode("latin-1"),
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


class EchoServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), EchoHandler)
        self.seen: list[tuple[str, str, bytes]] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@contextmanager
def proxy_in_thread(server: ProxyServer, listener: socket.socket,
                    loop: asyncio.AbstractEventLoop | None = None
                    ) -> Iterator[asyncio.AbstractEventLoop]:
    """Serve ``listener`` with an in-process ``server`` on an event loop in its own thread
    (``loop``, or a new asyncio loop)."""
    loop = loop or asyncio.new_event_loop()
    started = threading.Event()

    def begin() -> None:
        server.serve(listener)
        started.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(begin)
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(5)
    try:
        yield loop
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


class ThreadedServer:
    """A loopback TCP server with a thread per connection; subclasses answer in ``serve``.
    It counts its connections and closes them all on ``close``."""

    def __init__(self, port: int = 0, backlog: int = 16) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(backlog)
        self.port: int = self.listener.getsockname()[1]
        self.connections = 0
        self._open: list[socket.socket] = []

    def start(self) -> ThreadedServer:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            self._open.append(conn)
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        with contextlib.suppress(OSError):  # wakes the accepting thread, which holds the socket
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for conn in self._open:
            with contextlib.suppress(OSError):
                conn.close()


@contextmanager
def echo_server() -> Iterator[EchoServer]:
    server = EchoServer()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def make_ca(directory: Path, hosts: list[str], name: str = "egresslock test CA"
            ) -> tuple[Path, Path, Path]:
    """A test CA called ``name`` and a leaf for ``hosts``: returns (ca.pem, leaf.pem, leaf.key).
    Two CAs of one name in a trust file make OpenSSL pick the wrong issuer (neither has a key
    identifier): a second CA in one test needs a name of its own."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    ca_path, leaf_path = directory / "ca.pem", directory / "leaf.pem"
    key_path = directory / "leaf.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    leaf_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ca_path, leaf_path, key_path


@contextmanager
def tls_echo_server(leaf: Path, key: Path) -> Iterator[EchoServer]:
    """The echo server behind TLS."""
    server = EchoServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class Recorder:
    """A TCP server that records every byte that reaches it, and answers nothing."""

    def __init__(self, port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind(("127.0.0.1", port))
        except OSError:
            self.sock.close()
            raise
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.settimeout(2)
            try:
                while data := conn.recv(65536):
                    self.received += data
            except OSError:
                pass
            conn.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


class StaticHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the server's directory read-only and records every request line it parsed."""

    protocol_version = "HTTP/1.1"
    server: StaticServer

    def log_message(self, format: str, *args: object) -> None:
        return

    def parse_request(self) -> bool:
        ok = super().parse_request()
        if ok:
            self.server.seen.append((self.command, self.path))
        return ok


class StaticServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: Path) -> None:
        self.root = root
        super().__init__(("127.0.0.1", 0), StaticHandler)
        self.seen: list[tuple[str, str]] = []

    def finish_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        StaticHandler(request, client_address, self, directory=str(self.root))

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@contextmanager
def tls_static_server(root: Path, leaf: Path, key: Path) -> Iterator[StaticServer]:
    """A static-file server for ``root`` behind TLS (GET and HEAD only; anything else is 501)."""
    server = StaticServer(root)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def read_head(sock: socket.socket) -> bytes:
    """What ``sock`` (plain or TLS) sends up to a blank line, and whatever came with it; short
    of one if the peer closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def exchange_raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` to 127.0.0.1:``port``, half-close, and read until the peer closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def upload_past_refusal(sock: socket.socket, head: bytes, chunks: int = 64,
                        size: int = 4096) -> tuple[bytes, OSError | None]:
    """Send ``head`` and a chunked body far over any cap, as a streaming client does: it keeps
    writing after the proxy has refused. Returns what the proxy answered and the send error."""
    sock.sendall(head)
    error: OSError | None = None
    try:
        for _ in range(chunks):
            sock.sendall(b"%x\r\n%s\r\n" % (size, b"u" * size))
        sock.sendall(b"0\r\n\r\n")
    except OSError as exc:
        error = exc
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, ssl.SSLError, OSError) as exc:
        error = error or exc
    return out, error


def make_wheel(name: str, version: str, module: str, source: str) -> bytes:
    """A minimal pure-Python wheel (PEP 427) made by hand, no build backend: one module,
    METADATA, WHEEL and a true RECORD."""
    dist_info = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": source.encode(),
        f"{dist_info}/METADATA": (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                  f"Summary: egresslock test package\n").encode(),
        f"{dist_info}/WHEEL": (b"Wheel-Version: 1.0\nGenerator: egresslock-tests\n"
                               b"Root-Is-Purelib: true\nTag: py3-none-any\n"),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path, data in files.items():
            zf.writestr(zipfile.ZipInfo(path, (2024, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()
