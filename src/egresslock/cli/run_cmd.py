"""``egresslock run``: run a command whose only way to the network is egresslock.

This module wires the subsystems together for one run (only ``cli/`` may): the sandbox child is
forked first, before any thread exists; then the audit log, the proxy on the sockets the child
made inside its namespace, the DNS stub and the NFLOG reader run on one event loop until the
command exits. Then the rest of its process tree is ended, and a summary goes to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from egresslock.cli.options import command_identity
from egresslock.cli.proxy_cmd import _run, raise_fd_limit
from egresslock.cli.session import (  # noqa: F401  command_environment: the tests import it here
    Session,
    SessionOptions,
    command_environment,
    preload,
)

if TYPE_CHECKING:
    from egresslock.cli.courier_session import Courier
    from egresslock.sandbox.spawn import Sandboxed

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)
# In a warm server's worker: the connection to the client whose run this is. The client sends
# the signals it receives over it, and its end of the stream means the client is gone, which
# ends the command as egresslock's death ends it in a cold run (PR_SET_PDEATHSIG).
warm_channel: socket.socket | None = None


@click.command(context_settings={"ignore_unknown_options": True,
                                 "allow_interspersed_args": False})
@click.option("-p", "--policy", "policy_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Policy file.")
@click.option("--audit", "audit_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Audit database (default: $EGRESSLOCK_AUDIT or "
                   "~/.local/state/egresslock/audit.db).")
@click.option("--resolve", multiple=True, metavar="HOST:ADDR",
              help="Pin HOST to ADDR instead of asking DNS (repeatable).")
@click.option("--upstream-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Verify inspected upstreams against this CA file instead of the system "
                   "trust store.")
@click.option("--ca-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Inspection CA directory (default: $EGRESSLOCK_CA_DIR or "
                   "~/.local/share/egresslock/ca).")
@click.option("--connect-timeout", type=click.FloatRange(0.1), default=10.0, show_default=True)
@click.option("--transparent/--no-transparent", default=True, show_default=True,
              help="Capture connections of programs that ignore HTTP_PROXY with nftables. "
                   "Off: such connections are dropped, and Landlock limits TCP connect to the "
                   "proxy's port.")
@click.option("--share", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Keep this path visible although it lies in a hidden directory "
                   "(/tmp, /run...). The working directory is always kept. Repeatable.")
@click.option("--user", metavar="USER",
              help="As root: the user the command runs as (default: $SUDO_UID, else nobody).")
@click.option("--level", metavar="LEVEL",
              help="Start the session's mark at LEVEL (one of the policy's levels), for an "
                   "agent handed private data up front: destinations below it are refused.")
@click.option("-q", "--quiet", is_flag=True, help="No summary at the end.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the end-of-run summary as one JSON object on stderr.")
@click.option("--no-uvloop", is_flag=True, help="Use asyncio's own event loop.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(policy_file: Path, audit_path: Path | None, resolve: tuple[str, ...],
        upstream_ca: Path | None, ca_dir: Path | None, connect_timeout: float,
        transparent: bool, share: tuple[Path, ...], user: str | None, level: str | None,
        quiet: bool, as_json: bool, no_uvloop: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND so that its only way to the network is egresslock.

    \b
      egresslock run -p policy.yaml -- npx some-mcp-server
      egresslock run -p policy.yaml -- python agent.py

    The command gets a network namespace of its own with only a loopback interface. Its
    proxy variables (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, both cases) point at the proxy at
    127.0.0.1:3128 inside; NO_PROXY is removed. With transparent capture (the default),
    nftables sends every other TCP connection to the proxy too, and DNS to a stub that
    answers only names the policy allows. Everything else (UDP, ICMP, raw sockets) is
    dropped and logged. /run, /tmp and other directories holding host sockets are hidden;
    the working directory stays. seccomp refuses new namespaces, ptrace, io_uring, netlink,
    raw, packet and vsock sockets.

    Every decision is a row in the audit log. The exit code is the command's (128+N when a
    signal N ended it); 125 when the sandbox could not be set up, in which case the command
    did not run. Ctrl-C and SIGTERM reach the command; when it exits, whatever it left
    running is ended.

    When this user runs a warm server (`egresslock warm start`), the run is handed to it and
    the command starts in tens of milliseconds instead of hundreds; nothing else changes.
    Runs on a terminal start cold, and EGRESSLOCK_WARM=off makes every run cold.
    """
    from egresslock.errors import SandboxError
    from egresslock.sandbox.process import become_subreaper, end_tree
    from egresslock.sandbox.spawn import spawn
    from egresslock.sandbox.syscalls import PR_SET_DUMPABLE, prctl

    raise_fd_limit()
    session = Session(SessionOptions(policy_file, audit_path, resolve, upstream_ca, ca_dir,
                                     connect_timeout, level, quiet))
    uid, gid = command_identity(user)
    spec = session.spec(command, uid, gid, share=share, transparent=transparent)
    courier: Courier | None = None
    if session.ctx.policy.current.source.actions:  # else the courier's code is never loaded
        from egresslock.cli.courier_session import plan_courier

        courier = plan_courier(session, uid, gid)
    if courier is not None:
        spec = courier.agent_spec(spec)
    become_subreaper()
    # Until _supervise installs its handlers, a SIGTERM would kill egresslock and leave the
    # command to its parent-death signal: hold the forwarded signals back until then.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    spec = replace(spec, signal_mask=frozenset(mask))
    try:
        preload()
        if courier is not None:
            courier.start()  # ready (non-dumpable, files given up) before the agent exists
        sandboxed = spawn(spec)  # first: no thread may exist yet
    except SandboxError as exc:
        click.echo(f"egresslock: {exc}", err=True)
        sys.exit(125)
    # The command runs under the same uid when egresslock is not root: without this, it could
    # read and write this process's memory through /proc/<pid>/mem (proc(5): a ptrace access
    # check, which a same-uid, dumpable process passes without any capability).
    prctl(PR_SET_DUMPABLE, 0)
    audit = session.open_audit()
    code = 125
    try:
        code = _run_loop(_supervise(session, sandboxed, courier), no_uvloop)
    finally:
        end_tree()
        sandboxed.sockets.close()
        audit.close()
        summary, audit_file = session.summary, str(session.audit_file)
        if as_json:
            started = "warm" if warm_channel is not None else "cold"
            click.echo(json.dumps({**summary.as_dict(code, audit_file, audit.run_id),
                                   "start": started}), err=True)
        elif not quiet:
            click.echo(summary.render(code, audit_file, audit.run_id), err=True)
    sys.exit(code)


