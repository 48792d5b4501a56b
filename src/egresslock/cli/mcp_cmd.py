"""``egresslock mcp``: an MCP server behind the policy, in the sandbox, through the gateway.

The order is ``egresslock run``'s (see run_cmd.py), with the server's stdin and stdout on two
pipes: the session is built and the policy's ``mcp`` section compiled (a bad schema stops here),
the ``--listen`` socket bound, then the server is forked into the sandbox before any thread
exists, this process made undumpable, the audit log opened, and only then does the event loop
start: the proxy, DNS stub and drop log serve the server's network, and the gateway
(egresslock.mcp) serves the agent. The gateway and the proxy share the session's one mark.

The run ends when the agent closes its end (stdio), on SIGINT/SIGTERM/SIGHUP, or when the server
exits; then whatever the server left running is ended, and the summary goes to stderr (never
stdout: in stdio mode that is the agent's MCP channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import click

from egresslock.cli.options import command_identity, sandbox_options, session_options_from

if TYPE_CHECKING:
    import socket

    from egresslock.cli.session import Session
    from egresslock.mcp.decide import ToolTable
    from egresslock.mcp.gateway import Hooks
    from egresslock.sandbox.spawn import Sandboxed

ENDING_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACE = 2.0  # seconds the server has to exit on its own once its stdin is closed


@click.command(context_settings={"ignore_unknown_options": True,
                                 "allow_interspersed_args": False})
@sandbox_options
@click.option("--listen", metavar="HOST:PORT",
              help="Serve the agent over streamable HTTP at http://HOST:PORT/mcp instead of "
                   "stdio (port 0 picks a free one; the address is printed on stderr). Bind to "
                   "loopback: the gateway has no authentication of its own.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def mcp(listen: str | None, command: tuple[str, ...], **values: Any) -> None:
    """Run the MCP server COMMAND in the sandbox, behind the policy's per-tool rules.

    \b
      egresslock mcp -p policy.yaml -- npx -y @modelcontextprotocol/server-github
      egresslock mcp -p policy.yaml --listen 127.0.0.1:8931 -- python server.py

    The agent talks MCP to egresslock (stdio by default); egresslock talks to the server over
    its stdin and stdout. The server runs as under 'egresslock run': its network goes through
    the policy's rules, and its secrets and files are hidden the same way.

    Every tool call, resource read (matched as 'resource:URI') and prompt ('prompt:NAME') is
    decided by the first matching entry of the policy's mcp.tools (mcp.default when none):
    its action, its 'level' against the session's mark, its 'arguments' JSON Schema, and a
    scan of the arguments for secrets and data-carrying links. A refused tool call returns a
    tool error whose text says why. Results of tools with 'reads' raise the mark. Tools the
    policy denies are left out of tools/list. Every call is one 'mcp' row in the audit log.

    Exit code: 0 when the agent ended the session, the server's own when it exited first, 125
    when the sandbox could not be set up.
    """
    from egresslock.cli.proxy_cmd import raise_fd_limit
    from egresslock.cli.session import Session, preload
    from egresslock.errors import SandboxError
    from egresslock.mcp.decide import ToolTable
    from egresslock.sandbox.process import become_subreaper, end_tree
    from egresslock.sandbox.spawn import spawn
    from egresslock.sandbox.syscalls import PR_SET_DUMPABLE, prctl

    raise_fd_limit()
    options = session_options_from(values)
    session = Session(options)
    table = ToolTable(session.ctx.policy.current.source, str(options.policy_file))
    uid, gid = command_identity(values["user"])
    listener = _listener(listen, options.quiet) if listen is not None else None
    to_server, from_server = os.pipe(), os.pipe()  # (read, write) each
    spec = session.spec(command, uid, gid, share=values["share"],
                        transparent=values["transparent"])
    become_subreaper()
    # Held back until the loop's handlers are in place (see run_cmd.py).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ENDING_SIGNALS)
    spec = replace(spec, signal_mask=frozenset(mask),
                   stdio=(to_server[0], from_server[1], None))
    try:
        preload()
        sandboxed = spawn(spec)  # first: no thread may exist yet
    except SandboxError as exc:
        for fd in (*to_server, *from_server):
            os.close(fd)
        click.echo(f"egresslock: {exc}", err=True)
        sys.exit(125)
    os.close(to_server[0])
    os.close(from_server[1])
    prctl(PR_SET_DUMPABLE, 0)  # see run_cmd.py: the server must not read our memory
    audit = session.open_audit()
    code = 125
    try:
        code = _run_loop(_supervise(session, sandboxed, table, from_server[0], to_server[1],
                                    listener), values["no_uvloop"])
    finally:
        end_tree()
        sandboxed.sockets.close()
        if listener is not None:
            listener.close()
        audit.close()
        summary, audit_file = session.summary, str(session.audit_file)
        if values["as_json"]:
            click.echo(json.dumps(summary.as_dict(code, audit_file, audit.run_id)), err=True)
        elif not values["quiet"]:
            click.echo(summary.render(code, audit_file, audit.run_id), err=True)
    sys.exit(code)


def _listener(listen: str, quiet: bool) -> socket.socket:
    """The ``--listen`` socket, bound before the sandbox starts: a port in use stops here."""
    from egresslock.cli.proxy_cmd import parse_listen
    from egresslock.mcp.serve import LOOPBACK_NAMES, bind

    where = parse_listen(listen)
    if where[0] not in LOOPBACK_NAMES and not quiet:
        _say(f"warning: --listen {listen} is not a loopback address: whoever can reach it can "
             "use the server, and the gateway has no authentication of its own")
    try:
        return bind(*where)
    except OSError as exc:
        raise click.BadParameter(f"cannot listen on {where[0]}:{where[1]}: {exc.strerror}",
                                 param_hint="--listen") from exc


def _run_loop(coro: Any, no_uvloop: bool) -> int:
    from egresslock.cli.proxy_cmd import _run

    result: list[int] = []

    async def main() -> None:
        result.append(await coro)

    _run(main(), no_uvloop)
    return result[0] if result else 125


async def _supervise(session: Session, sandboxed: Sandboxed, table: ToolTable, read_fd: int,
                     write_fd: int, listener: socket.socket | None) -> int:
    import anyio

    from egresslock.mcp.gateway import Gateway
    from egresslock.mcp.pipes import pipe_streams
    from egresslock.mcp.serve import serve_http, serve_stdio, url_of
    from egresslock.sandbox.process import wait_exit

    gateway = Gateway(_hooks(session, table, sandboxed.pid))
    served = await session.serve(sandboxed)
    outcome = _Outcome()
    server_exited = anyio.Event()

    async def watch_server() -> None:
        outcome.server = await wait_exit(sandboxed.pid)
        outcome.initialized = gateway.initialized
        if not outcome.initialized and not outcome.failed:
            _say(f"the MCP server exited with code {outcome.server} before it answered "
                 "initialize")
        server_exited.set()
        tasks.cancel_scope.cancel()

    async def serve_agent() -> None:
        try:
            async with pipe_streams(read_fd, write_fd) as streams, gateway.connect(streams):
                server = gateway.server()
                if listener is None:
                    await serve_stdio(server)
                else:
                    _say(f"MCP gateway for {gateway.name} listening on {url_of(listener)}")
                    await serve_http(server, listener)
        except Exception as exc:  # the server failed to initialize, or the transport broke
            _say(f"the MCP gateway stopped: {_describe(exc)}")
            outcome.failed = True
        outcome.agent_ended = True
        with anyio.move_on_after(GRACE):  # its stdin is closed: let it exit on its own
            await server_exited.wait()
        tasks.cancel_scope.cancel()

    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if outcome.signal is None:
            outcome.signal = sig
        tasks.cancel_scope.cancel()

    for sig in ENDING_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, ENDING_SIGNALS)  # held ones arrive now
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(watch_server)
            tasks.start_soon(serve_agent)
    finally:
        for sig in ENDING_SIGNALS:
            loop.remove_signal_handler(sig)
        await served.close()
    return outcome.code()


def _hooks(session: Session, table: ToolTable, pid: int) -> Hooks:
    """The gateway's view of the session: the proxy's content checks, mark and audit log."""
    from egresslock.mcp.gateway import Hooks

    ctx = session.ctx
    return Hooks(
        table=lambda: table,
        secrets=lambda text: [h.describe() for h in ctx.content.scanner.scan_text(text)],
        mark=lambda: ctx.mark, log=ctx.log, pid=pid,
        say=None if session.options.quiet else _say)


@dataclass
class _Outcome:
    """How the session ended, and so the exit code."""

    signal: int | None = None    # a signal ended it
    agent_ended: bool = False    # the agent closed its end (or the gateway stopped)
    failed: bool = False         # the gateway stopped on an error
    server: int | None = None    # the server's exit code, when it exited
    initialized: bool = False    # the gateway had initialized the server by then

    def code(self) -> int:
        if self.signal is not None:
            return 128 + self.signal
        if self.agent_ended and not self.failed:
            return 0
        if self.server:
            return self.server
        # A server that exited 0 without ever answering initialize did not do its job.
        return 1 if self.failed or not self.initialized else 0


def _say(line: str) -> None:
    click.echo(f"egresslock: {line}", err=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    text = str(exc) or type(exc).__name__
    with contextlib.suppress(Exception):
        from mcp.shared.exceptions import MCPError

        if isinstance(exc, MCPError):
            text = exc.message
    return text
