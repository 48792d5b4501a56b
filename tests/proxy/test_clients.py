"""Real clients through the real proxy, to servers on loopback. Integration tests."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import urllib.error
import urllib.request

import httpx
import pytest
import requests

from tests.conftest import require_tool
from tests.proxy.conftest import RunningProxy, Upstreams
from tests.proxy.servers import read_head

pytestmark = pytest.mark.integration


def test_curl_get_allowed_and_post_denied(proxy: RunningProxy, upstreams: Upstreams) -> None:
    curl = require_tool("curl")
    url = f"http://app.test:{upstreams.http.port}/echo/a?page=2"
    out = subprocess.run([curl, "-sS", "-x", proxy.url, url], capture_output=True, text=True,
                         timeout=30, check=True)
    assert json.loads(out.stdout)["path"] == "/echo/a?page=2"
    denied = subprocess.run([curl, "-sS", "-x", proxy.url, "-X", "POST", "-d", "x", "-i", url],
                            capture_output=True, text=True, timeout=30, check=True)
    assert denied.stdout.startswith("HTTP/1.1 403")
    assert ("X-Egresslock-Deny: app-read; method POST not allowed by rule app-read "
            "(allows GET, HEAD)") in denied.stdout
    assert "egresslock: denied: app-read; method POST" in denied.stdout


def test_requests_keep_alive_and_bodies(proxy: RunningProxy, upstreams: Upstreams) -> None:
    proxies = {"http": proxy.url}
    base = f"http://write.test:{upstreams.http.port}"
    with requests.Session() as s:
        for i in range(5):
            r = s.post(f"{base}/upload/f{i}", data=b"a" * 100, proxies=proxies, timeout=10)
            assert r.status_code == 200, r.text
            assert json.loads(r.text)["body"] == "a" * 100
        # A chunked upload (generator body) under the cap is relayed intact.
        r = s.put(f"{base}/upload/gen", data=(b"xyz" for _ in range(10)), proxies=proxies,
                  timeout=10)
        assert r.status_code == 200
        assert json.loads(r.text)["body"] == "xyz" * 10
        too_big = s.post(f"{base}/upload/big", data=b"b" * 1001, proxies=proxies, timeout=10)
        assert too_big.status_code == 403
        assert "body of 1001 bytes over max_body_bytes 1000" in too_big.headers[
            "X-Egresslock-Deny"]
        admin = s.post(f"{base}/upload/admin", data=b"x", proxies=proxies, timeout=10)
        assert admin.status_code == 403
        assert admin.headers["X-Egresslock-Deny"] == "no-admin; denied by rule no-admin"


def test_chunked_upload_over_cap_is_stopped_before_the_excess(proxy: RunningProxy,
                                                              upstreams: Upstreams) -> None:
    before = len(upstreams.http.seen)
    r = requests.post(f"http://write.test:{upstreams.http.port}/upload/stream",
                      data=(b"z" * 100 for _ in range(50)), proxies={"http": proxy.url},
                      timeout=10)
    assert r.status_code == 403
    assert "chunked upload stopped" in r.headers["X-Egresslock-Deny"]
    # The upstream never got a complete request with the oversized body.
    assert all(len(body) <= 1000 for _, _, body in upstreams.http.seen[before:])


def test_httpx_and_urllib(proxy: RunningProxy, upstreams: Upstreams) -> None:
    url = f"http://app.test:{upstreams.http.port}/echo/x"
    with httpx.Client(proxy=proxy.url, timeout=10) as client:
        assert client.get(url).json()["method"] == "GET"
        assert client.head(url).status_code == 200
        assert client.get(f"http://app.test:{upstreams.http.port}/chunked").text == (
            "hello chunked world")
        denied = client.get(f"http://evil.test:{upstreams.http.port}/")
        assert denied.status_code == 403
        assert denied.headers["x-egresslock-deny"] == "default; no rule allows host evil.test"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy.url}))
    with opener.open(url, timeout=10) as resp:
        assert json.loads(resp.read())["path"] == "/echo/x"
    with pytest.raises(urllib.error.HTTPError) as err:
        opener.open(f"http://app.test:{upstreams.http.port}/private", timeout=10)
    assert err.value.code == 403


def test_connect_to_local_tls_server(proxy: RunningProxy, upstreams: Upstreams) -> None:
    curl = require_tool("curl")
    url = f"https://secure.test:{upstreams.tls.port}/hello"
    out = subprocess.run([curl, "-sS", "--cacert", str(upstreams.ca), "-x", proxy.url,
                          "--resolve", f"secure.test:{upstreams.tls.port}:127.0.0.1", url],
                         capture_output=True, text=True, timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["path"] == "/hello"
    r = requests.get(url, proxies={"https": proxy.url}, verify=str(upstreams.ca), timeout=10)
    assert r.json()["path"] == "/hello"
    ctx = ssl.create_default_context(cafile=str(upstreams.ca))
    with httpx.Client(proxy=proxy.url, verify=ctx, timeout=10) as client:
        assert client.get(url).json()["path"] == "/hello"


def test_upstream_unreachable_is_502_not_a_deny(proxy_factory, upstreams: Upstreams) -> None:  # type: ignore[no-untyped-def]
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()  # nothing listens there now
    policy = (f"version: 1\nnetwork: {{allow_ranges: ['127.0.0.1/32']}}\nrules:\n"
              f"  - id: dead\n    host: app.test\n    ports: [{dead_port}]\n")
    p = proxy_factory(policy)
    r = requests.get(f"http://app.test:{dead_port}/", proxies={"http": p.url}, timeout=10)
    assert r.status_code == 502
    assert "X-Egresslock-Deny" not in r.headers
    assert "cannot connect to 127.0.0.1" in r.text


def _upgrade_echo_server() -> tuple[socket.socket, threading.Thread]:
    """Answers one Upgrade request with 101, then echoes bytes until the peer closes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def run() -> None:
        conn, _ = srv.accept()
        with conn:
            read_head(conn)
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\n\r\n")
            try:
                while data := conn.recv(4096):
                    conn.sendall(data)
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv, t


