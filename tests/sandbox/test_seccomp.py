"""The seccomp filter against the real kernel: each escape it exists to close, then what it
must leave working.

Every scenario runs in a forked child that loads the filter (it cannot be unloaded), tries the
call with raw syscalls where Python has no wrapper, and reports results over a pipe. Nothing is
mocked. A control run without the filter shows that each EPERM comes from the filter, not from a
missing capability.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from egresslock.sandbox.seccomp import CLONE_NAMESPACE_FLAGS, REFUSED_SYSCALLS, describe_filter
from tests.conftest import require_sandbox

AF_VSOCK, AF_BLUETOOTH, AF_CAN = 40, 31, 29
SOCK_PACKET = 10
PTRACE_SEIZE = 0x4206
CLONE_ARGS_SIZE_VER0 = 64


def _seccomp_available() -> tuple[bool, str]:
    try:
        import pyseccomp  # noqa: F401
    except (ImportError, RuntimeError, OSError) as exc:
        return False, f"pyseccomp/libseccomp unavailable: {exc}"
    return True, ""


@pytest.fixture(autouse=True)
def _needs_seccomp() -> None:
    require_sandbox(*_seccomp_available())


@dataclass
class Outcome:
    """What a child reported (None when it died first) and how it ended."""

    result: Any
    status: int

    @property
    def killed_by(self) -> int | None:
        return os.WTERMSIG(self.status) if os.WIFSIGNALED(self.status) else None


def in_child(scenario: Callable[[], Any], *, filtered: bool = True) -> Outcome:
    """Run ``scenario`` in a forked child, after ``install_seccomp()`` when ``filtered``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 0
        try:
            os.close(read_fd)
            if filtered:
                from egresslock.sandbox.seccomp import install_seccomp

                install_seccomp()
            reply = {"ok": True, "result": scenario()}
        except BaseException:  # report everything, then exit
            reply, code = {"ok": False, "error": traceback.format_exc()}, 1
        try:
            os.write(write_fd, json.dumps(reply).encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as inp:
        while select.select([inp], [], [], 30)[0]:
            chunk = inp.read1(65536)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return Outcome(None, status)
    reply = json.loads(b"".join(chunks))
    if not reply["ok"]:
        raise AssertionError(f"the child failed:\n{reply['error']}")
    return Outcome(reply["result"], status)


def raw_syscall(number: int, *args: int) -> int:
    """syscall(2) with integer arguments: the result, or minus the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    result = int(libc.syscall(ctypes.c_long(number), *(ctypes.c_ulong(a & (2**64 - 1))
                                                          for a in args)))
    return result if result >= 0 else -ctypes.get_errno()


def nr(name: str) -> int:
    import pyseccomp

    number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    assert number >= 0, f"{name} does not exist on this architecture"
    return int(number)


def socket_errno(family: int, sock_type: int, proto: int = 0) -> int:
    try:
        socket.socket(family, sock_type, proto).close()
    except OSError as exc:
        return exc.errno or 0
    return 0


def fd_errno(result: int) -> int:
    """A raw syscall's fd closed and 0, or its errno."""
    if result >= 0:
        os.close(result)
        return 0
    return -result


def fork_like(result: int) -> int:
    """After a raw clone that the filter let through: the new child leaves, the parent reaps."""
    if result == 0:
        os._exit(0)
    if result > 0:
        os.waitpid(result, 0)
    return result


# --- sockets: families and types that would bypass the namespace's nftables ------------------

SOCKET_ATTACKS = {
    "netlink (routing, netfilter: rewrite the firewall)": (socket.AF_NETLINK, socket.SOCK_RAW,
                                                           0, errno.EAFNOSUPPORT),
    "packet socket (below IP, no netfilter)": (socket.AF_PACKET, socket.SOCK_RAW, 0,
                                               errno.EAFNOSUPPORT),
    "vsock (crosses network namespaces to the host/hypervisor)": (AF_VSOCK, socket.SOCK_STREAM,
                                                                  0, errno.EAFNOSUPPORT),
    "bluetooth": (AF_BLUETOOTH, socket.SOCK_STREAM, 0, errno.EAFNOSUPPORT),
    "can bus": (AF_CAN, socket.SOCK_RAW, 1, errno.EAFNOSUPPORT),
    "raw IPv4 with SOCK_CLOEXEC masked in": (socket.AF_INET,
                                             socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                             socket.IPPROTO_ICMP, errno.EPERM),
    "raw IPv6 with SOCK_NONBLOCK masked in": (socket.AF_INET6,
                                              socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                              socket.IPPROTO_ICMPV6, errno.EPERM),
    "SOCK_PACKET on AF_INET (the kernel turns it into AF_PACKET)": (socket.AF_INET, SOCK_PACKET,
                                                                    0, errno.EPERM),
    "SOCK_RDM on AF_INET": (socket.AF_INET, socket.SOCK_RDM, 0, errno.EPERM),
}


def test_socket_families_and_raw_types_are_refused() -> None:
    def scenario() -> dict[str, int]:
        return {name: socket_errno(fam, typ, proto)
                for name, (fam, typ, proto, _) in SOCKET_ATTACKS.items()}

    got = in_child(scenario).result
    assert got == {name: want for name, (*_, want) in SOCKET_ATTACKS.items()}


def test_family_with_garbage_in_the_upper_register_half_is_refused() -> None:
    # The kernel truncates the family to int, so 0x1_0000_0011 would be AF_PACKET to it; the
    # filter compares all 64 bits and must not let it through as "not an exact match".
    def scenario() -> dict[str, int]:
        return {
            "packet": raw_syscall(nr("socket"), (1 << 32) | socket.AF_PACKET, socket.SOCK_RAW, 0),
            "inet": raw_syscall(nr("socket"), (1 << 32) | socket.AF_INET, socket.SOCK_RAW, 0),
        }

    assert in_child(scenario).result == {"packet": -errno.EAFNOSUPPORT,
                                         "inet": -errno.EAFNOSUPPORT}


def test_socketpair_follows_the_same_family_rules() -> None:
    def scenario() -> dict[str, int]:
        try:
            socket.socketpair(socket.AF_NETLINK, socket.SOCK_RAW)
        except OSError as exc:
            netlink = exc.errno or 0
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.sendall(b"x")
        unix = b.recv(1) == b"x"
        a.close()
        b.close()
        return {"netlink": netlink, "unix_works": int(unix)}

    assert in_child(scenario).result == {"netlink": errno.EAFNOSUPPORT, "unix_works": 1}


def test_inet_stream_dgram_and_unix_sockets_still_work() -> None:
    def scenario() -> dict[str, int]:
        return {
            "tcp4": socket_errno(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC),
            "udp4": socket_errno(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK),
            "tcp6": socket_errno(socket.AF_INET6, socket.SOCK_STREAM),
            "udp6": socket_errno(socket.AF_INET6, socket.SOCK_DGRAM),
            "unix": socket_errno(socket.AF_UNIX, socket.SOCK_STREAM),
            "unix_dgram": socket_errno(socket.AF_UNIX, socket.SOCK_DGRAM),
        }

    assert set(in_child(scenario).result.values()) == {0}


def test_loopback_tcp_round_trip_still_works() -> None:
    def scenario() -> str:
        with socket.create_server(("127.0.0.1", 0)) as server:
            with socket.create_connection(server.getsockname()) as client:
                conn, _ = server.accept()
                with conn:
                    client.sendall(b"still connected")
                    return conn.recv(64).decode()

    assert in_child(scenario).result == "still connected"


# --- whole syscalls refused with EPERM ---------------------------------------------------------


def refusal_args(name: str, ppid: int, pidfd: int) -> tuple[int, ...]:
    """Arguments that would do no harm if the filter were missing (root included)."""
    invalid_flags = 0xFFFF0000
    special: dict[str, tuple[int, ...]] = {
        "ptrace": (PTRACE_SEIZE, ppid, 0, 0),  # SEIZE does not stop the parent (pytest)
        "process_vm_readv": (ppid, 0, 0, 0, 0, 0),
        "process_vm_writev": (ppid, 0, 0, 0, 0, 0),
        "pidfd_getfd": (pidfd, 0, 0),
        "kexec_load": (0, 0, 0, invalid_flags),
        "kexec_file_load": (-1, -1, 0, 0, invalid_flags),
        "finit_module": (-1, 0, 0),
        "open_by_handle_at": (-1, 0, 0),
        "io_uring_enter": (-1, 0, 0, 0, 0, 0),
        "io_uring_register": (-1, 0, 0, 0),
        "setns": (-1, 0),
        "fsmount": (-1, 0, 0),
        "fsconfig": (-1, 0, 0, 0, 0),
        "mount_setattr": (-1, 0, 0, 0, 0),
    }
    return special.get(name, (0, 0, 0, 0, 0, 0))


def try_refused_syscalls() -> dict[str, int]:
    ppid = os.getppid()
    pidfd = os.pidfd_open(ppid)
    results = {}
    for name, _why in REFUSED_SYSCALLS:
        result = raw_syscall(nr(name), *refusal_args(name, ppid, pidfd))
        if result > 0 and name in {"userfaultfd", "pidfd_getfd", "io_uring_setup"}:
            os.close(result)
        results[name] = result
    return results


def test_every_refused_syscall_gets_eperm() -> None:
    got = in_child(try_refused_syscalls).result
    assert got == {name: -errno.EPERM for name, _ in REFUSED_SYSCALLS}


def test_control_without_the_filter_none_of_them_is_eperm() -> None:
    # As root nothing in the list is refused for lack of a capability, so an EPERM in the test
    # above can only be the filter's. Unprivileged, the kernel itself says EPERM to many.
    if os.geteuid() != 0:
        pytest.skip("the control is meaningful only as root")
    got = in_child(try_refused_syscalls, filtered=False).result
    assert [name for name, result in got.items() if result == -errno.EPERM] == []

    def sockets() -> dict[str, int]:
        return {
            "netlink": socket_errno(socket.AF_NETLINK, socket.SOCK_RAW),
            "packet": socket_errno(socket.AF_PACKET, socket.SOCK_RAW),
            "raw": socket_errno(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
            "sock_packet": socket_errno(socket.AF_INET, SOCK_PACKET),
            "packet_high_bits": fd_errno(raw_syscall(nr("socket"),
                                                     (1 << 32) | socket.AF_PACKET,
                                                     socket.SOCK_RAW, 0)),
        }

    assert in_child(sockets, filtered=False).result == dict.fromkeys(
        ("netlink", "packet", "raw", "sock_packet", "packet_high_bits"), 0)


def test_named_escapes_in_their_usual_form() -> None:
    def scenario() -> dict[str, int]:
        libc = ctypes.CDLL(None, use_errno=True)

        def errno_of(call: Callable[[], object]) -> int:
            try:
                call()
            except OSError as exc:
                return exc.errno or 0
            return 0

        def libc_errno(rc: int) -> int:
            return ctypes.get_errno() if rc != 0 else 0

        netns = os.open("/proc/self/ns/net", os.O_RDONLY)
        params = ctypes.create_string_buffer(120)  # struct io_uring_params
        return {
            "io_uring_setup": -raw_syscall(nr("io_uring_setup"), 8, ctypes.addressof(params)),
            "unshare_net": -raw_syscall(nr("unshare"), 0x40000000),
            "unshare_user": -raw_syscall(nr("unshare"), 0x10000000),
            "setns_net": -raw_syscall(nr("setns"), netns, 0x40000000),
            "ptrace_seize_parent": -raw_syscall(nr("ptrace"), PTRACE_SEIZE, os.getppid(), 0, 0),
            "bpf_prog_load": -raw_syscall(nr("bpf"), 5, 0, 0),
            "mount_tmpfs": libc_errno(libc.mount(b"tmpfs", b"/mnt", b"tmpfs", ctypes.c_ulong(0),
                                                 None)),
            "keyctl_join_session": -raw_syscall(nr("keyctl"), 1, 0),
            "chroot": errno_of(lambda: os.chroot("/")),
        }

    got = in_child(scenario).result
    assert got == dict.fromkeys(got, errno.EPERM)


# --- clone: new namespaces refused, plain fork and threads kept -------------------------------


def test_clone_with_any_namespace_flag_is_refused() -> None:
    def scenario() -> dict[str, int]:
        return {name: fork_like(raw_syscall(nr("clone"), flag | signal.SIGCHLD, 0, 0, 0, 0))
                for name, flag in CLONE_NAMESPACE_FLAGS.items()}

    got = in_child(scenario).result
    assert got == dict.fromkeys(CLONE_NAMESPACE_FLAGS, -errno.EPERM)


def test_clone3_is_enosys_so_libc_falls_back_to_clone() -> None:
    def scenario() -> int:
        args = ctypes.create_string_buffer(struct.pack("=8Q", 0, 0, 0, 0, signal.SIGCHLD, 0, 0, 0))
        return fork_like(raw_syscall(nr("clone3"), ctypes.addressof(args), CLONE_ARGS_SIZE_VER0))

    assert in_child(scenario).result == -errno.ENOSYS


def test_fork_threads_subprocess_and_exec_still_work() -> None:
    def scenario() -> dict[str, object]:
        pid = os.fork()  # glibc's fork is clone(SIGCHLD|CLONE_CHILD_*): no namespace flag
        if pid == 0:
            os._exit(3)
        forked = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        seen: list[int] = []
        # pthread_create tries clone3 first and must fall back to clone on ENOSYS.
        threads = [threading.Thread(target=seen.append, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        true = subprocess.run(["true"], check=False).returncode  # posix_spawn/vfork path
        shell = subprocess.run(["/bin/sh", "-c", "echo from-sh; exit 7"], capture_output=True,
                               text=True, check=False)
        return {"fork": forked, "threads": sorted(seen), "true": true,
                "sh": [shell.returncode, shell.stdout.strip()]}

    assert in_child(scenario).result == {"fork": 3, "threads": [0, 1, 2, 3], "true": 0,
                                         "sh": [7, "from-sh"]}


def test_children_and_exec_inherit_the_filter() -> None:
    probe = ("import socket, errno\n"
             "try:\n"
             "    socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)\n"
             "    print('open')\n"
             "except OSError as e:\n"
             "    print(errno.errorcode[e.errno])\n")

    def scenario() -> dict[str, str]:
        python = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                check=False).stdout.strip()
        # A new program through a shell, a fork of a fork: the filter goes everywhere.
        nested = subprocess.run(["/bin/sh", "-c", f"exec {sys.executable} -c \"$0\"", probe],
                                capture_output=True, text=True, check=False).stdout.strip()
        return {"python": python, "nested": nested}

    assert in_child(scenario).result == {"python": "EAFNOSUPPORT", "nested": "EAFNOSUPPORT"}


# --- other architectures: killed, not filtered by the wrong table -----------------------------


def int80_getpid() -> int:
    """getpid through the i386 entry (``int 0x80``), from machine code in an executable page."""
    code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20; int 0x80; ret
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    return int(ctypes.CFUNCTYPE(ctypes.c_int)(address)())


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="i386 and x32 entries are x86-64's")
def test_i386_and_x32_syscalls_kill_the_process() -> None:
    unfiltered = in_child(int80_getpid, filtered=False)
    require_sandbox(unfiltered.killed_by is None,
                    "this kernel has no i386 emulation (int 0x80 faults even unfiltered)")
    assert unfiltered.result > 0  # the entry exists, so only the filter can stop it
    i386 = in_child(int80_getpid)
    assert (i386.result, i386.killed_by) == (None, signal.SIGSYS)
    x32 = in_child(lambda: raw_syscall(0x40000000 | 39))  # __X32_SYSCALL_BIT | getpid
    assert (x32.result, x32.killed_by) == (None, signal.SIGSYS)


def test_description_names_every_refused_syscall() -> None:
    text = "\n".join(describe_filter())
    for name, _ in REFUSED_SYSCALLS:
        assert f"{name} -> EPERM" in text
    for name in ("AF_VSOCK", "SOCK_RAW", "clone3 -> ENOSYS", "kill the process"):
        assert name in text
