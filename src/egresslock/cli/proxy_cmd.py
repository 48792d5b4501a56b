"""``egresslock proxy``: run the policy-checking proxy in the foreground."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from egresslock.proxy.ca import LeafMinter
    from egresslock.proxy.context import ProxyContext


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise click.BadParameter(f"{value!r} must be HOST:PORT, like 127.0.0.1:3128 "
                                 "(port 0 picks a free port)", param_hint="--listen")
    return host, int(port)


@click.command()
@click.option("-p", "--policy", "policy_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Policy file.")
@click.option("--listen", default="127.0.0.1:3128", show_default=True, metavar="HOST:PORT",
              help="Where to listen; port 0 picks a free one.")
@click.option("--audit", "audit_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Audit database (default: $EGRESSLOCK_AUDIT or "
                   "~/.local/state/egresslock/audit.db).")
@click.option("--resolve", multiple=True, metavar="HOST:ADDR",
              help="Pin HOST to ADDR instead of asking DNS (repeatable).")
@click.option("--metrics", metavar="HOST:PORT", help="Serve Prometheus metrics here.")
@click.option("--max-connections", type=click.IntRange(1), default=4096, show_default=True,
              help="Connections served at once; more get 503. A connection counts once the "
                   "kernel hands it over, when its first bytes have come (Linux).")
@click.option("--connect-timeout", type=click.FloatRange(0.1), default=10.0, show_default=True)
@click.option("--head-timeout", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="Seconds a request head may take to arrive in full (slowloris guard).")
@click.option("--idle-timeout", type=click.FloatRange(0.1), default=60.0, show_default=True,
              help="Seconds a keep-alive connection may wait for its next request.")
@click.option("--tunnel-idle-timeout", type=click.FloatRange(0.1), default=300.0,
              show_default=True)
@click.option("--upstream-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Verify inspected upstreams against this CA file instead of the system "
                   "trust store.")
@click.option("--ca-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Inspection CA directory (default: $EGRESSLOCK_CA_DIR or "
                   "~/.local/share/egresslock/ca).")
@click.option("--no-uvloop", is_flag=True, help="Use asyncio's own event loop.")
def proxy(policy_file: Path, listen: str, audit_path: Path | None, resolve: tuple[str, ...],
          metrics: str | None, max_connections: int, connect_timeout: float,
          head_timeout: float, idle_timeout: float, tunnel_idle_timeout: float,
          upstream_ca: Path | None, ca_dir: Path | None, no_uvloop: bool) -> None:
    """Run the egress proxy until interrupted.

    Clients use it as an HTTP proxy (HTTP_PROXY/HTTPS_PROXY=http://HOST:PORT). Every request
    is decided by the policy; denied ones get 403 with X-Egresslock-Deny naming the rule and
    reason; every decision is a row in the audit log. Prints "listening on HOST:PORT" when
    ready. SIGHUP, or a change to the policy file, reloads the policy; a bad new policy is
    refused with its errors and the old one stays in force.
    """
    from egresslock.audit import default_db_path
    from egresslock.audit.process import ProcessAuditLog
    from egresslock.proxy.context import Limits, PolicyHolder, ProxyContext
    from egresslock.proxy.metrics import ProxyMetrics
    from egresslock.proxy.resolver import Resolver, parse_pins
    from egresslock.proxy.server import ProxyServer, install_reload, make_listener

    raise_fd_limit()
    try:
        pins = parse_pins(resolve)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--resolve") from exc
    host, port = parse_listen(listen)
    holder = PolicyHolder.from_file(policy_file, key_dir=ca_dir)
    for warning in holder.content.warnings:
        click.echo(f"egresslock: warning: {warning}", err=True)
    limits = Limits(max_connections=max_connections, connect_timeout=connect_timeout,
                    head_timeout=head_timeout, idle_timeout=idle_timeout,
                    tunnel_idle_timeout=tunnel_idle_timeout)
    proxy_metrics = ProxyMetrics() if metrics else None
    audit = ProcessAuditLog(audit_path or default_db_path())
    ctx = ProxyContext(holder, audit.record, Resolver(pins), limits, proxy_metrics,
                       upstream_ca=str(upstream_ca) if upstream_ca else None)
    ctx.minter = _minter(ctx, ca_dir)
    listener = make_listener(host, port)

    def report_reload(error: str | None) -> None:
        if error:
            click.echo(f"egresslock: policy reload refused, old policy stays:\n{error}",
                       err=True)
        else:
            ctx.minter = _minter(ctx, ca_dir)  # name constraints follow the inspected hosts
            click.echo(f"egresslock: policy reloaded from {policy_file}", err=True)

    async def main() -> None:
        server = ProxyServer(ctx)
        server.serve(listener)
        watcher = install_reload(ctx, report_reload)
        if proxy_metrics is not None and metrics is not None:
            m_host, m_port = parse_listen(metrics)
            proxy_metrics.serve(m_host, m_port)
        _ready(listener)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        watcher.cancel()
        await server.close()

    try:
        _run(main(), no_uvloop)
    finally:
        listener.close()
        audit.close()
        click.echo(f"egresslock: audit log {audit_path or default_db_path()} "
                   f"(run {audit.run_id})", err=True)


def _minter(ctx: ProxyContext, ca_dir: Path | None) -> LeafMinter | None:
    """A leaf minter for the policy's inspected hosts, or None (with a warning) without a CA."""
    from egresslock.proxy.context import inspected_hosts

    hosts = inspected_hosts(ctx.policy.current)
    if not hosts:
        return None
    from egresslock.proxy.ca import CAError, LeafMinter, load_ca
    try:
        root = load_ca(ca_dir)
    except CAError as exc:
        click.echo(f"egresslock: warning: {exc}; tunnels of inspect: true rules will be "
                   "refused", err=True)
        return None
    _ = ctx.upstream_tls  # a bad --upstream-ca fails now, not at the first inspected request
    return LeafMinter(root, hosts)


def raise_fd_limit() -> None:
    """Each tunnel holds two sockets and two pipes: lift the soft fd limit to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _run(coro: object, no_uvloop: bool) -> None:
    if not no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(coro)  # type: ignore[arg-type]
            return
    asyncio.run(coro)  # type: ignore[arg-type]


def _ready(listener: socket.socket) -> None:
    """Say where the proxy listens, once it is about to serve.

    First, what is loaded (the compiled policy above all) is moved out of the cyclic collector's
    reach, since it stays for the proxy's life: a collection then scans only what serving
    allocates (a full one took about 12 ms with the policy in it, a pause that every request
    in flight would see)."""
    gc.collect()
    gc.freeze()
    bound = listener.getsockname()
    click.echo(f"listening on {bound[0]}:{bound[1]}")
    sys.stdout.flush()
