"""Attacks on the proxy, one per class in DESIGN.md that applies to a proxy.

Each sends raw bytes so that no client library "fixes" the attack on the way, and checks the
status, the deny reason, that the upstream saw nothing, and that the attempt is in the audit log.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from tests.conftest import require_sandbox
from tests.proxy.conftest import RunningProxy, Upstreams
from tests.proxy.servers import Recorder, exchange_raw, read_head, upload_past_refusal

pytestmark = pytest.mark.integration


def raw(proxy: RunningProxy, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data``, then read until the proxy closes or ``timeout``."""
    return exchange_raw(proxy.port, data, timeout)


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else 0


@pytest.mark.parametrize(("attack", "target", "needle"), [
    ("userinfo", "http://app.test:{p}@evil.test/echo/a", b"userinfo"),
    ("userinfo-allowed-host", "http://user:pw@app.test:{p}/echo/a", b"userinfo"),
    ("backslash", "http://evil.test\\@app.test:{p}/echo/a", b""),
    ("dot-segments", "http://app.test:{p}/echo/../private", b"dot segment"),
    ("encoded-dot-segments", "http://app.test:{p}/echo/%2e%2e/private", b"dot segment"),
    ("encoded-slash-traversal", "http://app.test:{p}/echo%2F..%2Fprivate", b"path"),
    ("double-slash", "http://app.test:{p}/echo//a", b"empty segment"),
    ("encoded-backslash", "http://app.test:{p}/echo/%5c..%5cprivate", b"backslash"),
    ("fragment", "http://app.test:{p}/echo/a#frag", b""),
    ("suffix-trick", "http://app.test.evil.test:{p}/echo/a", b"no rule allows host"),
    ("ip-literal-octal", "http://0177.0.0.2:{p}/echo/a", b"loopback"),
    ("ip-literal-hex", "http://0x7f000002:{p}/echo/a", b"loopback"),
    ("ip-literal-short", "http://127.2:{p}/echo/a", b"loopback"),
    ("ipv6-mapped", "http://[::ffff:127.0.0.1]:{p}/echo/a", b"ipv6-embedded-ipv4"),
    ("nat64", "http://[64:ff9b::7f00:1]:{p}/echo/a", b"ipv6-embedded-ipv4"),
    ("metadata-literal", "http://169.254.169.254/latest/meta-data/", b"link-local"),
    ("port-outside-rule", "http://app.test:1/echo/a", b"port 1 not allowed by rule app-read"),
    ("query-param-not-allowed", "http://app.test:{p}/echo/a?d=c2VjcmV0", b"query parameter"),
    ("query-value-too-long", "http://app.test:{p}/echo/a?page=" + "9" * 40, b"max_value_len"),
    ("full-width-dot", "http://app\uff0etest:{p}/private", b""),
])
def test_url_attacks_are_denied(proxy: RunningProxy, upstreams: Upstreams, attack: str,
                                target: str, needle: bytes) -> None:
    before = len(upstreams.http.seen)
    t = target.format(p=upstreams.http.port).encode("utf-8")
    host = t.split(b"//", 1)[1].split(b"/", 1)[0]
    resp = raw(proxy, b"GET " + t + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    assert status(resp) in (400, 403), (attack, resp[:300])
    assert needle in resp, (attack, resp[:400])
    assert len(upstreams.http.seen) == before, f"{attack} reached the upstream"


def test_ip_literal_allowed_only_as_written_in_rule(proxy: RunningProxy,
                                                    upstreams: Upstreams) -> None:
    # 2130706433 is 127.0.0.1, which rule ipv4-literal allows: same address, same decision.
    for spelling in ("127.0.0.1", "2130706433", "0x7f000001", "127.1"):
        resp = raw(proxy, b"GET http://%s:%d/x HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % (
            spelling.encode(), upstreams.http.port, spelling.encode(), upstreams.http.port))
        assert status(resp) == 200, (spelling, resp[:200])


