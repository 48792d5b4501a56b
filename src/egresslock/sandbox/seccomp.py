"""The syscall filter installed as the last step before the sandboxed command is exec'd.

Why a deny-list on a default-allow filter: the network namespace and nftables already decide where
packets go; seccomp's job is narrower, to close the doors *around* them. Those doors are few and
known: socket families that do not pass through the namespace's netfilter hooks (AF_VSOCK crosses
namespaces by design, AF_PACKET and raw sockets skip the transport layer), interfaces that perform
socket operations where seccomp cannot see them (io_uring), and syscalls that leave or reshape the
namespaces the sandbox is built from (unshare, setns, clone with CLONE_NEW*, mount and friends), or
reach into the proxy process that holds the only way out (ptrace, process_vm_*, pidfd_getfd). An
allow-list of every syscall an agent's tools might need (compilers, browsers, language runtimes)
would break them in ways a user cannot diagnose, for no gain in what can leave the machine.

Errno choices follow one rule: answer what the kernel itself answers when the feature is absent,
so that programs take the fallback path they already have:

- a socket family outside UNIX/INET/INET6 gets EAFNOSUPPORT, as from a kernel built without it;
- raw, packet and RDM sockets get EPERM, as for a process without CAP_NET_RAW (ping falls back to
  its ICMP datagram socket on exactly that);
- the refused syscalls get EPERM, as io_uring_setup gives under ``kernel.io_uring_disabled=2``
  and namespace, mount and module calls give without the capability;
- clone3 gets ENOSYS, as on a kernel older than 5.3: its flags sit in a struct behind a pointer,
  which seccomp cannot read, and glibc then retries with clone, whose flags it can.

Only the native architecture is in the filter. Any other (i386 through ``int 0x80``, x32 through
``__X32_SYSCALL_BIT``) is killed: those tables number syscalls differently, i386 multiplexes
sockets through socketcall with its arguments in memory, and an agent has no business there.
"""

from __future__ import annotations

import errno
import functools
import tempfile
from typing import Any

from egresslock.errors import SandboxError
from egresslock.sandbox.syscalls import PR_SET_NO_NEW_PRIVS, prctl

AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
ALLOWED_FAMILIES = (AF_UNIX, AF_INET, AF_INET6)
# Families are enumerated one by one below this bound, and everything at or above it is refused
# with one comparison; libseccomp cannot put two comparisons on one argument in a rule, so "not
# in {1, 2, 10}" has to be spelled this way. AF_MAX is 46 on Linux 6.x.
_FAMILY_BOUND = 64

SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET = 1, 2, 5
# The kernel reads the type as ``type & SOCK_TYPE_MASK``; the rest are SOCK_NONBLOCK/SOCK_CLOEXEC.
SOCK_TYPE_MASK = 0xF
# Stream (TCP, MPTCP), datagram (UDP, ICMP ping sockets) and seqpacket (SCTP) all pass through the
# namespace's netfilter hooks. Everything else is refused, notably SOCK_RAW (3), SOCK_RDM (4) and
# SOCK_PACKET (10), which net/socket.c silently turns into an AF_PACKET socket for AF_INET.
ALLOWED_INET_TYPES = (SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET)

# Namespace flags clone() may carry. CLONE_NEWTIME (0x80) is absent on purpose: for clone() that
# bit belongs to the exit signal (CSIGNAL), so only unshare and clone3 can ask for a time namespace,
# and both are refused whole.
CLONE_NAMESPACE_FLAGS = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

