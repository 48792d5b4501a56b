"""The actions endpoint on the proxy's own address (integration: a proxy on a loopback socket).

The proxy runs in this process with a recording handler in place of the courier: requests for
``/actions`` in origin-form or in absolute-form naming the proxy itself reach the handler; every
other request is the proxy's business as before, and without a handler nothing changed at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from egresslock.audit import AuditRecord
from egresslock.policy import compile_policy, parse_policy
from egresslock.proxy.actions import (
    MAX_CALL_BYTES,
    ActionCall,
    ActionHandler,
    ActionReply,
    action_path,
)
from egresslock.proxy.context import Limits, PolicyHolder, ProxyContext
from egresslock.proxy.http1 import parse_request_head
from egresslock.proxy.resolver import Resolver
from egresslock.proxy.server import ProxyServer, make_listener
from tests.proxy.servers import exchange_raw, proxy_in_thread

pytestmark = pytest.mark.integration


@dataclass
class Endpoint:
    port: int
    calls: list[ActionCall] = field(default_factory=list)
    rows: list[AuditRecord] = field(default_factory=list)


def _serve(with_actions: bool) -> Iterator[Endpoint]:
    policy = parse_policy("version: 1\nrules:\n  - {id: app, host: app.test, ports: [80]}\n")
    endpoint = Endpoint(0)
    ctx = ProxyContext(PolicyHolder(None, compile_policy(policy)), endpoint.rows.append,
                       Resolver(), Limits(head_timeout=2, idle_timeout=2, body_timeout=2))

    async def handler(call: ActionCall) -> ActionReply:
        endpoint.calls.append(call)
        return ActionReply(200, b'{"ok": true}', ((b"X-Test", b"1"),))

    actions: ActionHandler | None = handler if with_actions else None
    listener = make_listener("127.0.0.1", 0)
    endpoint.port = listener.getsockname()[1]
    with proxy_in_thread(ProxyServer(ctx, actions=actions), listener):
        yield endpoint
    listener.close()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    yield from _serve(with_actions=True)


@pytest.fixture
def plain_proxy() -> Iterator[Endpoint]:
    yield from _serve(with_actions=False)


def _post(target: bytes, body: bytes, host: bytes = b"127.0.0.1:3128") -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (target, host, len(body),
                                                                   body))


PATHS = {
    "origin-form call": (b"POST /actions/create_issue", 3128, "/actions/create_issue"),
    "origin-form list": (b"GET /actions", 3128, "/actions"),
    "origin-form list with a query": (b"GET /actions?x=1", 3128, "/actions"),
    "absolute-form to the proxy itself": (b"POST http://127.0.0.1:3128/actions/x", 3128,
                                          "/actions/x"),
    "absolute-form, localhost": (b"GET http://localhost:3128/actions", 3128, "/actions"),
    "absolute-form, IPv6 loopback": (b"GET http://[::1]:3128/actions", 3128, "/actions"),
    "absolute-form to another local port": (b"GET http://127.0.0.1:8080/actions", 3128, None),
    "absolute-form without a port": (b"GET http://127.0.0.1/actions", 3128, None),
    "another host": (b"GET http://app.test:3128/actions", 3128, None),
    "a look-alike path": (b"GET /actionsx", 3128, None),
    "another origin-form path": (b"GET /metrics", 3128, None),
}


@pytest.mark.parametrize("case", PATHS, ids=list(PATHS))
def test_which_requests_are_for_the_endpoint(case: str) -> None:
    line, port, expected = PATHS[case]
    head = parse_request_head(line + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert action_path(head, port) == expected


def test_origin_form_reaches_the_handler(endpoint: Endpoint) -> None:
    out = exchange_raw(endpoint.port, _post(b"/actions/create_issue", b'{"a": 1}'))
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"X-Test: 1\r\n" in out
    assert b"Content-Type: application/json\r\n" in out
    assert out.endswith(b'{"ok": true}')
    assert endpoint.calls == [ActionCall("POST", "create_issue", b'{"a": 1}')]


def test_absolute_form_to_the_proxy_reaches_the_handler(endpoint: Endpoint) -> None:
    target = b"http://127.0.0.1:%d/actions" % endpoint.port
    out = exchange_raw(endpoint.port, b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                       b"Connection: close\r\n\r\n" % (target, endpoint.port))
    assert out.startswith(b"HTTP/1.1 200")
    assert endpoint.calls == [ActionCall("GET", None, b"")]


def test_a_chunked_call_and_keep_alive(endpoint: Endpoint) -> None:
    body = b'{"title": "x"}'
    one = (b"POST /actions/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    two = b"GET /actions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = exchange_raw(endpoint.port, one + two)
    assert out.count(b"HTTP/1.1 200") == 2
    assert endpoint.calls == [ActionCall("POST", "a", body), ActionCall("GET", None, b"")]


def test_an_oversized_call_is_refused_and_logged(endpoint: Endpoint) -> None:
    head = (b"POST /actions/a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
            % (MAX_CALL_BYTES + 1))
    out = exchange_raw(endpoint.port, head)
    assert out.startswith(b"HTTP/1.1 413")
    assert endpoint.calls == []
    assert [(r.layer, r.verdict) for r in endpoint.rows] == [("courier", "deny")]


def test_other_requests_are_still_the_proxys(endpoint: Endpoint) -> None:
    out = exchange_raw(endpoint.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")
    assert b"forward proxy" in out
    out = exchange_raw(endpoint.port, b"GET http://127.0.0.1:1/actions HTTP/1.1\r\n"
                                      b"Host: 127.0.0.1:1\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 403")
    assert endpoint.calls == []


def test_without_a_handler_nothing_changes(plain_proxy: Endpoint) -> None:
    out = exchange_raw(plain_proxy.port, _post(b"/actions/create_issue", b"{}"))
    assert out.startswith(b"HTTP/1.1 400")
    assert b"forward proxy" in out
    target = b"http://127.0.0.1:%d/actions" % plain_proxy.port
    out = exchange_raw(plain_proxy.port, b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n"
                       % (target, plain_proxy.port))
    assert out.startswith(b"HTTP/1.1 403")  # loopback: no rule, and block_private
