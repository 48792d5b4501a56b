"""Start a command in the sandbox: the child sets the kernel up, hands its sockets out, execs.

The order is the design (DESIGN.md, "The sandbox on Linux")::

    parent (egresslock run)                child
    ───────────────────────                ─────
    fork ───────────────────────────────►  [root only] drop to the command's uid and gid
                                           unshare(user | net | mount)
                                           map its own uid and gid, nothing else
                                           lo up, routes via lo, nftables, NFLOG socket
                                           listening sockets: proxy, transparent, DNS
                                           mounts: /run, /tmp... hidden, cwd carried through
    recv_fds ◄──── SCM_RIGHTS ───────────  send the sockets and their manifest
                                           no_new_privs, [Landlock], seccomp
    EOF on the pipe = exec succeeded ◄───  execve(command)

The parent never enters the namespace (it could not: ``setns`` needs a capability it does not
hold over the child's user namespace); every socket it serves was made inside by the child,
while the child still held capabilities there. After exec the command holds none: its uid is
not 0 inside the namespace, so execve(2) grants nothing (capabilities(7), "Effect of user ID
changes on capabilities"). When run as root, the child first becomes an unprivileged user,
because a namespace's root may leave it (``nsenter --net=/proc/1/ns/net``).

The child runs Python between fork and exec, which is safe only because the parent forks before
it starts any thread (the audit writer, the event loop): ``spawn`` must be called first.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from egresslock.errors import SandboxError
from egresslock.sandbox.mounts import MountPlan, apply_mounts
from egresslock.sandbox.syscalls import (
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWUSER,
    PR_SET_DUMPABLE,
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    prctl,
    unshare,
)

# Ports inside the sandbox's own network namespace: nothing else listens there, so fixed
# numbers are safe and a user can rely on them (HTTP_PROXY=http://127.0.0.1:3128).
PROXY_PORT = 3128
TRANSPARENT_PORT = 3129
DNS_PORT = 53
NFLOG_GROUP = 7

_EXIT_SETUP_FAILED = 125
NOBODY = 65534


def default_identity() -> tuple[int, int]:
    """The uid and gid a command runs as when no user is chosen: the caller's own, or, for
    root, the user sudo came from, else nobody. Never root: a namespace's root may leave it."""
    if os.geteuid() != 0:
        return os.getuid(), os.getgid()
    sudo_uid = os.environ.get("SUDO_UID", "")
    if sudo_uid.isdigit() and int(sudo_uid) != 0:
        return int(sudo_uid), int(os.environ.get("SUDO_GID", sudo_uid))
    return NOBODY, NOBODY


@dataclass(frozen=True, slots=True)
class SandboxSpec:
    """Everything the child needs, decided by the parent before fork."""

    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str
    uid: int
    gid: int
    mounts: MountPlan
    transparent: bool = True
    seccomp: bool = True
    # The signal mask the command starts with: the parent blocks the signals it forwards until
    # its handlers are in place, and execve(2) would hand that block on.
    signal_mask: frozenset[int] = frozenset()
    # Descriptors that become the command's stdin, stdout, stderr (None: inherit egresslock's),
    # for a parent that talks to the command over pipes (the MCP gateway).
    stdio: tuple[int | None, int | None, int | None] = (None, None, None)
    # More descriptors the command keeps across exec, at the same numbers (a courier's channel).
    keep_fds: tuple[int, ...] = ()


@dataclass(slots=True)
class SandboxSockets:
    """The listening sockets the child made inside its namespace, by role."""

    proxy: list[socket.socket] = field(default_factory=list)
    transparent: list[socket.socket] = field(default_factory=list)
    dns_udp: list[socket.socket] = field(default_factory=list)
    dns_tcp: list[socket.socket] = field(default_factory=list)
    nflog: socket.socket | None = None

    def close(self) -> None:
        for sock in [*self.proxy, *self.transparent, *self.dns_udp, *self.dns_tcp,
                     *([self.nflog] if self.nflog else [])]:
            sock.close()


@dataclass(slots=True)
class Sandboxed:
    """A started command: its pid and the sockets that are its only way out."""

    pid: int
    sockets: SandboxSockets


def spawn(spec: SandboxSpec, *, on_child: Callable[[], None] | None = None) -> Sandboxed:
    """Fork the sandboxed command. Raises SandboxError when the kernel refuses a step or the
    command cannot be executed; nothing runs unprotected."""
    parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, checked by the sandbox tests
        parent_end.close()
        code = _EXIT_SETUP_FAILED
        try:
            if on_child is not None:
                on_child()
            _child(spec, child_end)
        except BaseException as exc:
            message = str(exc) if isinstance(exc, SandboxError) else _describe(exc)
            try:
                child_end.send(json.dumps({"error": message}).encode())
            finally:
                os._exit(code)
        os._exit(code)
    child_end.close()
    try:
        return _receive(pid, parent_end)
    finally:
        parent_end.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{exc.strerror or exc} ({exc.filename})" if exc.filename else str(exc)
    return f"{type(exc).__name__}: {exc}"


