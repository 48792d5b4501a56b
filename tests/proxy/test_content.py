"""Content controls through the real proxy: transforms, dynamic links, budgets, secrets in bodies.

Real clients (requests, raw sockets) talk to ``egresslock proxy`` on loopback, which forwards to
an echo server that reports exactly what it received: the tests compare what the client sent,
what the upstream got, and what the audit log says was changed or refused.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.proxy.conftest import PINS, Proxies, RunningProxy, Upstreams

pytestmark = pytest.mark.integration

SECRET = "zx-Canary-0d9c8b7a6f5e4d3c"

POLICY = """\
version: 1
network: {{allow_ranges: ["127.0.0.1/32"]}}
secrets:
  - {{name: canary, value: "{secret}"}}
budget: {{requests: 1000}}
rules:
  - id: hashed
    host: app.test
    ports: [{http}]
    paths: ["/hash/**"]
    headers: {{strip: [X-Debug]}}
    hash_query: [user]
    hash_json: [/user/email, /items/*/id]
    redact_json: [/prompt]
  - id: allow-only
    host: app.test
    ports: [{http}]
    paths: ["/allow/**"]
    headers: {{allow: [Accept, Content-Type, Authorization]}}
  - id: links
    host: write.test
    ports: [{http}]
  - id: cdn
    host: "*.cdn.test"
    ports: [443]
  - id: budget
    host: meta.test
    ports: [{http}]
    budget: {{requests: 3, bytes_out: 600, per: 2s}}
    dynamic_links: allow
"""


@pytest.fixture(scope="module")
def content_proxy(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Callable[..., RunningProxy]]:
    pins = [pin for pin in PINS if not pin.startswith("meta.test:169")] + ["meta.test:127.0.0.1"]
    proxies = Proxies(tmp_path_factory, POLICY.format(http=upstreams.http.port, secret=SECRET),
                      pins)

    def factory(policy_text: str | None = None, keys: Path | None = None) -> RunningProxy:
        ca = keys or tmp_path_factory.mktemp("content-ca") / "ca"
        return proxies.start(policy_text, "--ca-dir", str(ca))

    yield factory
    proxies.stop_all()


@pytest.fixture(scope="module")
def cproxy(content_proxy: Callable[..., RunningProxy]) -> RunningProxy:
    return content_proxy()


def via(p: RunningProxy) -> dict[str, str]:
    return {"http": p.url}


def url(upstreams: Upstreams, host: str, path: str) -> str:
    return f"http://{host}:{upstreams.http.port}{path}"


def last_row(p: RunningProxy, path_prefix: str) -> dict[str, object]:
    for _ in range(50):
        rows = [r for r in p.rows() if str(r.get("path") or "").startswith(path_prefix)]
        if rows:
            return rows[-1]
        time.sleep(0.1)
    raise AssertionError(f"no audit row for {path_prefix}")


def test_headers_are_stripped_and_query_values_hashed(cproxy: RunningProxy,
                                                      upstreams: Upstreams) -> None:
    r = requests.get(url(upstreams, "app.test", "/hash/q?user=alice%40example.com&page=2"),
                     headers={"X-Debug": "1", "Cookie": "s=1", "Authorization": "Bearer x",
                              "Accept": "text/plain"}, proxies=via(cproxy), timeout=10)
    assert r.status_code == 200, r.text
    got = r.json()
    assert "x-debug" not in got["headers"]
    assert "cookie" not in got["headers"]
    assert "authorization" not in got["headers"]
    assert got["headers"]["accept"] == "text/plain"
    path = got["path"]
    assert "alice" not in path
    assert "page=2" in path
    hashed = path.split("user=")[1].split("&")[0]
    assert hashed.startswith("hmac-")
    assert len(hashed) == 37
    # Stable: the receiver can correlate the same user across requests.
    again = requests.get(url(upstreams, "app.test", "/hash/q?user=alice%40example.com"),
                         proxies=via(cproxy), timeout=10).json()["path"]
    assert again.endswith(f"user={hashed}")
    row = last_row(cproxy, "/hash/q?user=alice%40example.com&page")
    changes = json.dumps(row.get("extra"))
    assert "stripped header x-debug" in changes
    assert "stripped header cookie" in changes
    assert "hashed query parameter user" in changes


def test_hashes_depend_on_the_installation_key(content_proxy: Callable[..., RunningProxy],
                                               cproxy: RunningProxy, upstreams: Upstreams,
                                               tmp_path: Path) -> None:
    other = content_proxy(keys=tmp_path / "other-ca")
    target = url(upstreams, "app.test", "/hash/k?user=bob")
    one = requests.get(target, proxies=via(cproxy), timeout=10).json()["path"]
    two = requests.get(target, proxies=via(other), timeout=10).json()["path"]
    assert one != two
    key = tmp_path / "other-ca" / "transform.key"
    assert key.stat().st_mode & 0o777 == 0o600


def test_allow_list_of_headers_keeps_only_those(cproxy: RunningProxy,
                                                upstreams: Upstreams) -> None:
    got = requests.get(url(upstreams, "app.test", "/allow/x"),
                       headers={"X-Trace": "abc", "Authorization": "Bearer t", "Cookie": "c=1",
                                "Accept": "*/*"}, proxies=via(cproxy), timeout=10).json()
    assert got["headers"]["authorization"] == "Bearer t"  # named in allow
    assert "cookie" not in got["headers"]
    assert "x-trace" not in got["headers"]
    assert "user-agent" not in got["headers"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_json_fields_are_hashed_and_redacted(cproxy: RunningProxy, upstreams: Upstreams,
                                             chunked: bool) -> None:
    doc = {"user": {"email": "alice@example.com", "name": "Alice"},
           "items": [{"id": 7}, {"id": "x-42"}], "prompt": "the whole conversation"}
    raw = json.dumps(doc).encode()
    data = iter([raw[:10], raw[10:]]) if chunked else raw
    r = requests.post(url(upstreams, "app.test", f"/hash/json-{chunked}"), data=data,
                      headers={"Content-Type": "application/json"}, proxies=via(cproxy),
                      timeout=10)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["headers"]["content-length"] == str(len(got["body"]))
    assert "transfer-encoding" not in got["headers"]
    sent = json.loads(got["body"])
    assert sent["user"]["name"] == "Alice"
    assert sent["user"]["email"].startswith("hmac-")
    assert all(str(item["id"]).startswith("hmac-") for item in sent["items"])
    assert sent["prompt"] == "[redacted]"
    changes = json.dumps(last_row(cproxy, f"/hash/json-{chunked}").get("extra"))
    for what in ("hashed /user/email", "hashed /items/0/id", "hashed /items/1/id",
                 "redacted /prompt"):
        assert what in changes


def test_a_body_that_must_be_transformed_but_is_not_json_is_refused(
        cproxy: RunningProxy, upstreams: Upstreams) -> None:
    before = len(upstreams.http.seen)
    r = requests.post(url(upstreams, "app.test", "/hash/not-json"), data=b"plain words",
                      proxies=via(cproxy), timeout=10)
    assert r.status_code == 403
    assert "not JSON" in r.headers["X-Egresslock-Deny"]
    assert len(upstreams.http.seen) == before


@pytest.mark.parametrize(("path", "allowed"), [
    ("/simple/requests/", True),
    ("/repos/acme/widgets/commits/3f9a8b7c1d2e4f6a8b0c2d4e6f8a0b2c4d6e8f0a", True),
    ("/log?d=c2stbGl2ZS0xMjM0NTY3OGFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHl6", False),
    ("/go?url=https%3A%2F%2Fevil.example%2Fx", False),
    ("/p/" + "9f86d081884c7d659a2feaa0c55ad015" * 3, False),
])
def test_dynamic_links_are_refused_by_default(cproxy: RunningProxy, upstreams: Upstreams,
                                              path: str, allowed: bool) -> None:
    r = requests.get(url(upstreams, "write.test", path), proxies=via(cproxy), timeout=10)
    if allowed:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 403
    deny = r.headers["X-Egresslock-Deny"]
    assert deny.startswith("links; dynamic link refused by rule links")
    assert upstreams.http.seen[-1][1] != path


def test_budgets_deny_past_the_limit_and_refill_as_the_window_slides(
        cproxy: RunningProxy, upstreams: Upstreams) -> None:
    target = url(upstreams, "meta.test", "/budget")
    codes = [requests.get(target, proxies=via(cproxy), timeout=10).status_code
             for _ in range(4)]
    assert codes == [200, 200, 200, 403]
    r = requests.get(target, proxies=via(cproxy), timeout=10)
    assert "budget of 3 requests per 2s is spent" in r.headers["X-Egresslock-Deny"]
    time.sleep(2.2)
    assert requests.get(target, proxies=via(cproxy), timeout=10).status_code == 200
    time.sleep(2.2)
    # 600 bytes per window: a 700-byte body is refused before a byte of it is sent.
    before = len(upstreams.http.seen)
    r = requests.post(target, data=b"a" * 700, proxies=via(cproxy), timeout=10)
    assert r.status_code == 403
    assert "bytes out" in r.headers["X-Egresslock-Deny"]
    assert len(upstreams.http.seen) == before


def _raw_post(proxy: RunningProxy, host: str, port: int, path: str, parts: list[bytes],
              extra: bytes = b"") -> bytes:
    """A chunked POST sent part by part with pauses, so each part reaches the proxy alone."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(b"POST http://%s:%d%s HTTP/1.1\r\nHost: %s:%d\r\n%s"
                  b"Transfer-Encoding: chunked\r\n\r\n" % (
                      host.encode(), port, path.encode(), host.encode(), port, extra))
        for part in parts:
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            except OSError:
                break
            time.sleep(0.05)
        with contextlib.suppress(OSError):
            s.sendall(b"0\r\n\r\n")
        out = b""
        while True:
            try:
                data = s.recv(65536)
            except OSError:
                break
            if not data:
                break
            out += data
            if b"\r\n\r\n" in out and b"egresslock" in out:
                break
        return out


def test_a_secret_split_across_chunks_never_reaches_upstream(cproxy: RunningProxy,
                                                             upstreams: Upstreams) -> None:
    raw = SECRET.encode()
    parts = [b"x" * 5000, raw[:9], raw[9:17], raw[17:], b"tail"]
    before = len(upstreams.http.seen)
    out = _raw_post(cproxy, "write.test", upstreams.http.port, "/split", parts)
    assert out.startswith(b"HTTP/1.1 403"), out[:300]
    assert b"secret canary in the body (plain)" in out
    assert len(upstreams.http.seen) == before  # the upstream never finished a request
    row = last_row(cproxy, "/split")
    assert row["verdict"] == "deny"
    assert SECRET not in json.dumps(row)


def test_gzip_bodies_are_scanned_and_bombs_refused(cproxy: RunningProxy,
                                                   upstreams: Upstreams) -> None:
    target = url(upstreams, "write.test", "/gz")
    hidden = gzip.compress(b"ordinary text " * 1000 + SECRET.encode())
    r = requests.post(target, data=hidden, headers={"Content-Encoding": "gzip"},
                      proxies=via(cproxy), timeout=10)
    assert r.status_code == 403
    assert "decompressed body" in r.headers["X-Egresslock-Deny"]
    clean = gzip.compress(b"ordinary text " * 1000)
    r = requests.post(target, data=clean, headers={"Content-Encoding": "gzip"},
                      proxies=via(cproxy), timeout=10)
    assert r.status_code == 200
    assert r.json()["body"].encode("latin-1") == clean  # forwarded as it was sent
    bomb = gzip.compress(b"\0" * (80 << 20))
    r = requests.post(target, data=bomb, headers={"Content-Encoding": "gzip"},
                      proxies=via(cproxy), timeout=30)
    assert r.status_code == 403
    assert "decompression bomb" in r.headers["X-Egresslock-Deny"]


def test_report_mode_logs_what_content_checks_would_refuse(
        content_proxy: Callable[..., RunningProxy], upstreams: Upstreams) -> None:
    policy = "mode: report\n" + POLICY.format(http=upstreams.http.port, secret=SECRET)
    p = content_proxy(policy)
    r = requests.post(url(upstreams, "write.test", "/reported"), data=f"v={SECRET}",
                      proxies=via(p), timeout=10)
    assert r.status_code == 200
    assert SECRET in r.json()["body"]
    row = last_row(p, "/reported")
    assert row["verdict"] == "report"
    assert "secret canary in the body" in str(row["reason"])


@pytest.mark.parametrize("label", [
    SECRET.encode().hex()[:40] + "." + SECRET.encode().hex()[40:],   # hex, split across labels
    "q8zr2lx9tb4nm7kpw3vj6hd1yf5gc0sa.m2n8b4v6c1x9z7l5k3j0h8g6f4d2s1a9",  # data, no secret
], ids=["secret-in-labels", "dynamic-label"])
def test_a_tunnel_name_carrying_data_is_refused_before_any_lookup(
        cproxy: RunningProxy, label: str) -> None:
    """The CONNECT host (which the SNI must then equal) is checked like a DNS name: a secret
    in any label, or data in the labels a wildcard rule matches, is refused with 403 before the
    proxy resolves it, and the log does not hold the secret."""
    host = f"{label}.cdn.test"
    with socket.create_connection(("127.0.0.1", cproxy.port), timeout=10) as s:
        s.sendall(b"CONNECT %s:443 HTTP/1.1\r\nHost: %s:443\r\n\r\n" % (
            host.encode(), host.encode()))
        reply = s.recv(4096)
    assert reply.startswith(b"HTTP/1.1 403"), reply
    row = [r for r in cproxy.rows() if r["layer"] == "connect"][-1]
    assert row["verdict"] == "deny"
    assert row["rule_id"] == "cdn"
    assert SECRET.encode().hex()[:16] not in json.dumps(row)
    if "secret" in str(row["reason"]):
        assert "secret canary" in str(row["reason"])
        assert str(row["host"]).startswith("<redacted>")
    else:
        assert "dynamic name" in str(row["reason"])
