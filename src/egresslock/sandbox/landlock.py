"""Landlock's TCP-connect restriction, through the raw syscalls (no Python binding exists).

What it adds: in proxy-variable mode the agent is told to use ``HTTP_PROXY``, and nftables would
drop anything else; Landlock refuses a ``connect()`` to any other TCP port right at the syscall,
with EACCES, before a packet exists. It is one more independent layer, and it keeps working even if
a rule set were flushed.

Where it does not fit: Landlock checks the port the program asked for, before netfilter's NAT
rewrites it. Under transparent capture every outbound TCP connection is *meant* to target a foreign
port and be redirected to the proxy, so Landlock would refuse exactly the traffic that mode exists
to capture; use it only when transparent capture is off. It also never covers UDP, nor Unix
sockets reached by path (the mount namespace hides those).

Only the network is handled (``handled_access_net = CONNECT_TCP``): no filesystem access and no
bind is restricted, so the agent's tools keep their files and may still listen locally.

Kernel reference: Documentation/userspace-api/landlock.rst; network rules need ABI 4 (Linux 6.7).
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterable
from typing import Any

from egresslock.errors import InputError, SandboxError

SYS_LANDLOCK_CREATE_RULESET = 444  # the same number on every architecture (asm-generic table)
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446

LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_NET_PORT = 2
LANDLOCK_ACCESS_NET_BIND_TCP = 1 << 0
LANDLOCK_ACCESS_NET_CONNECT_TCP = 1 << 1

# The first ABI with LANDLOCK_ACCESS_NET_*.
NET_ABI = 4


class _RulesetAttr(ctypes.Structure):
    # struct landlock_ruleset_attr as of ABI 4. Later ABIs append fields (``scoped`` in ABI 6);
    # the kernel accepts a shorter struct and treats the missing tail as zero.
    _fields_ = (
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
    )


class _NetPortAttr(ctypes.Structure):
    # struct landlock_net_port_attr: two u64, no padding.
    _fields_ = (
        ("allowed_access", ctypes.c_uint64),
        ("port", ctypes.c_uint64),
    )


def _syscall() -> Any:
    """libc's syscall(2), declared to return a long as it does (ctypes would assume int)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = libc.syscall
    fn.restype = ctypes.c_long
    return fn


def landlock_abi() -> int:
    """The Landlock ABI version this kernel offers; 0 when Landlock is absent or disabled.

    ENOSYS means the kernel was built without it, EOPNOTSUPP that it is built but not in the
    ``lsm=`` boot list; both mean 0 here. Never raises.
    """
    try:
        syscall = _syscall()
    except OSError:
        return 0
    version = syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                      ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    return int(version) if version > 0 else 0


def _validated_ports(allowed_ports: Iterable[int]) -> list[int]:
    ports = sorted(set(allowed_ports))
    bad = [p for p in ports if not 0 < p <= 0xFFFF]
    if bad:
        raise InputError(f"allowed_ports: {bad} outside 1-65535")
    return ports


def restrict_tcp_connect(allowed_ports: Iterable[int]) -> None:
    """Refuse, for this thread and everything it later starts, TCP connect to other ports.

    Sets no_new_privs first (Landlock requires it of an unprivileged caller). A connect to a
    port not in ``allowed_ports`` fails with EACCES, on any address; bind and files are left
    alone. Landlock applies to the calling thread only, so call it in the single-threaded
    child before exec. An empty ``allowed_ports`` forbids every TCP connect.

    Raises :class:`SandboxError` naming the ABI found when the kernel has no network rules
    (ABI < 4), and :class:`InputError` for a port outside 1-65535.
    """
    from egresslock.sandbox.seccomp import set_no_new_privs

    ports = _validated_ports(allowed_ports)
    abi = landlock_abi()
    if abi < NET_ABI:
        found = f"ABI {abi}" if abi else "no Landlock (not built in, or not in the lsm= list)"
        raise SandboxError(
            f"Landlock network rules need ABI {NET_ABI} (Linux 6.7+), this kernel has {found}; "
            "run with transparent capture instead, or upgrade the kernel"
        )
    syscall = _syscall()
    attr = _RulesetAttr(handled_access_fs=0, handled_access_net=LANDLOCK_ACCESS_NET_CONNECT_TCP)
    ruleset_fd = int(syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                             ctypes.c_size_t(ctypes.sizeof(attr)), ctypes.c_uint32(0)))
    if ruleset_fd < 0:
        raise _error("landlock_create_ruleset", ctypes.get_errno())
    try:
        for port in ports:
            rule = _NetPortAttr(allowed_access=LANDLOCK_ACCESS_NET_CONNECT_TCP, port=port)
            rc = syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset_fd),
                         ctypes.c_int(LANDLOCK_RULE_NET_PORT), ctypes.byref(rule),
                         ctypes.c_uint32(0))
            if rc != 0:
                raise _error(f"landlock_add_rule(port {port})", ctypes.get_errno())
        set_no_new_privs()
        rc = syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset_fd),
                     ctypes.c_uint32(0))
        if rc != 0:
            raise _error("landlock_restrict_self", ctypes.get_errno())
    finally:
        os.close(ruleset_fd)


def _error(call: str, eno: int) -> SandboxError:
    hint = ""
    if eno == errno.EPERM:
        hint = " (no_new_privs is not set and the caller lacks CAP_SYS_ADMIN)"
    elif eno == errno.E2BIG:
        hint = " (the thread is already in the maximum 16 stacked Landlock domains)"
    return SandboxError(f"{call} failed: {os.strerror(eno)}{hint}")