def _receive(pid: int, channel: socket.socket) -> Sandboxed:
    try:
        message, fds, _, _ = socket.recv_fds(channel, 1 << 16, 64)
    except OSError as exc:
        _reap(pid)
        raise SandboxError(f"the sandbox child failed before reporting: {exc}") from exc
    sockets = SandboxSockets()
    try:
        manifest = json.loads(message or b"{}")
        if "error" in manifest:
            raise SandboxError(f"cannot set up the sandbox: {manifest['error']}")
        roles: list[str] = manifest.get("roles", [])
        if len(roles) != len(fds):
            raise SandboxError(f"the sandbox child sent {len(fds)} sockets for {len(roles)} roles")
        for role, fd in zip(roles, fds, strict=True):
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            if role == "nflog":
                sockets.nflog = sock
            else:
                getattr(sockets, role).append(sock)
        fds = []
        # The channel is close-on-exec: EOF means the command is running; a message means
        # execve failed (command not found, not executable).
        after = channel.recv(1 << 16)
        if after:
            raise SandboxError(json.loads(after)["error"])
    except BaseException:
        for fd in fds:
            os.close(fd)
        sockets.close()
        _reap(pid)
        raise
    return Sandboxed(pid, sockets)


def _reap(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


# --- the child, between fork and exec ---------------------------------------------------------


def _child(spec: SandboxSpec, channel: socket.socket) -> None:  # pragma: no cover - in child
    if os.geteuid() == 0:
        drop_root(spec.uid, spec.gid)
    # The command dies with egresslock: no proxy, no command (and no network anyway).
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWNS)
    except OSError as exc:
        raise SandboxError(
            f"the kernel refused a user namespace ({exc.strerror}); 'egresslock doctor' says "
            "what to enable. The command was not run.") from exc
    map_ids(spec.uid, spec.gid)
    roles, socks = _network(spec)
    apply_mounts(spec.mounts, spec.uid, spec.gid)
    os.chdir(spec.cwd)
    socket.send_fds(channel, [json.dumps({"roles": roles}).encode()],
                    [s.fileno() for s in socks])
    for s in socks:
        s.close()
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    if not spec.transparent:
        from egresslock.sandbox.landlock import restrict_tcp_connect

        restrict_tcp_connect([PROXY_PORT, DNS_PORT])
    if spec.seccomp:
        from egresslock.sandbox.seccomp import install_seccomp

        install_seccomp()
    signal.pthread_sigmask(signal.SIG_SETMASK, spec.signal_mask)
    for target, fd in enumerate(spec.stdio):
        if fd is not None and fd != target:
            os.dup2(fd, target)  # the copy is inheritable; the original closes at exec
    for fd in spec.keep_fds:
        os.set_inheritable(fd, True)
    try:
        os.execvpe(spec.argv[0], list(spec.argv), dict(spec.env))  # noqa: S606
    except OSError as exc:
        raise SandboxError(f"cannot run {spec.argv[0]!r}: {exc.strerror}") from exc


def drop_root(uid: int, gid: int) -> None:  # pragma: no cover - in child
    """Become ``uid``/``gid`` before unsharing, still able to write the own id maps."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # Changing credentials made the process non-dumpable, which makes /proc/self/uid_map
    # root's: the child could not write its own map (proc(5), /proc/pid/uid_map).
    prctl(PR_SET_DUMPABLE, 1)


def map_ids(uid: int, gid: int) -> None:  # pragma: no cover - in child
    """Right after unshare(CLONE_NEWUSER): map only the process's own uid and gid."""
    # The command keeps its own ids inside; uid 0 stays unmapped, so nothing inside is root.
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _network(spec: SandboxSpec) -> tuple[list[str], list[socket.socket]]:  # pragma: no cover
    from egresslock.sandbox.netlink import CaptureSpec, setup_network

    nflog = setup_network(CaptureSpec(proxy_port=PROXY_PORT, transparent_port=TRANSPARENT_PORT,
                                      dns_port=DNS_PORT, nflog_group=NFLOG_GROUP,
                                      transparent=spec.transparent))
    roles: list[str] = ["nflog"]
    socks: list[socket.socket] = [nflog]
    wanted = [("proxy", PROXY_PORT, socket.SOCK_STREAM), ("dns_udp", DNS_PORT, socket.SOCK_DGRAM),
              ("dns_tcp", DNS_PORT, socket.SOCK_STREAM)]
    if spec.transparent:
        wanted.append(("transparent", TRANSPARENT_PORT, socket.SOCK_STREAM))
    for role, port, kind in wanted:
        for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            sock = socket.socket(family, kind)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address, port))
            except OSError:
                sock.close()
                if family == socket.AF_INET6:
                    continue  # IPv6 disabled on this host: nothing to capture there either
                raise
            if kind == socket.SOCK_STREAM:
                if role == "proxy":  # its clients speak first: see proxy.server.defer_until_data
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
                sock.listen(1024)
            roles.append(role)
            socks.append(sock)
    return roles, socks
