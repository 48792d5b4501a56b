"""Runs inside a fresh network namespace (``unshare --net``): load a compiled ruleset, then see
what gets through.

Usage: ``python -m tests.compile.netns_probe SPEC.json``. The spec names the ruleset files, the
addresses to put on ``lo``, the servers to start and the connections to try. Every address lives
in this namespace, so nothing the probe sends can leave the machine. Locally delivered packets
still pass the output hook, which is what the rulesets filter: a server on 203.0.113.5 stands in
for the internet, one on 198.51.100.7 for the proxy. Prints one JSON object: what each attempt
returned, what each server received, and the ruleset's counters.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False,
                          env={**os.environ, "XTABLES_LOCKFILE": _LOCK})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")


_LOCK = os.path.join(tempfile.mkdtemp(prefix="egresslock-xt-"), "xtables.lock")


class Server:
    """Counts the connections (or datagrams) and bytes one address and port receives."""

    def __init__(self, address: str, port: int, kind: str) -> None:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        self.kind = kind
        self.connections = 0
        self.bytes = 0
        self.sock = socket.socket(family, socket.SOCK_STREAM if kind == "tcp"
                                  else socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, port))
        if kind == "tcp":
            self.sock.listen()
        self.sock.settimeout(0.2)
        self.stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop:
            try:
                if self.kind == "udp":
                    data = self.sock.recv(65536)
                    self.connections += 1
                    self.bytes += len(data)
                    continue
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            with conn:
                conn.settimeout(1)
                try:
                    self.bytes += len(conn.recv(65536))
                    conn.sendall(b"ok")
                except OSError:
                    pass

    def close(self) -> dict[str, int]:
        self.stop = True
        self.thread.join(2)
        self.sock.close()
        return {"connections": self.connections, "bytes": self.bytes}


def attempt(kind: str, address: str, port: int) -> str:
    """'ok' when the data went out (and, for TCP, a reply came back), else the errno name."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        if kind == "udp":
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"hello", (address, port))
            return "ok"
        with socket.create_connection((address, port), timeout=3) as sock:
            sock.sendall(b"hello")
            sock.settimeout(3)
            return "ok" if sock.recv(16) == b"ok" else "no reply"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))


def main(spec_path: str) -> None:
    with open(spec_path, encoding="utf-8") as f:
        spec: dict[str, Any] = json.load(f)
    _run("ip", "link", "set", "lo", "up")
    for address in spec["addresses"]:
        extra = ["nodad"] if ":" in address else []
        _run("ip", "addr", "add", address, "dev", "lo", *extra)
    servers = {f"{kind} {a} {p}": Server(a, p, kind) for kind, a, p in spec["servers"]}
    time.sleep(0.2 if any(":" in a for a in spec["addresses"]) else 0)
    if spec["kind"] == "nftables":
        _run("nft", "-f", spec["files"][0])
    else:
        _run("iptables-restore", spec["files"][0])
        _run("ip6tables-restore", spec["files"][1])
    results = {f"{kind} {a} {p}": attempt(kind, a, p) for kind, a, p in spec["attempts"]}
    time.sleep(0.3)
    received = {key: server.close() for key, server in servers.items()}
    if spec["kind"] == "nftables":
        counters = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True,
                                  check=False).stdout
    else:
        counters = subprocess.run(["iptables-save", "-c"], capture_output=True, text=True,
                                  check=False, env={**os.environ, "XTABLES_LOCKFILE": _LOCK}
                                  ).stdout
    json.dump({"attempts": results, "received": received, "counters": counters}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
