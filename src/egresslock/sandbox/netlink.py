"""The sandbox's routing table: ``lo`` up, and a default route through it for IPv4 and IPv6.

A fresh network namespace (``network_namespaces(7)``) holds only ``lo``, and it is down. With
no route, ``connect()`` to a public address fails at once with ENETUNREACH before any packet
exists, so the nftables output hook never sees it: transparent capture could not redirect it
and NFLOG could not report it. A default route through ``lo`` (``default dev lo src
127.0.0.1`` and ``default dev lo`` for IPv6) makes every destination routable, so every
attempt becomes a packet that the output hook redirects or drops and logs. Nothing can leave
through that route: ``lo`` loops packets back into the same namespace, where a packet for an
address the namespace does not own has nowhere to go but ``lo`` again.

All of this runs in the child between ``unshare`` and ``exec``, while it still holds
CAP_NET_ADMIN in its own user namespace; a separate ``ip`` process would have lost the
capabilities across ``execve`` (``capabilities(7)``, "Transformation of capabilities during
execve()"). So the messages are built here by hand, following ``rtnetlink(7)`` and
``netlink(7)``; the structures are small and stable kernel ABI.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

from egresslock.errors import SandboxError
from egresslock.sandbox.nflog import open_nflog
from egresslock.sandbox.nft import CaptureSpec, Nft, capture_ruleset

__all__ = ["CaptureSpec", "add_default_routes", "bring_up_loopback", "read_ack", "setup_network"]

# linux/sockios.h and linux/if.h
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFNAMSIZ = 16
_IFREQ_SIZE = 40  # sizeof(struct ifreq) on 64-bit Linux: a 16-byte name and a 24-byte union

# linux/netlink.h
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x001
_NLM_F_ACK = 0x004
_NLM_F_REPLACE = 0x100
_NLM_F_CREATE = 0x400
_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_NLMSGERR = struct.Struct("=i")  # followed by the offending request's header

# linux/rtnetlink.h
_RTM_NEWROUTE = 24
# struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_RT_TABLE_MAIN = 254
_RTPROT_STATIC = 4
_RT_SCOPE_UNIVERSE = 0
_RT_SCOPE_LINK = 253
_RTN_UNICAST = 1
_RTA_OIF = 4
_RTA_PREFSRC = 7
_RTA = struct.Struct("=HH")  # len, type


def setup_network(spec: CaptureSpec) -> socket.socket:
    """Build the sandbox's network in the current (new) namespace; return its NFLOG socket.

    The one call the sandbox child makes after ``unshare`` and the id maps, before ``exec``:
    ``lo`` up, default routes through it, the capture ruleset of ``spec`` installed, and a
    netlink socket receiving NFLOG group ``spec.nflog_group``, configured and ready for the
    parent to read. The NFLOG socket is opened before the rules exist, so no dropped packet
    can go unreported. Raises :class:`SandboxError` on any refusal; nothing is left half
    configured that could let traffic out, since the namespace has no route out either way.
    """
    bring_up_loopback()
    add_default_routes()
    nflog = open_nflog(spec.nflog_group)
    try:
        with Nft() as nft:
            nft.run(capture_ruleset(spec))
    except BaseException:
        nflog.close()
        raise
    return nflog


def bring_up_loopback() -> None:
    """Set IFF_UP on ``lo`` in the current network namespace (``netdevice(7)``, SIOCSIFFLAGS).

    Raises :class:`SandboxError` naming the errno, typically EPERM when the caller lacks
    CAP_NET_ADMIN in the user namespace that owns the network namespace.
    """
    name = b"lo".ljust(_IFNAMSIZ, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            reply = fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS,
                                struct.pack("=16sh", name, 0).ljust(_IFREQ_SIZE, b"\0"))
            (flags,) = struct.unpack_from("=h", reply, _IFNAMSIZ)
            if flags & _IFF_UP:
                return
            request = struct.pack("=16sh", name, flags | _IFF_UP).ljust(_IFREQ_SIZE, b"\0")
            fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, request)
        except OSError as exc:
            raise SandboxError(
                f"cannot bring up the loopback interface lo (SIOCSIFFLAGS IFF_UP): "
                f"{_errname(exc.errno)} {exc.strerror}; the sandbox needs CAP_NET_ADMIN in its "
                f"own network namespace") from exc


def add_default_routes() -> None:
    """Route every IPv4 and IPv6 destination through ``lo`` in the current network namespace.

    IPv4: ``default dev lo scope link src 127.0.0.1``; IPv6: ``default dev lo``. Both are
    added with NLM_F_CREATE|NLM_F_REPLACE, so calling this twice is harmless. ``lo`` must be up
    first (:func:`bring_up_loopback`): the kernel refuses a route through a down device.

    A kernel built without IPv6 answers EAFNOSUPPORT for the IPv6 route; that is accepted,
    since such a namespace has no IPv6 to escape through. Every other refusal raises
    :class:`SandboxError` naming the errno and the route attempted.
    """
    try:
        lo_index = socket.if_nametoindex("lo")
    except OSError as exc:
        raise SandboxError("the network namespace has no loopback interface lo") from exc
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.bind((0, 0))
        # "scope link" is what `ip route add default dev lo` installs for a gatewayless route.
        # The preferred source is what matters: 127.0.0.1 has scope host, narrower than any
        # route scope, so without RTA_PREFSRC the kernel picks no address: connect() binds the
        # socket to 0.0.0.0 and a redirected connection never completes (measured on 6.x: the
        # SYN reaches nothing, connect() times out).
        _request_route(
            sock, seq=1, family=socket.AF_INET, scope=_RT_SCOPE_LINK,
            attributes=_rta(_RTA_OIF, struct.pack("=I", lo_index))
            + _rta(_RTA_PREFSRC, socket.inet_pton(socket.AF_INET, "127.0.0.1")),
            description="IPv4 route 'default dev lo scope link src 127.0.0.1'")
        # IPv6 ignores the scope of a route and picks the source by RFC 6724 rules, which
        # choose ::1 as the only address in the namespace.
        try:
            _request_route(
                sock, seq=2, family=socket.AF_INET6, scope=_RT_SCOPE_UNIVERSE,
                attributes=_rta(_RTA_OIF, struct.pack("=I", lo_index)),
                description="IPv6 route 'default dev lo'")
        except SandboxError as exc:
            if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.EAFNOSUPPORT:
                return
            raise


def _rta(kind: int, payload: bytes) -> bytes:
    """One route attribute, padded to the 4-byte alignment of ``RTA_ALIGN``."""
    length = _RTA.size + len(payload)
    return (_RTA.pack(length, kind) + payload).ljust((length + 3) & ~3, b"\0")


def _request_route(sock: socket.socket, *, seq: int, family: int, scope: int,
                   attributes: bytes, description: str) -> None:
    body = _RTMSG.pack(family, 0, 0, 0, _RT_TABLE_MAIN, _RTPROT_STATIC, scope, _RTN_UNICAST, 0)
    flags = _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_REPLACE
    payload = body + attributes
    message = _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), _RTM_NEWROUTE, flags, seq, 0) + payload
    try:
        sock.send(message)
        error = read_ack(sock, seq)
    except OSError as exc:
        raise SandboxError(f"cannot add the {description}: netlink I/O failed: "
                           f"{_errname(exc.errno)} {exc.strerror}") from exc
    if error:
        cause = OSError(error, os.strerror(error))
        raise SandboxError(f"cannot add the {description}: the kernel answered "
                           f"{_errname(error)} ({os.strerror(error)})") from cause


def read_ack(sock: socket.socket, seq: int) -> int:
    """Wait for the NLMSG_ERROR that acknowledges request ``seq``; return its errno (0 = done).

    Shared with :mod:`egresslock.sandbox.nflog`, whose configuration requests are acknowledged
    the same way (``netlink(7)``: an ACK is an NLMSG_ERROR whose error field is 0). Messages
    for other sequence numbers (an earlier request's late ACK, a multicast event) are skipped.
    Raises ``OSError`` when the socket fails, and EPROTO when the reply is malformed.
    """
    while True:
        data = sock.recv(65536)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _flags, msg_seq, _pid = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size or offset + length > len(data):
                raise OSError(errno.EPROTO, "malformed netlink reply")
            if kind == _NLMSG_ERROR and msg_seq == seq:
                if length < _NLMSGHDR.size + _NLMSGERR.size:
                    raise OSError(errno.EPROTO, "truncated netlink acknowledgement")
                (negative,) = _NLMSGERR.unpack_from(data, offset + _NLMSGHDR.size)
                return -int(negative)
            offset += (length + 3) & ~3


def _errname(code: int | None) -> str:
    return errno.errorcode.get(code or 0, f"errno {code}")
