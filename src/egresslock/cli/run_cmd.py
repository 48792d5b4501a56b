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
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from egresslock.cli.proxy_cmd import _minter, _run, raise_fd_limit
from egresslock.cli.run_summary import RunSummary

if TYPE_CHECKING:
    from egresslock.dns.names import NameBook
    from egresslock.policy.model import Policy
    from egresslock.policy.normalize import IPAddress
    from egresslock.proxy.context import ProxyContext
    from egresslock.sandbox.spawn import Sandboxed, SandboxSpec

# What the command sees: every proxy variable, in both cases, points at the sandbox's proxy.
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                   "all_proxy")
# Removed from the command's environment: NO_PROXY would send requests around the proxy (they
# would then meet transparent capture or nothing); SSH_AUTH_SOCK names a socket that is hidden.
REMOVED_VARIABLES = ("NO_PROXY", "no_proxy", "SSH_AUTH_SOCK")
CA_IN_SANDBOX = "/run/egresslock/ca.pem"
BUNDLE_IN_SANDBOX = "/run/egresslock/bundle.pem"
FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
                     signal.SIGUSR1, signal.SIGUSR2)


def command_environment(base: dict[str, str], proxy_url: str,
                        ca_cert: str | None) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in REMOVED_VARIABLES}
    for name in PROXY_VARIABLES:
        env[name] = proxy_url
    env["EGRESSLOCK_SANDBOX"] = "1"
    if ca_cert is not None:
        bundle = os.path.join(os.path.dirname(ca_cert), "bundle.pem")
        for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT",
                     "GIT_SSL_CAINFO"):
            env[name] = bundle
        env["NODE_EXTRA_CA_CERTS"] = ca_cert
    return env