def test_websocket_upgrade_allowed_by_rule_and_capped(proxy_factory) -> None:  # type: ignore[no-untyped-def]
    srv, _thread = _upgrade_echo_server()
    port = srv.getsockname()[1]
    policy = (f"version: 1\nnetwork: {{allow_ranges: ['127.0.0.1/32']}}\nrules:\n"
              f"  - id: ws\n    host: app.test\n    ports: [{port}]\n"
              "    upgrades: [websocket]\n    max_body_bytes: 100\n")
    p = proxy_factory(policy)
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        s.sendall(b"GET http://app.test:%d/ws HTTP/1.1\r\nHost: app.test:%d\r\n"
                  b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n" % (port, port))
        head = read_head(s)
        assert head.startswith(b"HTTP/1.1 101")
        s.sendall(b"frame-one!")
        assert s.recv(4096) == b"frame-one!"
        s.sendall(b"x" * 200)  # past max_body_bytes: the connection is cut
        rest = b""
        try:
            while chunk := s.recv(4096):
                rest += chunk
        except ConnectionResetError:
            pass
        assert b"x" not in rest
    srv.close()
    rows = p.rows(1)
    assert any("upgraded connection cut: client sent over max_body_bytes 100" in str(r["reason"])
               and r["verdict"] == "deny" for r in rows)


def test_upgrade_without_rule_is_denied(proxy: RunningProxy, upstreams: Upstreams) -> None:
    p = upstreams.http.port
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"GET http://app.test:%d/echo/a HTTP/1.1\r\nHost: app.test:%d\r\n"
                  b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n" % (p, p))
        resp = s.recv(4096)
    assert resp.startswith(b"HTTP/1.1 403")
    assert b"upgrade to websocket not allowed by rule app-read (allows none)" in resp
