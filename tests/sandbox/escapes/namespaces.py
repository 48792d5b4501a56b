"""Leave the sandbox: new namespaces, setns into egresslock's namespace, nsenter, unshare(1),
ptrace of egresslock, io_uring."""
import ctypes
import os
import subprocess

from _common import attempt, parent_pid, report

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWNS = 0x10000000, 0x40000000, 0x00020000
PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206
SYS_IO_URING_SETUP, SYS_PTRACE = 425, 101


def check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise OSError(1, f"{argv[0]} exited {done.returncode}: {done.stderr.strip()[:200]}")
    return done.stdout


def setns_parent() -> int:
    fd = os.open(f"/proc/{parent_pid()}/ns/net", os.O_RDONLY)
    try:
        return check(libc.setns(fd, CLONE_NEWNET), "setns")
    finally:
        os.close(fd)


def setns_self() -> int:
    # Our own namespace file, which we can always open: isolates the seccomp refusal of setns.
    fd = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        return check(libc.setns(fd, CLONE_NEWNET), "setns")
    finally:
        os.close(fd)


attempt("unshare-net", lambda: check(libc.unshare(CLONE_NEWNET), "unshare"))
attempt("unshare-user-net", lambda: check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNET), "unshare"))
attempt("unshare-mount", lambda: check(libc.unshare(CLONE_NEWNS), "unshare"))
attempt("setns-parent", setns_parent)
attempt("setns-self", setns_self)
attempt("nsenter-parent", lambda: run("nsenter", f"--net=/proc/{parent_pid()}/ns/net", "true"))
attempt("unshare-cmd", lambda: run("unshare", "-Urn", "true"))
attempt("ptrace-attach", lambda: check(
    libc.syscall(SYS_PTRACE, PTRACE_ATTACH, parent_pid(), 0, 0), "ptrace"))
attempt("ptrace-seize", lambda: check(
    libc.syscall(SYS_PTRACE, PTRACE_SEIZE, parent_pid(), 0, 0), "ptrace"))
params = ctypes.create_string_buffer(120)
attempt("io_uring_setup", lambda: check(
    libc.syscall(SYS_IO_URING_SETUP, 4, params), "io_uring_setup"))
report()
