"""TLS inspection with real clients: methods, paths, queries and bodies enforced inside HTTPS.

The upstream is a TLS echo server signed by a test CA (``--upstream-ca``); clients trust the
egresslock CA made by ``egresslock ca init`` in a temporary directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest
import requests

from egresslock.proxy.ca import LeafMinter, init_ca
from tests.conftest import require_tool
from tests.proxy.conftest import PINS, RunningProxy, Upstreams, start_proxy
from tests.proxy.servers import make_ca, read_head, tls_echo_server, upload_past_refusal

pytestmark = pytest.mark.integration

POLICY = """\
version: 1
network: {{allow_ranges: ["127.0.0.1/32"]}}
rules:
  - id: api-read
    host: secure.test
    ports: [{tls}]
    methods: [GET, HEAD]
    paths: ["/echo/**", "/big", "/chunked"]
    query: {{params: [page, n], max_value_len: 8}}
    inspect: true
  - id: api-write
    host: secure.test
    ports: [{tls}]
    methods: [POST, PUT]
    paths: ["/upload/*"]
    max_body_bytes: 1000
    inspect: true
  - id: bad-cert
    host: badcert.test
    ports: [{bad}]
    inspect: true
"""


@pytest.fixture(scope="module")
def inspecting(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[RunningProxy, Path, int]]:
    d = tmp_path_factory.mktemp("inspect")
    ca_dir = d / "ca"
    subprocess.run([sys.executable, "-m", "egresslock", "ca", "init", "--dir", str(ca_dir)],
                   check=True, capture_output=True, timeout=60)
    # An upstream whose certificate no trusted CA signed: inspection must refuse it (502).
    _, bad_leaf, bad_key = make_ca(d, ["badcert.test"])
    with tls_echo_server(bad_leaf, bad_key) as bad:
        policy = d / "policy.yaml"
        policy.write_text(POLICY.format(tls=upstreams.tls.port, bad=bad.port))
        pins = [a for p in [*PINS, "badcert.test:127.0.0.1"] for a in ("--resolve", p)]
        os.environ["EGRESSLOCK_CA_DIR"] = str(ca_dir)
        try:
            p = start_proxy(policy, d / "audit.db", *pins, "--upstream-ca", str(upstreams.ca))
        finally:
            del os.environ["EGRESSLOCK_CA_DIR"]
        yield p, ca_dir / "ca.pem", bad.port
        p.stop()


def _curl(proxy: RunningProxy, ca: Path, port: int, *args: str) -> subprocess.CompletedProcess[str]:
    curl = require_tool("curl")
    return subprocess.run([curl, "-sS", "-i", "--cacert", str(ca), "-x", proxy.url,
                           "--resolve", f"secure.test:{port}:127.0.0.1", *args],
                          capture_output=True, text=True, timeout=30, check=False)


def test_curl_allowed_is_byte_for_byte(inspecting: tuple[RunningProxy, Path, int],
                                       upstreams: Upstreams) -> None:
    proxy, ca, _ = inspecting
    port = upstreams.tls.port
    through = _curl(proxy, ca, port, f"https://secure.test:{port}/big?n=300000")
    assert through.returncode == 0, through.stderr
    assert through.stdout.startswith("HTTP/1.1 200")
    body = through.stdout.split("\n\n", 2)[2]  # CONNECT reply, response head, body
    assert body == "x" * 300000
    chunked = _curl(proxy, ca, port, f"https://secure.test:{port}/chunked")
    assert chunked.stdout.endswith("hello chunked world")


@pytest.mark.parametrize(("what", "args", "reason"), [
    ("method", ["-X", "DELETE", "https://secure.test:{p}/echo/a"],
     "method DELETE not allowed by rule api-read (allows GET, HEAD)"),
    ("path", ["https://secure.test:{p}/admin"], "path /admin not allowed by rule api-read"),
    ("query", ["https://secure.test:{p}/echo/a?token=abc"],
     "query parameter 'token' not allowed by rule api-read"),
    ("body", ["-X", "POST", "--data-binary", "@-", "https://secure.test:{p}/upload/f"],
     "body of 2000 bytes over max_body_bytes 1000 by rule api-write"),
])
def test_curl_denied_inside_tunnel(inspecting: tuple[RunningProxy, Path, int],
                                   upstreams: Upstreams, what: str, args: list[str],
                                   reason: str) -> None:
    proxy, ca, _ = inspecting
    port = upstreams.tls.port
    before = len(upstreams.tls.seen)
    curl = require_tool("curl")
    r = subprocess.run([curl, "-sS", "-i", "--cacert", str(ca), "-x", proxy.url, "--resolve",
                        f"secure.test:{port}:127.0.0.1",
                        *[a.format(p=port) for a in args]],
                       input="b" * 2000, capture_output=True, text=True, timeout=30,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert "HTTP/1.1 403" in r.stdout, r.stdout[:300]
    assert reason in r.stdout, (what, r.stdout[:500])
    assert len(upstreams.tls.seen) == before


def test_tunnel_stays_usable_after_a_deny(inspecting: tuple[RunningProxy, Path, int],
                                          upstreams: Upstreams) -> None:
    proxy, ca, _ = inspecting
    base = f"https://secure.test:{upstreams.tls.port}"
    ctx = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(proxy=proxy.url, verify=ctx, timeout=10) as client:
        assert client.get(f"{base}/echo/1").json()["path"] == "/echo/1"
        denied = client.delete(f"{base}/echo/1")
        assert denied.status_code == 403
        assert client.get(f"{base}/echo/2").json()["path"] == "/echo/2"
        assert client.post(f"{base}/upload/x", content=b"q" * 10).json()["body"] == "q" * 10
    with requests.Session() as s:
        # verify= per request: the environment's REQUESTS_CA_BUNDLE overrides Session.verify.
        kw = {"proxies": {"https": proxy.url}, "verify": str(ca), "timeout": 10}
        assert s.get(f"{base}/echo/r", **kw).json()["path"] == "/echo/r"  # type: ignore[arg-type]
        # A streamed (chunked) upload over the cap is stopped inside the tunnel.
        r = s.put(f"{base}/upload/s", data=(b"z" * 100 for _ in range(20)), **kw)  # type: ignore[arg-type]
        assert r.status_code == 403
        assert "chunked upload stopped" in r.headers["X-Egresslock-Deny"]


def _tunnel(proxy: RunningProxy, ca: Path, port: int) -> ssl.SSLSocket:
    """A TLS connection to secure.test through an inspected CONNECT tunnel."""
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    raw.sendall(b"CONNECT secure.test:%d HTTP/1.1\r\nHost: secure.test:%d\r\n\r\n"
                % (port, port))
    reply = read_head(raw)
    assert reply.startswith(b"HTTP/1.1 200")
    return ssl.create_default_context(cafile=str(ca)).wrap_socket(raw,
                                                                  server_hostname="secure.test")


def _response(f: BinaryIO) -> tuple[int, dict[bytes, bytes], bytes]:
    """Status, headers (lower-case names) and Content-Length body of one response."""
    line = f.readline()
    assert line, "the tunnel closed"
    headers = {}
    while (h := f.readline()) not in (b"\r\n", b""):
        name, _, value = h.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(line.split()[1]), headers, f.read(int(headers.get(b"content-length", b"0")))


def test_a_denied_request_with_a_body_leaves_the_tunnel_usable(
        inspecting: tuple[RunningProxy, Path, int], upstreams: Upstreams) -> None:
    proxy, ca, _ = inspecting
    port = upstreams.tls.port
    host = b"Host: secure.test:%d\r\n" % port
    get = b"GET /echo/after HTTP/1.1\r\n" + host + b"\r\n"
    with _tunnel(proxy, ca, port) as s:
        f = s.makefile("rb")
        # POST is not allowed under /echo: refused, its 5 body bytes read and dropped.
        s.sendall(b"POST /echo/a HTTP/1.1\r\n" + host + b"Content-Length: 5\r\n\r\nhello" + get)
        status, headers, _ = _response(f)
        assert status == 403
        assert b"close" not in headers.get(b"connection", b"")
        assert _response(f)[0] == 200
        # The same with a chunked body, and the next request in the same packet.
        s.sendall(b"POST /echo/b HTTP/1.1\r\n" + host + b"Transfer-Encoding: chunked\r\n\r\n"
                  b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n" + get)
        assert _response(f)[0] == 403
        status, _, body = _response(f)
        assert status == 200
        assert json.loads(body)["path"] == "/echo/after"
        # A body past what the proxy reads to keep the tunnel: the 403 says close, and it does.
        s.sendall(b"POST /echo/c HTTP/1.1\r\n" + host + b"Content-Length: 100000\r\n\r\n")
        status, headers, _ = _response(f)
        assert status == 403
        assert headers[b"connection"] == b"close"
        assert f.read() == b""
    rows = proxy.rows()
    posts = [r for r in rows
             if r.get("method") == "POST" and str(r.get("path")).startswith("/echo/")]
    assert [(r["path"], r["verdict"]) for r in posts] == [
        ("/echo/a", "deny"), ("/echo/b", "deny"), ("/echo/c", "deny")]


def test_refusal_inside_tunnel_reaches_a_client_still_uploading(
        inspecting: tuple[RunningProxy, Path, int], upstreams: Upstreams) -> None:
    proxy, ca, _ = inspecting
    port = upstreams.tls.port
    with _tunnel(proxy, ca, port) as s:
        out, error = upload_past_refusal(s, b"PUT /upload/s HTTP/1.1\r\nHost: secure.test:%d\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n" % port)
    assert out.startswith(b"HTTP/1.1 403"), (out[:300], error)
    assert b"chunked upload stopped" in out
    assert error is None


def test_invalid_upstream_certificate_is_502(inspecting: tuple[RunningProxy, Path, int]
                                             ) -> None:
    proxy, ca, bad_port = inspecting
    curl = require_tool("curl")
    r = subprocess.run([curl, "-sS", "-i", "--cacert", str(ca), "-x", proxy.url, "--resolve",
                        f"badcert.test:{bad_port}:127.0.0.1",
                        f"https://badcert.test:{bad_port}/"],
                       capture_output=True, text=True, timeout=30, check=False)
    assert "HTTP/1.1 502" in r.stdout, r.stdout + r.stderr
    assert "certificate verification failed" in r.stdout
    assert "X-Egresslock-Deny" not in r.stdout


def test_domain_fronting_inside_tunnel_is_denied(inspecting: tuple[RunningProxy, Path, int],
                                                 upstreams: Upstreams) -> None:
    proxy, ca, _ = inspecting
    port = upstreams.tls.port
    before = len(upstreams.tls.seen)
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    s.sendall(b"CONNECT secure.test:%d HTTP/1.1\r\nHost: secure.test:%d\r\n\r\n" % (port, port))
    assert s.recv(4096).startswith(b"HTTP/1.1 200")
    tls = ssl.create_default_context(cafile=str(ca)).wrap_socket(s, server_hostname="secure.test")
    tls.sendall(b"GET /echo/a HTTP/1.1\r\nHost: other.test\r\n\r\n")
    resp = tls.recv(65536)
    assert resp.startswith(b"HTTP/1.1 403")
    assert b"Host other.test differs from CONNECT host secure.test" in resp
    tls.sendall(b"GET /echo/b HTTP/1.1\r\nHost: secure.test:%d\r\nConnection: close\r\n\r\n"
                % port)
    ok = b""
    while chunk := tls.recv(65536):
        ok += chunk
    assert ok.startswith(b"HTTP/1.1 200")
    tls.close()
    assert len(upstreams.tls.seen) == before + 1


def test_minted_leaf_for_an_uninspected_host_fails_name_constraints(tmp_path: Path) -> None:
    root = init_ca(tmp_path / "ca")
    minter = LeafMinter(root, ["secure.test"])
    client_ctx = ssl.create_default_context(cafile=str(root.cert_path))

    def handshake(host: str) -> str | None:
        a, b = socket.socketpair()
        server = minter.context(host).wrap_socket(a, server_side=True,
                                                  do_handshake_on_connect=False)
        result: list[str | None] = []

        def serve() -> None:
            with contextlib.suppress(ssl.SSLError, OSError):
                server.do_handshake()

        t = threading.Thread(target=serve)
        t.start()
        try:
            client_ctx.wrap_socket(b, server_hostname=host).close()
            result.append(None)
        except ssl.SSLCertVerificationError as exc:
            result.append(exc.verify_message)
        t.join(5)
        server.close()
        return result[0]

    assert handshake("secure.test") is None
    assert handshake("api.secure.test") is None  # a DNS constraint permits subdomains
    failure = handshake("evil.test")
    assert failure is not None
    assert "subtree" in failure.lower(), failure
    minter.close()


def test_env_prints_trust_variables(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    subprocess.run([sys.executable, "-m", "egresslock", "ca", "init", "--dir", str(ca_dir)],
                   check=True, capture_output=True, timeout=60)
    r = subprocess.run([sys.executable, "-m", "egresslock", "env", "--dir", str(ca_dir),
                        "--json", "--proxy", "http://127.0.0.1:3128"], capture_output=True,
                       text=True, timeout=60, check=True)
    variables = json.loads(r.stdout)
    bundle = str(ca_dir / "bundle.pem")
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT",
                 "GIT_SSL_CAINFO"):
        assert variables[name] == bundle
    assert variables["NODE_EXTRA_CA_CERTS"] == str(ca_dir / "ca.pem")
    assert variables["https_proxy"] == "http://127.0.0.1:3128"
    assert variables["NO_PROXY"] == ""
    assert (ca_dir / "ca.pem").read_bytes() in (ca_dir / "bundle.pem").read_bytes()
    assert (ca_dir / "ca.key").stat().st_mode & 0o777 == 0o600

