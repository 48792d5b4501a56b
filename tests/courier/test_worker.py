"""The worker, without its sandbox: what it sends through the proxy, and what it gives up.

A fake forward proxy on loopback records each request as the real proxy would receive it
(absolute-form target, headers, body) and answers as the real one does: the upstream's response,
a 403 with X-Egresslock-Deny, or a 502 of its own. The worker process itself is started as
``egresslock run`` starts it (``python -I -m egresslock.courier.worker --fd N``), only outside a
sandbox, to show the channel, the hello, the lockdown and calls after it.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from egresslock.courier.template import Template, parse_template
from egresslock.courier.wire import Lines, WireError, encode
from egresslock.courier.worker import Worker, _tls_context
from egresslock.sandbox.landlock import landlock_abi

pytestmark = pytest.mark.integration

PARAMS = {"type": "object", "additionalProperties": False, "required": ["name"],
          "properties": {"name": {"type": "string", "pattern": "^[^ ]{1,40}$", "maxLength": 40},
                         "text": {"type": "string", "x-free-text": True, "maxLength": 100}}}


class FakeProxy(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: list[dict[str, Any]]

    def log_message(self, format: str, *args: object) -> None:
        return

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append({"target": self.path,  # type: ignore[attr-defined]
                                 "headers": list(self.headers.items()), "body": body})
        if "/deny" in self.path:
            self._send(403, b"egresslock: denied\n", [("X-Egresslock-Deny", "app; no")])
        elif "/gone" in self.path:
            self._send(502, b"egresslock: cannot connect to 198.51.100.10:80\n")
        elif "/big" in self.path:
            self._send(200, b"x" * 5000, [("Content-Type", "text/plain")])
        else:
            self._send(201, b'{"created": true}', [("Content-Type", "application/json"),
                                                   ("Location", "/items/1"),
                                                   ("Set-Cookie", "s=1"),
                                                   ("X-RateLimit-Remaining", "9")])

    def _send(self, status: int, body: bytes, headers: Sequence[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def fake_proxy() -> Iterator[http.server.ThreadingHTTPServer]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeProxy)
    server.seen = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _template(path: str = "items") -> Template:
    template, problems = parse_template(
        "make", "POST", f"http://app.test/{path}/{{name}}",
        {"Authorization": "Bearer {credential.TOKEN}"}, {"text": "{text}", "v": 1}, PARAMS)
    assert problems == [], problems
    assert template is not None
    return template


def _worker(proxy: http.server.ThreadingHTTPServer, *templates: Template,
            max_body: int = 1 << 20) -> Worker:
    return Worker({t.name: t for t in templates}, {"TOKEN": "EGLPHtoken"},
                  ("127.0.0.1", proxy.server_address[1]), _tls_context(), max_body, 5.0)


def test_a_call_is_sent_in_absolute_form_exactly(fake_proxy: Any) -> None:
    reply = _worker(fake_proxy, _template()).call(
        {"id": 7, "action": "make", "params": {"name": "a/b", "text": "hi"}})
    assert reply["ok"] is True, reply
    assert reply["id"] == 7
    assert reply["status"] == 201
    assert reply["body"] == '{"created": true}'
    # Only the headers an agent needs: no cookie.
    assert reply["headers"] == {"content-type": "application/json", "location": "/items/1",
                                "x-ratelimit-remaining": "9"}
    assert reply["request"] == {"method": "POST", "target": "/items/a%2Fb", "bytes": 19}
    (seen,) = fake_proxy.seen
    assert seen["target"] == "http://app.test/items/a%2Fb"
    assert seen["headers"] == [("Host", "app.test"), ("Authorization", "Bearer EGLPHtoken"),
                               ("Content-Type", "application/json"),
                               ("Content-Length", "19")]
    assert seen["body"] == b'{"text":"hi","v":1}'


def test_a_refused_call_sends_nothing(fake_proxy: Any) -> None:
    worker = _worker(fake_proxy, _template())
    params: object
    for params in ({"name": "a b"}, {"name": "x", "text": "a\r\nb"}, {"name": ".."}, [],
                   {"name": "x", "extra": 1}):
        reply = worker.call({"id": 1, "action": "make", "params": params})
        assert reply["ok"] is False
        assert reply["kind"] == "refused", reply
    assert worker.call({"id": 2, "action": "nope", "params": {}})["kind"] == "refused"
    assert fake_proxy.seen == []


def test_a_proxy_refusal_and_an_upstream_failure_are_told_apart(fake_proxy: Any) -> None:
    worker = _worker(fake_proxy, _template("deny"))
    reply = worker.call({"id": 1, "action": "make", "params": {"name": "a"}})
    assert (reply["ok"], reply["kind"]) == (False, "denied")
    assert "app; no" in reply["reason"]
    worker = _worker(fake_proxy, _template("gone"))
    reply = worker.call({"id": 1, "action": "make", "params": {"name": "a"}})
    assert (reply["ok"], reply["kind"]) == (False, "upstream")
    assert "cannot connect" in reply["reason"]


def test_a_large_response_is_capped(fake_proxy: Any) -> None:
    reply = _worker(fake_proxy, _template("big"), max_body=1000).call(
        {"id": 1, "action": "make", "params": {"name": "a"}})
    assert reply["ok"] is True
    assert reply["truncated"] is True
    assert len(reply["body"]) == 1000


def test_no_proxy_is_an_upstream_failure() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Worker({"make": _template()}, {"TOKEN": "EGLPHtoken"}, ("127.0.0.1", port),
                    _tls_context(), 100, 2.0)
    reply = worker.call({"id": 1, "action": "make", "params": {"name": "a"}})
    assert (reply["ok"], reply["kind"]) == (False, "upstream")


class Channel:
    """egresslock's end of the channel to a worker process."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lines = Lines()
        self.queued: list[dict[str, Any]] = []

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode(message))

    def next(self) -> dict[str, Any]:
        while not self.queued:
            data = self.sock.recv(1 << 16)
            assert data, "the worker closed the channel"
            self.queued.extend(self.lines.feed(data))
        return self.queued.pop(0)


