"""Prometheus metrics of the proxy: decisions, bytes, tunnels, latencies.

Each proxy owns its registry (no process-global state), served on ``--metrics HOST:PORT``.
Reasons are reduced to a small set of kinds for the ``reason`` label, since a label holding
hosts or paths would grow without bound.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_REASON_KINDS = (
    ("allowed", "allowed"), ("name allowed", "allowed"), ("method", "method"),
    ("path", "path"), ("query", "query"), ("body", "body"), ("port", "port"),
    ("address", "address"), ("no rule", "no-rule"), ("no allow rule", "no-rule"),
    ("denied by rule", "deny-rule"), ("report mode", "report"), ("refused", "malformed"),
    ("malformed", "malformed"), ("sni", "sni"), ("upgrade", "upgrade"),
)


def reason_kind(reason: str) -> str:
    """A bounded label for a free-text reason."""
    low = reason.lower()
    for prefix, kind in _REASON_KINDS:
        if low.startswith(prefix):
            return kind
    return "other"


class ProxyMetrics:
    """The proxy's instruments, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter("egresslock_decisions", "Decisions by layer, verdict, rule "
                                 "and reason kind", ["layer", "verdict", "rule", "reason"],
                                 registry=r)
        self.bytes = Counter("egresslock_bytes", "Bytes relayed", ["direction"], registry=r)
        self.tunnels = Gauge("egresslock_active_tunnels", "Open CONNECT tunnels", registry=r)
        self.connections = Gauge("egresslock_active_connections", "Open client connections",
                                 registry=r)
        self.decision_seconds = Histogram(
            "egresslock_decision_seconds", "Time to decide", registry=r,
            buckets=(1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 1e-3, 1e-2))
        self.dial_seconds = Histogram(
            "egresslock_dial_seconds", "Time to resolve and connect upstream", registry=r,
            buckets=(1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1, 5))

    def serve(self, host: str, port: int) -> None:
        """Serve /metrics from a daemon thread."""
        start_http_server(port, addr=host, registry=self.registry)
