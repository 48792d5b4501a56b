"""The worker gives up the filesystem (and every TCP port but the proxy's) before its first call.

The worker's mount namespace already hides the agent's working directory and home, but a mount
plan can only hide what it names, and the same user may own files elsewhere. So once the worker
has loaded what it needs (its modules, the CA bundle), it asks Landlock to handle every
filesystem access right the kernel knows and grants none: from then on it cannot open, list,
create or execute any file, whoever owns it (Documentation/userspace-api/landlock.rst). With
ABI 4+ it also handles TCP bind and connect and grants only connect to the proxy's port, and
with ABI 6+ it scopes signals and abstract Unix sockets to itself.

It then checks its own work by trying: opening ``/`` must fail with EACCES. The result is a
sentence for egresslock to show; a kernel without Landlock leaves the worker running with the
mount namespace as its only file barrier, and says so.
"""

from __future__ import annotations

import ctypes
import errno
import os

from egresslock.sandbox.landlock import (
    LANDLOCK_ACCESS_NET_BIND_TCP,
    LANDLOCK_ACCESS_NET_CONNECT_TCP,
    LANDLOCK_RULE_NET_PORT,
    NET_ABI,
    SYS_LANDLOCK_ADD_RULE,
    SYS_LANDLOCK_CREATE_RULESET,
    SYS_LANDLOCK_RESTRICT_SELF,
    landlock_abi,
)
from egresslock.sandbox.syscalls import PR_SET_NO_NEW_PRIVS, prctl

# Filesystem rights by ABI: 13 in ABI 1, REFER in 2, TRUNCATE in 3, IOCTL_DEV in 5.
_FS_BITS = {1: 13, 2: 14, 3: 15, 4: 15}
_SCOPE_ABI = 6
_SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
_SCOPE_SIGNAL = 1 << 1


class _Ruleset(ctypes.Structure):
    _fields_ = (("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64))


class _NetPort(ctypes.Structure):
    _fields_ = (("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64))


def lock_down(proxy_port: int) -> str:
    """Give up the filesystem and every TCP port but ``proxy_port``; a sentence saying what
    was done. Raises OSError when the kernel offers Landlock and refuses it."""
    abi = landlock_abi()
    if abi == 0:
        return "not locked: this kernel has no Landlock; only the mount namespace hides files"
    libc = ctypes.CDLL(None, use_errno=True)
    syscall = libc.syscall
    syscall.restype = ctypes.c_long
    attr = _Ruleset(handled_access_fs=(1 << _FS_BITS.get(abi, 16)) - 1)
    size = 8
    if abi >= NET_ABI:
        attr.handled_access_net = LANDLOCK_ACCESS_NET_BIND_TCP | LANDLOCK_ACCESS_NET_CONNECT_TCP
        size = 16
    if abi >= _SCOPE_ABI:
        attr.scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL
        size = 24
    fd = int(syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                     ctypes.c_size_t(size), ctypes.c_uint32(0)))
    if fd < 0:
        raise _error("landlock_create_ruleset")
    try:
        if abi >= NET_ABI:
            rule = _NetPort(allowed_access=LANDLOCK_ACCESS_NET_CONNECT_TCP, port=proxy_port)
            if syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(fd),
                       ctypes.c_int(LANDLOCK_RULE_NET_PORT), ctypes.byref(rule),
                       ctypes.c_uint32(0)) != 0:
                raise _error("landlock_add_rule")
        prctl(PR_SET_NO_NEW_PRIVS, 1)  # set by the sandbox already; Landlock requires it
        if syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(fd),
                   ctypes.c_uint32(0)) != 0:
            raise _error("landlock_restrict_self")
    finally:
        os.close(fd)
    try:
        os.close(os.open("/", os.O_RDONLY | os.O_DIRECTORY))
    except PermissionError:
        pass
    else:
        raise OSError(errno.EPERM, "Landlock was applied, yet / can still be opened")
    net = f", TCP connect only to port {proxy_port}" if abi >= NET_ABI else ""
    return f"locked (Landlock ABI {abi}): no file can be opened{net}"


def _error(call: str) -> OSError:
    eno = ctypes.get_errno()
    return OSError(eno, f"{call}: {os.strerror(eno)}")