def test_dns_rebinding_to_metadata_is_denied(proxy: RunningProxy, upstreams: Upstreams) -> None:
    # meta.test is allowed by a rule, but resolves to 169.254.169.254.
    resp = raw(proxy, b"GET http://meta.test/latest/ HTTP/1.1\r\nHost: meta.test\r\n\r\n")
    assert status(resp) == 403
    assert b"169.254.169.254 (link-local) is blocked by network.block_private" in resp


def test_redirect_to_internal_is_relayed_not_followed(proxy: RunningProxy,
                                                      upstreams: Upstreams) -> None:
    p = upstreams.http.port
    resp = raw(proxy, b"GET http://app.test:%d/redirect HTTP/1.1\r\nHost: app.test:%d\r\n"
               b"Connection: close\r\n\r\n" % (p, p))
    assert status(resp) == 302
    assert b"Location: http://169.254.169.254/latest/meta-data/" in resp


@pytest.mark.parametrize(("attack", "request_bytes"), [
    ("cl-te-smuggling", b"POST http://write.test:{p}/upload/a HTTP/1.1\r\nHost: write.test:{p}"
     b"\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("duplicate-content-length", b"POST http://write.test:{p}/upload/a HTTP/1.1\r\nHost: "
     b"write.test:{p}\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"),
    ("obs-fold", b"GET http://app.test:{p}/echo/a HTTP/1.1\r\nHost: app.test:{p}\r\nX: a\r\n"
     b" b\r\n\r\n"),
    ("bare-lf", b"GET http://app.test:{p}/echo/a HTTP/1.1\nHost: app.test:{p}\n\n"),
    ("nul-in-header", b"GET http://app.test:{p}/echo/a HTTP/1.1\r\nHost: app.test:{p}\r\n"
     b"X: a\x00b\r\n\r\n"),
    ("host-mismatch", b"GET http://app.test:{p}/echo/a HTTP/1.1\r\nHost: evil.test\r\n\r\n"),
    ("two-hosts", b"GET http://app.test:{p}/echo/a HTTP/1.1\r\nHost: app.test:{p}\r\n"
     b"Host: evil.test\r\n\r\n"),
    ("te-not-chunked", b"POST http://write.test:{p}/upload/a HTTP/1.1\r\nHost: write.test:{p}"
     b"\r\nTransfer-Encoding: gzip\r\n\r\n"),
    ("origin-form", b"GET /echo/a HTTP/1.1\r\nHost: app.test:{p}\r\n\r\n"),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    ("websocket-upgrade", b"GET http://app.test:{p}/echo/a HTTP/1.1\r\nHost: app.test:{p}\r\n"
     b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"),
    ("h2c-upgrade", b"GET http://app.test:{p}/echo/a HTTP/1.1\r\nHost: app.test:{p}\r\n"
     b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQA\r\n"
     b"\r\n"),
])
def test_protocol_attacks_are_refused(proxy: RunningProxy, upstreams: Upstreams, attack: str,
                                      request_bytes: bytes) -> None:
    before = len(upstreams.http.seen)
    p = str(upstreams.http.port).encode()
    resp = raw(proxy, request_bytes.replace(b"{p}", p))
    assert status(resp) in (400, 403), (attack, resp[:300])
    assert len(upstreams.http.seen) == before, f"{attack} reached the upstream"


def test_oversized_head_is_431(proxy: RunningProxy) -> None:
    resp = raw(proxy, b"GET http://app.test/ HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
    assert status(resp) == 431


def test_refusal_reaches_a_client_still_uploading(proxy: RunningProxy,
                                                  upstreams: Upstreams) -> None:
    """The proxy refuses mid-body and closes; the client is still sending. Without a lingering
    close the kernel resets the connection and the client never reads why it was refused."""
    p = upstreams.http.port
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        out, error = upload_past_refusal(s, b"POST http://write.test:%d/upload/x HTTP/1.1\r\n"
                                            b"Host: write.test:%d\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n" % (p, p))
    assert status(out) == 403, (out[:300], error)
    assert b"chunked upload stopped" in out
    assert error is None


def _connect(proxy: RunningProxy, target: bytes) -> tuple[socket.socket, bytes]:
    s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    s.sendall(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (target, target))
    return s, read_head(s)


def test_connect_with_mismatched_sni_is_reset(proxy: RunningProxy, upstreams: Upstreams) -> None:
    s, head = _connect(proxy, b"secure.test:%d" % upstreams.tls.port)
    assert head.startswith(b"HTTP/1.1 200")
    ctx = ssl.create_default_context(cafile=str(upstreams.ca))
    with pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(s, server_hostname="other.test")  # fronting: SNI other.test
    s.close()
    rows = proxy.rows()
    assert any(r["layer"] == "tls" and "SNI other.test differs from CONNECT host secure.test"
               in str(r["reason"]) for r in rows)


def test_connect_without_sni_is_reset(proxy: RunningProxy, upstreams: Upstreams) -> None:
    s, head = _connect(proxy, b"secure.test:%d" % upstreams.tls.port)
    assert head.startswith(b"HTTP/1.1 200")
    ctx = ssl.create_default_context(cafile=str(upstreams.ca))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(s, server_hostname=None)
    s.close()
    assert any("has no SNI" in str(r["reason"]) for r in proxy.rows())


def test_connect_denied_host_and_port(proxy: RunningProxy, upstreams: Upstreams) -> None:
    for target, reason in [(b"evil.test:443", b"no rule allows host evil.test"),
                           (b"secure.test:22", b"port 22 not allowed by rule secure"),
                           (b"app.test:%d" % upstreams.http.port,
                            b"cannot see inside a tunnel without inspect: true")]:
        s, head = _connect(proxy, target)
        s.close()
        assert head.startswith(b"HTTP/1.1 403"), (target, head)
        assert reason in head, (target, head)


def test_non_tls_bytes_on_https_port_are_refused(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    try:
        rec = Recorder(port=443)  # TLS is mandatory on 443, so the recorder must sit there
    except PermissionError:
        require_sandbox(False, "binding 127.0.0.1:443 needs root")
        return
    try:
        policy = ("version: 1\nnetwork: {allow_ranges: ['127.0.0.1/32']}\nrules:\n"
                  "  - id: tls\n    host: secure.test\n    ports: [443]\n")
        p = proxy_factory(policy)
        s, head = _connect(p, b"secure.test:443")
        assert head.startswith(b"HTTP/1.1 200")
        s.sendall(b"GET /exfil?d=c2VjcmV0 HTTP/1.1\r\nHost: secure.test\r\n\r\n")
        s.settimeout(5)
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
        assert data == b"", "a refused tunnel must be reset, not answered"
        s.close()
        time.sleep(0.3)
        assert rec.received == b"", "bytes of a refused tunnel reached the upstream"
        assert any("non-TLS bytes on HTTPS port 443" in str(r["reason"]) for r in p.rows(1))
    finally:
        rec.close()


def test_pipelined_requests_are_answered_in_order(proxy: RunningProxy,
                                                  upstreams: Upstreams) -> None:
    p = upstreams.http.port
    one = b"GET http://app.test:%d/echo/first HTTP/1.1\r\nHost: app.test:%d\r\n\r\n" % (p, p)
    denied = b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n"
    two = (b"GET http://app.test:%d/echo/second HTTP/1.1\r\nHost: app.test:%d\r\n"
           b"Connection: close\r\n\r\n" % (p, p))
    resp = raw(proxy, one + denied + two)
    assert resp.count(b"HTTP/1.1 ") == 3, resp
    first, second = resp.find(b"/echo/first"), resp.find(b"/echo/second")
    deny = resp.find(b"HTTP/1.1 403")
    assert 0 < first < deny < second
