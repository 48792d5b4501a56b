"""``python -m egresslock.courier.worker --fd N``: the courier's worker, inside its own sandbox.

egresslock starts this process with ``Session.spec`` and ``spawn``, like the agent: a network
namespace whose only way out is the same proxy, a mount namespace in which the agent's working
directory and home are hidden, seccomp, an environment that holds the proxy variables and
nothing of the agent's. Its one link to egresslock is the socket ``--fd`` names.

What it does, in order, and why in that order:

1. ``PR_SET_DUMPABLE`` 0, first of all. The agent may run under the same uid; a dumpable
   process of that uid would let it read ``/proc/<pid>/environ`` and write ``/proc/<pid>/mem``
   (proc(5): a ptrace access check). egresslock waits for this worker to be ready before it
   starts the agent, so the agent never sees it dumpable.
2. Read the hello: the action templates and the credential placeholders. They come over the
   channel, not the environment, so they arrive only after step 1.
3. Load what calls will need (modules, the CA bundle), then give up the filesystem
   (:mod:`egresslock.courier.lockdown`), and say ready.
4. For each call: validate the parameters against the schema, check their characters, render
   the request (:mod:`egresslock.courier.render`), send it through the proxy, and reply with
   the status, a few response headers and the body (capped). One call at a time.

It follows no redirect and retries nothing; a 3xx goes back to the agent as it came.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from egresslock.courier.render import CallRefused, Rendered, prepare_call
from egresslock.courier.template import Template
from egresslock.courier.wire import MAX_LINE, decode, encode
from egresslock.sandbox.syscalls import PR_SET_DUMPABLE, prctl

MAX_RESPONSE_BODY = 1 << 20
TIMEOUT = 60.0
# Response headers an agent may need to act on the result; the rest stay with the worker.
_SHOWN_HEADERS = ("content-type", "location", "retry-after", "etag", "last-modified", "link")


class UpstreamError(Exception):
    """The request could not be completed: no connection, a broken answer, a proxy 502/504."""


class ProxyDenied(Exception):
    """The proxy refused the request (403 with X-Egresslock-Deny)."""


@dataclass
class Worker:
    """The worker's state after the hello: its actions and how to reach the proxy."""

    templates: dict[str, Template]
    placeholders: dict[str, str]
    proxy: tuple[str, int]
    tls: ssl.SSLContext
    max_body: int = MAX_RESPONSE_BODY
    timeout: float = TIMEOUT

    @classmethod
    def from_hello(cls, hello: Mapping[str, Any]) -> Worker:
        templates = {t["name"]: Template.from_json(t) for t in hello["actions"]}
        host, port = hello["proxy"]
        return cls(templates, dict(hello.get("placeholders", {})), (str(host), int(port)),
                   _tls_context(), int(hello.get("max_body", MAX_RESPONSE_BODY)),
                   float(hello.get("timeout", TIMEOUT)))

    def warm_up(self) -> None:
        """Import now whatever a call would import later, when no file can be opened."""
        import encodings.idna  # noqa: F401  http.client may encode a host name with it

        for template in self.templates.values():
            samples: tuple[object, ...] = ({}, {"\x00": 1}, [])
            for params in samples:
                with contextlib.suppress(CallRefused):
                    prepare_call(template, params, self.placeholders)

    def call(self, message: Mapping[str, Any]) -> dict[str, Any]:
        """One call, answered: never raises for anything a call can do wrong."""
        reply: dict[str, Any] = {"id": message.get("id")}
        template = self.templates.get(str(message.get("action")))
        if template is None:
            return {**reply, "ok": False, "kind": "refused",
                    "reason": f"no action named {message.get('action')!r}"}
        try:
            rendered = prepare_call(template, message.get("params"), self.placeholders)
        except CallRefused as exc:
            return {**reply, "ok": False, "kind": "refused", "reason": exc.reason,
                    "schema_valid": exc.schema_valid}
        reply["request"] = {"method": rendered.method, "target": rendered.target,
                            "bytes": len(rendered.body or b"")}
        try:
            status, headers, body = self.send(rendered, template)
        except ProxyDenied as exc:
            return {**reply, "ok": False, "kind": "denied", "reason": str(exc)}
        except (UpstreamError, OSError, http.client.HTTPException) as exc:
            return {**reply, "ok": False, "kind": "upstream",
                    "reason": str(exc) or type(exc).__name__}
        truncated = len(body) > self.max_body
        return {**reply, "ok": True, "status": status, "headers": headers,
                "body": body[: self.max_body].decode("utf-8", "replace"),
                "truncated": truncated, "bytes_in": len(body)}

    def send(self, rendered: Rendered, template: Template
             ) -> tuple[int, dict[str, str], bytes]:
        sock = socket.socket(socket.AF_INET6 if ":" in self.proxy[0] else socket.AF_INET)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.proxy)  # no getaddrinfo: it may want files the worker gave up
            conn: http.client.HTTPConnection
            if template.scheme == "https":
                _tunnel(sock, template.host, template.port)
                conn = http.client.HTTPSConnection(template.host, template.port,
                                                   timeout=self.timeout, context=self.tls)
                conn.sock = self.tls.wrap_socket(sock, server_hostname=template.host)
                target = rendered.target
            else:
                conn = http.client.HTTPConnection(template.host, template.port,
                                                  timeout=self.timeout)
                conn.sock = sock
                target = rendered.url  # absolute-form, as a forward proxy takes it
            conn.putrequest(rendered.method, target, skip_accept_encoding=True)
            for name, value in rendered.headers:
                conn.putheader(name, value)
            if rendered.body is not None or rendered.method in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(rendered.body or b"")))
            conn.endheaders(rendered.body)
            resp = conn.getresponse()
            body = resp.read(self.max_body + 1)
            deny = resp.getheader("X-Egresslock-Deny")
            if resp.status == 403 and deny:
                raise ProxyDenied(f"the proxy refused the request: {deny}")
            if resp.status in (502, 504) and body.startswith(b"egresslock: "):
                raise UpstreamError(body.decode("utf-8", "replace").strip())
            shown = {k.lower(): v for k, v in resp.getheaders()
                     if k.lower() in _SHOWN_HEADERS or k.lower().startswith("x-ratelimit-")}
            return resp.status, shown, body
        finally:
            sock.close()


