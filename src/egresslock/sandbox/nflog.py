"""Packets the sandbox dropped, as the kernel reports them through NFLOG.

The filter chain ends in ``log group N drop`` (see :mod:`egresslock.sandbox.nft`): every
packet that would have left the namespace, a UDP datagram, a ping, a direct TCP connection
when transparent capture is off, is copied to NFLOG group N before it is dropped. The copy
reaches userspace on an ``AF_NETLINK``/``NETLINK_NETFILTER`` socket bound to that group
(``include/uapi/linux/netfilter/nfnetlink_log.h``). DESIGN.md asks for a row per dropped
packet, so this module has two halves:

* :func:`open_nflog` makes and configures that socket. It runs in the sandbox child before
  ``exec``: configuring a group needs CAP_NET_ADMIN over the namespace (nfnetlink checks it
  per message), and the socket is bound to the namespace it was made in, so the parent could
  not make it. Once configured, reading it needs no capability, so the child hands it to the
  parent over SCM_RIGHTS.
* :func:`parse_nflog` is sans-IO: the bytes of one ``recv()`` in, :class:`DroppedPacket`
  values out. The bytes come from the kernel, but about a process we do not trust, so the
  parser takes nothing on faith: any input either parses or raises :class:`NflogError`.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from egresslock.errors import EgresslockError, SandboxError

NETLINK_NETFILTER = 12
_NFNL_SUBSYS_ULOG = 4
_NFULNL_MSG_PACKET = 0
_NFULNL_MSG_CONFIG = 1
_MSG_PACKET = (_NFNL_SUBSYS_ULOG << 8) | _NFULNL_MSG_PACKET
_MSG_CONFIG = (_NFNL_SUBSYS_ULOG << 8) | _NFULNL_MSG_CONFIG

_NLMSGHDR = struct.Struct("=IHHII")
_NFGENMSG = struct.Struct("!BBH")  # family, version, res_id (the group, big-endian)
_NLA = struct.Struct("=HH")
_NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED and NLA_F_NET_BYTEORDER (netlink(7))
_NLMSG_NOOP, _NLMSG_ERROR, _NLMSG_DONE, _NLMSG_OVERRUN = 1, 2, 3, 4
_NLM_F_REQUEST, _NLM_F_ACK = 0x1, 0x4

# Configuration attributes and commands (nfnetlink_log.h)
_NFULA_CFG_CMD = 1
_NFULA_CFG_MODE = 2
_NFULA_CFG_TIMEOUT = 4
_NFULA_CFG_QTHRESH = 5
_NFULNL_CFG_CMD_BIND = 1
_NFULNL_COPY_PACKET = 2

# Packet attributes
_NFULA_PACKET_HDR = 1
_NFULA_PAYLOAD = 9
_NFULA_UID = 11
_NFULA_GID = 14

_PROTOCOL_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
# Protocols whose header starts with a 16-bit source port and a 16-bit destination port:
# TCP, UDP, DCCP, SCTP, UDP-Lite.
_PORTED = frozenset({6, 17, 33, 132, 136})
_ICMP = {"ipv4": 1, "ipv6": 58}
# IPv6 extension headers to walk past to find the transport (RFC 8200 section 4).
_IPV6_EXTENSIONS = frozenset({0, 43, 44, 51, 60})
DEFAULT_COPY_RANGE = 96  # an IPv6 header, a few extension bytes and a TCP header's ports


class NflogError(EgresslockError):
    """Bytes from the NFLOG socket that are not a well-formed NFLOG message."""


@dataclass(frozen=True, slots=True)
class DroppedPacket:
    """One packet the sandbox's filter dropped on its way out.

    ``protocol`` is "tcp", "udp", "icmp" or "icmpv6", else the IP protocol number. Ports and
    ``icmp_type`` are None when the protocol has none or the copy ends before them (a
    non-first fragment, a truncated capture). ``uid``/``gid`` are the sending socket's owner,
    None when the kernel knows of no socket (a packet it made itself, such as a reset).
    ``length`` is the packet's length on the wire per its IP header, not the bytes copied.
    """

    family: str
    protocol: str | int
    source: str
    destination: str
    source_port: int | None
    destination_port: int | None
    icmp_type: int | None
    uid: int | None
    gid: int | None
    length: int


def open_nflog(group: int, copy_range: int = DEFAULT_COPY_RANGE) -> socket.socket:
    """A netlink socket receiving NFLOG group ``group`` of the current network namespace.

    Copies the first ``copy_range`` bytes of each packet, from its IP header on, and flushes
    each packet to the socket at once (queue threshold 1) rather than batching for up to a
    second, the kernel's default. Raises :class:`SandboxError` naming the errno and the step
    when the kernel refuses. EPERM means either no CAP_NET_ADMIN or a group already held by
    another socket (nfnetlink_log answers both with EPERM, measured on 6.x); ENOENT or
    EOPNOTSUPP means a kernel without nfnetlink_log.

    No PF_UNBIND/PF_BIND is sent (libnetfilter_log sends them for old kernels): ``log group
    N`` (nft_log) asks nf_log for the logger of type NF_LOG_TYPE_ULOG, not for the per-family
    default logger that PF_BIND sets; the tests verify delivery on 6.x without it. No flag is
    asked for uid and gid either:
    unlike NFQUEUE, NFLOG has no such flag and always adds NFULA_UID/NFULA_GID when the packet
    belongs to a socket.
    """
    if not 0 <= group <= 65535:
        raise SandboxError(f"NFLOG group must be 0-65535, not {group}")
    if not 1 <= copy_range <= 65535:
        raise SandboxError(f"NFLOG copy range must be 1-65535 bytes, not {copy_range}")
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as exc:
        raise SandboxError(f"cannot open a NETLINK_NETFILTER socket for NFLOG: "
                           f"{errno.errorcode.get(exc.errno or 0, exc.errno)} "
                           f"{exc.strerror}") from exc
    try:
        sock.bind((0, 0))
        _configure(sock, 1, group, _nla(_NFULA_CFG_CMD, bytes([_NFULNL_CFG_CMD_BIND])),
                   f"bind NFLOG group {group}")
        settings = (_nla(_NFULA_CFG_MODE, struct.pack(">IBx", copy_range, _NFULNL_COPY_PACKET))
                    + _nla(_NFULA_CFG_QTHRESH, struct.pack(">I", 1))
                    + _nla(_NFULA_CFG_TIMEOUT, struct.pack(">I", 0)))
        _configure(sock, 2, group, settings,
                   f"set NFLOG group {group} to copy {copy_range} bytes, unbatched")
    except BaseException:
        sock.close()
        raise
    return sock


def _nla(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return (_NLA.pack(length, kind) + payload).ljust((length + 3) & ~3, b"\0")


def _configure(sock: socket.socket, seq: int, group: int, attributes: bytes, what: str) -> None:
    # The family is AF_UNSPEC for per-group commands; version 0 is NFNETLINK_V0.
    # Imported here, not at the top: netlink imports this module for setup_network().
    from egresslock.sandbox.netlink import read_ack

    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, group) + attributes
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), _MSG_CONFIG,
                            _NLM_F_REQUEST | _NLM_F_ACK, seq, 0)
    try:
        sock.send(header + body)
        error = read_ack(sock, seq)
    except OSError as exc:
        error = exc.errno or errno.EIO
    if error:
        hint = (" (no CAP_NET_ADMIN in this namespace, or another socket holds the group)"
                if error == errno.EPERM else "")
        raise SandboxError(f"cannot {what}: the kernel answered "
                           f"{errno.errorcode.get(error, error)} ({os.strerror(error)}){hint}")


def parse_nflog(data: bytes) -> list[DroppedPacket]:
    """The dropped packets in the bytes of one ``recv()`` from an :func:`open_nflog` socket.

    A read may hold several netlink messages, and a batch ends with NLMSG_DONE; ACKs and
    no-ops are skipped. Raises :class:`NflogError`, and nothing else, on anything malformed:
    a message or attribute whose length runs past the data, a packet message without a
    payload or with a payload that is not an IP header, or an error reported by the kernel.
    """
    packets: list[DroppedPacket] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _NLMSGHDR.size:
            raise NflogError(f"{len(data) - offset} trailing bytes are too short for a "
                             f"netlink header")
        length, kind, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or length > len(data) - offset:
            raise NflogError(f"netlink message length {length} does not fit the "
                             f"{len(data) - offset} bytes left at offset {offset}")
        body = data[offset + _NLMSGHDR.size : offset + length]
        offset += (length + 3) & ~3
        if kind in (_NLMSG_NOOP, _NLMSG_DONE):
            continue
        if kind == _NLMSG_ERROR:
            if len(body) < 4:
                raise NflogError("truncated netlink error message")
            code = -struct.unpack_from("=i", body)[0]
            if code:
                raise NflogError(f"the kernel reported {errno.errorcode.get(code, code)} "
                                 f"on the NFLOG socket")
            continue
        if kind == _NLMSG_OVERRUN:
            raise NflogError("the kernel reported a netlink overrun: drops were lost")
        if kind != _MSG_PACKET:
            raise NflogError(f"unexpected netlink message type {kind:#06x} on the NFLOG socket")
        packets.append(_parse_packet(body))
    return packets


def _attributes(body: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    offset = _NFGENMSG.size
    if len(body) < offset:
        raise NflogError("NFLOG packet message shorter than its nfgenmsg header")
    while offset + _NLA.size <= len(body):
        length, kind = _NLA.unpack_from(body, offset)
        if length < _NLA.size or length > len(body) - offset:
            raise NflogError(f"NFLOG attribute length {length} does not fit the message")
        found[kind & _NLA_TYPE_MASK] = body[offset + _NLA.size : offset + length]
        offset += (length + 3) & ~3
    return found


def _be32(attrs: dict[int, bytes], kind: int, name: str) -> int | None:
    raw = attrs.get(kind)
    if raw is None:
        return None
    if len(raw) != 4:
        raise NflogError(f"NFLOG {name} attribute has {len(raw)} bytes, not 4")
    return int.from_bytes(raw, "big")


def _parse_packet(body: bytes) -> DroppedPacket:
    attrs = _attributes(body)
    payload = attrs.get(_NFULA_PAYLOAD)
    if not payload:
        raise NflogError("NFLOG packet message carries no payload; the group must copy packets")
    uid = _be32(attrs, _NFULA_UID, "uid")
    gid = _be32(attrs, _NFULA_GID, "gid")
    version = payload[0] >> 4
    if version == 4:
        return _parse_ipv4(payload, uid, gid)
    if version == 6:
        return _parse_ipv6(payload, uid, gid)
    raise NflogError(f"NFLOG payload is not an IP packet (version nibble {version})")


def _parse_ipv4(p: bytes, uid: int | None, gid: int | None) -> DroppedPacket:
    header_len = (p[0] & 0x0F) * 4
    if len(p) < 20 or header_len < 20 or header_len > len(p):
        raise NflogError(f"truncated IPv4 header in NFLOG payload ({len(p)} bytes)")
    total_len, frag = struct.unpack_from(">H2xH", p, 2)
    protocol = p[9]
    first_fragment = frag & 0x1FFF == 0
    return _packet("ipv4", protocol, p[12:16], p[16:20],
                   p[header_len:] if first_fragment else b"", uid, gid, total_len)


def _parse_ipv6(p: bytes, uid: int | None, gid: int | None) -> DroppedPacket:
    if len(p) < 40:
        raise NflogError(f"truncated IPv6 header in NFLOG payload ({len(p)} bytes)")
    payload_len = struct.unpack_from(">H", p, 4)[0]
    protocol = p[6]
    offset = 40
    transport = b""
    while True:
        if protocol not in _IPV6_EXTENSIONS:
            transport = p[offset:]
            break
        if offset + 8 > len(p):
            break  # the copy ends inside the extension headers: protocol stays the header's
        if protocol == 44:  # fragment: only the first fragment carries the transport header
            if struct.unpack_from(">H", p, offset + 2)[0] >> 3:
                protocol = p[offset]
                break
            size = 8
        elif protocol == 51:  # AH counts 4-byte units, minus 2 (RFC 4302 section 2.2)
            size = (p[offset + 1] + 2) * 4
        else:
            size = (p[offset + 1] + 1) * 8
        protocol = p[offset]
        offset += size
    return _packet("ipv6", protocol, p[8:24], p[24:40], transport, uid, gid, 40 + payload_len)


def _packet(family: str, protocol: int, source: bytes, destination: bytes, transport: bytes,
            uid: int | None, gid: int | None, length: int) -> DroppedPacket:
    source_port = destination_port = icmp_type = None
    if protocol in _PORTED and len(transport) >= 4:
        source_port, destination_port = struct.unpack_from(">HH", transport)
    elif protocol == _ICMP[family] and transport:
        icmp_type = transport[0]
    return DroppedPacket(
        family=family, protocol=_PROTOCOL_NAMES.get(protocol, protocol),
        source=str(ipaddress.ip_address(source)),
        destination=str(ipaddress.ip_address(destination)),
        source_port=source_port, destination_port=destination_port, icmp_type=icmp_type,
        uid=uid, gid=gid, length=length)
