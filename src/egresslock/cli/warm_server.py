"""The warm server: ``egresslock run`` without paying Python's start-up again for each run.

A cold ``egresslock run -- /bin/true`` spends most of its time importing modules (the policy
schema, asyncio, the proxy, SQLite) and parsing the policy. The warm server does that once. It
listens on an abstract Unix socket named for this user and installation
(:func:`egresslock.cli.warm_client.socket_name`); for each run a client sends, it checks that
the client could have run the command itself with the same result, then forks a worker. The
worker takes on the client's environment, working directory, umask, resource limits and stdio,
and runs the same code path as a cold ``egresslock run``: same option parsing, same sandbox,
same audit rows, same summary on the client's stderr. Only the imports and the parsed policy
(kept by file name and content) come from the server.

Who may use it, and why that is safe:

* The socket is abstract, so it exists only in the server's network namespace: a sandboxed
  command has a network namespace of its own and cannot reach it, so it cannot start a new run
  under a policy of its own choosing.
* A client must have the server's uid and gid (SO_PEERCRED), its namespaces, its capability
  sets, no_new_privs and seccomp state, groups, security label, nice value, CPU affinity and OOM
  score adjustment, so that a confined client cannot use the server to run a command outside its
  confinement. A client whose cgroup differs is served only if the worker can move into it.
  Landlock domains are not visible in /proc: a process confined by Landlock without
  no_new_privs (which needs CAP_SYS_ADMIN) is not told apart.
* The worker runs the command as its child, so the command never shares the server's memory;
  the server itself is not dumpable, and never runs a session of its own.

A client that does not meet these gets the answer ``cold`` and runs the command cold itself.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from egresslock.cli.warm_client import (
    FORWARDED,
    MAGIC,
    RLIMITS,
    frame,
    peer_credentials,
    read_exactly,
    socket_name,
)

NAMESPACES = ("mnt", "user", "pid", "net", "cgroup", "ipc", "uts")
STATUS_FIELDS = ("Uid", "Gid", "Groups", "NoNewPrivs", "Seccomp", "Seccomp_filters", "CapInh",
                 "CapPrm", "CapEff", "CapBnd", "CapAmb")
MAX_REQUEST = 4 << 20  # arguments and environment
REQUEST_TIMEOUT = 5.0


class WarmError(Exception):
    """The server cannot start (another one holds the socket)."""


@dataclass
class RunRequest:
    argv: list[str]
    env: dict[str, str]
    umask: int
    limits: list[tuple[str, int, int]]
    fds: list[int] = field(default_factory=list)  # stdin, stdout, stderr, working directory

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = []


def decode_run(data: bytes, fds: list[int]) -> RunRequest:
    parts = data.split(b"\0")
    if len(parts) < 5 or parts[0] != MAGIC or parts[1] != b"run":
        raise ValueError("not a run request of this egresslock version")
    umask = int(parts[2])
    limits = []
    for item in filter(None, parts[3].decode().split(",")):
        name, soft, hard = item.split(":")
        if name not in RLIMITS:
            raise ValueError(f"unknown resource limit {name!r}")
        limits.append((name, int(soft), int(hard)))
    argc = int(parts[4])
    argv = [os.fsdecode(a) for a in parts[5:5 + argc]]
    env = {}
    for entry in parts[5 + argc:]:
        key, sep, value = entry.partition(b"=")
        if not sep:
            raise ValueError("an environment entry without '='")
        env[os.fsdecode(key)] = os.fsdecode(value)
    if len(fds) != 4:
        raise ValueError(f"a run request carries 4 descriptors, not {len(fds)}")
    return RunRequest(argv, env, umask, limits, fds)


# --- who may be served ---------------------------------------------------------------------------


def _status(pid: int | str) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                out[key] = " ".join(value.split())
    return out


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace").strip()
    except OSError:
        return None


def _stat_fields(pid: int | str) -> tuple[str, str]:
    """Nice value and scheduling policy from /proc/PID/stat."""
    stat = _read(f"/proc/{pid}/stat") or ""
    fields = stat[stat.rfind(")") + 2:].split()
    return (fields[16], fields[38]) if len(fields) > 38 else ("", "")


def mismatch(pid: int) -> str | None:
    """Why a client with this pid must run cold, or None when a worker of this server would
    run its command exactly as it could itself (the cgroup aside: see :func:`join_cgroup`)."""
    try:
        for ns in NAMESPACES:
            if os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"):
                return f"the client is in another {ns} namespace"
        theirs, ours = _status(pid), _status("self")
        for key in STATUS_FIELDS:
            if theirs.get(key) != ours.get(key):
                return f"the client's {key} ({theirs.get(key)}) is not the server's " \
                       f"({ours.get(key)})"
        for what in ("attr/current", "oom_score_adj"):
            if _read(f"/proc/{pid}/{what}") != _read(f"/proc/self/{what}"):
                return f"the client's {what} differs"
        if _stat_fields(pid) != _stat_fields("self"):
            return "the client's nice value or scheduling policy differs"
        if os.sched_getaffinity(pid) != os.sched_getaffinity(0):
            return "the client's CPU affinity differs"
    except (OSError, IndexError) as exc:
        return f"cannot inspect the client: {exc}"
    return None


def join_cgroup(pid: int) -> str | None:
    """Move this process (a worker) into client ``pid``'s cgroup, so the command is counted
    and limited where the client is. Returns why it could not, or None."""
    theirs, ours = _read(f"/proc/{pid}/cgroup"), _read("/proc/self/cgroup")
    if theirs == ours:
        return None
    if theirs is None or not theirs.startswith("0::"):
        return "the client is in another cgroup and this is not a cgroup v2 system"
    try:
        with open(f"/sys/fs/cgroup{theirs[3:]}/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
    except OSError as exc:
        return f"cannot join the client's cgroup {theirs[3:]}: {exc.strerror}"
    return None


def apply_limits(limits: list[tuple[str, int, int]]) -> str | None:
    import resource

    for name, soft, hard in limits:
        try:
            resource.setrlimit(getattr(resource, name), (soft, hard))
        except (ValueError, OSError) as exc:
            return f"cannot give the command the client's {name} ({soft}, {hard}): {exc}"
    return None


def installation_files() -> list[str]:
    """egresslock's Python files and directories, and the site-packages directories its
    dependencies live in (an install or upgrade adds and removes entries there)."""
    here = Path(__file__).resolve().parents[1]
    paths = []
    for root, _dirs, files in os.walk(here):
        paths.append(root)  # a file added or removed changes its directory's time
        paths += [os.path.join(root, name) for name in files if name.endswith(".py")]
    paths += [entry for entry in sys.path
              if entry.endswith("site-packages") and os.path.isdir(entry)]
    return sorted(paths)


def installation_stamp(paths: list[str]) -> tuple[float, ...]:
    """The modification times of ``paths``: when one changes, the code the server holds is not
    the code on disk."""
    stamps = []
    for path in paths:
        try:
            stamps.append(os.stat(path).st_mtime)
        except OSError:
            stamps.append(-1.0)
    return tuple(stamps)


# --- the server ------------------------------------------------------------------------------


def preload() -> None:
    """Everything a run imports, imported once here instead of in every run."""
    import egresslock.audit
    import egresslock.cli.courier_session
    import egresslock.cli.main
    import egresslock.cli.run_cmd
    import egresslock.content.credentials
    import egresslock.content.engine
    import egresslock.dns.stub
    import egresslock.flow.mark
    import egresslock.proxy.server
    import egresslock.sandbox.mounts
    import egresslock.sandbox.process
    import egresslock.sandbox.spawn  # noqa: F401
    from egresslock.cli.session import preload as preload_sandbox
    from egresslock.memo import Memo

    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401
    preload_sandbox()
    Memo.remember()  # parsed policies, compiled policies, scan engines


class WarmServer:
    def __init__(self, idle_timeout: float) -> None:
        self.name = socket_name()
        self.idle_timeout = idle_timeout
        self.started_at = time.time()
        self.last_run = 0.0
        self.runs = 0
        self.declined = 0
        self.workers: set[int] = set()
        self.files = installation_files()
        self.stamp = installation_stamp(self.files)
        self.stopping = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(self.name)
        except OSError as exc:
            self.sock.close()
            raise WarmError(f"cannot listen on @{self.name[1:]}: {exc.strerror} (a warm "
                            "server for this user and installation already runs: "
                            "'egresslock warm status')") from exc
        self.sock.listen(64)

    def status(self) -> dict[str, object]:
        from egresslock import __version__

        return {"pid": os.getpid(), "socket": "@" + self.name[1:], "version": __version__,
                "started_at": self.started_at, "runs": self.runs, "declined": self.declined,
                "last_run": self.last_run or None, "active": len(self.workers),
                "idle_timeout": None if self.idle_timeout == float("inf") else self.idle_timeout}

    def serve_forever(self) -> None:
        from egresslock.sandbox.syscalls import PR_SET_DUMPABLE, prctl

        prctl(PR_SET_DUMPABLE, 0)
        os.chdir("/")
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        gc.collect()
        gc.freeze()  # what is loaded now stays shared with every worker, untouched
        try:
            while not self.stopping:
                self._reap()
                idle_since = max(self.last_run, self.started_at)
                wait = self.idle_timeout - (time.time() - idle_since)
                if wait <= 0 and not self.workers:
                    log(f"idle for {self.idle_timeout:.0f} s: exiting")
                    break
                ready, _, _ = select.select([self.sock], [], [], max(0.05, min(wait, 1.0)))
                if ready:
                    conn, _ = self.sock.accept()
                    try:
                        self._handle(conn)
                    except Exception as exc:  # one bad client never stops the server
                        log(f"request failed: {type(exc).__name__}: {exc}")
                    finally:
                        conn.close()
        finally:
            self.sock.close()

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def _reap(self) -> None:
        for pid in list(self.workers):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    continue
            self.workers.discard(pid)

    def _handle(self, conn: socket.socket) -> None:
        pid, uid, gid = peer_credentials(conn)
        if uid != os.geteuid() or gid != os.getegid():
            log(f"refused pid {pid}: uid {uid} gid {gid} is not the server's")
            return
        conn.settimeout(REQUEST_TIMEOUT)
        data, fds = _receive(conn)
        if data.startswith(b"{"):
            self._control(conn, json.loads(data))
            for fd in fds:
                os.close(fd)
            return
        request = decode_run(data, fds)
        try:
            reason = mismatch(pid)
            if reason is None and installation_stamp(self.files) != self.stamp:
                reason = "egresslock changed on disk since the warm server started; it exits"
                self.stopping = True
            if reason is not None:
                self.declined += 1
                log(f"declined pid {pid}: {reason}")
                conn.sendall(frame(b"cold " + reason.encode()))
                return
            worker = os.fork()
            if worker == 0:  # pragma: no cover - the worker, checked by the warm-start tests
                code = 125
                try:
                    self.sock.close()
                    code = _work(conn, request, pid)
                finally:
                    os._exit(code)
            self.workers.add(worker)
            self.runs += 1
            self.last_run = time.time()
            # While the worker runs: parse this run's policy here too, so that the next run
            # with the same file finds it parsed, compiled and its scanner built.
            _warm_up(request)
        finally:
            request.close()

    def _control(self, conn: socket.socket, message: dict[str, object]) -> None:
        op = message.get("op")
        self._reap()
        if op == "status":
            conn.sendall(frame(json.dumps(self.status()).encode()))
        elif op == "stop":
            self.stopping = True
            conn.sendall(frame(json.dumps({"stopping": True, **self.status()}).encode()))
        else:
            conn.sendall(frame(json.dumps({"error": f"unknown operation {op!r}"}).encode()))


def _receive(conn: socket.socket) -> tuple[bytes, list[int]]:
    """A framed request and the descriptors sent with its first bytes (close-on-exec)."""
    space = socket.CMSG_SPACE(8 * 4)
    first, ancillary, _flags, _ = conn.recvmsg(1 << 16, space, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += [int.from_bytes(payload[i:i + 4], sys.byteorder, signed=True)
                    for i in range(0, usable, 4)]
    try:
        if len(first) < 4:
            first += _more(conn, 4 - len(first))
        size = int.from_bytes(first[:4], "big")
        if size > MAX_REQUEST:
            raise ValueError(f"a request of {size} bytes is over the {MAX_REQUEST} limit")
        body = first[4:]
        if len(body) < size:
            body += _more(conn, size - len(body))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return body, fds


def _more(conn: socket.socket, size: int) -> bytes:
    data = read_exactly(conn, size)
    if data is None:
        raise ValueError("the client closed the connection mid-request")
    return data


@contextlib.contextmanager
def _with_client(request: RunRequest) -> Iterator[None]:
    """The client's environment and working directory, for the server's warm-up (put back
    afterwards: the server serves one request at a time, with no thread)."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(request.env)
    os.fchdir(request.fds[3])
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        os.chdir("/")


