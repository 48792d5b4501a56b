"""The sandbox's network plumbing: loopback, routes via lo, the capture ruleset and NFLOG.

Integration tests run on the real kernel, each scenario in a forked child inside a fresh user +
network namespace (see nsutil); the child reports JSON and the parent asserts. Nothing they
send leaves the machine: the namespace holds only ``lo``. The ruleset text and the NFLOG
parser also get plain unit tests, and the parser a property test.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egresslock.errors import SandboxError
from egresslock.sandbox import netlink
from egresslock.sandbox.nflog import DroppedPacket, NflogError, open_nflog, parse_nflog
from egresslock.sandbox.nft import CaptureSpec, Nft, capture_ruleset
from tests.conftest import require_sandbox
from tests.sandbox.nsutil import namespaces_available, run_in_namespace

PROXY, TRANSPARENT, DNS, GROUP = 18080, 18443, 15353, 7
SPEC = CaptureSpec(proxy_port=PROXY, transparent_port=TRANSPARENT, dns_port=DNS,
                   nflog_group=GROUP, transparent=True)
SPEC_NO_TRANSPARENT = CaptureSpec(proxy_port=PROXY, transparent_port=TRANSPARENT, dns_port=DNS,
                                  nflog_group=GROUP, transparent=False)


@pytest.fixture
def namespace() -> None:
    available, reason = namespaces_available()
    require_sandbox(available, reason)


# ---------------------------------------------------------------------------------------------
# Helpers that run inside the namespace child


def _connect_errno(family: int, address: str, port: int) -> int:
    """errno of a non-blocking connect(): EINPROGRESS means a SYN was routed."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        return sock.connect_ex((address, port))


