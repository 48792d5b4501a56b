"""A test world for ``egresslock run``: a network namespace that owns every address a test uses.

Run as root, in a fresh network and mount namespace::

    unshare --net --mount -- .venv/bin/python -m tests.sandbox.world SCENARIO.json

Inside, this script

* brings ``lo`` up and puts the world's addresses on it: 198.51.100.10 (the allowed upstream:
  app.test, secure.test, pypi.test, git.test), 203.0.113.5 and 2001:db8::5 (the attacker),
  203.0.113.53 (a fake outside DNS resolver, also the world's /etc/resolv.conf);
* starts the servers: HTTP on 198.51.100.10:80 and HTTPS on :443 (a test CA, its ca.pem goes to
  the scenario's work directory), which answer by Host: app.test/secure.test echo the request as
  JSON, pypi.test serves a simple index with one hand-made wheel, git.test serves a repository
  through ``git http-backend`` (smart HTTP); the attacker's TCP recorders (80, 443, 8080, 9999 on
  both addresses), UDP recorders (53 and 9999, and 53 on the resolver) and nftables counters of
  every packet addressed to an attacker address (ICMP echo separately); a "host relay service"
  listening on Unix sockets in /tmp and /run (what a Docker or SSH agent socket would be);
* runs ``egresslock run`` with the scenario's policy, pins and command (as root, or with
  ``"unprivileged": true`` under ``setpriv`` as uid 65534), optionally sends it a signal;
* prints one JSON object: exit code, stdout, stderr, the ``--json`` summary, the audit rows, and
  what every attacker server, counter and the relay received.

Nothing here can reach another machine: the world's namespace has only ``lo``, so even a
sandbox that let everything through would only reach the recorders.

Scenario keys (all optional except ``command``): ``policy`` (YAML text; default
:data:`DEFAULT_POLICY`), ``command`` (argv), ``args`` (extra ``egresslock run`` options),
``workdir`` (the command's working directory, made accessible to uid 65534 by the caller),
``env`` (added to egresslock's environment), ``stdin`` (text), ``timeout`` (s),
``unprivileged``, ``signal`` ({"signum": N, "after_file": NAME, "wait": s, "delay": s}:
send N to egresslock ``delay`` seconds after NAME exists in the work directory), ``linger``
(s to wait after the run before the recorders are read, for processes the command left
behind), ``git`` (build the repository git.test serves), ``bare`` (run the command without
egresslock: the control that shows the recorders do record).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import http.server
import json
import os
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
EGRESSLOCK = str(VENV_BIN / "egresslock")

UPSTREAM = "198.51.100.10"
ATTACKER = "203.0.113.5"
ATTACKER6 = "2001:db8::5"
RESOLVER = "203.0.113.53"
UPSTREAM_HOSTS = ("app.test", "secure.test", "pypi.test", "git.test")
ATTACKER_TCP_PORTS = (80, 443, 8080, 9999)
ATTACKER_UDP_PORTS = (53, 9999)
SECRET = "s3cr3tK3yV4lu3-egresslock-test"
NOBODY = 65534
PACKAGE = "egl-demo"
PACKAGE_VERSION = "1.0"

DEFAULT_POLICY = f"""\
version: 1
mode: enforce
network:
  block_private: true
  allow_ranges: ["{UPSTREAM}/32"]
rules:
  - id: app
    host: app.test
    ports: [80, 443]
  - id: secure
    host: secure.test
    ports: [443]
  - id: pypi
    host: pypi.test
    ports: [80]
  - id: git
    host: git.test
    ports: [80, 443]
secrets:
  - {{name: key, value: "{SECRET}"}}