def _warm_up(request: RunRequest) -> None:
    """Parse and compile the run's policy in the server, unless it has already, so the next run
    with the same file finds it parsed (and its scanner compiled). Errors are left for the
    worker to report."""
    from egresslock.cli.run_cmd import run
    from egresslock.policy import compile_policy, load_policy
    from egresslock.policy.loader import is_remembered
    from egresslock.proxy.context import PolicyHolder

    try:
        with _with_client(request):
            ctx = run.make_context("run", request.argv[1:], resilient_parsing=True)
            path = ctx.params.get("policy_file")
            if path is not None and not is_remembered(path):
                PolicyHolder(path, compile_policy(load_policy(path)), ctx.params.get("ca_dir"))
    except Exception as exc:
        log(f"warm-up: {type(exc).__name__}: {exc}")


def _work(conn: socket.socket, request: RunRequest, client: int) -> int:  # pragma: no cover
    """The worker: become the client's ``egresslock run`` and run it. Returns the exit status
    of this process (the run's exit code went to the client)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    os.setpgid(0, 0)
    reason = join_cgroup(client) or apply_limits(request.limits)
    if reason is not None:
        conn.sendall(frame(b"cold " + reason.encode()))
        return 0
    os.umask(request.umask)
    os.fchdir(request.fds[3])
    os.environ.clear()
    os.environ.update(request.env)
    for target, fd in enumerate(request.fds[:3]):
        os.dup2(fd, target)  # inheritable: the command's stdio, as in a cold run
    request.close()
    _reopen_stdio()
    conn.sendall(frame(b"started %d" % os.getpid()))
    from egresslock.cli import run_cmd

    run_cmd.warm_channel = conn
    sys.argv = ["egresslock", *request.argv]
    code: int = 1
    try:
        from egresslock.cli.main import main

        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    with contextlib.suppress(OSError):
        conn.sendall(frame(b"exit %d" % code))
    return 0


def _reopen_stdio() -> None:
    """Python's stdout and stderr objects for the new descriptors 1 and 2, as a fresh
    interpreter would make them."""
    import io

    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                  errors="surrogateescape", write_through=False)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                  errors="backslashreplace", line_buffering=True)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8",
                                 errors="surrogateescape")


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} egresslock warm[{os.getpid()}]: {message}",
          file=sys.stderr, flush=True)


def forwarded_signal(message: bytes) -> int | None:
    """The signal number in a client's ``signal N`` message, if it is one a run forwards."""
    if not message.startswith(b"signal "):
        return None
    try:
        number = int(message[7:])
    except ValueError:
        return None
    allowed = {int(getattr(signal, name)) for name in FORWARDED}
    return number if number in allowed else None
