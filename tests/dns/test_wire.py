"""The DNS codec: tables of queries it must read or refuse, responses checked by dnspython, and
the property that any bytes parse or raise DnsFormatError, never anything else."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import struct

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egresslock.dns.wire import (
    TCP_MAX_SIZE,
    DnsFormatError,
    Query,
    Rcode,
    answer,
    nodata,
    parse_query,
    refuse,
    type_name,
)

SETTINGS = settings(max_examples=int(os.environ.get("EGRESSLOCK_FUZZ_EXAMPLES", "400")),
                    deadline=None, suppress_health_check=[HealthCheck.too_slow])

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address


def header(ident: int = 0x1234, flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0,
           ar: int = 0) -> bytes:
    return struct.pack("!6H", ident, flags, qd, an, ns, ar)


def qname(*labels: bytes) -> bytes:
    return b"".join(bytes((len(x),)) + x for x in labels) + b"\x00"


A_IN = struct.pack("!HH", 1, 1)
OPT_4096 = b"\x00" + struct.pack("!HHIH", 41, 4096, 0, 0)
SIMPLE = header() + qname(b"app", b"test") + A_IN


def wire_query(name: str, rdtype: str = "A", **kwargs: object) -> bytes:
    return dns.message.make_query(name, rdtype, **kwargs).to_wire()  # type: ignore[arg-type]


# --- reading ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "name", "qtype", "udp_size", "edns"), [
    pytest.param(SIMPLE, "app.test", 1, 512, None, id="plain A query"),
    pytest.param(header() + qname(b"ApP", b"TeSt") + A_IN, "app.test", 1, 512, None,
                 id="upper case is folded"),
    pytest.param(header(ar=1) + qname(b"app", b"test") + A_IN + OPT_4096, "app.test", 1, 4096, 0,
                 id="EDNS payload size is noted"),
    pytest.param(header(ar=1) + qname(b"x") + A_IN + b"\x00" + struct.pack("!HHIH", 41, 100, 0, 0),
                 "x", 1, 512, 0, id="EDNS payload below 512 counts as 512"),
    pytest.param(header(ar=1) + qname(b"x") + A_IN + b"\x00"
                 + struct.pack("!HHIH", 41, 1232, 1 << 16, 0), "x", 1, 1232, 1,
                 id="EDNS version is noted"),
    pytest.param(header(ar=1) + qname(b"a", b"b") + A_IN + b"\xc0\x0c"
                 + struct.pack("!HHIH", 250, 255, 0, 3) + b"sig", "a.b", 1, 512, None,
                 id="other additional records are skipped, compressed owner included"),
    pytest.param(header() + qname() + struct.pack("!HH", 2, 1), "", 2, 512, None,
                 id="root name"),
    pytest.param(header() + qname(b"api.github", b"com") + A_IN, "api\\.github.com", 1, 512, None,
                 id="dot inside a label is escaped, not a separator"),
    pytest.param(header() + qname(b"a\xff\x00\\", b"b") + A_IN, "a\\255\\000\\\\.b", 1, 512, None,
                 id="other octets use decimal escapes"),
    pytest.param(header() + qname(b"x" * 63, b"y") + struct.pack("!HH", 28, 1), "x" * 63 + ".y",
                 28, 512, None, id="63-octet label is the maximum"),
])
def test_reads_query(data: bytes, name: str, qtype: int, udp_size: int,
                     edns: int | None) -> None:
    q = parse_query(data)
    assert (q.id, q.name, q.qtype, q.qclass, q.udp_size, q.edns_version) == (
        0x1234, name, qtype, 1, udp_size, edns)
    assert q.rd
    assert q.opcode == 0


def test_question_is_kept_as_received_for_the_echo() -> None:
    data = header() + qname(b"ApP", b"TeSt") + A_IN
    assert parse_query(data).question == qname(b"ApP", b"TeSt") + A_IN


_LONG = [b"x" * 63] * 4


@pytest.mark.parametrize(("data", "replyable", "needle"), [
    pytest.param(b"", False, "shorter than the 12-octet header", id="empty"),
    pytest.param(header()[:11], False, "shorter", id="11 octets"),
    pytest.param(header(flags=0x8100) + qname(b"a") + A_IN, False, "response",
                 id="a response is never answered"),
    pytest.param(header(qd=0), True, "0 questions", id="no question"),
    pytest.param(header(qd=2) + qname(b"a") + A_IN * 2, True, "2 questions",
                 id="two questions"),
    pytest.param(header(an=1) + qname(b"a") + A_IN, True, "answer", id="query with an answer"),
    pytest.param(header(), True, "past the end", id="header only"),
    pytest.param(header() + b"\x05ab", True, "past the end", id="label cut short"),
    pytest.param(header() + qname(b"a"), True, "type and class", id="no type and class"),
    pytest.param(header() + qname(b"a") + b"\x00", True, "type and class", id="half a type"),
    pytest.param(header() + b"\x40" + b"x" * 64 + b"\x00" + A_IN, True, "over 63",
                 id="label of 64"),
    pytest.param(header() + b"\x80\x00" + A_IN, True, "over 63", id="reserved label type"),
    pytest.param(header() + qname(*_LONG) + A_IN, True, "over 255", id="name of 257 octets"),
    pytest.param(header() + b"\xc0\x0c" + A_IN, True, "pointer", id="pointer to itself"),
    pytest.param(header() + b"\x01a\xc0\x0c" + A_IN, True, "pointer",
                 id="pointer loop back to the name start"),
    pytest.param(header() + b"\xc0\x02" + A_IN, True, "pointer", id="pointer into the header"),
    pytest.param(header() + b"\xc0\x20" + A_IN + b"\x00" * 20, True, "pointer",
                 id="forward pointer"),
    pytest.param(header() + b"\x01a\xc0", True, "cut off", id="pointer cut off"),
    pytest.param(SIMPLE + b"junk", True, "follow the last record", id="trailing octets"),
    pytest.param(header(ar=2) + qname(b"a") + A_IN + OPT_4096 * 2, True, "unique",
                 id="two OPT records"),
    pytest.param(header(ar=1) + qname(b"a") + A_IN + b"\x01x\x00" + OPT_4096[1:], True, "root",
                 id="OPT not owned by the root"),
    pytest.param(header(ar=1) + qname(b"a") + A_IN + OPT_4096[:-1] + b"\x05", True,
                 "record data", id="record data cut short"),
    pytest.param(header(ar=1) + qname(b"a") + A_IN, True, "past the end",
                 id="announced record missing"),
])
def test_refuses_malformed(data: bytes, replyable: bool, needle: str) -> None:
    with pytest.raises(DnsFormatError, match=needle) as caught:
        parse_query(data)
    assert caught.value.replyable is replyable


def test_pointer_chain_is_bounded() -> None:
    # Each pointer points at the one before it: backwards every time, so only the count stops
    # it. The chain sits in the data of a first record; the second record's owner enters it.
    start = 12 + len(qname(b"q")) + 4
    rdata_at = start + 3 + 10
    chain = struct.pack("!H", 0xC000 | start) + b"".join(
        struct.pack("!H", 0xC000 | (rdata_at + 2 * (i - 1))) for i in range(1, 20))
    first = b"\x01a\x00" + struct.pack("!HHIH", 1, 1, 0, len(chain)) + chain
    second = struct.pack("!H", 0xC000 | (rdata_at + 2 * 19)) + struct.pack("!HHIH", 1, 1, 0, 0)
    data = header(ar=2) + qname(b"q") + A_IN + first + second
    with pytest.raises(DnsFormatError, match="at most 16"):
        parse_query(data)
    shorter = struct.pack("!H", 0xC000 | (rdata_at + 2 * 10)) + struct.pack("!HHIH", 1, 1, 0, 0)
    assert parse_query(header(ar=2) + qname(b"q") + A_IN + first + shorter).name == "q"


# --- writing ------------------------------------------------------------------------------------

def test_answer_holds_only_the_asked_family() -> None:
    wire = wire_query("App.Test", "A", id=7)
    q = parse_query(wire)
    r = dns.message.from_wire(answer(q, [V4("127.0.0.1"), V6("::1"), V4("10.0.0.1")], 30))
    assert r.id == 7
    assert r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.QR
    assert r.flags & dns.flags.RD
    assert not r.flags & (dns.flags.AA | dns.flags.RA | dns.flags.TC)
    (rrset,) = r.answer
    assert rrset.ttl == 30
    assert sorted(str(x) for x in rrset) == ["10.0.0.1", "127.0.0.1"]
    assert dns.message.from_wire(wire).is_response(r)


def test_answer_aaaa_and_question_echo_keeps_case() -> None:
    wire = wire_query("App.Test", "AAAA")
    q = parse_query(wire)
    out = answer(q, [V4("127.0.0.1"), V6("::1")], 5)
    assert out[12:12 + len(q.question)] == q.question
    assert b"App" in out
    r = dns.message.from_wire(out)
    assert [str(x) for x in r.answer[0]] == ["::1"]


def test_answer_to_other_types_is_empty() -> None:
    q = parse_query(wire_query("app.test", "MX"))
    r = dns.message.from_wire(answer(q, [V4("127.0.0.1")], 30))
    assert r.answer == []
    assert r.rcode() == dns.rcode.NOERROR


_MANY = [V4(f"127.0.0.{i}") for i in range(1, 61)]


@pytest.mark.parametrize(("query", "max_size", "truncated", "count"), [
    pytest.param(wire_query("app.test"), None, True, 0, id="over 512 without EDNS"),
    pytest.param(wire_query("app.test", use_edns=0, payload=4096), None, False, 60,
                 id="fits the EDNS size"),
    pytest.param(wire_query("app.test", use_edns=0, payload=600), None, True, 0,
                 id="over a small EDNS size"),
    pytest.param(wire_query("app.test"), TCP_MAX_SIZE, False, 60, id="TCP has room"),
])
def test_truncation(query: bytes, max_size: int | None, truncated: bool, count: int) -> None:
    out = answer(parse_query(query), _MANY, 30, max_size=max_size)
    r = dns.message.from_wire(out)
    assert bool(r.flags & dns.flags.TC) is truncated
    assert sum(len(rrset) for rrset in r.answer) == count
    assert len(r.question) == 1


@pytest.mark.parametrize("rcode", [Rcode.REFUSED, Rcode.NXDOMAIN, Rcode.NOTIMP, Rcode.FORMERR,
                                   Rcode.SERVFAIL])
def test_refuse_sets_rcode_and_echoes_question(rcode: Rcode) -> None:
    wire = wire_query("evil.test", "TXT", id=99)
    r = dns.message.from_wire(refuse(parse_query(wire), rcode))
    assert r.rcode() == int(rcode)
    assert r.id == 99
    assert str(r.question[0].name) == "evil.test."
    assert r.answer == []


def test_refuse_raw_bytes_copies_header_only() -> None:
    out = refuse(header(ident=0xBEEF) + b"\x05ab", Rcode.FORMERR)
    r = dns.message.from_wire(out)
    assert (r.id, r.rcode(), len(r.question)) == (0xBEEF, dns.rcode.FORMERR, 0)
    assert r.flags & dns.flags.RD
    with pytest.raises(DnsFormatError):
        refuse(b"\x00" * 11, Rcode.FORMERR)


def test_refuse_needs_an_error_rcode() -> None:
    with pytest.raises(ValueError, match="nodata"):
        refuse(parse_query(SIMPLE), Rcode.NOERROR)


def test_edns_query_gets_opt_and_badvers_uses_extended_rcode() -> None:
    q = parse_query(wire_query("app.test", use_edns=0, payload=1400))
    r = dns.message.from_wire(nodata(q))
    assert r.edns == 0
    assert r.payload == 1232
    r = dns.message.from_wire(refuse(q, Rcode.BADVERS))
    assert r.rcode() == dns.rcode.BADVERS
    plain = dns.message.from_wire(nodata(parse_query(SIMPLE)))
    assert plain.edns == -1


def test_query_validates_its_id() -> None:
    with pytest.raises(ValueError, match="16 bits"):
        Query(70000, 0, "a", 1, 1, b"")


def test_type_names() -> None:
    assert [type_name(t) for t in (1, 28, 15, 65280)] == ["A", "AAAA", "MX", "TYPE65280"]


# --- properties ---------------------------------------------------------------------------------

def _parses_or_format_error(data: bytes) -> None:
    # Either outcome is fine; any other exception fails the property.
    with contextlib.suppress(DnsFormatError):
        parse_query(data)


@SETTINGS
@given(st.binary(max_size=600))
def test_any_bytes_parse_or_raise_format_error(data: bytes) -> None:
    _parses_or_format_error(data)


@SETTINGS
@given(st.binary(min_size=12, max_size=12), st.binary(max_size=300))
def test_any_body_after_a_query_header(head: bytes, body: bytes) -> None:
    # A QUERY header with one question, so the fuzzing reaches names, pointers and records.
    data = head[:2] + b"\x01\x00\x00\x01\x00\x00\x00\x00" + head[10:] + body
    _parses_or_format_error(data)


@SETTINGS
@given(st.binary(min_size=1, max_size=200), st.data())
def test_mutated_real_queries(noise: bytes, data: st.DataObject) -> None:
    wire = bytearray(wire_query("www.example.com", "AAAA", use_edns=0))
    for byte in noise[:8]:
        wire[data.draw(st.integers(0, len(wire) - 1))] = byte
    cut = data.draw(st.integers(0, len(wire)))
    _parses_or_format_error(bytes(wire[:cut]))


_LABEL = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_",
                 min_size=1, max_size=63)
NAMES = st.lists(_LABEL, min_size=1, max_size=8).map(".".join).filter(lambda n: len(n) <= 253)


@SETTINGS
@given(NAMES, st.sampled_from(["A", "AAAA", "MX", "TXT", "HTTPS", "ANY"]),
       st.integers(0, 0xFFFF), st.booleans(), st.integers(0, 65535))
def test_round_trips_dnspython_queries(name: str, rdtype: str, ident: int, edns: bool,
                                       payload: int) -> None:
    msg = dns.message.make_query(name, rdtype, use_edns=0 if edns else None,
                                 payload=payload if edns else None)
    msg.id = ident
    wire = msg.to_wire()
    q = parse_query(wire)
    assert q.id == ident
    assert q.name == name.lower()
    assert q.qtype == dns.rdatatype.from_text(rdtype)
    assert q.rd
    assert q.edns_version == (0 if edns else None)
    assert q.udp_size == (max(512, payload) if edns else 512)
    response = dns.message.from_wire(answer(q, [V4("192.0.2.1"), V6("2001:db8::1")], 60))
    assert msg.is_response(response)
    assert response.question[0].name == dns.name.from_text(name)
