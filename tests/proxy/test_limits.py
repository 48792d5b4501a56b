"""Limits, reloads and metrics of the real proxy process."""

from __future__ import annotations

import signal
import socket
import time
import urllib.request
from collections.abc import Callable

import pytest
import requests

from tests.proxy.conftest import RunningProxy, Upstreams

pytestmark = pytest.mark.integration

ALLOW = ("version: 1\nnetwork: {{allow_ranges: ['127.0.0.1/32']}}\nrules:\n"
         "  - id: {rid}\n    host: app.test\n    ports: [{port}]\n")


def test_slowloris_head_is_cut_off_with_408(proxy_factory: Callable[..., RunningProxy]) -> None:
    p = proxy_factory(None, "--head-timeout", "1")
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as s:
        start = time.monotonic()
        s.sendall(b"GET http://app.test/ HTTP/1.1\r\n")
        out = b""
        for _ in range(20):  # one header line every 0.2 s: never completes
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
            s.settimeout(0.2)
            try:
                out += s.recv(4096)
                if out:
                    break
            except TimeoutError:
                continue
        elapsed = time.monotonic() - start
    assert out.startswith(b"HTTP/1.1 408"), out
    assert elapsed < 3
    assert any("not complete within 1s" in str(r["reason"]) for r in p.rows(1))


def test_connection_limit_answers_503(proxy_factory: Callable[..., RunningProxy]) -> None:
    p = proxy_factory(None, "--max-connections", "2")
    held = [socket.create_connection(("127.0.0.1", p.port), timeout=5) for _ in range(2)]
    for s in held:  # a request begun: the kernel hands a connection over once bytes come
        s.sendall(b"GET http://app.test/ HTTP/1.1\r\n")
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as third:
        third.sendall(b"GET http://app.test/ HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert third.recv(4096).startswith(b"HTTP/1.1 503")
    for s in held:
        s.close()
    assert any("too many connections (limit 2)" in str(r["reason"]) for r in p.rows(1))


def test_reload_on_sighup_and_bad_policy_keeps_the_old(
        proxy_factory: Callable[..., RunningProxy], upstreams: Upstreams) -> None:
    port = upstreams.http.port
    p = proxy_factory(ALLOW.format(rid="first", port=port))
    url = f"http://app.test:{port}/x"
    proxies = {"http": p.url}
    assert requests.get(url, proxies=proxies, timeout=5).status_code == 200
    p.policy.write_text("version: 1\nrules:\n  - id: broken\n    host: '*'\n")
    p.proc.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    r = requests.get(url, proxies=proxies, timeout=5)
    assert r.status_code == 200, "a bad policy must not replace the good one"
    p.policy.write_text(ALLOW.format(rid="second", port=port).replace("app.test", "other.test"))
    p.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        r = requests.get(url, proxies=proxies, timeout=5)
        if r.status_code == 403:
            break
        time.sleep(0.2)
    assert r.status_code == 403
    assert r.headers["X-Egresslock-Deny"] == "default; no rule allows host app.test"
    p.stop()
    assert p.proc.stderr is not None
    err = p.proc.stderr.read()
    assert "policy reload refused, old policy stays" in err
    assert "'*' would allow every host" in err


def test_metrics_endpoint(proxy_factory: Callable[..., RunningProxy], upstreams: Upstreams
                          ) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        mport = s.getsockname()[1]
    p = proxy_factory(None, "--metrics", f"127.0.0.1:{mport}")
    proxies = {"http": p.url}
    requests.get(f"http://app.test:{upstreams.http.port}/echo/m", proxies=proxies, timeout=5)
    requests.get(f"http://evil.test:{upstreams.http.port}/", proxies=proxies, timeout=5)
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert ('egresslock_decisions_total{layer="http",reason="allowed",rule="app-read",'
            'verdict="allow"} 1.0') in text
    assert ('egresslock_decisions_total{layer="http",reason="no-rule",rule="default",'
            'verdict="deny"} 1.0') in text
    assert "egresslock_decision_seconds_bucket" in text
    assert "egresslock_dial_seconds_count" in text
    assert 'egresslock_bytes_total{direction="in"}' in text
