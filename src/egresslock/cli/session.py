"""One sandboxed session: the policy, the proxy context, the audit log and the sandbox's sockets.

``egresslock run`` starts one command in a session; ``egresslock mcp`` starts an MCP server in
one, and the courier runs its worker in the same session as the agent it serves. Every command
of a session shares one policy, one audit log and one session mark. Only ``cli/`` wires
subsystems together, so this lives here.

The order is the security argument of the sandbox: a :class:`Session` is built (the policy is
loaded, nothing forked), :meth:`Session.spec` describes a sandboxed command, ``spawn`` forks it
before any thread exists, then :meth:`Session.serve` runs the proxy on the sockets the child made
inside its namespace, the DNS stub and the NFLOG reader on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from egresslock.cli.proxy_cmd import _minter
from egresslock.cli.run_summary import RunSummary

if TYPE_CHECKING:
    from egresslock.audit import AuditLog
    from egresslock.dns.names import NameBook
    from egresslock.policy.model import Policy
    from egresslock.policy.normalize import IPAddress
    from egresslock.proxy.actions import ActionHandler
    from egresslock.proxy.context import ProxyContext
    from egresslock.proxy.server import ProxyServer
    from egresslock.sandbox.spawn import Sandboxed, SandboxSpec

# What the command sees: every proxy variable, in both cases, points at the sandbox's proxy.
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                   "all_proxy")
# Removed from the command's environment: NO_PROXY would send requests around the proxy (they
# would then meet transparent capture or nothing); SSH_AUTH_SOCK names a socket that is hidden.
REMOVED_VARIABLES = ("NO_PROXY", "no_proxy", "SSH_AUTH_SOCK")
CA_IN_SANDBOX = "/run/egresslock/ca.pem"
BUNDLE_IN_SANDBOX = "/run/egresslock/bundle.pem"


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


@dataclass
class SessionOptions:
    """The options every sandboxing command takes (see ``egresslock run --help``)."""

    policy_file: Path
    audit_path: Path | None = None
    resolve: tuple[str, ...] = ()
    upstream_ca: Path | None = None
    ca_dir: Path | None = None
    connect_timeout: float = 10.0
    level: str | None = None
    quiet: bool = False


@dataclass
class Served:
    """What :meth:`Session.serve` started, to be stopped with :meth:`close`."""

    server: ProxyServer
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    readers: list[int] = field(default_factory=list)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self.readers:
            loop.remove_reader(fd)
        for t in self.tasks:
            t.cancel()
        await self.server.close()


class Session:
    """The policy, proxy context and summary of one sandboxed session."""

    def __init__(self, options: SessionOptions) -> None:
        from egresslock.audit import default_db_path
        from egresslock.proxy.context import Limits, PolicyHolder, ProxyContext
        from egresslock.proxy.resolver import Resolver, parse_pins

        try:
            pins = parse_pins(options.resolve)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--resolve") from exc
        self.options = options
        holder = PolicyHolder.from_file(options.policy_file, key_dir=options.ca_dir)
        if not options.quiet:
            for warning in holder.content.warnings:
                click.echo(f"egresslock: warning: {warning}", err=True)
        self.summary = RunSummary()
        self.audit_file = options.audit_path or default_db_path()
        self.ctx: ProxyContext = ProxyContext(
            holder, self.summary.count, Resolver(pins),
            Limits(connect_timeout=options.connect_timeout),
            upstream_ca=str(options.upstream_ca) if options.upstream_ca else None)
        self.ctx.start_level = _start_level(options.level, holder.current.levels)
        self.ctx.minter = _minter(self.ctx, options.ca_dir)
        self.audit: AuditLog | None = None
        self._names: NameBook | None = None
        self._server: ProxyServer | None = None

    def spec(self, command: Sequence[str], uid: int, gid: int, *,
             share: Sequence[Path] = (), transparent: bool = True,
             env: Mapping[str, str] | None = None, cwd: str | None = None,
             hide: Sequence[str] = ()) -> SandboxSpec:
        """A sandboxed command of this session. ``env`` replaces egresslock's environment as
        the base (the proxy, CA and credential variables are added either way); ``hide`` are
        more directories to cover with an empty tmpfs."""
        return _spec(self.ctx, self.options.ca_dir, tuple(command), tuple(share), uid, gid,
                     transparent, env, cwd, hide)

    def open_audit(self) -> AuditLog:
        """Open the audit log (after every spawn: SQLite must not cross a fork)."""
        from egresslock.audit import AuditLog

        self.audit = AuditLog(self.audit_file)
        self.summary.sink = self.audit.record
        return self.audit

    async def serve(self, sandboxed: Sandboxed, actions: ActionHandler | None = None,
                    origin: str = "agent") -> Served:
        """Serve a sandboxed command's sockets: proxy, transparent capture, DNS, drops.
        ``actions`` answers the courier's endpoint (/actions) on this command's proxy port;
        ``origin`` says whose requests they are ("courier": rules with via: courier apply)."""
        from egresslock.dns.names import NameBook
        from egresslock.proxy.server import ProxyServer

        if self._names is None:
            self._names = NameBook()
        names = self._names
        ctx = self.ctx if origin == "agent" else self.ctx.for_origin(origin)
        server = ProxyServer(ctx, names.names_for, actions)
        socks = sandboxed.sockets
        for s in socks.proxy:
            server.serve(s)
        for s in socks.transparent:
            server.serve(s, transparent=True)
        served = Served(server, _start_dns(ctx, names, socks.dns_udp, socks.dns_tcp))
        if socks.nflog is not None:
            _watch_drops(ctx, socks.nflog)
            served.readers.append(socks.nflog.fileno())
        return served


def _spec(ctx: ProxyContext, ca_dir: Path | None, command: tuple[str, ...],
          share: tuple[Path, ...], uid: int, gid: int, transparent: bool,
          base_env: Mapping[str, str] | None, cwd: str | None,
          hide: Sequence[str]) -> SandboxSpec:
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
    env = command_environment(dict(os.environ if base_env is None else base_env),
                              f"http://127.0.0.1:{PROXY_PORT}", ca_bundle)
    content = ctx.content
    placeholders, removed = sandbox_environment(content.bindings, ctx.policy.current.source)
    for name in removed:
        env.pop(name, None)
    env.update(placeholders)
    cwd = cwd or os.getcwd()
    mounts = plan_mounts(cwd, [str(p) for p in share], os.environ,
                         resolv_conf="nameserver 127.0.0.1\nnameserver ::1\n", files=files,
                         hide_extra=[*_private_dirs(ca_dir), *hide],
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
    from egresslock.paths import default_ca_dir

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


def preload() -> None:
    """Import in the parent what the child needs, so the fork shares it instead of the child
    paying for it between fork and exec."""
    import egresslock.sandbox.landlock
    import egresslock.sandbox.netlink  # noqa: F401
    from egresslock.sandbox.nft import library
    from egresslock.sandbox.seccomp import prepared_filter

    # After it drops root the child may not read the interpreter's files (a Python under /root);
    # and the filter built here is only loaded by each child, as libnftables is only used.
    prepared_filter()
    library()


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
