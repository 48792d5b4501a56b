"""What this machine offers the sandbox, found by trying it, for ``egresslock doctor``.

Reading sysctls and kernel configs guesses; trying is the only answer that covers every way a
feature can be switched off (a sysctl, an AppArmor or SELinux rule, a container runtime's seccomp
profile, a missing module). So one forked child does in miniature what ``egresslock run`` does:
unshare a user and network namespace, then a mount namespace and mount a tmpfs, install a NAT and
a log rule with libnftables, bind an NFLOG group, and finally load the seccomp filter. It reports
over a pipe and exits; its namespaces die with it. The sysctls are still read, but only to explain
a failure and to name the fix.

Nothing here raises, and the whole check takes a few tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import shutil
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from egresslock.errors import SandboxError
from egresslock.sandbox.spawn import default_identity, drop_root, map_ids
from egresslock.sandbox.syscalls import (
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWUSER,
    MS_PRIVATE,
    MS_REC,
    mount,
    unshare,
)

NFTABLES_SONAME = "libnftables.so.1"
SECCOMP_SONAME = "libseccomp.so.2"
_CHILD_TIMEOUT = 2.0  # seconds; the child normally answers in about 20 ms

# What the child applies to its private netns: the two kinds of rule transparent capture needs.
_NFT_PROBE = b"""add table inet egresslock_doctor
add chain inet egresslock_doctor nat_out { type nat hook output priority -100 ; }
add rule inet egresslock_doctor nat_out tcp dport 1 redirect to :2
add chain inet egresslock_doctor filter_out { type filter hook output priority 0 ; }
add rule inet egresslock_doctor filter_out log group 7
"""


@dataclass(frozen=True, slots=True)
class Feature:
    """One thing the sandbox uses, whether it works here, and what to do when it does not."""

    name: str
    ok: bool
    detail: str
    fix: str
    required: bool
    what_fails: str


Probe = dict[str, tuple[bool, str]]


def check_features(identity: tuple[int, int] | None = None) -> list[Feature]:
    """Every feature the sandbox uses, required ones first. Never raises.

    ``identity`` is the (uid, gid) to probe namespaces as when running as root; it defaults to
    :func:`egresslock.sandbox.spawn.default_identity`. Without root the probe runs as the caller.
    """
    uid, gid = identity if identity is not None else default_identity()
    probe = _run_probe_child(uid, gid)
    return [
        _user_namespaces(probe, uid),
        _feature(probe, "mount-namespace", required=True,
                 fix="the same as for user namespaces; a container runtime must allow mount "
                     "(e.g. docker run --security-opt seccomp=unconfined)",
                 what_fails="egresslock run: host Unix sockets (/run, /tmp) cannot be hidden"),
        _nftables_library(),
        _feature(probe, "nftables-in-namespace", required=True,
                 fix="load the modules: modprobe nf_tables nft_nat nft_redir nft_log; a "
                     "container needs a kernel that has them",
                 what_fails="egresslock run: no firewall inside the sandbox, so it will not start"),
        _seccomp(probe),
        _landlock(),
        _feature(probe, "nflog", required=False,
                 fix="modprobe nfnetlink_log",
                 what_fails="dropped UDP/ICMP/other packets are still dropped but not logged as "
                            "audit rows"),
        _tool("bubblewrap", "bwrap", "apt-get install bubblewrap",
              "wrapping egresslock run in bwrap for a private filesystem view"),
        _tool("curl", "curl", "apt-get install curl",
              "the examples and `egresslock run -- curl` smoke tests"),
    ]


def _feature(probe: Probe, name: str, *, required: bool, fix: str, what_fails: str) -> Feature:
    ok, detail = probe.get(name, (False, "not tried: the probe child did not report"))
    return Feature(name, ok, detail, "" if ok else fix, required, what_fails)


def _read_sysctl(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _user_namespaces(probe: Probe, uid: int) -> Feature:
    ok, detail = probe.get("user-namespaces", (False, "the probe child did not report"))
    fixes: list[str] = []
    notes: list[str] = []
    max_ns = _read_sysctl("/proc/sys/user/max_user_namespaces")
    if max_ns is not None:
        notes.append(f"user.max_user_namespaces={max_ns}")
        if max_ns == "0":
            fixes.append("sysctl -w user.max_user_namespaces=15000")
    for key, bad, fix in (
        ("kernel/unprivileged_userns_clone", "0", "sysctl -w kernel.unprivileged_userns_clone=1"),
        ("kernel/apparmor_restrict_unprivileged_userns", "1",
         "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 (or an AppArmor profile "
         "with `userns,` for the Python that runs egresslock)"),
    ):
        value = _read_sysctl(f"/proc/sys/{key}")
        if value is not None:
            notes.append(f"{key.replace('/', '.')}={value}")
            if value == bad:
                fixes.append(fix)
    if os.geteuid() == 0:
        notes.append(f"probed as uid {uid}, the user egresslock run drops root to")
    if not ok and not fixes:
        fixes.append("allow unprivileged user namespaces (a container runtime must permit "
                     "unshare; e.g. docker run --security-opt seccomp=unconfined)")
    return Feature("user-namespaces", ok, "; ".join([detail, *notes]),
                   "" if ok else "; ".join(fixes), True,
                   "egresslock run: the sandbox cannot be built, so nothing runs")


def _nftables_library() -> Feature:
    try:
        ctypes.CDLL(NFTABLES_SONAME)
        ok, detail = True, f"{NFTABLES_SONAME} loads"
    except OSError as exc:
        ok, detail = False, f"{NFTABLES_SONAME} cannot be loaded: {exc}"
    return Feature("nftables-library", ok, detail,
                   "" if ok else "apt-get install libnftables1 (dnf install nftables)", True,
                   "egresslock run: the firewall inside the sandbox cannot be installed")


def _seccomp(probe: Probe) -> Feature:
    problems: list[str] = []
    try:
        ctypes.CDLL(SECCOMP_SONAME)
    except OSError as exc:
        problems.append(f"{SECCOMP_SONAME} cannot be loaded: {exc}")
    try:
        import pyseccomp  # noqa: F401  (imported only to prove it imports)
    except (ImportError, RuntimeError, OSError) as exc:
        problems.append(f"pyseccomp does not import: {exc}")
    actions = _read_sysctl("/proc/sys/kernel/seccomp/actions_avail")
    if actions is None:
        problems.append("/proc/sys/kernel/seccomp/actions_avail is missing (no CONFIG_SECCOMP?)")
    else:
        missing = {"errno", "kill_process"} - set(actions.split())
        if missing:
            problems.append(f"kernel lacks seccomp actions {sorted(missing)}")
    loaded_ok, loaded = probe.get("seccomp", (False, "the probe child did not report"))
    if not loaded_ok:
        problems.append(loaded)
    ok = not problems
    return Feature("seccomp", ok, loaded if ok else "; ".join(problems),
                   "" if ok else "apt-get install libseccomp2 and pip install pyseccomp; a "
                                 "kernel with CONFIG_SECCOMP_FILTER", True,
                   "egresslock run: raw sockets, AF_VSOCK, io_uring and namespace escapes stay "
                   "open, so it will not start")


def _landlock() -> Feature:
    from egresslock.sandbox.landlock import NET_ABI, landlock_abi

    abi = landlock_abi()
    ok = abi >= NET_ABI
    detail = f"Landlock ABI {abi}" if abi else "Landlock unavailable (not built, or not in lsm=)"
    if not ok:
        detail += f"; network rules need ABI {NET_ABI}"
    return Feature("landlock-net", ok, detail,
                   "" if ok else "Linux 6.7+ with landlock in the lsm= boot parameter", False,
                   "proxy-variable mode loses its connect-port restriction (transparent capture "
                   "does not use Landlock)")


def _tool(name: str, command: str, fix: str, what_fails: str) -> Feature:
    path = shutil.which(command)
    return Feature(name, path is not None, path or f"{command} not on PATH",
                   "" if path else fix, False, what_fails)


# --- the probe child ---------------------------------------------------------------------------


def _run_probe_child(uid: int, gid: int) -> Probe:
    """Fork, let the child try everything, collect its JSON report; never raise, never hang."""
    # Import in the parent what the child uses: once it drops root to nobody it may not be able
    # to read a Python installed under /root.
    from egresslock.sandbox import seccomp

    with contextlib.suppress(SandboxError):
        seccomp.libseccomp()  # a failure is reported by the child, which tries again
    try:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
    except OSError as exc:
        return {"user-namespaces": (False, f"cannot fork a probe child: {exc}")}
    if pid == 0:  # the child: report, then exit without running the parent's cleanup
        os.close(read_fd)
        try:
            report = _child_probe(uid, gid)
            os.write(write_fd, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + _CHILD_TIMEOUT
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([read_fd], [], [], left)[0]:
                break
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _reap(pid)
    try:
        raw = json.loads(b"".join(chunks))
        return {k: (bool(v[0]), str(v[1])) for k, v in raw.items()}
    except (ValueError, TypeError, IndexError, AttributeError):
        return {}


def _reap(pid: int) -> None:
    try:
        if os.waitpid(pid, os.WNOHANG) == (0, 0):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    except OSError:
        pass


def _child_probe(uid: int, gid: int) -> dict[str, tuple[bool, str]]:
    report: dict[str, tuple[bool, str]] = {}
    try:
        if os.geteuid() == 0:
            drop_root(uid, gid)
        unshare(CLONE_NEWUSER | CLONE_NEWNET)
    except OSError as exc:
        report["user-namespaces"] = (
            False, f"unshare(CLONE_NEWUSER|CLONE_NEWNET) as uid {uid}: {exc.strerror}")
        for name in ("mount-namespace", "nftables-in-namespace", "nflog"):
            report[name] = (False, "not tried: needs a user and network namespace")
    else:
        map_ids(uid, gid)
        report["user-namespaces"] = (
            True, f"unshare(CLONE_NEWUSER|CLONE_NEWNET) works as uid {uid}")
        report["mount-namespace"] = _try(_mount_namespace)
        report["nftables-in-namespace"] = _try(_nftables_in_namespace)
        report["nflog"] = _try(_nflog)
    report["seccomp"] = _try(_seccomp_loads)
    return report


def _try(check: Callable[..., tuple[bool, str]], *args: object) -> tuple[bool, str]:
    try:
        return check(*args)
    except Exception as exc:  # the probe reports every failure, never raises
        return False, f"{type(exc).__name__}: {exc}"


def _mount_namespace() -> tuple[bool, str]:
    # The mounts stay in this child's own mount namespace and vanish with it.
    try:
        unshare(CLONE_NEWNS)
        mount("none", "/", None, MS_REC | MS_PRIVATE)
        mount("tmpfs", "/tmp", "tmpfs", 0, "size=16k")  # noqa: S108  a mask, as the sandbox makes
    except OSError as exc:
        return False, str(exc.strerror)
    return True, "unshare(CLONE_NEWNS) and a tmpfs mask over /tmp work"


def _nftables_in_namespace() -> tuple[bool, str]:
    nft = ctypes.CDLL(NFTABLES_SONAME)
    nft.nft_ctx_new.restype = ctypes.c_void_p
    nft.nft_ctx_new.argtypes = (ctypes.c_uint32,)
    nft.nft_ctx_buffer_output.argtypes = nft.nft_ctx_buffer_error.argtypes = (ctypes.c_void_p,)
    nft.nft_run_cmd_from_buffer.argtypes = (ctypes.c_void_p, ctypes.c_char_p)
    nft.nft_ctx_get_error_buffer.argtypes = (ctypes.c_void_p,)
    nft.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
    ctx = nft.nft_ctx_new(0)
    if not ctx:
        return False, "nft_ctx_new failed"
    nft.nft_ctx_buffer_output(ctx)
    nft.nft_ctx_buffer_error(ctx)
    if nft.nft_run_cmd_from_buffer(ctx, _NFT_PROBE) != 0:
        message = (nft.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace").strip()
        first = message.splitlines()[0] if message else "no message"
        return False, f"a NAT redirect and a log rule were refused: {first}"
    return True, "a NAT redirect and a `log group` rule install in a private netns"


def _nflog() -> tuple[bool, str]:
    """Bind an NFLOG group over NETLINK_NETFILTER, as the drop logger does, and read the ack."""
    netlink_netfilter, group = 12, 7
    nfnl_subsys_ulog, nfulnl_msg_config, nfula_cfg_cmd, nfulnl_cfg_cmd_bind = 4, 1, 1, 1
    nlm_f_request_ack, nlmsg_error = 1 | 4, 2
    attr = struct.pack("=HHB3x", 5, nfula_cfg_cmd, nfulnl_cfg_cmd_bind)
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group)) + attr
    header = struct.pack("=IHHII", 16 + len(body), (nfnl_subsys_ulog << 8) | nfulnl_msg_config,
                         nlm_f_request_ack, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netlink_netfilter) as sock:
        sock.settimeout(1.0)
        sock.bind((0, 0))
        sock.send(header + body)
        reply = sock.recv(4096)
    _length, kind = struct.unpack_from("=IH", reply)
    if kind != nlmsg_error:
        return False, f"unexpected netlink reply type {kind}"
    (error,) = struct.unpack_from("=i", reply, 16)
    if error != 0:
        return False, f"binding NFLOG group {group}: {os.strerror(-error)}"
    return True, f"NETLINK_NETFILTER socket binds NFLOG group {group}"


def _seccomp_loads() -> tuple[bool, str]:
    from egresslock.sandbox.seccomp import install_seccomp

    install_seccomp()
    try:
        socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()
    except OSError as exc:
        return True, f"filter loads; socket(AF_NETLINK) now fails: {exc.strerror}"
    return False, "filter loaded but socket(AF_NETLINK) still works"