def _run_loop(coro: object, no_uvloop: bool) -> int:
    result: list[int] = []

    async def main() -> None:
        result.append(await coro)  # type: ignore[misc]

    _run(main(), no_uvloop)
    return result[0] if result else 125


async def _supervise(session: Session, sandboxed: Sandboxed,
                     courier: Courier | None = None) -> int:
    from egresslock.sandbox.process import wait_exit

    loop = asyncio.get_running_loop()
    served = await session.serve(sandboxed, courier.handle if courier is not None else None)
    if courier is not None:
        await courier.serve()
    pid = sandboxed.pid

    def forward(sig: signal.Signals) -> None:
        if sig == signal.SIGINT and _terminal_delivers_sigint():
            return  # the terminal sent it to the command's process group already
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    for sig in FORWARDED_SIGNALS:
        loop.add_signal_handler(sig, forward, sig)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)  # held ones arrive now
    if warm_channel is not None:
        _listen_to_client(loop, warm_channel, pid, forward)
    try:
        return await wait_exit(pid)
    finally:
        if warm_channel is not None:
            loop.remove_reader(warm_channel.fileno())
        await served.close()
        if courier is not None:
            await courier.close()


def _listen_to_client(loop: asyncio.AbstractEventLoop, channel: socket.socket, pid: int,
                      forward: Callable[[signal.Signals], None]) -> None:
    """A warm run: forward the signals the client sends; when it is gone, end the command."""
    from egresslock.cli.warm_client import read_frame
    from egresslock.cli.warm_server import forwarded_signal

    channel.setblocking(True)  # a frame is a few bytes, sent whole: readable means all of it

    def readable() -> None:
        try:
            message = read_frame(channel, limit=64)
        except OSError:
            message = None
        if message is None:
            loop.remove_reader(channel.fileno())
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        number = forwarded_signal(message)
        if number is not None:
            forward(signal.Signals(number))

    loop.add_reader(channel.fileno(), readable)


def _terminal_delivers_sigint() -> bool:
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