def _tunnel(sock: socket.socket, host: str, port: int) -> None:
    """CONNECT through the proxy by hand, so a refusal's X-Egresslock-Deny is not lost."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode("ascii"))
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data or len(head) > 65536:
            raise UpstreamError("the proxy closed the connection during CONNECT")
        head += data
    lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if len(lines[0].split()) > 1 else 0
    if status == 200:
        return
    deny = next((ln.split(":", 1)[1].strip() for ln in lines[1:]
                 if ln.lower().startswith("x-egresslock-deny:")), None)
    if status == 403 and deny:
        raise ProxyDenied(f"the proxy refused the tunnel: {deny}")
    raise UpstreamError(f"the proxy answered CONNECT with {lines[0]}")


def _tls_context() -> ssl.SSLContext:
    """Upstream verification, with the CA bundle loaded now (no file can be read later):
    the sandbox's bundle (system roots plus egresslock's CA) when inspection is on."""
    ctx = ssl.create_default_context()
    cafile = os.environ.get("SSL_CERT_FILE") or ssl.get_default_verify_paths().cafile
    if cafile and os.path.isfile(cafile):
        ctx.load_verify_locations(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def serve(channel: socket.socket) -> int:
    from egresslock.courier.lockdown import lock_down

    reader = channel.makefile("rb")
    line = reader.readline(MAX_LINE)
    if not line:
        return 0
    try:
        worker = Worker.from_hello(decode(line))
        worker.warm_up()
        state = lock_down(worker.proxy[1])
    except Exception as exc:  # reported to egresslock, which then refuses to run
        channel.sendall(encode({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    channel.sendall(encode({"ready": True, "pid": os.getpid(), "filesystem": state}))
    while line := reader.readline(MAX_LINE):
        if not line.endswith(b"\n"):
            return 1  # over the size limit: egresslock never sends such a line
        try:
            message = decode(line)
        except ValueError:
            return 1
        channel.sendall(encode(worker.call(message)))
    return 0


def main(argv: list[str]) -> int:
    prctl(PR_SET_DUMPABLE, 0)
    # Ctrl-C reaches the whole process group; the worker ends with egresslock, not before.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if len(argv) != 3 or argv[1] != "--fd" or not argv[2].isdigit():
        print("usage: python -m egresslock.courier.worker --fd N (started by egresslock run)",
              file=sys.stderr)
        return 2
    with socket.socket(fileno=int(argv[2])) as channel:
        return serve(channel)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
