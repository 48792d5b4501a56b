"""What every proxy handler shares: the current policy, limits, resolver, audit and pool.

The policy is held behind one reference that a reload swaps whole, so each request decides
against one complete policy, never half of an old and half of a new one.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from egresslock.audit import AuditRecord
from egresslock.errors import PolicyError
from egresslock.policy import CompiledPolicy, Decision, Request, compile_policy, load_policy
from egresslock.policy.decide import DecisionMemo
from egresslock.proxy.conn import Conn
from egresslock.proxy.resolver import Resolver

if TYPE_CHECKING:
    from egresslock.content.engine import ContentPolicy
    from egresslock.flow.mark import SessionMark

    # Loaded only when used: cryptography and prometheus_client cost a wrapped tool call
    # (egresslock run) tens of milliseconds of start-up it mostly does not need.
    from egresslock.proxy.ca import LeafMinter
    from egresslock.proxy.lane import HeadMemo
    from egresslock.proxy.metrics import ProxyMetrics


@dataclass(frozen=True, slots=True)
class Limits:
    """Resource limits. Every one of them, when hit, is answered with a status and a log row."""

    max_connections: int = 4096
    max_head_bytes: int = 64 * 1024
    head_timeout: float = 10.0  # a whole request head must arrive within this (slowloris)
    idle_timeout: float = 60.0  # keep-alive connection with no request
    connect_timeout: float = 10.0
    response_timeout: float = 120.0  # upstream response head
    body_timeout: float = 120.0  # gap between body reads either way
    hello_timeout: float = 10.0  # TLS ClientHello after CONNECT
    tunnel_idle_timeout: float = 300.0
    pool_per_host: int = 32


def build_content(compiled: CompiledPolicy, key_dir: Path | None,
                  previous: ContentPolicy | None = None) -> ContentPolicy:
    """The content checks of ``compiled`` (secrets read from this process's environment and
    files); budgets already spent under ``previous`` carry over to rules that kept them."""
    from egresslock.content.engine import ContentPolicy, key_loader

    content = ContentPolicy(compiled.source, key=key_loader(key_dir))
    if previous is not None:
        content.adopt_meters(previous)
    return content


class PolicyHolder:
    """The current compiled policy, its content checks and the file it came from; ``reload``
    is all-or-nothing: both are built before either replaces the old one."""

    __slots__ = ("_memo", "content", "current", "key_dir", "loaded_at", "mtime", "path")

    def __init__(self, path: str | Path | None, compiled: CompiledPolicy,
                 key_dir: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.key_dir = key_dir
        self.current = compiled
        self._memo: DecisionMemo | None = None
        self.content = build_content(compiled, key_dir)
        self.loaded_at = time.time()
        self.mtime = self._stat()

    @classmethod
    def from_file(cls, path: str | Path, key_dir: Path | None = None) -> PolicyHolder:
        return cls(path, compile_policy(load_policy(path)), key_dir)

    def _stat(self) -> float:
        try:
            return self.path.stat().st_mtime if self.path else 0.0
        except OSError:
            return 0.0

    def changed(self) -> bool:
        return self.path is not None and self._stat() != self.mtime

    @property
    def decisions(self) -> DecisionMemo:
        """``decide`` under the current policy, with its answers remembered; whatever replaces
        :attr:`current` (a reload, a test) starts a new memo, so no answer outlives its policy."""
        memo = self._memo
        if memo is None or memo.policy is not self.current:
            memo = self._memo = DecisionMemo(self.current)
        return memo

    def reload(self) -> None:
        """Load the file again; on any error raise PolicyError and keep the old policy.

        The file's mtime is taken first either way, so a bad file is reported once, not at
        every poll of the watcher, and a later edit is seen."""
        if self.path is None:
            return
        self.mtime = self._stat()
        compiled = compile_policy(load_policy(self.path))
        content = build_content(compiled, self.key_dir, self.content)
        self.current, self.content = compiled, content
        self.loaded_at = time.time()


AuditSink = Callable[[AuditRecord], None]


def scrub(record: AuditRecord, content: ContentPolicy) -> AuditRecord:
    """``record`` with any host, SNI or path that holds a secret (or placeholder, or
    credential-shaped value) replaced by a redacted form that keeps where it was going."""
    if content.scanner.empty:
        return record
    extra = record.extra
    sni = extra.get("sni") if extra else None
    key = (record.host, record.path, sni if isinstance(sni, str) else None)
    seen = content.scrubbed
    found = seen.get(key)
    if found is None:
        found = _scrubbed(content, *key)
        if len(seen) >= 4096:  # a stream of distinct paths must not grow it without bound
            seen.clear()
        seen[key] = found
    if found == key:
        return record
    from dataclasses import replace

    host, path, new_sni = found
    if new_sni != key[2]:
        extra = {**(extra or {}), "sni": new_sni}
    return replace(record, host=host, path=path, extra=extra)


def _scrubbed(content: ContentPolicy, host: str | None, path: str | None, sni: str | None
              ) -> tuple[str | None, str | None, str | None]:
    """Host, path and SNI as an audit row may hold them (the same values when clean)."""
    from egresslock.content.engine import redact_name

    if host and content.scanner.scan_name(host):
        host = redact_name(host)
    if path and content.scanner.scan_text(path):
        path = "<redacted: it held a secret>"
    if sni and content.scanner.scan_name(sni):
        sni = redact_name(sni)
    return host, path, sni


def upstream_context(cafile: str | None) -> ssl.SSLContext:
    """Full verification of upstream servers: the system trust store, or ``cafile`` instead."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def inspected_hosts(policy: CompiledPolicy) -> list[str]:
    """Hosts (or wildcard suffixes) that ``inspect: true`` rules name: the intermediate CA's
    name constraints."""
    out = []
    for rule in policy.rules:
        if rule.inspect:
            out.append(rule.host.exact or rule.host.suffix or "")
    return [h for h in out if h]