def _identity(user: str | None) -> tuple[int, int]:
    """The uid and gid the command runs as. Never root: as root, --user, else the user sudo
    came from, else nobody."""
    from egresslock.sandbox.spawn import default_identity

    if user is None:
        return default_identity()
    if os.geteuid() != 0:
        raise click.BadParameter("only root can choose the user a command runs as",
                                 param_hint="--user")
    import pwd

    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        if not user.isdigit():
            raise click.BadParameter(f"no user called {user!r}; give a name from /etc/passwd "
                                     "or a numeric uid", param_hint="--user") from None
        uid = gid = int(user)
    if uid == 0:
        raise click.BadParameter("the command may not run as root (uid 0): root inside the "
                                 "sandbox could leave it; choose another user",
                                 param_hint="--user")
    return uid, gid


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
    """
    from egresslock.audit import AuditLog, default_db_path
    from egresslock.errors import SandboxError
    from egresslock.proxy.context import Limits, PolicyHolder, ProxyContext
    from egresslock.proxy.resolver import Resolver, parse_pins
    from egresslock.sandbox.process import become_subreaper, end_tree
    from egresslock.sandbox.spawn import spawn
    from egresslock.sandbox.syscalls import PR_SET_DUMPABLE, prctl

    raise_fd_limit()
    try:
        pins = parse_pins(resolve)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--resolve") from exc
    holder = PolicyHolder.from_file(policy_file, key_dir=ca_dir)
    if not quiet:
        for warning in holder.content.warnings:
            click.echo(f"egresslock: warning: {warning}", err=True)
    uid, gid = _identity(user)
    limits = Limits(connect_timeout=connect_timeout)
    summary = RunSummary()
    audit_file = audit_path or default_db_path()
    ctx = ProxyContext(holder, summary.count, Resolver(pins), limits,
                       upstream_ca=str(upstream_ca) if upstream_ca else None)
    ctx.start_level = _start_level(level, holder.current.levels)
    ctx.minter = _minter(ctx, ca_dir)
    spec = _spec(ctx, ca_dir, command, share, uid, gid, transparent)
    become_subreaper()
    # Until _supervise installs its handlers, a SIGTERM would kill egresslock and leave the
    # command to its parent-death signal: hold the forwarded signals back until then.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED_SIGNALS)
    spec = replace(spec, signal_mask=frozenset(mask))
    try:
        _preload()
        sandboxed = spawn(spec)  # first: no thread may exist yet
    except SandboxError as exc:
        click.echo(f"egresslock: {exc}", err=True)
        sys.exit(125)
    # The command runs under the same uid when egresslock is not root: without this, it could
    # read and write this process's memory through /proc/<pid>/mem (proc(5): a ptrace access
    # check, which a same-uid, dumpable process passes without any capability).
    prctl(PR_SET_DUMPABLE, 0)
    audit = AuditLog(audit_file)
    summary.sink = audit.record
    code = 125
    try:
        code = _run_loop(_supervise(ctx, sandboxed), no_uvloop)
    finally:
        end_tree()
        sandboxed.sockets.close()
        audit.close()
        if as_json:
            click.echo(json.dumps(summary.as_dict(code, str(audit_file), audit.run_id)),
                       err=True)
        elif not quiet:
            click.echo(summary.render(code, str(audit_file), audit.run_id), err=True)
    sys.exit(code)


def _spec(ctx: ProxyContext, ca_dir: Path | None, command: tuple[str, ...],
          share: tuple[Path, ...], uid: int, gid: int, transparent: bool) -> SandboxSpec:
    from egresslock.content.credentials import sandbox_environment
    from egresslock.sandbox.mounts import plan_mounts
    from egresslock.sandbox.spawn import PROXY_PORT, SandboxSpec

    files: list[tuple[str, str]] = []
    ca_bundle = None
    if ctx.minter is not None:
        from egresslock.proxy.ca import load_ca

        # Certificates only, in the sandbox's own /run, readable whatever user it runs as:
        # the egresslock CA alone for Node (which adds it to its own roots), and the system
        # roots plus that CA for clients that take one file as their whole trust store.
        root = load_ca(ca_dir)
        files += [(CA_IN_SANDBOX, root.cert_path.read_text()),
                  (BUNDLE_IN_SANDBOX, root.bundle_path.read_text())]
        ca_bundle = CA_IN_SANDBOX
    env = command_environment(dict(os.environ), f"http://127.0.0.1:{PROXY_PORT}", ca_bundle)
    content = ctx.content
    placeholders, removed = sandbox_environment(content.bindings, ctx.policy.current.source)
    for name in removed:
        env.pop(name, None)
    env.update(placeholders)
    cwd = os.getcwd()
    mounts = plan_mounts(cwd, [str(p) for p in share], os.environ,
                         resolv_conf="nameserver 127.0.0.1\nnameserver ::1\n", files=files,
                         hide_extra=_private_dirs(ca_dir),
                         replace=_credential_files(ctx.policy.current.source, placeholders))
    return SandboxSpec(argv=command, env=env, cwd=cwd, uid=uid, gid=gid, mounts=mounts,
                       transparent=transparent)


def _start_level(level: str | None, levels: tuple[str, ...]) -> str | None:
    if level is not None and level not in levels:
        valid = ", ".join(levels) if levels else "none: the policy declares no levels"
        raise click.BadParameter(f"{level!r} is not one of the policy's levels ({valid})",
                                 param_hint="--level")
    return level


def _private_dirs(ca_dir: Path | None) -> list[str]:
    """egresslock's own directories, hidden from the command: the CA key and the hashing key
    (``transform.key``) live in the CA directory, and the audit log must not be rewritten by
    what it records."""
    from egresslock.audit import default_db_path
    from egresslock.proxy.ca import default_ca_dir

    dirs = [ca_dir or default_ca_dir(), default_db_path().parent]
    return [str(d) for d in dirs if d.is_dir()]


def _credential_files(policy: Policy, placeholders: dict[str, str]) -> list[tuple[str, str]]:
    """Credential files, shown inside the sandbox with the placeholder as their content."""
    out = []
    for cred in policy.credentials:
        if cred.file is not None and cred.name in placeholders:
            path = os.path.realpath(os.path.expanduser(cred.file))
            if os.path.isfile(path):
                out.append((path, placeholders[cred.name] + "\n"))
    return out


def _preload() -> None:
    """Import in the parent what the child needs, so the fork shares it instead of the child
    paying for it between fork and exec."""
    import egresslock.sandbox.landlock
    import egresslock.sandbox.netlink  # noqa: F401
    from egresslock.sandbox.seccomp import libseccomp

    # After it drops root the child may not read the interpreter's files (a Python under /root).
    libseccomp()


def _run_loop(coro: object, no_uvloop: bool) -> int:
    result: list[int] = []

    async def main() -> None:
        result.append(await coro)  # type: ignore[misc]

    _run(main(), no_uvloop)
    return result[0] if result else 125


async def _supervise(ctx: ProxyContext, sandboxed: Sandboxed) -> int:
    from egresslock.dns.names import NameBook
    from egresslock.proxy.server import ProxyServer
    from egresslock.sandbox.process import wait_exit

    loop = asyncio.get_running_loop()
    names = NameBook()
    socks = sandboxed.sockets
    server = ProxyServer(ctx, names.names_for)
    for s in socks.proxy:
        server.serve(s)
    for s in socks.transparent:
        server.serve(s, transparent=True)
    tasks = _start_dns(ctx, names, socks.dns_udp, socks.dns_tcp)
    if socks.nflog is not None:
        _watch_drops(ctx, socks.nflog)
    pid = sandboxed.pid

    def forward(sig: signal.Signals) -> None:
        if sig == signal.SIGINT and _terminal_delivers_sigint():
            return  # the terminal sent it to the command's process group already
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)

    for sig in FORWARDED_SIGNALS:
        loop.add_signal_handler(sig, forward, sig)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED_SIGNALS)  # held ones arrive now
    try:
        return await wait_exit(pid)
    finally:
        if socks.nflog is not None:
            loop.remove_reader(socks.nflog.fileno())
        for t in tasks:
            t.cancel()
        await server.close()


def _terminal_delivers_sigint() -> bool:
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _start_dns(ctx: ProxyContext, names: NameBook, udp: list[socket.socket],
               tcp: list[socket.socket]) -> list[asyncio.Task[None]]:
    from egresslock.dns.stub import DnsStub

    policy = ctx.policy.current

    async def resolve(name: str) -> tuple[IPAddress, ...]:
        return await ctx.resolver.resolve(name, 443)

    # The current policy's content checks, whatever reloads happen.
    def name_check(host: str, rule_id: str) -> str | None:
        return ctx.content.name_refusal(host, rule_id)

    def find_secrets(name: str) -> list[str]:  # every query, allowed or not, for the log
        return [h.describe() for h in ctx.content.scanner.scan_name(name)]

    stub = DnsStub(decide=ctx.decide, resolve=resolve, log=ctx.log, names=names,
                   check_address=policy.addresses.check, name_check=name_check,
                   find_secrets=find_secrets, report_only=policy.report_only)
    return [asyncio.ensure_future(stub.serve_udp(s)) for s in udp] + \
        [asyncio.ensure_future(stub.serve_tcp(s)) for s in tcp]


def _watch_drops(ctx: ProxyContext, nflog: socket.socket) -> None:
    """Each packet nftables dropped becomes a ``drop`` row: protocol, destination, uid."""
    from egresslock.audit import AuditRecord
    from egresslock.policy.normalize import join_authority
    from egresslock.sandbox.nflog import NflogError, parse_nflog

    def readable() -> None:
        while True:
            try:
                data = nflog.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ENOBUFS: the kernel dropped log messages; say so once
                ctx.log(AuditRecord(layer="drop", verdict="deny", rule_id="default",
                                    reason="some dropped packets were not logged (NFLOG "
                                           "buffer overrun)"))
                return
            try:
                packets = parse_nflog(data)
            except NflogError:
                continue
            for p in packets:
                where = p.destination if p.destination_port is None else \
                    join_authority(p.destination, p.destination_port)
                ctx.log(AuditRecord(
                    layer="drop", verdict="deny", rule_id="default",
                    reason=f"{p.protocol} to {where} dropped: the sandbox lets out only TCP "
                           "through the proxy and DNS through the stub",
                    host=p.destination, address=p.destination, port=p.destination_port,
                    uid=p.uid, protocol=str(p.protocol)))

    asyncio.get_running_loop().add_reader(nflog.fileno(), readable)
