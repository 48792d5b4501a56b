"""Address classification: every address is put in one class before anything dials it.

A rule names hosts, but the proxy connects to addresses, and an attacker who controls a name's DNS
can point an allowed-looking name at 127.0.0.1 or at the cloud metadata service 169.254.169.254.
So each resolved address is classified, and under ``network.block_private`` only GLOBAL ones are
dialled unless ``network.allow_ranges`` names them.

IPv6 addresses that embed an IPv4 address (mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96``,
6to4 ``2002::/16``, Teredo ``2001::/32``) get their own class whatever the embedded address is:
on a host with a NAT64 gateway or a 6to4 relay they reach IPv4 space that the IPv6 rules never
saw. Ranges follow the IANA special-purpose registries (RFC 6890 and its updates).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from egresslock.policy.normalize import IPAddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressClass(enum.Enum):
    """The kind of place an address leads to. Only GLOBAL is public unicast."""

    GLOBAL = "global"
    LOOPBACK = "loopback"
    LINK_LOCAL = "link-local"
    PRIVATE = "private"
    CGNAT = "cgnat"
    ULA = "unique-local"
    MULTICAST = "multicast"
    BROADCAST = "broadcast"
    UNSPECIFIED = "unspecified"
    IPV6_EMBEDDED_IPV4 = "ipv6-embedded-ipv4"
    DOCUMENTATION = "documentation"
    BENCHMARK = "benchmark"
    RESERVED = "reserved"


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


# Checked in order; the first match decides.
_IPV4_TABLE: tuple[tuple[AddressClass, tuple[IPNetwork, ...]], ...] = (
    (AddressClass.BROADCAST, _nets("255.255.255.255/32")),
    (AddressClass.UNSPECIFIED, _nets("0.0.0.0/8")),
    (AddressClass.LOOPBACK, _nets("127.0.0.0/8")),
    (AddressClass.LINK_LOCAL, _nets("169.254.0.0/16")),
    (AddressClass.PRIVATE, _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")),
    (AddressClass.CGNAT, _nets("100.64.0.0/10")),
    (AddressClass.MULTICAST, _nets("224.0.0.0/4")),
    (AddressClass.DOCUMENTATION, _nets("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")),
    (AddressClass.BENCHMARK, _nets("198.18.0.0/15")),
    # IETF protocol assignments, 6to4 relay anycast, and the old class E space.
    (AddressClass.RESERVED, _nets("192.0.0.0/24", "192.88.99.0/24", "240.0.0.0/4")),
)

_IPV6_TABLE: tuple[tuple[AddressClass, tuple[IPNetwork, ...]], ...] = (
    (AddressClass.UNSPECIFIED, _nets("::/128")),
    (AddressClass.LOOPBACK, _nets("::1/128")),
    (
        AddressClass.IPV6_EMBEDDED_IPV4,
        _nets(
            "::ffff:0:0/96",  # IPv4-mapped
            "::/96",  # IPv4-compatible (deprecated, still parsed by stacks)
            "::ffff:0:0:0/96",  # SIIT IPv4-translated
            "64:ff9b::/96",  # NAT64 well-known prefix
            "64:ff9b:1::/48",  # NAT64 local-use prefix
            "2002::/16",  # 6to4
            "2001::/32",  # Teredo
        ),
    ),
    (AddressClass.LINK_LOCAL, _nets("fe80::/10")),
    (AddressClass.ULA, _nets("fc00::/7")),
    (AddressClass.MULTICAST, _nets("ff00::/8")),
    (AddressClass.DOCUMENTATION, _nets("2001:db8::/32", "3fff::/20")),
    (AddressClass.BENCHMARK, _nets("2001:2::/48")),
    (AddressClass.RESERVED, _nets("100::/64", "2001::/23", "fec0::/10")),
)


# Everything outside 2000::/3 that no row above names is unassigned IPv6 space.
_IPV6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")


@functools.lru_cache(maxsize=8192)
def classify_address(address: IPAddress) -> AddressClass:
    """Put an address in its class. Pure; the tables above are the whole logic."""
    table = _IPV4_TABLE if address.version == 4 else _IPV6_TABLE
    for cls, networks in table:
        for net in networks:
            if address in net:
                return cls
    if address.version == 6 and address not in _IPV6_GLOBAL_UNICAST:
        return AddressClass.RESERVED
    return AddressClass.GLOBAL


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, for log lines that explain a refusal."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    packed = address.packed
    if packed[:12] == bytes(12) or address in ipaddress.ip_network("64:ff9b::/96"):
        return ipaddress.IPv4Address(packed[12:])
    return None


@dataclass(frozen=True, slots=True)
class AddressVerdict:
    """Whether one address may be dialled, and if not, a sentence that says why."""

    allowed: bool
    cls: AddressClass
    reason: str


class AddressPolicy:
    """``network.block_private`` and ``network.allow_ranges``, compiled once."""

    __slots__ = ("_allow", "block_private")

    def __init__(self, block_private: bool, allow_ranges: Iterable[IPNetwork]) -> None:
        self.block_private = block_private
        self._allow = tuple(allow_ranges)

    def check(self, address: IPAddress) -> AddressVerdict:
        cls = classify_address(address)
        if cls is AddressClass.GLOBAL or not self.block_private:
            return AddressVerdict(True, cls, f"address {address} is {cls.value}")
        for net in self._allow:
            if address.version == net.version and address in net:
                return AddressVerdict(True, cls, f"address {address} is in allow_ranges {net}")
        detail = cls.value
        if cls is AddressClass.IPV6_EMBEDDED_IPV4 and isinstance(address, ipaddress.IPv6Address):
            inner = embedded_ipv4(address)
            if inner is not None:
                detail = f"{cls.value}, carrying {inner}"
        return AddressVerdict(
            False,
            cls,
            f"address {address} ({detail}) is blocked by network.block_private; "
            "list its range in network.allow_ranges to allow it",
        )