@dataclass
class ProxyContext:
    """Shared state of one proxy instance."""

    policy: PolicyHolder
    audit: AuditSink
    resolver: Resolver
    limits: Limits = field(default_factory=Limits)
    metrics: ProxyMetrics | None = None
    pool: dict[tuple[str, int], list[Conn]] = field(default_factory=dict)
    active_connections: int = 0
    # TLS inspection: leaves for inspected hosts, and how upstream certificates are verified.
    minter: LeafMinter | None = None
    # Built on first use: loading the system trust store costs ~20 ms that a run with no
    # inspected host never needs.
    upstream_ca: str | None = None
    _upstream_tls: ssl.SSLContext | None = None
    # The session's high-water mark (policies with levels); shared with the MCP gateway.
    start_level: str | None = None
    _mark: SessionMark | None = None
    # Whose requests this context decides: "agent", or "courier" for the courier's worker.
    origin: str = "agent"
    # The fast lane's answers for heads it has seen (see egresslock.proxy.lane), per origin.
    head_memo: HeadMemo | None = None

    def for_origin(self, origin: str) -> ProxyContext:
        """This context for another origin's sockets: the same policy, log, pool and mark."""
        from dataclasses import replace

        self.mark  # noqa: B018  made now, so that both contexts hold the same one
        return replace(self, origin=origin, head_memo=None)

    @property
    def upstream_tls(self) -> ssl.SSLContext:
        if self._upstream_tls is None:
            self._upstream_tls = upstream_context(self.upstream_ca)
        return self._upstream_tls

    @property
    def content(self) -> ContentPolicy:
        return self.policy.content

    @property
    def mark(self) -> SessionMark | None:
        """The run's mark, made on first use when the policy has levels."""
        levels = self.policy.current.levels
        if not levels:
            return self._mark
        if self._mark is None:
            from egresslock.flow.mark import SessionMark

            self._mark = SessionMark(levels, self.start_level)
        elif self._mark.levels != levels:
            self._mark.update_levels(levels)  # a reload changed the order
        return self._mark

    def flow_refusal(self, rule_id: str, destination: str) -> str | None:
        """Why a write to ``destination`` under ``rule_id`` breaks no-write-down, or None."""
        rule = self.policy.current.by_id.get(rule_id)
        mark = self.mark
        if rule is None or rule.level is None or mark is None:
            return None
        return mark.refusal(rule.level, destination, f"rule {rule.id}")

    def flow_read(self, rule_id: str, source: str) -> None:
        """A response from ``rule_id`` reached the agent: raise the mark to its ``reads``."""
        rule = self.policy.current.by_id.get(rule_id)
        mark = self.mark
        if rule is None or rule.reads is None or mark is None:
            return
        step = mark.raise_to(rule.reads, source, rule.id)
        if step is not None:
            self.log(AuditRecord(
                layer="flow", verdict="allow", rule_id=rule.id,
                reason=f"session mark raised from {step.previous or mark.levels[0]} to "
                       f"{step.level} by {source}",
                extra={"mark": step.level, "previous": step.previous, "source": source}))

    def decide(self, request: Request) -> Decision:
        if self.origin != "agent":
            from dataclasses import replace

            request = replace(request, origin=self.origin)
        if self.metrics is None:
            return self.policy.decisions.decide(request)
        start = time.perf_counter()
        decision = self.policy.decisions.decide(request)
        self.metrics.decision_seconds.observe(time.perf_counter() - start)
        return decision

    def log(self, record: AuditRecord) -> None:
        """Write an audit row and count it; never raises into a handler.

        A secret must not reach the log either (it names secrets, never their values): a
        host, SNI or path that holds one is written redacted.
        """
        record = scrub(record, self.content)
        self.audit(record)
        if self.metrics is not None:
            from egresslock.proxy.metrics import reason_kind

            self.metrics.decisions.labels(record.layer, record.verdict, record.rule_id,
                                          reason_kind(record.reason)).inc()
            if record.bytes_out:
                self.metrics.bytes.labels("out").inc(record.bytes_out)
            if record.bytes_in:
                self.metrics.bytes.labels("in").inc(record.bytes_in)

    def pooled_any(self, addresses: Iterable[str], port: int) -> tuple[Conn, str] | None:
        """A pooled connection to the first of ``addresses`` that has one, and that address."""
        for address in addresses:
            conn = self.pooled(address, port)
            if conn is not None:
                return conn, address
        return None

    def pooled(self, address: str, port: int) -> Conn | None:
        conns = self.pool.get((address, port))
        while conns:
            conn = conns.pop()
            if not conn.closed and not conn.buf:
                return conn
            conn.close()
        return None

    def release(self, address: str, port: int, conn: Conn) -> None:
        conns = self.pool.setdefault((address, port), [])
        if len(conns) < self.limits.pool_per_host and not conn.buf:
            conns.append(conn)
        else:
            conn.close()

    def reload_policy(self) -> str | None:
        """Reload; returns an error message (the old policy stays) or None on success."""
        try:
            self.policy.reload()
        except PolicyError as exc:
            return str(exc)
        return None
