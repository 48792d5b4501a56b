"""The client side of warm start: hand ``egresslock run`` to a warm server, or say it cannot.

A cold ``egresslock run`` spends most of its start-up importing Python modules and parsing the
policy. A warm server (``egresslock warm start``, see :mod:`egresslock.cli.warm_server`) has done
both already: this client sends it the run (arguments, environment, working directory, umask,
resource limits, and its stdin, stdout and stderr as descriptors), and the server forks a worker
that runs exactly the cold code path with them. The worker's exit code becomes this process's.

This module runs before anything else is imported, so it uses only what the interpreter has
loaded at start-up (``os``, ``sys``) and C modules (``_socket``, ``_signal``, ``resource``,
``zlib``): importing :mod:`socket` or :mod:`json` would cost more than the rest of the client.

It answers ``None`` (run cold) whenever warm start does not apply: no server for this user and
installation, a server that is not this user's (checked with SO_PEERCRED before anything is
sent), a terminal on stdin, stdout or stderr (a worker cannot hand the command a controlling
terminal), or a server that declines (see :func:`egresslock.cli.warm_server.mismatch`).
"""

from __future__ import annotations

import _socket
import os
import sys

TYPE_CHECKING = False  # typing itself costs a wrapped tool call milliseconds
if TYPE_CHECKING:  # the same functions and numbers; signal itself would import enum
    import signal as _signal
else:
    import _signal

MAGIC = b"egresslock-warm/1"
# What the worker forwards to the command, as a cold run does.
FORWARDED = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2")
# Resource limits carried to the worker: the command gets the client's, not the server's.
RLIMITS = ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE",
           "RLIMIT_LOCKS", "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE",
           "RLIMIT_NPROC", "RLIMIT_RSS", "RLIMIT_RTPRIO", "RLIMIT_RTTIME", "RLIMIT_SIGPENDING",
           "RLIMIT_STACK")
EXIT_SETUP_FAILED = 125


def socket_name(euid: int | None = None) -> str:
    """The abstract Unix socket of this user's warm server for this installation.

    Abstract names belong to a network namespace, so no sandboxed command (which has a network
    namespace of its own) can reach it; the name carries the installation (the package's directory
    and the environment's prefix) so that two venvs do not share a server, and
    ``$EGRESSLOCK_WARM_NAME`` when set, for a server of its own (a test, a separate agent)."""
    import zlib

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__))).encode()
    where = here + b"\0" + os.fsencode(sys.prefix)
    tag = f"{zlib.crc32(where):08x}{zlib.adler32(where):08x}"
    own = os.environ.get("EGRESSLOCK_WARM_NAME", "")
    suffix = f"-{own}" if own else ""
    return f"\0egresslock-warm-{os.geteuid() if euid is None else euid}-{tag}{suffix}"


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def encode_run(argv: list[str], env: dict[str, str] | os._Environ[str], umask: int,
               limits: list[tuple[str, int, int]]) -> bytes:
    """A run request: NUL-separated fields (no argument or environment entry can hold NUL)."""
    fields = [MAGIC, b"run", str(umask).encode(),
              ",".join(f"{n}:{s}:{h}" for n, s, h in limits).encode(),
              str(len(argv)).encode(), *(os.fsencode(a) for a in argv),
              *(os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items())]
    return b"\0".join(fields)


def read_frame(sock: _socket.socket, limit: int = 1 << 20) -> bytes | None:
    """One length-prefixed message; None at end of stream."""
    head = read_exactly(sock, 4)
    if head is None:
        return None
    size = int.from_bytes(head, "big")
    if size > limit:
        raise OSError(f"warm start: a message of {size} bytes is over the {limit} limit")
    return read_exactly(sock, size) if size else b""


def peer_credentials(sock: _socket.socket) -> tuple[int, int, int]:
    """The pid, uid and gid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return (int.from_bytes(creds[0:4], sys.byteorder), int.from_bytes(creds[4:8], sys.byteorder),
            int.from_bytes(creds[8:12], sys.byteorder))


def read_exactly(sock: _socket.socket, size: int) -> bytes | None:
    """``size`` bytes, or None when the stream ends first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


_ABSENT: list[bool] = []  # set when the last try found no server at all


def no_server() -> bool:
    """Whether :func:`try_run` answered None because no server listens (rather than one that
    declined, a terminal, or another user's socket)."""
    return bool(_ABSENT)


def try_run(argv: list[str]) -> int | None:
    """Run ``egresslock run ...`` (``argv`` without the program name) on a warm server and
    return its exit code, or None when it must run cold. After the server has accepted the
    run, this never answers None: the run happened, or it failed with code 125."""
    if any(os.isatty(fd) for fd in (0, 1, 2)):
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            sock.connect(socket_name())
        except (ConnectionRefusedError, FileNotFoundError):
            _ABSENT.append(True)
            raise
        _, uid, _ = peer_credentials(sock)
        if uid != os.geteuid():  # someone else holds the name: tell them nothing
            print(f"egresslock: warning: the warm-start socket is held by uid {uid}, not this "
                  "user; starting cold", file=sys.stderr)
            sock.close()
            return None
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        sock.close()
        return None
    try:
        return _converse(sock, argv, cwd)
    finally:
        os.close(cwd)
        sock.close()


def _converse(sock: _socket.socket, argv: list[str], cwd: int) -> int | None:
    import resource

    umask = os.umask(0o022)
    os.umask(umask)
    limits = []
    for name in RLIMITS:
        which = getattr(resource, name, None)
        if which is not None:
            soft, hard = resource.getrlimit(which)
            limits.append((name, soft, hard))
    request = frame(encode_run(argv, os.environ, umask, limits))
    fds = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in (0, 1, 2, cwd))
    try:
        sent = sock.sendmsg([request], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        if sent < len(request):
            sock.sendall(request[sent:])
        answer = read_frame(sock)
    except OSError:
        return None
    if answer is None or answer.startswith(b"cold"):
        return None  # declined before anything ran: the cold path runs the command
    if not answer.startswith(b"started"):
        print(f"egresslock: warm start: unexpected answer {answer[:80]!r}", file=sys.stderr)
        return EXIT_SETUP_FAILED

    def forward(signum: int, _frame: object) -> None:
        try:
            sock.sendall(frame(b"signal %d" % signum))
        except OSError:
            return  # the worker is gone; its end is reported by the loop below

    for name in FORWARDED:
        _signal.signal(getattr(_signal, name), forward)
    try:
        while True:
            message = read_frame(sock)
            if message is None:
                break
            if message.startswith(b"exit "):
                return int(message[5:])
    except (OSError, ValueError):
        pass
    print("egresslock: the warm server's worker ended without an exit code; the command "
          "was ended with it", file=sys.stderr)
    return EXIT_SETUP_FAILED