"""

_lock = threading.Lock()


# --- the network --------------------------------------------------------------------------------


def _sh(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()}")
    return done.stdout


NFT_RULES = f"""\
table inet world {{
  counter attacker_icmp {{
  }}
  counter attacker_v4 {{
  }}
  counter attacker_v6 {{
  }}
  counter resolver {{
  }}
  chain input {{
    type filter hook input priority 0; policy accept;
    ip daddr {ATTACKER} icmp type echo-request counter name "attacker_icmp"
    ip daddr {ATTACKER} counter name "attacker_v4"
    ip6 daddr {ATTACKER6} counter name "attacker_v6"
    ip daddr {RESOLVER} counter name "resolver"
  }}
}}
"""


def setup_network() -> None:
    _sh("ip", "link", "set", "lo", "up")
    for addr in (UPSTREAM, ATTACKER, RESOLVER):
        _sh("ip", "addr", "add", f"{addr}/32", "dev", "lo")
    _sh("ip", "-6", "addr", "add", f"{ATTACKER6}/128", "dev", "lo", "nodad")
    _sh("nft", "-f", "-", stdin=NFT_RULES)


def read_counters() -> dict[str, int]:
    data = json.loads(_sh("nft", "-j", "list", "counters", "table", "inet", "world"))
    out: dict[str, int] = {}
    for item in data.get("nftables", []):
        if "counter" in item:
            out[item["counter"]["name"]] = int(item["counter"]["packets"])
    return out


def private_resolv_conf(state: Path) -> None:
    """The world's own resolv.conf names the fake outside resolver: any lookup the proxy makes
    for a name that is not pinned lands on a recorder, never on a real server. (The file must
    outlive the bind mount: a mount over an unlinked file cannot be mounted over again, and the
    sandbox puts its own resolv.conf there.)"""
    path = state / "resolv.conf"
    path.write_text(f"nameserver {RESOLVER}\noptions timeout:1 attempts:1\n")
    os.chmod(path, 0o644)
    _sh("mount", "--make-rprivate", "/")
    _sh("mount", "--bind", str(path), os.path.realpath("/etc/resolv.conf"))


def _bind(source: str, target: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    ms_bind, ms_rec = 4096, 16384
    if libc.mount(source.encode(), target.encode(), None, ms_bind | ms_rec, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bind {source} on {target}: {os.strerror(err)}")


def expose_interpreter() -> list[str]:
    """Make the venv's interpreter usable by uid 65534 in the world's mount namespace only.

    The command runs as nobody (and, unprivileged, egresslock too), but the interpreter may live
    below a directory only root may search (pyenv in a 0700 /root). For each such ancestor, an
    empty tmpfs goes over it and only the path component the interpreter needs is bound back.
    The host's mounts are untouched (the world's mount namespace is private).
    """
    exposed: list[str] = []
    for target in {os.path.realpath(VENV_BIN / "python"), os.path.realpath(sys.base_prefix)}:
        parts = Path(target).parts
        for i in range(1, len(parts) - 1):
            directory = Path(*parts[: i + 1])
            if os.stat(directory).st_mode & 0o001:
                continue
            keep = directory / parts[i + 1]
            fd = os.open(keep, os.O_PATH)
            try:
                _sh("mount", "-t", "tmpfs", "-o", "mode=0755,size=1m", "world", str(directory))
                keep.mkdir() if os.path.isdir(f"/proc/self/fd/{fd}") else keep.touch()
                _bind(f"/proc/self/fd/{fd}", str(keep))  # mount(8) would resolve the link
            finally:
                os.close(fd)
            exposed.append(str(keep))
    return exposed


# --- recorders ----------------------------------------------------------------------------------


class Recorders:
    """Everything that reaches an attacker address or the relay socket, by server."""

    def __init__(self) -> None:
        self.tcp: dict[str, dict[str, Any]] = {}
        self.udp: dict[str, dict[str, Any]] = {}
        self.unix: dict[str, dict[str, Any]] = {}
        self._socks: list[socket.socket] = []
        self.paths: list[str] = []

    def _entry(self, table: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
        return table.setdefault(key, {"connections": 0, "bytes": 0, "data": ""})

    def _note(self, table: dict[str, dict[str, Any]], key: str, data: bytes, conn: bool) -> None:
        with _lock:
            e = self._entry(table, key)
            e["connections"] += int(conn)
            e["bytes"] += len(data)
            if len(e["data"]) < 4096:
                e["data"] += data[:4096].decode("latin-1")

    def tcp_listener(self, family: int, addr: str, port: int) -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr, port))
        sock.listen(64)
        key = f"[{addr}]:{port}" if family == socket.AF_INET6 else f"{addr}:{port}"
        self._entry(self.tcp, key)
        self._socks.append(sock)
        threading.Thread(target=self._accept, args=(sock, self.tcp, key), daemon=True).start()

    def unix_listener(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o777)  # noqa: S103 - the relay must be open to anyone who can see it
        sock.listen(16)
        self._entry(self.unix, path)
        self._socks.append(sock)
        self.paths.append(path)
        threading.Thread(target=self._accept, args=(sock, self.unix, path), daemon=True).start()

    def _accept(self, sock: socket.socket, table: dict[str, dict[str, Any]], key: str) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            self._note(table, key, b"", True)
            threading.Thread(target=self._drain, args=(conn, table, key), daemon=True).start()

    def _drain(self, conn: socket.socket, table: dict[str, dict[str, Any]], key: str) -> None:
        conn.settimeout(5)
        with conn:
            try:
                while data := conn.recv(65536):
                    self._note(table, key, data, False)
            except OSError:
                pass

    def udp_listener(self, family: int, addr: str, port: int) -> None:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((addr, port))
        key = f"[{addr}]:{port}" if family == socket.AF_INET6 else f"{addr}:{port}"
        self._entry(self.udp, key)
        self._socks.append(sock)

        def loop() -> None:
            while True:
                try:
                    data, _ = sock.recvfrom(65536)
                except OSError:
                    return
                self._note(self.udp, key, data, True)

        threading.Thread(target=loop, daemon=True).start()

    def close(self) -> None:
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()
        for p in self.paths:
            with contextlib.suppress(OSError):
                os.unlink(p)


# --- the allowed upstream -----------------------------------------------------------------------


def build_wheel(directory: Path) -> Path:
    """A pure-Python wheel made by hand (no build backend needed): module egl_demo."""
    from tests.proxy.servers import make_wheel

    path = directory / f"{PACKAGE.replace('-', '_')}-{PACKAGE_VERSION}-py3-none-any.whl"
    path.write_bytes(make_wheel(PACKAGE, PACKAGE_VERSION, "egl_demo",
                                "MESSAGE = 'installed through egresslock'\n"))
    return path


def build_index(root: Path) -> None:
    pkg = root / "simple" / PACKAGE
    pkg.mkdir(parents=True)
    wheel = build_wheel(pkg)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (root / "simple" / "index.html").write_text(
        f'<html><body><a href="/simple/{PACKAGE}/">{PACKAGE}</a></body></html>\n')
    (pkg / "index.html").write_text(
        f'<html><body><a href="/simple/{PACKAGE}/{wheel.name}#sha256={digest}">'
        f"{wheel.name}</a></body></html>\n")


def build_repo(root: Path) -> Path:
    """A bare repository with one commit, exported by git http-backend."""
    src = root / "src"
    src.mkdir(parents=True)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
           "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"}
    (src / "README").write_text("cloned through egresslock\n")
    for argv in (["git", "init", "-q", "-b", "main"], ["git", "add", "README"],
                 ["git", "commit", "-q", "-m", "first"]):
        subprocess.run(argv, cwd=src, env=env, check=True, capture_output=True)
    bare = root / "repos" / "demo.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(src), str(bare)], env=env, check=True,
                   capture_output=True)
    return root / "repos"


class UpstreamHandler(http.server.BaseHTTPRequestHandler):
    """app.test/secure.test: JSON echo; pypi.test: the index; git.test: git http-backend."""

    protocol_version = "HTTP/1.1"
    server: UpstreamServer

    def log_message(self, format: str, *args: object) -> None:
        return

    def _handle(self) -> None:
        host = (self.headers.get("Host") or "").split(":")[0].lower()
        body = self._body()
        with _lock:
            # Everything the upstream received, so a test can prove a secret never arrived.
            self.server.seen.append({"host": host, "method": self.command, "path": self.path,
                                     "tls": self.server.tls,
                                     "headers": {k.lower(): v for k, v in self.headers.items()},
                                     "body": body[:1 << 16].decode("latin-1")})
        if host == "pypi.test":
            self._static(self.server.pypi_root)
            return
        if host == "git.test":
            self._git(body)
            return
        payload = json.dumps({"host": host, "method": self.command, "path": self.path,
                              "tls": self.server.tls, "body": body.decode("latin-1"),
                              "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self._send(200, {"Content-Type": "application/json"}, payload)

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            parts: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, headers: dict[str, str], payload: bytes) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _static(self, root: Path) -> None:
        rel = self.path.split("?")[0].split("#")[0].lstrip("/")
        target = (root / rel).resolve()
        if target.is_dir():
            target = target / "index.html"
        if not str(target).startswith(str(root)) or not target.is_file():
            self._send(404, {}, b"not found\n")
            return
        kind = "text/html" if target.suffix == ".html" else "application/octet-stream"
        self._send(200, {"Content-Type": kind}, target.read_bytes())

    def _git(self, body: bytes) -> None:
        path, _, query = self.path.partition("?")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               "GIT_PROJECT_ROOT": str(self.server.git_root), "GIT_HTTP_EXPORT_ALL": "1",
               "PATH_INFO": path, "QUERY_STRING": query, "REQUEST_METHOD": self.command,
               "CONTENT_TYPE": self.headers.get("Content-Type", ""),
               "CONTENT_LENGTH": str(len(body)), "REMOTE_ADDR": "127.0.0.1",
               "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(self.server.git_root)}
        if self.headers.get("Git-Protocol"):
            env["GIT_PROTOCOL"] = self.headers["Git-Protocol"]
        done = subprocess.run(["git", "http-backend"], input=body, env=env,
                              capture_output=True, check=False)
        head, _, payload = done.stdout.partition(b"\r\n\r\n")
        status, headers = 200, {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                headers[name.strip()] = value.strip()
        self._send(status, headers, payload)

    do_GET = do_POST = do_HEAD = do_PUT = _handle


class UpstreamServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, tls: ssl.SSLContext | None, pypi_root: Path,
                 git_root: Path) -> None:
        super().__init__((UPSTREAM, port), UpstreamHandler)
        self.tls = tls is not None
        self.seen: list[dict[str, Any]] = []
        self.pypi_root = pypi_root
        self.git_root = git_root
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would ask DNS for the address's name (getfqdn): a query to the
        # fake resolver that the recorders would then blame on the sandbox.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = UPSTREAM, int(self.server_address[1])


def start_upstream(state: Path, workdir: Path, git: bool) -> list[UpstreamServer]:
    from tests.proxy.servers import make_ca

    ca, leaf, key = make_ca(state, list(UPSTREAM_HOSTS))
    shutil.copy(ca, workdir / "ca.pem")
    os.chmod(workdir / "ca.pem", 0o644)
    build_index(state / "pypi")
    git_root = build_repo(state / "git") if git else state / "git"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(leaf, key)
    servers = [UpstreamServer(80, None, state / "pypi", git_root),
               UpstreamServer(443, context, state / "pypi", git_root)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    return servers


# --- the run ------------------------------------------------------------------------------------


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: leftovers of the run come back here


def end_leftovers() -> list[int]:
    """Kill and reap every process the run left behind (they were reparented to us)."""
    me = os.getpid()
    killed: list[int] = []
    for _ in range(3):
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            ppid = next((int(ln.split()[1]) for ln in status.splitlines()
                         if ln.startswith("PPid:")), 0)
            if ppid == me:
                found.append(int(entry))
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            killed.append(pid)
        if not found:
            break
    return killed


def run_egresslock(scenario: dict[str, Any], workdir: Path, state: Path,
                   relays: list[str]) -> dict[str, Any]:
    policy = state / "policy.yaml"
    policy.write_text(scenario.get("policy", DEFAULT_POLICY))
    os.chmod(policy, 0o644)
    audit_dir = workdir / ".audit"
    audit_dir.mkdir(exist_ok=True)
    os.chmod(audit_dir, 0o777)  # noqa: S103 - written by uid 65534 when unprivileged
    audit = audit_dir / "audit.db"
    for old in audit_dir.glob("audit.db*"):
        old.unlink()
    # The checkout holds the venv and the escape scripts; a clone under /tmp would otherwise be
    # hidden inside the sandbox (sharing a path outside hidden directories changes nothing).
    argv = [EGRESSLOCK, "run", "-p", str(policy), "--audit", str(audit), "--json",
            "--share", str(ROOT)]
    for host in UPSTREAM_HOSTS:
        argv += ["--resolve", f"{host}:{UPSTREAM}"]
    argv += list(scenario.get("args", []))
    argv += ["--", *scenario["command"]]
    if scenario.get("bare"):  # the control: the command without egresslock
        argv = list(scenario["command"])
    as_user = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] \
        if scenario.get("unprivileged") else []
    argv = [*as_user, *argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    # What an agent could learn on a real host: where the relay sockets are, and an SSH agent.
    env["EGRESSLOCK_WORLD_RELAYS"] = ":".join(relays)
    env["SSH_AUTH_SOCK"] = relays[-1]
    env["NO_PROXY"] = env["no_proxy"] = "*"
    env.update(scenario.get("env", {}))
    env.setdefault("EGRESSLOCK_CA_DIR", str(state / "no-ca"))
    if scenario.get("unprivileged"):
        env["HOME"] = str(workdir)
    timeout = float(scenario.get("timeout", 30))
    warm = None
    if scenario.get("warm"):
        # The run's user's server, in this world's network namespace; the command learns its
        # socket name from the environment, as an agent could guess it.
        env["EGRESSLOCK_WARM_NAME"] = f"world{os.getpid()}"
        warm, env["EGRESSLOCK_WORLD_WARM_SOCKET"] = start_warm_server(
            env, "--idle", "120s", as_user=as_user)
    started = time.monotonic()
    proc = subprocess.Popen(argv, cwd=workdir, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sent: int | None = None
    sig = scenario.get("signal")
    out: list[bytes] = []
    err: list[bytes] = []
    to_child, from_out, from_err = proc.stdin, proc.stdout, proc.stderr  # all three are pipes
    assert to_child is not None
    assert from_out is not None
    assert from_err is not None
    readers = [threading.Thread(target=lambda: out.append(from_out.read()), daemon=True),
               threading.Thread(target=lambda: err.append(from_err.read()), daemon=True)]
    for t in readers:
        t.start()
    try:
        if scenario.get("stdin"):
            to_child.write(scenario["stdin"].encode())
        to_child.close()
    except BrokenPipeError:
        pass
    if sig:
        deadline = time.monotonic() + float(sig.get("wait", 10))
        marker = workdir / sig["after_file"]
        while time.monotonic() < deadline and not marker.exists() and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(float(sig.get("delay", 0)))
        if proc.poll() is None:
            proc.send_signal(int(sig["signum"]))
            sent = int(sig["signum"])
    timed_out = False
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        code = proc.wait()
    elapsed = time.monotonic() - started
    for t in readers:
        t.join(5)
    stderr = (err[0] if err else b"").decode(errors="replace")
    summary = None
    for raw_line in reversed(stderr.splitlines()):
        line = raw_line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                summary = json.loads(line)
                break
    warm_state = None
    if warm is not None:
        warm_state = warm_status(env, as_user)
        stop_warm_server(warm)
    rows: list[dict[str, Any]] = []
    if audit.exists():
        done = subprocess.run([EGRESSLOCK, "audit", "--db", str(audit), "--json", "--limit",
                               "1000"], capture_output=True, text=True, check=False)
        rows = [json.loads(ln) for ln in done.stdout.splitlines() if ln.strip().startswith("{")]
    return {"exit": code, "stdout": (out[0] if out else b"").decode(errors="replace"),
            "stderr": stderr, "summary": summary, "audit": rows, "timed_out": timed_out,
            "signal_sent": sent, "elapsed": elapsed, "argv": argv, "warm": warm_state}


def start_warm_server(env: dict[str, str], *options: str, as_user: Sequence[str] = ()
                      ) -> tuple[subprocess.Popen[bytes], str]:
    """``egresslock warm serve`` (as ``as_user``, with ``env``), once it listens: the process
    and its socket's name (``@...``)."""
    server = subprocess.Popen([*as_user, EGRESSLOCK, "warm", "serve", *options], env=env,
                              cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    assert server.stderr is not None
    line = server.stderr.readline().decode()
    if not line.startswith("listening on @"):
        server.kill()
        raise RuntimeError(f"the warm server did not start: {line}{server.stderr.read()!r}")
    return server, line.split()[-1]


def stop_warm_server(server: subprocess.Popen[bytes]) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def warm_status(env: dict[str, str], as_user: Sequence[str] = ()) -> dict[str, Any]:
    """``egresslock warm status --json`` of the server ``env`` names."""
    done = subprocess.run([*as_user, EGRESSLOCK, "warm", "status", "--json"], env=env,
                          capture_output=True, text=True, timeout=10, check=False)
    found: dict[str, Any] = json.loads(done.stdout) if done.stdout.strip() \
        else {"running": False}
    return found


def main(argv: list[str]) -> int:
    scenario = json.loads(Path(argv[1]).read_text())
    if os.geteuid() != 0:
        print(json.dumps({"error": "the test world must run as root"}))
        return 2
    workdir = Path(scenario.get("workdir") or tempfile.mkdtemp(prefix="egresslock-world-"))
    state = Path(tempfile.mkdtemp(prefix="egresslock-world-state-"))
    os.chmod(state, 0o755)  # noqa: S103 - the policy file inside is read by uid 65534
    rec = Recorders()
    servers: list[UpstreamServer] = []
    try:
        become_subreaper()
        setup_network()
        private_resolv_conf(state)
        exposed = expose_interpreter()
        for port in ATTACKER_TCP_PORTS:
            rec.tcp_listener(socket.AF_INET, ATTACKER, port)
            rec.tcp_listener(socket.AF_INET6, ATTACKER6, port)
        for port in ATTACKER_UDP_PORTS:
            rec.udp_listener(socket.AF_INET, ATTACKER, port)
            rec.udp_listener(socket.AF_INET6, ATTACKER6, port)
        rec.udp_listener(socket.AF_INET, RESOLVER, 53)
        rec.tcp_listener(socket.AF_INET, RESOLVER, 53)
        tag = f"{os.getpid()}"
        rec.unix_listener(f"/tmp/egresslock-relay-{tag}.sock")
        rec.unix_listener(f"/run/egresslock-relay-{tag}.sock")
        servers = start_upstream(state, workdir, bool(scenario.get("git")))
        result = run_egresslock(scenario, workdir, state, rec.paths)
        time.sleep(float(scenario.get("linger", 0.3)))
        result["leftovers"] = end_leftovers()
        with _lock:
            result["attacker"] = {"tcp": rec.tcp, "udp": rec.udp, "unix": rec.unix,
                                  "counters": read_counters()}
            result["upstream"] = [r for s in servers for r in s.seen]
        result["relay_paths"] = rec.paths
        result["exposed"] = exposed
    finally:
        rec.close()
        for s in servers:
            s.shutdown()
            s.server_close()
        shutil.rmtree(state, ignore_errors=True)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

