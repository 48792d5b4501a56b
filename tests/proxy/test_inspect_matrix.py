"""TLS inspection across clients and edge cases: what the other inspection tests leave out.

Real clients and real TLS servers on loopback, through a real ``egresslock proxy`` process:
what upstream receives of an over-limit chunked upload, ALPN and SAN of the minted leaf, the
leaf cache, upstream hostname verification, ambiguous paths, Upgrade (WebSocket, h2c) inside a
tunnel, the client x case matrix for requests, httpx, Node, git and pip, and that the CA key is
not readable inside ``egresslock run``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import httpx
import pytest
import requests
from cryptography import x509

from egresslock.proxy.ca import LeafMinter, init_ca
from tests.conftest import require_sandbox, require_tool
from tests.proxy.conftest import RunningProxy, Upstreams, start_proxy
from tests.proxy.servers import (
    ThreadedServer,
    make_ca,
    read_head,
    tls_echo_server,
    upload_past_refusal,
)
from tests.proxy.test_inspect import POLICY as INSPECT_POLICY
from tests.proxy.test_inspect_clients import clean_env, undici  # noqa: F401  (fixture)

pytestmark = pytest.mark.integration

# test_inspect.py's policy, and the hosts only these tests serve.
POLICY = INSPECT_POLICY + """\
  - id: mismatch
    host: mismatch.test
    ports: [{tls}]
    inspect: true
  - id: rec-write
    host: rec.test
    ports: [{rec}]
    methods: [POST, PUT]
    paths: ["/upload/*"]
    max_body_bytes: 1000
    inspect: true
  - id: ws
    host: ws.test
    ports: [{ws}]
    upgrades: [websocket]
    max_body_bytes: 100
    inspect: true
