"""Shared by the escape scripts: each attempt is recorded, never raised, and the script prints
one JSON object: {attempt name: {"ok": bool, "errno": name or None, "detail": str}}.

"ok" means the operation itself succeeded (a socket was created, a packet was sent, bytes came
back); whether that is an escape is for the test to judge against the recorders and the audit
log. These scripts run inside the sandbox as an unprivileged user, with only the standard library.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

ATTACKER = "203.0.113.5"
ATTACKER6 = "2001:db8::5"
RESOLVER = "203.0.113.53"
RESULTS: dict[str, dict[str, Any]] = {}


def attempt(name: str, fn: Callable[[], object]) -> dict[str, Any]:
    try:
        detail = fn()
        RESULTS[name] = {"ok": True, "errno": None, "detail": repr(detail)[:300]}
    except OSError as exc:
        code = errno.errorcode.get(exc.errno or 0) if exc.errno else None
        RESULTS[name] = {"ok": False, "errno": code, "detail": str(exc)[:300]}
    except Exception as exc:
        RESULTS[name] = {"ok": False, "errno": None, "detail": f"{type(exc).__name__}: {exc}"}
    return RESULTS[name]


def report() -> None:
    sys.stdout.write(json.dumps(RESULTS) + "\n")
    sys.stdout.flush()


def tcp_exchange(family: int, address: tuple[Any, ...], payload: bytes,
                 timeout: float = 3.0) -> bytes:
    """Connect, send, half-close, read what comes back (b'' when the peer just closes)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def udp_send(family: int, address: tuple[Any, ...], payload: bytes) -> int:
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        return s.sendto(payload, address)


def dns_query(name: str, server: str, qtype: int = 1, tcp: bool = False,
              timeout: float = 3.0) -> dict[str, Any]:
    """One DNS query; returns the rcode and answer count of the reply."""
    header = struct.pack(">HHHHHH", 0x2A2A, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    msg = header + qname + struct.pack(">HH", qtype, 1)
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    if tcp:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect((server, 53))
            s.sendall(struct.pack(">H", len(msg)) + msg)
            data = s.recv(65536)[2:]
    else:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(msg, (server, 53))
            data = s.recv(65536)
    return {"rcode": data[3] & 0xF, "answers": struct.unpack(">H", data[6:8])[0]}


def parent_pid() -> int:
    """egresslock's pid: the command's parent (the sandbox shares the host's pid namespace)."""
    return os.getppid()
