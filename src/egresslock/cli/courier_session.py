"""The courier of one run: the worker's sandbox, and the agent's ``/actions`` endpoint.

``egresslock run`` with a policy that declares actions does, before any thread exists:

1. check every action against the policy (:mod:`egresslock.courier.definitions`); a bad one
   stops the run before anything starts;
2. spawn the worker (``python -I -m egresslock.courier.worker``) in a sandbox of the same
   session: its own network namespace whose only way out is the same proxy, the agent's working
   directory and home hidden, ``/`` as its working directory, an environment of proxy and CA
   variables only. The channel is a socketpair the worker inherits (``keep_fds``);
3. send it the templates and the placeholders of the credentials its actions name, and wait until
   it is ready: it has made itself non-dumpable and given up the filesystem (Landlock). Only
   then is the agent spawned, so the agent never sees the worker in a state it could inspect;
4. spawn the agent, whose environment no longer holds the credentials the actions name: they are
   the courier's alone.

Then, on the event loop, each ``POST /actions/NAME`` on the agent's proxy port is checked here
(schema, characters, the session mark against the action's ``level``, secrets and dynamic links
in the parameters), forwarded to the worker, which validates and renders it again and sends it
through the proxy (whose rules and content checks apply as to any request), and answered with
the worker's result. Every call is one ``courier`` audit row; an action with ``reads`` raises the
mark when it succeeds. Replies pass through a redaction of every credential placeholder and real
value, so the agent cannot learn a placeholder from an upstream that echoes its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
import sysconfig
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from egresslock.audit import AuditRecord
from egresslock.proxy.actions import ActionCall, ActionReply

if TYPE_CHECKING:
    from egresslock.cli.session import Served, Session
    from egresslock.courier.template import Template
    from egresslock.policy.model import Action
    from egresslock.sandbox.spawn import Sandboxed, SandboxSpec

READY_TIMEOUT = 30.0
CALL_TIMEOUT = 75.0  # the worker's own upstream timeout (60 s) and some
_WORKER_MODULES = ("egresslock", "jsonschema", "jsonschema_specifications", "referencing",
                   "rpds", "attrs")


def plan_courier(session: Session, uid: int, gid: int) -> Courier | None:
    """The courier of this run, when the policy declares actions; raises PolicyError naming
    every problem of every action (nothing is started then)."""
    from egresslock.courier.definitions import compile_actions
    from egresslock.errors import PolicyError, PolicyProblem

    compiled = session.ctx.policy.current
    policy = compiled.source
    if not policy.actions:
        return None
    templates, problems, warnings = compile_actions(policy, compiled)
    if problems:
        file = str(session.options.policy_file)
        raise PolicyError([PolicyProblem(file, None, f"actions[{p.action}].{p.key}", p.message)
                           for p in problems])
    if not session.options.quiet:
        for warning in warnings:
            click.echo(f"egresslock: warning: {warning}", err=True)
    return Courier(session, templates, {a.name: a for a in policy.actions}, uid, gid)


def needed_paths() -> list[str]:
    """What the worker's interpreter must still see: the interpreter, the standard library,
    site-packages, and the packages the worker imports."""
    paths = {sys.executable, sys.prefix, sys.base_prefix,
             sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for name in _WORKER_MODULES:
        with contextlib.suppress(ImportError, ValueError):
            spec = find_spec(name)
            for location in (spec.submodule_search_locations or []) if spec else []:
                paths.add(location)
    return sorted({os.path.realpath(p) for p in paths})


def hidden_from_worker(candidates: list[str], needed: list[str]) -> list[str]:
    """Directories to hide from the worker: each candidate whole, or, when the interpreter or
    a package it needs lies inside, every subdirectory that is not on the way to one."""
    out: list[str] = []
    for candidate in candidates:
        real = os.path.realpath(candidate)
        if real != "/" and os.path.isdir(real):
            out += _hide_around(real, needed)
    return list(dict.fromkeys(out))


def _below(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _hide_around(directory: str, needed: list[str]) -> list[str]:
    inside = [n for n in needed if _below(n, directory)]
    if not inside:
        return [directory]
    if directory in inside:
        return []
    out = []
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):  # a link could name anything: leave it
                out += _hide_around(entry.path, needed)
    return out


class Courier:
    """The worker of one run and the handler of the agent's ``/actions`` endpoint."""

    def __init__(self, session: Session, templates: dict[str, Template],
                 actions: dict[str, Action], uid: int, gid: int) -> None:
        self.session = session
        self.ctx = session.ctx
        self.templates = templates
        self.actions = actions
        self.uid, self.gid = uid, gid
        self.credentials = {c for t in templates.values() for c in t.credentials()}
        self.sandboxed: Sandboxed | None = None
        self.channel: socket.socket | None = None
        self.filesystem = ""
        self.gone: str | None = None
        self._served: Served | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._send_lock: asyncio.Lock | None = None

    # -- before the loop: the two sandboxes ---------------------------------------------------

    def agent_spec(self, spec: SandboxSpec) -> SandboxSpec:
        """The agent's spec without the credentials the actions name: they are the courier's.
        A credential file shows empty instead of its placeholder."""
        policy = self.ctx.policy.current.source
        files = {os.path.realpath(os.path.expanduser(c.file)) for c in policy.credentials
                 if c.name in self.credentials and c.file is not None}
        env = {k: v for k, v in spec.env.items() if k not in self.credentials}
        shown = tuple((p, "" if p in files else c) for p, c in spec.mounts.replace)
        return replace(spec, env=env, mounts=replace(spec.mounts, replace=shown))

    def _worker_spec(self, fd: int, devnull: int) -> SandboxSpec:
        argv = [sys.executable, "-I", "-m", "egresslock.courier.worker", "--fd", str(fd)]
        agent_dirs = [os.getcwd(), *([os.environ["HOME"]] if os.environ.get("HOME") else [])]
        needed = needed_paths()
        # The interpreter and egresslock may live below a directory every sandbox hides (a
        # checkout and its venv in /tmp): those paths are carried through, nothing else.
        spec = self.session.spec(argv, self.uid, self.gid, env={"PATH": "/usr/bin:/bin",
                                                                 "LANG": "C.UTF-8"},
                                 cwd="/", share=[Path(p) for p in needed],
                                 hide=hidden_from_worker(agent_dirs, needed))
        # The placeholders travel over the channel, after the worker made itself non-dumpable.
        names = {c.name for c in self.ctx.policy.current.source.credentials}
        env = {k: v for k, v in spec.env.items() if k not in names}
        # The agent's terminal is not the worker's: stdin and stdout are /dev/null (stderr
        # stays egresslock's, for a traceback should the worker fail to start).
        return replace(spec, env=env, keep_fds=(fd,), stdio=(devnull, devnull, None))

    def start(self) -> None:
        """Spawn the worker and wait until it is ready (call before any thread exists, and
        before the agent is spawned). Raises SandboxError when it cannot start."""
        from egresslock.courier.wire import Lines, encode
        from egresslock.errors import SandboxError
        from egresslock.sandbox.spawn import PROXY_PORT, spawn

        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
            try:
                self.sandboxed = spawn(self._worker_spec(child.fileno(), devnull))
            finally:
                child.close()
                os.close(devnull)
            placeholders = {b.name: b.placeholder.decode("ascii")
                            for b in self.ctx.content.bindings if b.name in self.credentials}
            parent.settimeout(READY_TIMEOUT)
            parent.sendall(encode({"hello": 1, "proxy": ["127.0.0.1", PROXY_PORT],
                                   "actions": [t.to_json() for t in self.templates.values()],
                                   "placeholders": placeholders}))
            lines = Lines()
            messages: list[dict[str, Any]] = []
            while not messages:
                data = parent.recv(1 << 16)
                if not data:
                    raise SandboxError("the courier's worker exited before it was ready "
                                       f"(interpreter {sys.executable}: it must be readable "
                                       f"by uid {self.uid})")
                messages = lines.feed(data)
        except (OSError, ValueError) as exc:
            parent.close()
            raise SandboxError(f"the courier's worker did not start: {exc}") from exc
        except BaseException:
            parent.close()
            raise
        ready = messages[0]
        if not ready.get("ready"):
            parent.close()
            raise SandboxError(f"the courier's worker could not start: {ready.get('error')}")
        self.filesystem = str(ready.get("filesystem", ""))
        if self.filesystem.startswith("not locked") and not self.session.options.quiet:
            click.echo(f"egresslock: warning: courier worker's filesystem is {self.filesystem}",
                       err=True)
        parent.setblocking(False)
        self.channel = parent

    # -- on the loop --------------------------------------------------------------------------

    async def serve(self) -> None:
        """Serve the worker's own sandbox (its proxy, DNS, drops) and read its replies."""
        assert self.sandboxed is not None
        self._send_lock = asyncio.Lock()
        self._served = await self.session.serve(self.sandboxed, origin="courier")
        self._reader = asyncio.ensure_future(self._read())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self._fail("the run is ending")
        if self._served is not None:
            await self._served.close()
        if self.channel is not None:
            self.channel.close()
        if self.sandboxed is not None:
            self.sandboxed.sockets.close()

    async def _read(self) -> None:
        from egresslock.courier.wire import Lines, WireError

        assert self.channel is not None
        loop = asyncio.get_running_loop()
        lines = Lines()
        while True:
            try:
                data = await loop.sock_recv(self.channel, 1 << 16)
                messages = lines.feed(data) if data else None
            except (OSError, WireError) as exc:
                self._fail(f"the courier's channel broke: {exc}")
                return
            if messages is None:
                self._fail("the courier's worker exited")
                return
            for message in messages:
                future = self._pending.pop(message.get("id", -1), None)
                if future is not None and not future.done():
                    future.set_result(message)

    def _fail(self, why: str) -> None:
        self.gone = self.gone or why
        for future in self._pending.values():
            if not future.done():
                future.set_result({"ok": False, "kind": "upstream", "reason": why})
        self._pending.clear()

    async def ask(self, action: str, params: Any) -> dict[str, Any]:
        from egresslock.courier.wire import encode

        if self.gone is not None or self.channel is None or self._send_lock is None:
            return {"ok": False, "kind": "upstream", "reason": self.gone or "no courier"}
        self._next_id += 1
        call_id = self._next_id
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = future
        try:
            async with self._send_lock:
                await asyncio.get_running_loop().sock_sendall(
                    self.channel, encode({"id": call_id, "action": action, "params": params}))
            return await asyncio.wait_for(future, CALL_TIMEOUT)
        except TimeoutError:
            return {"ok": False, "kind": "timeout",
                    "reason": f"the courier gave no answer within {CALL_TIMEOUT:g}s"}
        except OSError as exc:
            self._fail(f"the courier's channel broke: {exc}")
            return {"ok": False, "kind": "upstream", "reason": self.gone or str(exc)}
        finally:
            self._pending.pop(call_id, None)

    # -- the endpoint -------------------------------------------------------------------------

    async def handle(self, call: ActionCall) -> ActionReply:
        """Answer one request to the agent's ``/actions`` endpoint."""
        from egresslock.cli.courier_calls import handle_call, listing

        if call.name is None:
            if call.method not in ("GET", "HEAD"):
                return json_reply(405, {"error": "GET /actions lists the actions; call one with "
                                            "POST /actions/NAME"})
            return json_reply(200, listing(self))
        return await handle_call(self, call)


def json_reply(status: int, payload: dict[str, Any],
          headers: tuple[tuple[bytes, bytes], ...] = ()) -> ActionReply:
    return ActionReply(status, json.dumps(payload, indent=1).encode("utf-8") + b"\n", headers)


def log_call(courier: Courier, name: str, verdict: str, reason: str, *,
             template: Template | None = None, reply: dict[str, Any] | None = None,
             schema: str | None = None) -> None:
    """The one ``courier`` audit row of a call."""
    request = (reply or {}).get("request") or {}
    extra: dict[str, object] = {"action": name}
    if schema is not None:
        extra["schema"] = schema
    if reply is not None and reply.get("status") is not None:
        extra["status"] = reply["status"]
    courier.ctx.log(AuditRecord(
        layer="courier", verdict=verdict, rule_id=name if template else "default",
        reason=reason, method=template.method if template else None,
        host=template.host if template else None, port=template.port if template else None,
        path=request.get("target"), bytes_out=int(request.get("bytes", 0)),
        bytes_in=int((reply or {}).get("bytes_in", 0)), protocol="tcp", extra=extra))