"""


class _TLSServer(ThreadedServer):
    """A loopback TLS server that serves each connection in a thread of its own."""

    def __init__(self, leaf: Path, key: Path) -> None:
        super().__init__()
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(leaf, key)
        self.start()


class TLSRecorder(_TLSServer):
    """A TLS server that records every decrypted byte of each connection and answers nothing."""

    def __init__(self, leaf: Path, key: Path) -> None:
        self.streams: list[bytearray] = []  # the decrypted bytes of each connection
        self.finished = 0
        super().__init__(leaf, key)

    def serve(self, conn: socket.socket) -> None:
        got = bytearray()
        self.streams.append(got)
        try:
            conn.settimeout(10)
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                while data := tls.recv(65536):
                    got += data
        except (OSError, ssl.SSLError):
            pass
        finally:
            self.finished += 1


class TLSUpgradeEcho(_TLSServer):
    """Answers an Upgrade request with 101 over TLS, then echoes bytes until the peer closes."""

    def __init__(self, leaf: Path, key: Path) -> None:
        self.echoed = bytearray()
        super().__init__(leaf, key)

    def serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(10)
            with self.ctx.wrap_socket(conn, server_side=True) as tls:
                if not read_head(tls).endswith(b"\r\n\r\n"):
                    return
                tls.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                            b"Upgrade: websocket\r\n\r\n")
                while data := tls.recv(4096):
                    self.echoed += data
                    tls.sendall(data)
        except (OSError, ssl.SSLError):
            pass


@dataclass
class Setup:
    proxy: RunningProxy
    ca: Path          # the egresslock root (what clients trust)
    ca_dir: Path
    port: int         # secure.test
    bad: int          # badcert.test
    rec: TLSRecorder
    ws: TLSUpgradeEcho
    tmp: Path


@pytest.fixture(scope="module")
def setup(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    d = tmp_path_factory.mktemp("matrix")
    ca_dir = d / "ca"
    subprocess.run([sys.executable, "-m", "egresslock", "ca", "init", "--dir", str(ca_dir)],
                   check=True, capture_output=True, timeout=60)
    (d / "bad").mkdir()
    _, bad_leaf, bad_key = make_ca(d / "bad", ["badcert.test"])
    (d / "own").mkdir()
    own_ca, own_leaf, own_key = make_ca(d / "own", ["rec.test", "ws.test"],
                                           "egresslock matrix test CA")
    trusted = d / "upstream-cas.pem"  # the echo server's CA and this module's own
    trusted.write_bytes(upstreams.ca.read_bytes() + own_ca.read_bytes())
    rec, ws = TLSRecorder(own_leaf, own_key), TLSUpgradeEcho(own_leaf, own_key)
    with tls_echo_server(bad_leaf, bad_key) as bad:
        policy = d / "policy.yaml"
        policy.write_text(POLICY.format(tls=upstreams.tls.port, bad=bad.port, rec=rec.port,
                                        ws=ws.port))
        pins = [a for h in ("secure.test", "badcert.test", "mismatch.test", "rec.test",
                            "ws.test") for a in ("--resolve", f"{h}:127.0.0.1")]
        p = start_proxy(policy, d / "audit.db", *pins, "--upstream-ca", str(trusted),
                        "--ca-dir", str(ca_dir))
        try:
            yield Setup(p, ca_dir / "ca.pem", ca_dir, upstreams.tls.port, bad.port, rec, ws, d)
        finally:
            p.stop()
            rec.close()
            ws.close()


def _tunnel(s: Setup, host: str, port: int, alpn: list[str] | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", s.proxy.port), timeout=10)
    raw.sendall(b"CONNECT %s:%d HTTP/1.1\r\nHost: %s:%d\r\n\r\n"
                % (host.encode(), port, host.encode(), port))
    reply = read_head(raw)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    ctx = ssl.create_default_context(cafile=str(s.ca))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx.wrap_socket(raw, server_hostname=host)


def _read_response(tls: ssl.SSLSocket) -> bytes:
    """One response with a Content-Length body (what the proxy's refusals carry)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        body += tls.recv(65536)
    return head + b"\r\n\r\n" + body


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """The body bytes of a chunked stream (as far as it goes) and whether it ended."""
    out, pos = b"", 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return out, False
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            return out, True
        out += data[end + 2:end + 2 + size]
        if end + 2 + size + 2 > len(data):
            return out, False
        pos = end + 2 + size + 2


# ---- leaf certificates

def test_leaf_has_san_of_connect_host_and_alpn_is_http11(setup: Setup) -> None:
    tls = _tunnel(setup, "secure.test", setup.port, alpn=["h2", "http/1.1"])
    try:
        assert tls.selected_alpn_protocol() == "http/1.1"
        cert = tls.getpeercert()
        assert cert is not None
        assert cert["subjectAltName"] == (("DNS", "secure.test"),)
        # The stubs give every key of the dict one union type; "issuer" holds the RDNs.
        rdns = cast("tuple[tuple[tuple[str, str], ...], ...]", cert["issuer"])
        issuer = dict(x[0] for x in rdns)
        assert issuer["commonName"] == "egresslock inspection"
    finally:
        tls.close()
    # A client that offers only h2 does not get h2: the proxy speaks HTTP/1.1 inside tunnels.
    only_h2 = _tunnel(setup, "secure.test", setup.port, alpn=["h2"])
    try:
        assert only_h2.selected_alpn_protocol() in (None, "http/1.1")
        only_h2.sendall(b"GET /echo/h HTTP/1.1\r\nHost: secure.test:%d\r\n\r\n" % setup.port)
        assert _read_response(only_h2).startswith(b"HTTP/1.1 200")
    finally:
        only_h2.close()


def test_leaf_contexts_are_cached_lru(tmp_path: Path) -> None:
    root = init_ca(tmp_path / "ca")
    minter = LeafMinter(root, ["a.test", "b.test", "c.test"], cache_size=2)
    try:
        a, b = minter.context("a.test"), minter.context("b.test")
        assert minter.context("a.test") is a  # cached; a is now the most recent
        minter.context("c.test")              # evicts b, the least recently used
        assert minter.context("a.test") is a
        assert minter.context("b.test") is not b
        san = minter.leaf("a.test").extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["a.test"]
    finally:
        minter.close()


# ---- upstream verification and normalised paths

def test_upstream_hostname_mismatch_is_502(setup: Setup) -> None:
    # The echo server's certificate is from a trusted CA but names secure.test, not mismatch.test.
    r = requests.get(f"https://mismatch.test:{setup.port}/echo/a",
                     proxies={"https": setup.proxy.url}, verify=str(setup.ca), timeout=10)
    assert r.status_code == 502, r.text
    assert "certificate verification failed" in r.text
    assert "mismatch" in r.text.lower(), r.text
    assert "X-Egresslock-Deny" not in r.headers


@pytest.mark.parametrize("target", ["/echo/../admin", "/echo/%2e%2e/admin", "/echo//x"])
def test_ambiguous_path_inside_tunnel_is_refused(setup: Setup, upstreams: Upstreams,
                                                 target: str) -> None:
    before = len(upstreams.tls.seen)
    tls = _tunnel(setup, "secure.test", setup.port)
    try:
        tls.sendall(b"GET %s HTTP/1.1\r\nHost: secure.test:%d\r\n\r\n"
                    % (target.encode(), setup.port))
        resp = _read_response(tls)
        assert resp.startswith(b"HTTP/1.1 403"), resp[:300]
        assert b"refused as ambiguous" in resp
        # the tunnel is still usable
        tls.sendall(b"GET /echo/ok HTTP/1.1\r\nHost: secure.test:%d\r\n\r\n" % setup.port)
        assert _read_response(tls).startswith(b"HTTP/1.1 200")
    finally:
        tls.close()
    assert [p for _, p, _ in upstreams.tls.seen[before:]] == ["/echo/ok"]


# ---- streaming, what upstream received

def _wait_recorded(rec: TLSRecorder, count: int) -> None:
    deadline = time.monotonic() + 10
    while rec.finished < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rec.finished >= count


def test_chunked_upload_over_limit_never_reaches_upstream_beyond_limit(setup: Setup) -> None:
    rec = setup.rec
    start = len(rec.streams)
    tls = _tunnel(setup, "rec.test", rec.port)
    with tls:
        out, _error = upload_past_refusal(
            tls, b"PUT /upload/s HTTP/1.1\r\nHost: rec.test:%d\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n" % rec.port, chunks=64, size=300)
    assert out.startswith(b"HTTP/1.1 403"), out[:300]
    assert b"chunked upload stopped" in out
    _wait_recorded(rec, start + 1)
    got = bytes(rec.streams[start])
    head, sep, rest = got.partition(b"\r\n\r\n")
    assert sep, got[:300]
    assert head.startswith(b"PUT /upload/s HTTP/1.1")
    body, ended = _dechunk(rest)
    assert len(body) <= 1000, len(body)
    assert not ended, "the upstream must not see a complete (truncated-but-valid) body"


def test_streamed_python_upload_over_limit_upstream_view(setup: Setup) -> None:
    rec = setup.rec
    start = len(rec.streams)
    r = requests.put(f"https://rec.test:{rec.port}/upload/g",
                     data=(b"z" * 100 for _ in range(30)),
                     proxies={"https": setup.proxy.url}, verify=str(setup.ca), timeout=10)
    assert r.status_code == 403
    assert "chunked upload stopped" in r.headers["X-Egresslock-Deny"]
    _wait_recorded(rec, start + 1)
    body, ended = _dechunk(bytes(rec.streams[start]).partition(b"\r\n\r\n")[2])
    assert len(body) <= 1000
    assert not ended


# ---- Upgrade inside an inspected tunnel

@pytest.mark.parametrize(("upgrade", "reason"), [
    (b"Connection: Upgrade\r\nUpgrade: websocket\r\n",
     b"upgrade to websocket not allowed by rule api-read (allows none)"),
    (b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQA\r\n",
     b"upgrade to h2c not allowed"),
])
def test_upgrade_inside_tunnel_without_rule_is_denied(setup: Setup, upstreams: Upstreams,
                                                      upgrade: bytes, reason: bytes) -> None:
    before = len(upstreams.tls.seen)
    tls = _tunnel(setup, "secure.test", setup.port)
    try:
        tls.sendall(b"GET /echo/ws HTTP/1.1\r\nHost: secure.test:%d\r\n%s\r\n"
                    % (setup.port, upgrade))
        resp = _read_response(tls)
        assert resp.startswith(b"HTTP/1.1 403"), resp[:300]
        assert reason in resp, resp[:500]
        assert b"X-Egresslock-Deny" in resp
    finally:
        tls.close()
    assert len(upstreams.tls.seen) == before


def test_websocket_inside_tunnel_allowed_relayed_and_capped(setup: Setup) -> None:
    ws = setup.ws
    tls = _tunnel(setup, "ws.test", ws.port)
    with tls:
        tls.sendall(b"GET /ws HTTP/1.1\r\nHost: ws.test:%d\r\nConnection: Upgrade\r\n"
                    b"Upgrade: websocket\r\n\r\n" % ws.port)
        head = read_head(tls)
        assert head.startswith(b"HTTP/1.1 101"), head
        tls.sendall(b"frame-one!")
        got = b""
        while len(got) < 10:
            got += tls.recv(4096)
        assert got == b"frame-one!"
        tls.sendall(b"x" * 200)  # 10 + 200 > max_body_bytes 100: the connection is cut
        rest = b""
        try:
            while chunk := tls.recv(4096):
                rest += chunk
        except (OSError, ssl.SSLError):
            pass
        assert b"x" not in rest
    assert b"x" not in bytes(ws.echoed)
    rows = setup.proxy.rows(1)
    assert any("upgraded connection cut: client sent over max_body_bytes 100"
               in str(r["reason"]) and r["verdict"] == "deny" for r in rows), rows[-3:]


# ---- the client x case matrix

DENIED = [
    ("method", "DELETE", "/echo/a", None,
     "api-read; method DELETE not allowed by rule api-read (allows GET, HEAD)"),
    ("path", "GET", "/admin", None, "path /admin not allowed by rule api-read"),
    ("query", "GET", "/echo/a?token=abc", None,
     "query parameter 'token' not allowed by rule api-read"),
    ("body", "POST", "/upload/f", b"b" * 2000,
     "body of 2000 bytes over max_body_bytes 1000 by rule api-write"),
]


@pytest.mark.parametrize(("what", "method", "path", "body", "reason"), DENIED)
def test_requests_denied_cases(setup: Setup, upstreams: Upstreams, what: str, method: str,
                               path: str, body: bytes | None, reason: str) -> None:
    before = len(upstreams.tls.seen)
    r = requests.request(method, f"https://secure.test:{setup.port}{path}", data=body,
                         proxies={"https": setup.proxy.url}, verify=str(setup.ca), timeout=10)
    assert r.status_code == 403, (what, r.status_code, r.text[:200])
    assert reason in r.headers["X-Egresslock-Deny"], (what, r.headers)
    assert len(upstreams.tls.seen) == before


@pytest.mark.parametrize(("what", "method", "path", "body", "reason"), DENIED)
def test_httpx_denied_cases(setup: Setup, upstreams: Upstreams, what: str, method: str,
                            path: str, body: bytes | None, reason: str) -> None:
    before = len(upstreams.tls.seen)
    ctx = ssl.create_default_context(cafile=str(setup.ca))
    with httpx.Client(proxy=setup.proxy.url, verify=ctx, timeout=10) as client:
        r = client.request(method, f"https://secure.test:{setup.port}{path}", content=body)
    assert r.status_code == 403, (what, r.status_code, r.text[:200])
    assert reason in r.headers["X-Egresslock-Deny"], (what, r.headers)
    assert len(upstreams.tls.seen) == before


def test_requests_and_httpx_allowed_byte_for_byte_and_bad_cert_502(setup: Setup) -> None:
    base = f"https://secure.test:{setup.port}"
    r = requests.get(f"{base}/big?n=300000", proxies={"https": setup.proxy.url},
                     verify=str(setup.ca), timeout=10)
    assert r.status_code == 200
    assert r.content == b"x" * 300000
    assert requests.get(f"{base}/chunked", proxies={"https": setup.proxy.url},
                        verify=str(setup.ca), timeout=10).content == b"hello chunked world"
    bad = requests.get(f"https://badcert.test:{setup.bad}/", proxies={"https": setup.proxy.url},
                       verify=str(setup.ca), timeout=10)
    assert bad.status_code == 502
    assert "certificate verification failed" in bad.text
    ctx = ssl.create_default_context(cafile=str(setup.ca))
    with httpx.Client(proxy=setup.proxy.url, verify=ctx, timeout=10) as client:
        got = client.get(f"{base}/big?n=300000")
        assert got.status_code == 200
        assert got.content == b"x" * 300000
        bad2 = client.get(f"https://badcert.test:{setup.bad}/")
        assert bad2.status_code == 502
        assert "certificate verification failed" in bad2.text


NODE_SCRIPT = r"""
const { ProxyAgent, fetch } = require(process.env.UNDICI_PATH);
(async () => {
  const dispatcher = new ProxyAgent(process.env.TEST_PROXY);
  const base = process.env.TEST_BASE;
  const out = {};
  const go = async (name, url, opts) => {
    const r = await fetch(url, { ...opts, dispatcher });
    const text = await r.text();
    out[name] = { status: r.status, deny: r.headers.get("x-egresslock-deny"),
                  length: text.length, text: text.slice(0, 300) };
  };
  await go("allowed", base + "/big?n=300000", {});
  await go("path", base + "/admin", {});
  await go("query", base + "/echo/a?token=abc", {});
  await go("body", base + "/upload/f", { method: "POST", body: "b".repeat(2000) });
  await go("badcert", process.env.TEST_BAD + "/", {});
  console.log(JSON.stringify(out));
  await dispatcher.close();
})().catch((e) => { console.error(e, e.cause); process.exit(2); });
"""


def test_node_fetch_path_query_body_and_bad_cert(setup: Setup, undici: Path) -> None:  # noqa: F811
    node = require_tool("node")
    home = setup.tmp / "node-home"
    home.mkdir(exist_ok=True)
    env = clean_env(home, NODE_EXTRA_CA_CERTS=str(setup.ca), UNDICI_PATH=str(undici),
                    TEST_PROXY=setup.proxy.url, TEST_BASE=f"https://secure.test:{setup.port}",
                    TEST_BAD=f"https://badcert.test:{setup.bad}")
    r = subprocess.run([node, "-e", NODE_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["allowed"]["status"] == 200
    assert out["allowed"]["length"] == 300000
    for name, (_, _, _, _, reason) in zip(["path", "query", "body"], DENIED[1:], strict=True):
        assert out[name]["status"] == 403, out[name]
        assert reason in (out[name]["deny"] or ""), out[name]
    assert out["badcert"]["status"] == 502
    assert "certificate verification failed" in out["badcert"]["text"]


def test_git_and_pip_bad_upstream_cert_is_502(setup: Setup) -> None:
    home = setup.tmp / "gp-home"
    home.mkdir(exist_ok=True)
    env = clean_env(home)
    r = subprocess.run([require_tool("git"), "-c", f"http.proxy={setup.proxy.url}", "-c",
                        f"http.sslCAInfo={setup.ca}", "clone", "-q",
                        f"https://badcert.test:{setup.bad}/repo.git", str(setup.tmp / "c")],
                       env=env, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0
    assert "502" in r.stderr, r.stderr
    p = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--isolated",
         "--disable-pip-version-check", "-vv", "--retries", "0", "--timeout", "20",
         "--index-url", f"https://badcert.test:{setup.bad}/simple/", "--proxy",
         setup.proxy.url, "--cert", str(setup.ca), "-d", str(setup.tmp / "pd"), "anything"],
        env=env, capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "502 Server Error: Bad Gateway" in out, out


def test_git_denied_path(setup: Setup) -> None:
    home = setup.tmp / "g2-home"
    home.mkdir(exist_ok=True)
    env = clean_env(home)
    git = require_tool("git")
    through = ["-c", f"http.proxy={setup.proxy.url}", "-c", f"http.sslCAInfo={setup.ca}"]
    # /repo.git is outside api-read's paths: git's first request (info/refs?service=...) is
    # refused, for its path.
    r = subprocess.run([git, *through, "clone", "-q", f"https://secure.test:{setup.port}/repo.git",
                        str(setup.tmp / "c2")], env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode != 0
    assert "403" in r.stderr, r.stderr
    rows = setup.proxy.rows(1)
    assert any(r_["path"] == "/repo.git/info/refs?service=git-upload-pack"
               and r_["verdict"] == "deny" for r_ in rows), [x["path"] for x in rows[-5:]]


# ---- inside egresslock run

def test_ca_key_not_readable_inside_sandbox_and_trust_variables_set() -> None:
    require_sandbox(os.geteuid() == 0, "egresslock run needs root here")
    for tool in ("unshare", "nft", "ip"):
        require_tool(tool)
    from tests.sandbox.conftest import make_workdir

    work = make_workdir()
    try:
        ca_dir = work / ".ca"
        init_ca(ca_dir)
        # Owned by the command's user (nobody): only hiding, not permissions, can keep it out.
        for p in (ca_dir, *ca_dir.iterdir()):
            os.chown(p, 65534, 65534)
        policy = work / "policy.yaml"
        policy.write_text("version: 1\nrules:\n  - {id: s, host: secure.test, ports: [443], "
                          "inspect: true, methods: [GET]}\n")
        script = (f"cat {ca_dir}/ca.key; echo cat-rc=$?; ls -A {ca_dir}; echo ls-rc=$?; "
                  "for v in SSL_CERT_FILE REQUESTS_CA_BUNDLE CURL_CA_BUNDLE NODE_EXTRA_CA_CERTS "
                  "PIP_CERT GIT_SSL_CAINFO; do eval echo $v=\\$$v; done; "
                  "cat /run/egresslock/bundle.pem | grep -c 'BEGIN CERTIFICATE'")
        egl = str(Path(sys.executable).parent / "egresslock")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
        env.pop("EGRESSLOCK_CA_DIR", None)
        r = subprocess.run([egl, "run", "-q", "-p", str(policy), "--ca-dir", str(ca_dir),
                            "--audit", str(work / "audit.db"), "--", "sh", "-c", script],
                           cwd=work, env=env, capture_output=True, text=True, timeout=90,
                           check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "PRIVATE KEY" not in r.stdout
        assert "cat-rc=0" not in r.stdout, r.stdout
        lines = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        for v in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT",
                  "GIT_SSL_CAINFO"):
            assert lines[v] == "/run/egresslock/bundle.pem", (v, r.stdout)
        assert lines["NODE_EXTRA_CA_CERTS"] == "/run/egresslock/ca.pem"
        assert int(r.stdout.strip().splitlines()[-1]) >= 2  # system roots + the egresslock CA
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- the ca commands by hand

def _egl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "egresslock", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_ca_init_show_export_and_key_mode(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    made = _egl("ca", "init", "--dir", str(d))
    assert made.returncode == 0, made.stderr
    assert (d / "ca.key").stat().st_mode & 0o777 == 0o600
    assert d.stat().st_mode & 0o777 == 0o700
    cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    from cryptography.hazmat.primitives.asymmetric import ec

    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    shown = _egl("ca", "show", "--dir", str(d), "--json")
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["certificate"] == str(d / "ca.pem")
    assert info["sha256"] in made.stdout
    exported = _egl("ca", "export", "--dir", str(d))
    assert exported.stdout == (d / "ca.pem").read_text()
    assert "PRIVATE" not in exported.stdout
    bundle = _egl("ca", "export", "--dir", str(d), "--bundle")
    assert bundle.stdout.count("BEGIN CERTIFICATE") >= 2
    again = _egl("ca", "init", "--dir", str(d))
    assert again.returncode != 0
    assert "already exists" in again.stderr
    (d / "ca.key").chmod(0o644)
    refused = _egl("ca", "show", "--dir", str(d))
    assert refused.returncode != 0
    assert "must be 600" in refused.stderr