def _start_worker(fake_proxy: Any) -> tuple[subprocess.Popen[bytes], Channel]:
    parent, child = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-I", "-m", "egresslock.courier.worker", "--fd",
                             str(child.fileno())], pass_fds=[child.fileno()])
    child.close()
    parent.settimeout(20)
    channel = Channel(parent)
    channel.send({"hello": 1, "proxy": ["127.0.0.1", fake_proxy.server_address[1]],
                  "actions": [_template().to_json()], "placeholders": {"TOKEN": "EGLPHtoken"}})
    return proc, channel


def test_the_worker_process_locks_itself_down_then_serves_calls(fake_proxy: Any) -> None:
    proc, channel = _start_worker(fake_proxy)
    try:
        ready = channel.next()
        assert ready["ready"] is True, ready
        assert ready["pid"] == proc.pid
        if landlock_abi() > 0:
            assert ready["filesystem"].startswith("locked (Landlock ABI"), ready
        else:
            assert ready["filesystem"].startswith("not locked"), ready
        # After the lockdown, calls (valid and refused) still work: all they need was loaded.
        channel.send({"id": 1, "action": "make", "params": {"name": "n"}})
        channel.send({"id": 2, "action": "make", "params": {"name": "n", "x": 1}})
        first, second = channel.next(), channel.next()
        assert (first["id"], first["ok"], first["status"]) == (1, True, 201), first
        assert (second["id"], second["ok"], second["kind"]) == (2, False, "refused"), second
    finally:
        channel.sock.close()
        assert proc.wait(10) == 0


def test_after_the_lockdown_no_file_can_be_opened() -> None:
    if landlock_abi() == 0:
        pytest.skip("this kernel has no Landlock")
    script = ("import json, socket; from egresslock.courier.lockdown import lock_down\n"
              "state = lock_down(3128); out = {'state': state}\n"
              "for path in ('/etc/hostname', '/proc/self/environ', '/'):\n"
              "    try: open(path, 'rb').close(); out[path] = 'read'\n"
              "    except OSError as exc: out[path] = exc.strerror\n"
              "s = socket.socket()\n"
              "try: s.connect(('127.0.0.1', 9)); out['connect'] = 'ok'\n"
              "except OSError as exc: out['connect'] = exc.strerror\n"
              "print(json.dumps(out))\n")
    done = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                          check=True, timeout=30)
    out = json.loads(done.stdout)
    assert out["state"].startswith("locked")
    assert out["/etc/hostname"] == "Permission denied"
    assert out["/proc/self/environ"] == "Permission denied"
    assert out["/"] == "Permission denied"
    if landlock_abi() >= 4:
        assert out["connect"] == "Permission denied"  # only the proxy's port is allowed


def test_the_channel_refuses_oversized_and_malformed_lines() -> None:
    lines = Lines(limit=10)
    assert lines.feed(b'{"a":1}\n{"b"') == [{"a": 1}]
    assert lines.feed(b":2}\n") == [{"b": 2}]
    with pytest.raises(WireError):
        lines.feed(b"x" * 11)
    with pytest.raises(WireError):
        Lines().feed(b"[1]\n")
    with pytest.raises(WireError):
        Lines().feed(b"not json\n")
