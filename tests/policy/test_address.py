"""Address classes: every address is put in one class before anything dials it.

The table follows smokescreen's classification tests, extended with the IPv6 forms that embed an
IPv4 address: on a host with a NAT64 gateway or a 6to4 relay they reach IPv4 space that no IPv6
rule saw, so they have their own class whatever they carry.
"""

from __future__ import annotations

import ipaddress

import pytest

from egresslock.policy import AddressClass, AddressPolicy, classify_address
from egresslock.policy.address import embedded_ipv4

A = AddressClass


@pytest.mark.parametrize(("address", "cls"), [
    pytest.param("8.8.8.8", A.GLOBAL, id="public DNS resolver is global"),
    pytest.param("1.1.1.1", A.GLOBAL, id="another public address is global"),
    pytest.param("2606:4700::1111", A.GLOBAL, id="public IPv6 is global"),
    pytest.param("10.0.0.1", A.PRIVATE, id="10/8 is private"),
    pytest.param("172.16.0.1", A.PRIVATE, id="172.16/12 is private"),
    pytest.param("172.31.255.255", A.PRIVATE, id="top of 172.16/12 is private"),
    pytest.param("172.32.0.1", A.GLOBAL, id="just above 172.16/12 is global"),
    pytest.param("192.168.0.1", A.PRIVATE, id="192.168/16 is private"),
    pytest.param("100.64.0.1", A.CGNAT, id="100.64/10 is carrier-grade NAT"),
    pytest.param("100.127.255.254", A.CGNAT, id="top of 100.64/10 is carrier-grade NAT"),
    pytest.param("127.0.0.1", A.LOOPBACK, id="127.0.0.1 is loopback"),
    pytest.param("127.255.255.254", A.LOOPBACK, id="all of 127/8 is loopback"),
    pytest.param("169.254.169.254", A.LINK_LOCAL, id="the cloud metadata service is link-local"),
    pytest.param("255.255.255.255", A.BROADCAST, id="limited broadcast"),
    pytest.param("224.0.0.1", A.MULTICAST, id="IPv4 multicast"),
    pytest.param("0.0.0.0", A.UNSPECIFIED, id="0.0.0.0 is unspecified"),
    pytest.param("0.1.2.3", A.UNSPECIFIED, id="all of 0/8 is unspecified"),
    pytest.param("192.0.2.1", A.DOCUMENTATION, id="TEST-NET-1 is documentation"),
    pytest.param("198.51.100.1", A.DOCUMENTATION, id="TEST-NET-2 is documentation"),
    pytest.param("203.0.113.5", A.DOCUMENTATION, id="TEST-NET-3 is documentation"),
    pytest.param("198.18.0.1", A.BENCHMARK, id="198.18/15 is benchmarking"),
    pytest.param("192.0.0.8", A.RESERVED, id="IETF protocol assignments are reserved"),
    pytest.param("240.0.0.1", A.RESERVED, id="old class E is reserved"),
    pytest.param("::1", A.LOOPBACK, id="::1 is loopback"),
    pytest.param("::", A.UNSPECIFIED, id=":: is unspecified"),
    pytest.param("fe80::1", A.LINK_LOCAL, id="fe80::/10 is link-local"),
    pytest.param("fc00::1", A.ULA, id="fc00::/7 is unique-local"),
    pytest.param("fd12:3456::1", A.ULA, id="fd00::/8 is unique-local"),
    pytest.param("ff02::2", A.MULTICAST, id="all-routers is multicast"),
    pytest.param("2001:db8::1", A.DOCUMENTATION, id="2001:db8::/32 is documentation"),
    pytest.param("2001:2::1", A.BENCHMARK, id="2001:2::/48 is benchmarking"),
    pytest.param("4000::1", A.RESERVED, id="outside 2000::/3 is unassigned"),
])
def test_classify_address(address: str, cls: AddressClass) -> None:
    assert classify_address(ipaddress.ip_address(address)) is cls


