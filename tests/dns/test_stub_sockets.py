"""The stub on real UDP and TCP sockets on 127.0.0.1, asked by dnspython as any client would.

The stub runs on its own asyncio loop in a thread, with a real compiled policy and a fake resolver
(tests/dns/helpers.py), for the whole module; each test reads the audit records its queries left.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from egresslock.audit.record import AuditRecord
from egresslock.dns.stub import DnsStub
from tests.dns.helpers import SECRET, SLOW_SECONDS, FakeResolver, make_stub

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


@dataclass
class RunningStub:
    stub: DnsStub
    udp_port: int
    tcp_port: int
    records: list[AuditRecord] = field(default_factory=list)

    def since(self, mark: int) -> list[AuditRecord]:
        return self.records[mark:]


@pytest.fixture(scope="module")
def running() -> Iterator[RunningStub]:
    records: list[AuditRecord] = []
    stub = make_stub(records, FakeResolver(), tcp_idle_timeout=2.0)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((HOST, 0))
    udp.setblocking(False)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind((HOST, 0))
    tcp.listen(16)
    tcp.setblocking(False)
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        await asyncio.gather(stub.serve_udp(udp), stub.serve_tcp(tcp))

    main = loop.create_task(serve())

    def run() -> None:
        asyncio.set_event_loop(loop)
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(main)

    thread = threading.Thread(target=run, name="dns-stub", daemon=True)
    thread.start()
    try:
        yield RunningStub(stub, udp.getsockname()[1], tcp.getsockname()[1], records)
    finally:
        loop.call_soon_threadsafe(main.cancel)
        thread.join(10)
        loop.close()
        udp.close()
        tcp.close()


def udp(running: RunningStub, name: str, rdtype: str = "A",
        **kwargs: object) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, **kwargs)  # type: ignore[arg-type]
    return dns.query.udp(q, HOST, port=running.udp_port, timeout=3)


def addresses(msg: dns.message.Message) -> list[str]:
    return sorted(str(r) for rrset in msg.answer for r in rrset)


def test_allowed_a_and_aaaa(running: RunningStub) -> None:
    mark = len(running.records)
    r = udp(running, "app.test", "A")
    assert (r.rcode(), addresses(r)) == (dns.rcode.NOERROR, ["127.0.0.1"])
    assert r.answer[0].ttl == 30
    assert not r.flags & (dns.flags.AA | dns.flags.RA)
    r = udp(running, "app.test", "AAAA", use_edns=0)
    assert (r.rcode(), addresses(r)) == (dns.rcode.NOERROR, ["::1"])
    rows = running.since(mark)
    assert [(x.verdict, x.rule_id, x.address) for x in rows] == [
        ("allow", "app", "127.0.0.1"), ("allow", "app", "::1")]
    assert running.stub.names.names_for(ipaddress.ip_address("::1")) == ("app.test",)


def test_mx_is_nodata(running: RunningStub) -> None:
    r = udp(running, "app.test", "MX")
    assert r.rcode() == dns.rcode.NOERROR
    assert r.answer == []


def test_denied_name_is_refused_with_a_scored_audit_record(running: RunningStub) -> None:
    mark = len(running.records)
    r = udp(running, "evil.test", "A")
    assert r.rcode() == dns.rcode.REFUSED
    (rec,) = running.since(mark)
    assert (rec.layer, rec.verdict, rec.rule_id, rec.host, rec.protocol) == (
        "dns", "deny", "default", "evil.test", "udp")
    assert rec.reason == "no rule allows host evil.test"
    assert rec.extra is not None
    assert rec.extra["score"] == 0.0
    assert rec.extra["qtype"] == "A"


def test_rebinding_to_metadata_is_refused(running: RunningStub) -> None:
    mark = len(running.records)
    r = udp(running, "meta.test", "A")
    assert r.rcode() == dns.rcode.REFUSED
    (rec,) = running.since(mark)
    assert "169.254.169.254 (link-local) is blocked by network.block_private" in rec.reason
    r = udp(running, "mixed.wild.test", "A")
    assert addresses(r) == ["127.0.0.2"]


@pytest.mark.parametrize("suffix", ["evil.test", "wild.test"])
def test_exfil_name_with_secret_in_hex_scores_one(running: RunningStub, suffix: str) -> None:
    hexed = SECRET.encode().hex()
    mark = len(running.records)
    r = udp(running, f"{hexed[:30]}.{hexed[30:]}.{suffix}", "TXT")
    assert r.rcode() == dns.rcode.REFUSED
    (rec,) = running.since(mark)
    assert rec.verdict == "deny"
    assert rec.extra is not None
    assert rec.extra["score"] == 1.0
    # One label may hold a whole fragment; if not, the labels joined do.
    reasons = rec.extra["score_reasons"]
    assert isinstance(reasons, list)
    (reason,) = reasons
    assert isinstance(reason, str)
    assert reason.startswith("secret #1 ")
    assert reason.endswith("(hex)")


def test_servfail_when_lookup_fails(running: RunningStub) -> None:
    r = udp(running, "nowhere.wild.test")
    assert r.rcode() == dns.rcode.SERVFAIL


def _raw_udp(running: RunningStub, data: bytes, timeout: float = 0.5) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(data, (HOST, running.udp_port))
        try:
            return s.recv(65535)
        except TimeoutError:
            return None


@pytest.mark.parametrize(("data", "formerr"), [
    pytest.param(b"", False, id="empty datagram"),
    pytest.param(b"\xff" * 5, False, id="no header"),
    pytest.param(b"\x12\x34\x81\x80" + b"\x00" * 8, False, id="a response"),
    pytest.param(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fabc", True,
                 id="question cut short"),
    pytest.param(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01",
                 True, id="pointer loop"),
    pytest.param(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x3f" * 2000, True,
                 id="long garbage"),
])
def test_malformed_packets_and_the_server_keeps_serving(running: RunningStub, data: bytes,
                                                        formerr: bool) -> None:
    reply = _raw_udp(running, data)
    if formerr:
        assert reply is not None
        r = dns.message.from_wire(reply)
        assert (r.id, r.rcode()) == (0x1234, dns.rcode.FORMERR)
    else:
        assert reply is None
    assert addresses(udp(running, "app.test")) == ["127.0.0.1"]


def _framed(name: str, rdtype: str, ident: int) -> bytes:
    q = dns.message.make_query(name, rdtype, id=ident).to_wire()
    return struct.pack("!H", len(q)) + q


def _read_framed(sock: socket.socket) -> dns.message.Message:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf

    (size,) = struct.unpack("!H", exactly(2))
    return dns.message.from_wire(exactly(size))


def test_tcp_two_queries_on_one_connection(running: RunningStub) -> None:
    with socket.create_connection((HOST, running.tcp_port), timeout=5) as s:
        s.sendall(_framed("app.test", "A", 1) + _framed("evil.test", "A", 2))
        replies = {m.id: m for m in (_read_framed(s), _read_framed(s))}
        assert addresses(replies[1]) == ["127.0.0.1"]
        assert replies[2].rcode() == dns.rcode.REFUSED
        s.sendall(_framed("app.test", "AAAA", 3))
        assert addresses(_read_framed(s)) == ["::1"]


def test_tcp_with_dnspython_and_untruncated_answers(running: RunningStub) -> None:
    mark = len(running.records)
    q = dns.message.make_query("many.wild.test", "A")
    r = dns.query.tcp(q, HOST, port=running.tcp_port, timeout=3)
    assert len(addresses(r)) == 60
    assert running.since(mark)[0].protocol == "tcp"
    r = udp(running, "many.wild.test")  # dnspython hands back the truncated reply
    assert r.flags & dns.flags.TC


def test_tcp_oversized_frame_closes_the_connection(running: RunningStub) -> None:
    with socket.create_connection((HOST, running.tcp_port), timeout=5) as s:
        s.sendall(b"\xff\xff" + b"x" * 100)
        assert s.recv(10) == b""
    assert addresses(udp(running, "app.test")) == ["127.0.0.1"]


def test_slow_lookup_does_not_block_other_queries(running: RunningStub) -> None:
    result: list[dns.message.Message] = []
    slow = threading.Thread(target=lambda: result.append(udp(running, "slow.wild.test")))
    slow.start()
    time.sleep(0.1)
    started = time.monotonic()
    for _ in range(3):
        assert addresses(udp(running, "app.test")) == ["127.0.0.1"]
    with socket.create_connection((HOST, running.tcp_port), timeout=5) as s:
        s.sendall(_framed("slow.wild.test", "A", 1) + _framed("app.test", "A", 2))
        first = _read_framed(s)
        assert first.id == 2, "a pipelined fast query waited for the slow one"
        assert time.monotonic() - started < SLOW_SECONDS
        assert addresses(_read_framed(s)) == ["127.0.0.9"]
    slow.join(5)
    assert addresses(result[0]) == ["127.0.0.9"]


def test_idle_tcp_connection_is_closed(running: RunningStub) -> None:
    with socket.create_connection((HOST, running.tcp_port), timeout=10) as s:
        started = time.monotonic()
        assert s.recv(10) == b""
        assert 1.5 < time.monotonic() - started < 5
