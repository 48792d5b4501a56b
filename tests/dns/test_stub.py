"""The stub's decisions, fed as bytes to ``DnsStub.handle`` (no sockets): each row a query, the
rcode and answers it must get, and the audit record it must leave."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import pytest

from egresslock.audit.record import AuditRecord
from egresslock.dns.stub import DnsStub
from tests.dns.helpers import SECRET, FakeResolver, make_stub

NOERROR, REFUSED, SERVFAIL = dns.rcode.NOERROR, dns.rcode.REFUSED, dns.rcode.SERVFAIL
NOTIMP, FORMERR, BADVERS = dns.rcode.NOTIMP, dns.rcode.FORMERR, dns.rcode.BADVERS


def ask(stub: DnsStub, wire: bytes, protocol: str = "udp") -> dns.message.Message | None:
    out = asyncio.run(stub.handle(wire, protocol))
    return None if out is None else dns.message.from_wire(out)


def query(name: str, rdtype: str = "A", **kwargs: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kwargs).to_wire()  # type: ignore[arg-type]


def addresses(msg: dns.message.Message) -> list[str]:
    return sorted(str(r) for rrset in msg.answer for r in rrset)


@pytest.fixture
def records() -> list[AuditRecord]:
    return []


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver()


@pytest.fixture
def stub(records: list[AuditRecord], resolver: FakeResolver) -> DnsStub:
    return make_stub(records, resolver)


HEX_SECRET = SECRET.encode().hex()


@pytest.mark.parametrize(("name", "rdtype", "rcode", "answers", "verdict", "rule", "reason"), [
    ("app.test", "A", NOERROR, ["127.0.0.1"], "allow", "app", "name allowed by rule app"),
    ("APP.test.", "AAAA", NOERROR, ["::1"], "allow", "app", "name allowed by rule app"),
    ("app.test", "MX", NOERROR, [], "allow", "app", "type MX is answered with no data"),
    ("app.test", "TXT", NOERROR, [], "allow", "app", "type TXT is answered with no data"),
    ("v4only.wild.test", "AAAA", NOERROR, [], "allow", "wild", "has no AAAA address"),
    ("evil.test", "A", REFUSED, [], "deny", "default", "no rule allows host evil.test"),
    ("evil.test", "TXT", REFUSED, [], "deny", "default", "no rule allows host evil.test"),
    ("gist.wild.test", "A", REFUSED, [], "deny", "no-gist", "denied by rule no-gist"),
    ("meta.test", "A", REFUSED, [], "deny", "default",
     "169.254.169.254 (link-local) is blocked by network.block_private"),
    ("mixed.wild.test", "A", NOERROR, ["127.0.0.2"], "allow", "wild", "allowed by rule wild"),
    ("mixed.wild.test", "AAAA", REFUSED, [], "deny", "default", "fe80::1 (link-local)"),
    ("gone.wild.test", "A", SERVFAIL, [], "allow", "wild",
     "but resolving gone.wild.test failed: cannot resolve gone.wild.test"),
    (f"{HEX_SECRET}.wild.test", "A", REFUSED, [], "deny", "secrets",
     "carries a secret: secret #1 in the name (hex)"),
    (f"{HEX_SECRET}.evil.test", "A", REFUSED, [], "deny", "default", "no rule allows host"),
])
def test_answers(stub: DnsStub, records: list[AuditRecord], name: str, rdtype: str, rcode: int,
                 answers: list[str], verdict: str, rule: str, reason: str) -> None:
    r = ask(stub, query(name, rdtype))
    assert r is not None
    assert r.rcode() == rcode
    assert addresses(r) == answers
    (rec,) = records
    assert (rec.layer, rec.verdict, rec.rule_id, rec.protocol) == ("dns", verdict, rule, "udp")
    assert reason in rec.reason
    assert rec.extra is not None
    assert rec.extra["qtype"] == rdtype
    assert isinstance(rec.extra["score"], float)
    assert rec.address == (answers[0] if answers else None)


def test_denied_exfil_name_is_logged_with_its_score(stub: DnsStub, records: list[AuditRecord],
                                                    resolver: FakeResolver) -> None:
    ask(stub, query(f"{HEX_SECRET}.evil.test", "TXT"))
    (rec,) = records
    assert rec.extra is not None
    assert rec.extra["score"] == 1.0
    assert rec.extra["score_reasons"] == ["secret #1 in the name (hex)"]
    assert rec.host == f"{HEX_SECRET}.evil.test"
    assert resolver.asked == [], "a refused name must never be looked up"


def test_answers_are_remembered_for_the_proxy(stub: DnsStub) -> None:
    ask(stub, query("app.test"))
    ask(stub, query("mixed.wild.test"))
    assert stub.names.addresses_for("app.test") == (ipaddress.ip_address("127.0.0.1"),)
    assert stub.names.addresses_for("mixed.wild.test") == (ipaddress.ip_address("127.0.0.2"),)
    assert stub.names.names_for(ipaddress.ip_address("169.254.169.254")) == ()


@pytest.mark.parametrize(("wire", "rcode", "reason"), [
    pytest.param(query("app.test", rdclass="CH"), REFUSED, "class 3 not served",
                 id="chaos class"),
    pytest.param(query("app.test", use_edns=1), BADVERS, "EDNS version 1", id="EDNS version 1"),
    pytest.param(b"\x00\x01\x11\x00" + query("app.test")[4:], NOTIMP, "opcode 2",
                 id="STATUS opcode"),
    pytest.param(b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03a\\b\x04test\x00\x00\x01"
                 b"\x00\x01", REFUSED, "name refused", id="backslash in a label"),
    pytest.param(b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03a.b\x04test\x00\x00\x01"
                 b"\x00\x01", REFUSED, "name refused", id="dot in a label"),
    pytest.param(query("."), REFUSED, "name refused", id="root name"),
    pytest.param(b"\x00\x07\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ab", FORMERR,
                 "malformed DNS message", id="cut-off question"),
])
def test_odd_queries(stub: DnsStub, records: list[AuditRecord], wire: bytes, rcode: int,
                     reason: str) -> None:
    r = ask(stub, wire)
    assert r is not None
    assert r.rcode() == rcode
    (rec,) = records
    assert rec.verdict == "deny"
    assert reason in rec.reason


@pytest.mark.parametrize("wire", [b"", b"\x00" * 11, b"\x00\x01\x81\x00" + b"\x00" * 8],
                         ids=["empty", "short", "response"])
def test_unanswerable_messages_are_dropped_and_logged(stub: DnsStub, records: list[AuditRecord],
                                                      wire: bytes) -> None:
    assert ask(stub, wire) is None
    (rec,) = records
    assert rec.extra is not None
    assert rec.extra["replied"] is False


def test_tcp_is_not_truncated(stub: DnsStub) -> None:
    udp = ask(stub, query("many.wild.test"))
    assert udp is not None
    assert udp.flags & dns.flags.TC
    assert udp.answer == []
    tcp = ask(stub, query("many.wild.test"), "tcp")
    assert tcp is not None
    assert len(addresses(tcp)) == 60


def test_slow_resolve_becomes_servfail(records: list[AuditRecord],
                                       resolver: FakeResolver) -> None:
    stub = make_stub(records, resolver, resolve_timeout=0.05)
    r = ask(stub, query("slow.wild.test"))
    assert r is not None
    assert r.rcode() == SERVFAIL
    assert "timed out after 0.05s" in records[0].reason


def test_max_score_refuses_data_names_that_rules_allow(records: list[AuditRecord],
                                                       resolver: FakeResolver) -> None:
    stub = make_stub(records, resolver, max_score=0.7)
    label = "6ljx66idjs5kdq4a222tblnw4qouwau5esbjpdywx2tnuoui4eyf2ctyg2c3"
    r = ask(stub, query(f"{label}.wild.test"))
    assert r is not None
    assert r.rcode() == REFUSED
    assert "over max_score 0.7" in records[0].reason
    assert resolver.asked == []


@pytest.mark.parametrize(("name", "rdtype", "answers", "reason"), [
    ("evil.test", "A", None, "enforce would deny: no rule allows host evil.test"),
    ("meta.test", "A", ["169.254.169.254"], "169.254.169.254 (link-local) is blocked"),
    (f"{HEX_SECRET}.wild.test", "A", None, "secret #1 in the name (hex)"),
    ("app.test", "A", ["127.0.0.1"], None),
])
def test_report_mode_answers_and_reports(records: list[AuditRecord], resolver: FakeResolver,
                                         name: str, rdtype: str, answers: list[str] | None,
                                         reason: str | None) -> None:
    stub = make_stub(records, resolver, mode="report")
    r = ask(stub, query(name, rdtype))
    assert r is not None
    (rec,) = records
    if reason is None:
        assert rec.verdict == "allow"
    else:
        assert rec.verdict == "report"
        assert reason in rec.reason
    if answers is not None:
        assert r.rcode() == NOERROR
        assert addresses(r) == answers
    else:
        # evil.test and the secret name do not resolve in the fake: the report is still written.
        assert r.rcode() in (NOERROR, SERVFAIL)


def test_a_failing_audit_log_drops_the_reply() -> None:
    def broken(_: AuditRecord) -> None:
        raise OSError("disk full")

    stub = make_stub([], FakeResolver())
    stub._log = broken
    out = asyncio.run(stub._handle_safely(query("app.test"), "udp"))
    assert out is None


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"ttl": -1}, "ttl"),
    ({"max_in_flight": 0}, "max_in_flight"),
])
def test_rejects_bad_settings(kwargs: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        make_stub([], FakeResolver(), **kwargs)