@pytest.mark.parametrize(("address", "inner"), [
    pytest.param("::ffff:10.0.0.1", "10.0.0.1", id="IPv4-mapped private"),
    pytest.param("::ffff:127.0.0.1", "127.0.0.1", id="IPv4-mapped loopback"),
    pytest.param("::ffff:8.8.8.8", "8.8.8.8", id="IPv4-mapped global is still embedded"),
    pytest.param("::127.0.0.1", "127.0.0.1", id="IPv4-compatible (deprecated)"),
    pytest.param("64:ff9b::ac1c:5", "172.28.0.5", id="NAT64 well-known prefix"),
    pytest.param("64:ff9b::a9fe:a9fe", "169.254.169.254", id="NAT64 to the metadata service"),
    pytest.param("64:ff9b:1::a00:1", None, id="NAT64 local-use prefix"),
    pytest.param("2002:c000:201::1", "192.0.2.1", id="6to4"),
    pytest.param("2002:7f00:1::1", "127.0.0.1", id="6to4 to loopback"),
    pytest.param("2001:0:4136:e378:8000:63bf:3fff:fdd2", "192.0.2.45", id="Teredo"),
])
def test_ipv6_embedded_ipv4_attack_has_its_own_class(address: str, inner: str | None) -> None:
    ip = ipaddress.IPv6Address(address)
    assert classify_address(ip) is A.IPV6_EMBEDDED_IPV4
    found = embedded_ipv4(ip)
    assert (None if found is None else str(found)) == inner


def test_embedded_ipv4_of_plain_ipv6_is_none() -> None:
    assert embedded_ipv4(ipaddress.IPv6Address("2606:4700::1111")) is None


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


def nets(*cidrs: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(c) for c in cidrs]


@pytest.mark.parametrize(("block_private", "allow", "address", "allowed", "needle"), [
    pytest.param(True, [], "8.8.8.8", True, "is global",
                 id="global is allowed under block_private"),
    pytest.param(True, [], "2606:4700::1111", True, "is global",
                 id="global IPv6 is allowed under block_private"),
    pytest.param(True, [], "127.0.0.1", False, "(loopback) is blocked by network.block_private",
                 id="loopback is blocked"),
    pytest.param(True, [], "169.254.169.254", False, "(link-local)",
                 id="metadata service is blocked"),
    pytest.param(True, [], "10.0.0.1", False, "(private)", id="RFC 1918 is blocked"),
    pytest.param(True, [], "100.64.0.1", False, "(cgnat)", id="CGNAT is blocked"),
    pytest.param(True, [], "fc00::1", False, "(unique-local)", id="ULA is blocked"),
    pytest.param(True, [], "198.51.100.1", False, "(documentation)",
                 id="documentation is blocked"),
    pytest.param(True, [], "::ffff:10.0.0.1", False, "carrying 10.0.0.1",
                 id="IPv4-mapped says what it carries"),
    pytest.param(True, [], "64:ff9b::7f00:1", False, "carrying 127.0.0.1",
                 id="NAT64 says what it carries"),
    pytest.param(True, [], "10.0.0.1", False, "list its range in network.allow_ranges",
                 id="the refusal says how to allow it"),
    pytest.param(True, ["10.20.0.0/16"], "10.20.1.2", True, "is in allow_ranges 10.20.0.0/16",
                 id="allow_ranges exempts an internal API"),
    pytest.param(True, ["10.20.0.0/16"], "10.21.0.1", False, "(private)",
                 id="allow_ranges exempts only its own range"),
    pytest.param(True, ["fd00::/8"], "fd00::5", True, "is in allow_ranges fd00::/8",
                 id="allow_ranges exempts IPv6"),
    pytest.param(True, ["10.0.0.0/8"], "::ffff:10.0.0.1", False, "carrying 10.0.0.1",
                 id="an IPv4 range does not exempt its IPv6-mapped form"),
    pytest.param(True, ["127.0.0.1/32"], "127.0.0.1", True, "allow_ranges 127.0.0.1/32",
                 id="a test server on loopback can be exempted"),
    pytest.param(False, [], "127.0.0.1", True, "is loopback",
                 id="block_private off allows loopback"),
    pytest.param(False, [], "169.254.169.254", True, "is link-local",
                 id="block_private off allows the metadata service"),
])
def test_address_policy(block_private: bool, allow: list[str], address: str, allowed: bool,
                        needle: str) -> None:
    verdict = AddressPolicy(block_private, nets(*allow)).check(ip(address))
    assert verdict.allowed is allowed
    assert needle in verdict.reason
    assert verdict.cls is classify_address(ip(address))