# Refused whole with EPERM, each with the reason a reader of the filter needs.
REFUSED_SYSCALLS: tuple[tuple[str, str], ...] = (
    ("io_uring_setup", "io_uring runs socket/connect/send (IORING_OP_SOCKET, ...) in the kernel, "
                       "where seccomp never sees the arguments"),
    ("io_uring_enter", "as io_uring_setup"),
    ("io_uring_register", "as io_uring_setup"),
    ("unshare", "a new user namespace gives capabilities back; as root a process can make new "
                "namespaces around the masks"),
    ("setns", "joins another namespace: as root, the host's network (/proc/1/ns/net)"),
    ("ptrace", "the proxy runs outside with the same uid and pid namespace: tracing it would "
               "reach its sockets and the data it holds"),
    ("process_vm_readv", "reads another process's memory (the proxy's) without ptrace"),
    ("process_vm_writev", "writes another process's memory without ptrace"),
    ("pidfd_getfd", "copies a file descriptor, such as the proxy's upstream socket, out of "
                    "another process"),
    ("bpf", "socket filters and attachable programs are kernel attack surface; not needed"),
    ("mount", "would unmask host paths (Unix sockets under /run) hidden by the mount namespace"),
    ("umount2", "would remove the masks the sandbox mounted over host paths"),
    ("pivot_root", "reshapes the mount namespace"),
    ("chroot", "reshapes the filesystem view the masks are built on; no agent tool needs it"),
    ("move_mount", "new mount API: same as mount"),
    ("open_tree", "new mount API: clones mount trees"),
    ("fsopen", "new mount API: same as mount"),
    ("fsmount", "new mount API: same as mount"),
    ("fsconfig", "new mount API: same as mount"),
    ("fspick", "new mount API: reconfigures existing mounts"),
    ("mount_setattr", "new mount API: changes mount flags"),
    ("keyctl", "the kernel keyring is shared beyond the sandbox (user and session keyrings)"),
    ("add_key", "as keyctl"),
    ("request_key", "as keyctl; can also call out to /sbin/request-key on the host"),
    ("perf_event_open", "observes other processes and the kernel; side-channel surface"),
    ("kexec_load", "replaces the running kernel"),
    ("kexec_file_load", "replaces the running kernel"),
    ("init_module", "loads kernel code"),
    ("finit_module", "loads kernel code"),
    ("delete_module", "unloads kernel code (netfilter modules among them)"),
    ("userfaultfd", "a staple of kernel exploits (pausing the kernel mid-copy); not needed"),
    ("name_to_handle_at", "file handles reach files outside the mount view"),
    ("open_by_handle_at", "opens files by handle, outside the mount view"),
    ("swapon", "host administration"),
    ("swapoff", "host administration"),
    ("reboot", "host administration"),
)


def libseccomp() -> Any:
    """The ``pyseccomp`` module, imported now; :class:`SandboxError` when it cannot be.

    Imported on demand because it raises at import time when libseccomp.so.2 is absent. A
    process that is going to drop root should call this first: afterwards the interpreter's
    own files may no longer be readable (a Python installed under /root).
    """
    try:
        import pyseccomp
    except (ImportError, RuntimeError, OSError) as exc:
        raise SandboxError(
            f"seccomp is unavailable ({exc}); install libseccomp2 (apt-get install libseccomp2) "
            "and the pyseccomp package"
        ) from exc
    return pyseccomp


def set_no_new_privs() -> None:
    """Set PR_SET_NO_NEW_PRIVS: no exec can gain privileges again (setuid, file capabilities).

    Both seccomp (for an unprivileged caller) and Landlock require it; it is idempotent.
    """
    try:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
    except OSError as exc:
        raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: {exc.strerror}") from exc


def _rule(f: Any, sc: Any, action: int, syscall: str, *args: Any) -> None:
    """Add one rule, naming the syscall when libseccomp refuses it."""
    number = sc.resolve_syscall(sc.Arch.NATIVE, syscall)
    if number == -1:  # __NR_SCMP_ERROR: this libseccomp has never heard of the name
        raise SandboxError(
            f"libseccomp does not know the syscall {syscall!r}; upgrade libseccomp2 to 2.5 or later"
        )
    try:
        f.add_rule(action, number, *args)
    except OSError as exc:
        raise SandboxError(f"seccomp rule for {syscall!r} refused by libseccomp: {exc}") from exc


def _add_socket_rules(f: Any, sc: Any, syscall: str) -> None:
    """Families outside the allow-list get EAFNOSUPPORT; INET sockets of other types EPERM."""
    refuse_family = sc.ERRNO(errno.EAFNOSUPPORT)
    for family in range(_FAMILY_BOUND):
        if family not in ALLOWED_FAMILIES:
            _rule(f, sc, refuse_family, syscall, sc.Arg(0, sc.EQ, family))
    # Also catches an allowed family with garbage in the upper 32 bits of the register, which the
    # kernel would truncate away but a 64-bit comparison would not match as AF_INET.
    _rule(f, sc, refuse_family, syscall, sc.Arg(0, sc.GE, _FAMILY_BOUND))
    refuse_type = sc.ERRNO(errno.EPERM)
    for family in (AF_INET, AF_INET6):
        for sock_type in range(SOCK_TYPE_MASK + 1):
            if sock_type not in ALLOWED_INET_TYPES:
                _rule(f, sc, refuse_type, syscall, sc.Arg(0, sc.EQ, family),
                      sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, sock_type))
    # AF_UNIX keeps every type: its reach is the mount view (paths) and the network namespace
    # (abstract names), both already confined. AF_NETLINK is refused above even though netlink
    # sockets are SOCK_RAW: what matters is the family, not the type.