def _listen(family: int, address: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((address, port))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    sock.settimeout(2)
    return sock


def _drain(nflog: socket.socket, want: int, wait: float = 2.0) -> list[dict[str, Any]]:
    """Read NFLOG until ``want`` packets arrived or ``wait`` seconds passed."""
    found: list[DroppedPacket] = []
    deadline = time.monotonic() + wait
    while len(found) < want and (left := deadline - time.monotonic()) > 0:
        nflog.settimeout(left)
        try:
            found += parse_nflog(nflog.recv(65536))
        except TimeoutError:
            break
    return [{slot: getattr(p, slot) for slot in DroppedPacket.__slots__} for p in found]


def _checksum(data: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _ping(family: int, address: str) -> str:
    """Send one echo request: a ping socket if allowed, else a raw one (CAP_NET_RAW here)."""
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    echo = 8 if family == socket.AF_INET else 128
    try:
        ping = socket.socket(family, socket.SOCK_DGRAM, proto)
    except PermissionError:  # net.ipv4.ping_group_range excludes us: use a raw socket
        pass
    else:
        with ping:
            ping.sendto(struct.pack("!BBHHH", echo, 0, 0, 0, 1) + b"egresslock", (address, 0))
        return "sent"
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        message = struct.pack("!BBHHH", echo, 0, 0, 0x4242, 1) + b"egresslock"
        if family == socket.AF_INET:  # the kernel sums ICMPv6 raw sockets itself (RFC 3542)
            message = message[:2] + struct.pack("!H", _checksum(message)) + message[4:]
        sock.sendto(message, (address, 0))
    return "sent"


# ---------------------------------------------------------------------------------------------
# Scenarios: loopback and routes


def _loopback_and_routes() -> dict[str, Any]:
    netlink.bring_up_loopback()
    netlink.bring_up_loopback()  # already up: a no-op
    with _listen(socket.AF_INET, "127.0.0.1", 0) as server:
        with socket.create_connection(server.getsockname(), timeout=2):
            pass
    before = _connect_errno(socket.AF_INET, "203.0.113.5", 80)
    before6 = _connect_errno(socket.AF_INET6, "2001:db8::5", 80)
    netlink.add_default_routes()
    netlink.add_default_routes()  # NLM_F_REPLACE: idempotent
    with socket.socket() as sock:
        sock.setblocking(False)
        after = sock.connect_ex(("203.0.113.5", 80))
        source = sock.getsockname()[0]
    after6 = _connect_errno(socket.AF_INET6, "2001:db8::5", 80)
    return {"before": before, "before6": before6, "after": after, "after6": after6,
            "source": source}


@pytest.mark.sandbox
def test_loopback_up_and_routes_via_lo_make_every_address_routable(namespace: None) -> None:
    result = run_in_namespace(_loopback_and_routes)
    assert result["before"] == errno.ENETUNREACH
    assert result["before6"] == errno.ENETUNREACH
    assert result["after"] == errno.EINPROGRESS
    assert result["after6"] == errno.EINPROGRESS
    assert result["source"] == "127.0.0.1"  # RTA_PREFSRC: not 0.0.0.0


def _routes_with_lo_down() -> str:
    try:
        netlink.add_default_routes()
    except SandboxError as exc:
        return str(exc)
    return "no error"


@pytest.mark.sandbox
def test_route_through_a_down_lo_is_refused_with_errno_and_route(namespace: None) -> None:
    message = run_in_namespace(_routes_with_lo_down)
    assert "ENETDOWN" in message
    assert "default dev lo scope link src 127.0.0.1" in message


# ---------------------------------------------------------------------------------------------
# Scenarios: transparent capture


def _transparent_capture() -> dict[str, Any]:
    nflog = netlink.setup_network(SPEC)
    out: dict[str, Any] = {}
    for family, listen_on, target, level in (
            (socket.AF_INET, "127.0.0.1", "203.0.113.5", socket.SOL_IP),
            (socket.AF_INET6, "::1", "2001:db8::5", socket.IPPROTO_IPV6)):
        with _listen(family, listen_on, TRANSPARENT) as server, \
                socket.create_connection((target, 443), timeout=2) as client:
            conn, _peer = server.accept()
            with conn:
                client.sendall(b"hello")
                raw = conn.getsockopt(level, 80, 28)  # SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST
                port = struct.unpack_from("!H", raw, 2)[0]
                packed = raw[4:8] if family == socket.AF_INET else raw[8:24]
                out[target] = {"original": [socket.inet_ntop(family, packed), port],
                               "data": conn.recv(5).decode(),
                               "peer_sees": list(client.getpeername()[:2])}
    # A server of the agent's own on loopback keeps working, untouched by the redirect.
    with _listen(socket.AF_INET, "127.0.0.1", 0) as own, \
            socket.create_connection(own.getsockname(), timeout=2):
        own.accept()[0].close()
    out["logged"] = _drain(nflog, 1, wait=0.3)
    return out


@pytest.mark.sandbox
def test_transparent_mode_redirects_tcp_and_keeps_the_original_destination(
        namespace: None) -> None:
    result = run_in_namespace(_transparent_capture)
    assert result["203.0.113.5"] == {"original": ["203.0.113.5", 443], "data": "hello",
                                     "peer_sees": ["203.0.113.5", 443]}
    assert result["2001:db8::5"] == {"original": ["2001:db8::5", 443], "data": "hello",
                                     "peer_sees": ["2001:db8::5", 443]}
    assert result["logged"] == []  # redirected and loopback traffic is not a drop


def _drops_are_logged() -> dict[str, Any]:
    import os

    nflog = netlink.setup_network(SPEC)
    sent = [_send(family, kind, proto, target)
            for family, target in ((socket.AF_INET, "203.0.113.5"),
                                   (socket.AF_INET6, "2001:db8::5"))
            for kind, proto in ((socket.SOCK_DGRAM, 0), (socket.SOCK_RAW, -1))]
    return {"uid": os.getuid(), "gid": os.getgid(), "sent": sent, "logged": _drain(nflog, 4)}


def _send(family: int, kind: int, proto: int, target: str) -> str:
    """How sending one UDP datagram (proto 0) or echo request (-1) ended."""
    try:
        if proto == 0:
            with socket.socket(family, kind) as udp:
                udp.sendto(b"exfil", (target, 9999))
            return "sent"
        return _ping(family, target)
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]


@pytest.mark.sandbox
def test_udp_and_icmp_are_dropped_and_reported_through_nflog(namespace: None) -> None:
    result = run_in_namespace(_drops_are_logged)
    # NF_DROP on the output path reaches the sender as EPERM: a tool fails at once instead of
    # waiting for a timeout.
    assert result["sent"] == ["EPERM"] * 4
    uid, gid = result["uid"], result["gid"]
    by_kind = {(p["family"], p["protocol"]): p for p in result["logged"]}
    assert set(by_kind) == {("ipv4", "udp"), ("ipv6", "udp"), ("ipv4", "icmp"),
                            ("ipv6", "icmpv6")}, result["logged"]
    udp = by_kind["ipv4", "udp"]
    assert (udp["source"], udp["destination"], udp["destination_port"]) == (
        "127.0.0.1", "203.0.113.5", 9999)
    assert (udp["uid"], udp["gid"], udp["length"]) == (uid, gid, 20 + 8 + 5)
    udp6 = by_kind["ipv6", "udp"]
    assert (udp6["source"], udp6["destination"], udp6["destination_port"]) == (
        "::1", "2001:db8::5", 9999)
    assert (udp6["uid"], udp6["length"]) == (uid, 40 + 8 + 5)
    icmp = by_kind["ipv4", "icmp"]
    assert (icmp["destination"], icmp["icmp_type"], icmp["uid"]) == ("203.0.113.5", 8, uid)
    assert icmp["source_port"] is None
    icmp6 = by_kind["ipv6", "icmpv6"]
    assert (icmp6["destination"], icmp6["icmp_type"], icmp6["uid"]) == ("2001:db8::5", 128, uid)


def _dns_redirect() -> dict[str, Any]:
    nflog = netlink.setup_network(SPEC)
    out: dict[str, Any] = {}
    for family, listen_on, resolver in ((socket.AF_INET, "127.0.0.1", "8.8.8.8"),
                                        (socket.AF_INET6, "::1", "2001:4860:4860::8888")):
        with _listen(family, listen_on, DNS, socket.SOCK_DGRAM) as stub, \
                socket.socket(family, socket.SOCK_DGRAM) as client:
            client.settimeout(2)
            client.sendto(b"query", (resolver, 53))
            data, peer = stub.recvfrom(512)
            stub.sendto(b"answer:" + data, peer)
            answer, source = client.recvfrom(512)
            out[resolver] = {"answer": answer.decode(), "from": list(source[:2])}
        # TCP 53 too, for resolvers that fall back to it on truncation (RFC 7766).
        with _listen(family, listen_on, DNS) as stub_tcp, \
                socket.create_connection((resolver, 53), timeout=2):
            stub_tcp.accept()[0].close()
    out["logged"] = _drain(nflog, 1, wait=0.3)
    return out


@pytest.mark.sandbox
def test_dns_to_any_resolver_is_redirected_to_the_stub(namespace: None) -> None:
    result = run_in_namespace(_dns_redirect)
    assert result["8.8.8.8"] == {"answer": "answer:query", "from": ["8.8.8.8", 53]}
    assert result["2001:4860:4860::8888"] == {"answer": "answer:query",
                                              "from": ["2001:4860:4860::8888", 53]}
    assert result["logged"] == []


def _direct_tcp_without_transparent() -> dict[str, Any]:
    import os

    nflog = netlink.setup_network(SPEC_NO_TRANSPARENT)
    with _listen(socket.AF_INET, "127.0.0.1", TRANSPARENT):  # must not receive anything
        code = _connect_errno(socket.AF_INET, "203.0.113.5", 443)
        code6 = _connect_errno(socket.AF_INET6, "2001:db8::5", 443)
        with _listen(socket.AF_INET, "127.0.0.1", PROXY) as proxy, \
                socket.create_connection(("127.0.0.1", PROXY), timeout=2):
            proxy.accept()[0].close()
        logged = _drain(nflog, 2)
        # A blocking connect learns at once: nftables answers the SYN with a reset.
        started = time.monotonic()
        try:
            socket.create_connection(("203.0.113.5", 80), timeout=5).close()
            blocking = "connected"
        except OSError as exc:
            blocking = errno.errorcode.get(exc.errno or 0, str(exc))
        return {"uid": os.getuid(), "codes": [code, code6], "logged": logged,
                "blocking": blocking, "seconds": time.monotonic() - started}


@pytest.mark.sandbox
def test_direct_tcp_is_dropped_and_logged_when_transparent_capture_is_off(
        namespace: None) -> None:
    result = run_in_namespace(_direct_tcp_without_transparent)
    assert result["codes"] == [errno.EINPROGRESS, errno.EINPROGRESS]
    seen = {(p["protocol"], p["destination"], p["destination_port"], p["uid"])
            for p in result["logged"]}
    assert seen == {("tcp", "203.0.113.5", 443, result["uid"]),
                    ("tcp", "2001:db8::5", 443, result["uid"])}
    assert result["blocking"] == "ECONNREFUSED"
    assert result["seconds"] < 1.0


def _ruleset_round_trip() -> dict[str, Any]:
    netlink.bring_up_loopback()
    with Nft() as nft:
        nft.run(capture_ruleset(SPEC))
        listed = nft.run("list table inet egresslock")
        try:
            nft.run("add rule inet egresslock egress tcp dport 22 frobnicate\n")
        except SandboxError as exc:
            refused = str(exc)
    return {"listed": listed, "refused": refused}


@pytest.mark.sandbox
def test_nft_installs_the_ruleset_and_reports_its_own_errors(namespace: None) -> None:
    result = run_in_namespace(_ruleset_round_trip)
    assert "log group 7 drop" in result["listed"]
    assert "redirect to :18443" in result["listed"]
    assert "nftables refused the sandbox rules" in result["refused"]
    assert "frobnicate" in result["refused"]


def _nflog_group_taken() -> str:
    first = open_nflog(GROUP)
    try:
        open_nflog(GROUP)
    except SandboxError as exc:
        return str(exc)
    finally:
        first.close()
    return "no error"


@pytest.mark.sandbox
def test_a_second_socket_for_the_same_nflog_group_is_refused(namespace: None) -> None:
    message = run_in_namespace(_nflog_group_taken)
    assert "bind NFLOG group 7" in message
    assert "EPERM" in message  # nfnetlink_log's answer for a group held by another socket
    assert "another socket holds the group" in message


# ---------------------------------------------------------------------------------------------
# The ruleset text


def test_capture_ruleset_text_in_transparent_mode() -> None:
    assert capture_ruleset(SPEC) == (
        "table inet egresslock {\n"
        "\tchain capture {\n"
        "\t\ttype nat hook output priority -100; policy accept;\n"
        "\t\tmeta l4proto { tcp, udp } th dport 53 redirect to :15353\n"
        "\t\tip daddr 127.0.0.0/8 accept\n"
        "\t\tip6 daddr ::1 accept\n"
        "\t\tmeta l4proto tcp redirect to :18443\n"
        "\t}\n"
        "\tchain egress {\n"
        "\t\ttype filter hook output priority 0; policy drop;\n"
        "\t\tip daddr 127.0.0.0/8 accept\n"
        "\t\tip6 daddr ::1 accept\n"
        "\t\tmeta l4proto tcp log group 7 reject with tcp reset\n"
        "\t\tlog group 7 drop\n"
        "\t}\n"
        "}\n")


def test_capture_ruleset_without_transparent_mode_redirects_only_dns() -> None:
    text = capture_ruleset(SPEC_NO_TRANSPARENT)
    assert "redirect to :15353" in text
    assert "18443" not in text
    assert text.count("redirect") == 1


@pytest.mark.parametrize(("field", "value"), [
    ("dns_port", 0), ("proxy_port", 65536), ("transparent_port", -1), ("nflog_group", 70000),
    ("dns_port", True), ("nflog_group", "7"),
])
def test_capture_spec_refuses_values_nft_could_not_take(field: str, value: object) -> None:
    values: dict[str, Any] = {"proxy_port": 1, "transparent_port": 2, "dns_port": 3,
                              "nflog_group": 4, "transparent": True, field: value}
    with pytest.raises(SandboxError, match=field):
        CaptureSpec(**values)


# ---------------------------------------------------------------------------------------------
# The NFLOG parser


def _nla(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return (struct.pack("=HH", length, kind) + payload).ljust((length + 3) & ~3, b"\0")


def _message(payload: bytes | None, uid: int | None = 1000, gid: int | None = 100,
             family: int = 2, kind: int = 0x0400, extra: bytes = b"") -> bytes:
    body = (struct.pack("!BBH", family, 0, GROUP) + _nla(1, struct.pack("!HBx", 0x0800, 3))
            + extra)
    if uid is not None:
        body += _nla(11, struct.pack("!I", uid))
    if gid is not None:
        body += _nla(14, struct.pack("!I", gid))
    if payload is not None:
        body += _nla(9, payload)
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def _ipv4(protocol: int, transport: bytes, frag: int = 0, total: int | None = None) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, total or 20 + len(transport), 1, frag, 64,
                       protocol, 0, bytes([127, 0, 0, 1]), bytes([203, 0, 113, 5])) + transport


def _ipv6(next_header: int, rest: bytes) -> bytes:
    return (struct.pack("!IHBB", 6 << 28, len(rest), next_header, 64)
            + socket.inet_pton(socket.AF_INET6, "::1")
            + socket.inet_pton(socket.AF_INET6, "2001:db8::5") + rest)


_PORTS = struct.pack("!HH", 40000, 443)
_DONE = struct.pack("=IHHIIi", 20, 3, 2, 0, 0, 0)
_ACK = struct.pack("=IHHIIi", 36, 2, 0, 1, 0, 0) + bytes(16)

PARSE_TABLE = [
    ("an IPv4 TCP SYN", _message(_ipv4(6, _PORTS + bytes(16))),
     [DroppedPacket("ipv4", "tcp", "127.0.0.1", "203.0.113.5", 40000, 443, None, 1000, 100, 40)]),
    ("an IPv4 UDP datagram with no socket owner", _message(_ipv4(17, _PORTS), None, None),
     [DroppedPacket("ipv4", "udp", "127.0.0.1", "203.0.113.5", 40000, 443, None, None, None,
                    24)]),
    ("an echo request", _message(_ipv4(1, b"\x08\x00")),
     [DroppedPacket("ipv4", "icmp", "127.0.0.1", "203.0.113.5", None, None, 8, 1000, 100, 22)]),
    ("a copy cut short of the ports keeps the wire length",
     _message(_ipv4(6, b"\x9c", total=1500)),
     [DroppedPacket("ipv4", "tcp", "127.0.0.1", "203.0.113.5", None, None, None, 1000, 100,
                    1500)]),
    ("a non-first fragment has no ports", _message(_ipv4(17, _PORTS, frag=0x00B9)),
     [DroppedPacket("ipv4", "udp", "127.0.0.1", "203.0.113.5", None, None, None, 1000, 100,
                    24)]),
    ("another protocol is named by number", _message(_ipv4(47, b"gre!")),
     [DroppedPacket("ipv4", 47, "127.0.0.1", "203.0.113.5", None, None, None, 1000, 100, 24)]),
    ("IPv6 UDP after a hop-by-hop and a first fragment header",
     _message(_ipv6(0, bytes([44, 0]) + bytes(6) + bytes([17, 0, 0, 0]) + bytes(4) + _PORTS),
              family=10),
     [DroppedPacket("ipv6", "udp", "::1", "2001:db8::5", 40000, 443, None, 1000, 100, 60)]),
    ("IPv6 non-first fragment", _message(_ipv6(44, bytes([6, 0, 0, 8]) + bytes(4) + _PORTS),
                                         family=10),
     [DroppedPacket("ipv6", "tcp", "::1", "2001:db8::5", None, None, None, 1000, 100, 52)]),
    ("an IPv6 copy that ends inside an extension header",
     _message(_ipv6(60, bytes([6, 4])), family=10),
     [DroppedPacket("ipv6", 60, "::1", "2001:db8::5", None, None, None, 1000, 100, 42)]),
    ("ICMPv6 echo request", _message(_ipv6(58, b"\x80\x00"), family=10),
     [DroppedPacket("ipv6", "icmpv6", "::1", "2001:db8::5", None, None, 128, 1000, 100, 42)]),
    ("two packets, a batch end and an ACK in one read",
     _message(_ipv4(17, _PORTS)) + _message(_ipv4(1, b"\x08")) + _DONE + _ACK,
     [DroppedPacket("ipv4", "udp", "127.0.0.1", "203.0.113.5", 40000, 443, None, 1000, 100, 24),
      DroppedPacket("ipv4", "icmp", "127.0.0.1", "203.0.113.5", None, None, 8, 1000, 100, 21)]),
    ("nothing", b"", []),
]


@pytest.mark.parametrize(("data", "expected"), [row[1:] for row in PARSE_TABLE],
                         ids=[row[0] for row in PARSE_TABLE])
def test_parse_nflog(data: bytes, expected: list[DroppedPacket]) -> None:
    assert parse_nflog(data) == expected


REFUSE_TABLE = [
    ("a header cut short", _message(_ipv4(17, _PORTS))[:10], "too short"),
    ("a length past the data", _message(_ipv4(17, _PORTS))[:-4], "does not fit"),
    ("a length below the header", struct.pack("=IHHII", 8, 0x0400, 0, 0, 0), "does not fit"),
    ("an attribute past its message",
     _message(None)[:-8] + struct.pack("=HH", 200, 9) + bytes(4), "attribute length"),
    ("no payload copied", _message(None), "no payload"),
    ("a payload that is not IP", _message(b"\x50" + bytes(40)), "version nibble 5"),
    ("a truncated IPv4 header", _message(_ipv4(6, b"")[:12]), "truncated IPv4"),
    ("an IPv4 header length past the copy", _message(b"\x4f" + bytes(30)), "truncated IPv4"),
    ("a truncated IPv6 header", _message(_ipv6(6, b"")[:30]), "truncated IPv6"),
    ("a uid of the wrong size", _message(_ipv4(17, _PORTS), None, extra=_nla(11, b"\0\0")), "uid"),
    ("a kernel error", struct.pack("=IHHIIi", 36, 2, 0, 0, 0, -errno.ENOBUFS) + bytes(16),
     "ENOBUFS"),
    ("another subsystem's message", _message(_ipv4(17, _PORTS), kind=0x0300), "0x0300"),
]


@pytest.mark.parametrize(("data", "match"), [row[1:] for row in REFUSE_TABLE],
                         ids=[row[0] for row in REFUSE_TABLE])
def test_parse_nflog_refuses_malformed_input(data: bytes, match: str) -> None:
    with pytest.raises(NflogError, match=match):
        parse_nflog(data)


def _parses_or_refuses(data: bytes) -> None:
    try:
        result = parse_nflog(data)
    except NflogError:
        return
    assert all(isinstance(p, DroppedPacket) for p in result)


@settings(max_examples=500)
@given(st.binary(max_size=512))
def test_parse_nflog_never_raises_anything_but_nflog_error(data: bytes) -> None:
    _parses_or_refuses(data)


@settings(max_examples=500)
@given(st.binary(max_size=200), st.sampled_from([2, 10]), st.booleans())
def test_parse_nflog_survives_any_payload_in_a_well_formed_message(
        payload: bytes, family: int, ipv6: bool) -> None:
    # Garbage in the one place the framing cannot catch it: the copied packet itself.
    _parses_or_refuses(_message((b"\x60" if ipv6 else b"\x45") + payload, family=family))
    _parses_or_refuses(_message(payload, family=family))