def _add_clone_rules(f: Any, sc: Any) -> None:
    # clone's flags are the first argument everywhere except s390, which swaps flags and stack.
    flags_arg = 1 if sc.system_arch() in (sc.Arch.S390, sc.Arch.S390X) else 0
    for flag in CLONE_NAMESPACE_FLAGS.values():
        _rule(f, sc, sc.ERRNO(errno.EPERM), "clone", sc.Arg(flags_arg, sc.MASKED_EQ, flag, flag))
    _rule(f, sc, sc.ERRNO(errno.ENOSYS), "clone3")


def build_filter() -> Any:
    """The filter as a ``pyseccomp.SyscallFilter``, built but not loaded."""
    sc = libseccomp()
    try:
        f = sc.SyscallFilter(sc.ALLOW)
        f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
        # Apply to every thread of the caller, in case it started one before calling us.
        f.set_attr(sc.Attr.CTL_TSYNC, 1)
    except OSError as exc:
        raise SandboxError(f"libseccomp cannot create a filter: {exc}") from exc
    for syscall in ("socket", "socketpair"):
        _add_socket_rules(f, sc, syscall)
    _add_clone_rules(f, sc)
    for syscall, _why in REFUSED_SYSCALLS:
        _rule(f, sc, sc.ERRNO(errno.EPERM), syscall)
    return f


@functools.cache
def prepared_filter() -> Any:
    """The filter, built once per process: a parent calls this before it forks sandboxed
    children, so that each child only loads it (building is ~150 calls into libseccomp,
    about 2 ms)."""
    return build_filter()


def install_seccomp() -> None:
    """Set no_new_privs and load the filter into the calling process; it cannot be removed.

    Call it last before exec: it refuses the netlink, mount and unshare calls the sandbox setup
    itself makes. Children and exec'd programs inherit it. Raises :class:`SandboxError` when the
    kernel or libseccomp cannot provide it, so that nothing runs unfiltered by accident.
    """
    f = prepared_filter()
    set_no_new_privs()
    try:
        f.load()
    except OSError as exc:
        raise SandboxError(f"the kernel refused the seccomp filter: {exc}") from exc


def export_pfc() -> str:
    """The filter in libseccomp's pseudo-filter-code text, for documentation and debugging."""
    f = build_filter()
    with tempfile.TemporaryFile(mode="w+") as out:
        try:
            f.export_pfc(out)
        except OSError as exc:
            raise SandboxError(f"libseccomp cannot export the filter: {exc}") from exc
        out.seek(0)
        return out.read()


def describe_filter() -> list[str]:
    """One line per decision of the filter, in words, for ``egresslock doctor`` and the docs."""
    families = ", ".join(_family_name(f) for f in ALLOWED_FAMILIES)
    types = ", ".join(_type_name(t) for t in ALLOWED_INET_TYPES)
    flags = "|".join(CLONE_NAMESPACE_FLAGS)
    lines = [
        "default: allow (the network namespace and nftables decide where packets go)",
        "other architectures (i386 int 0x80, x32): kill the process",
        f"socket, socketpair: family other than {families} -> EAFNOSUPPORT "
        "(AF_NETLINK, AF_PACKET, AF_VSOCK crosses network namespaces, AF_BLUETOOTH, ...)",
        f"socket, socketpair: AF_INET/AF_INET6 of a type other than {types} -> EPERM "
        "(SOCK_RAW, SOCK_RDM, SOCK_PACKET; SOCK_NONBLOCK/SOCK_CLOEXEC masked off)",
        f"clone with any of {flags} -> EPERM (new namespaces escape or reshape the sandbox)",
        "clone3 -> ENOSYS (its flags are behind a pointer seccomp cannot read; glibc falls "
        "back to clone)",
    ]
    lines.extend(f"{name} -> EPERM ({why})" for name, why in REFUSED_SYSCALLS)
    return lines


def _family_name(family: int) -> str:
    return {AF_UNIX: "AF_UNIX", AF_INET: "AF_INET", AF_INET6: "AF_INET6"}[family]


def _type_name(sock_type: int) -> str:
    names = {SOCK_STREAM: "SOCK_STREAM", SOCK_DGRAM: "SOCK_DGRAM", SOCK_SEQPACKET: "SOCK_SEQPACKET"}
    return names[sock_type]

