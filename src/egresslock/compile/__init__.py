"""compile: one policy as the configuration of the engines that enforce it elsewhere.

On a laptop ``egresslock run`` is the enforcement; in containers, VMs and clusters the work
belongs to engines built for it. Each target turns the same validated policy into their
configuration, and every rule they cannot express goes through the egresslock proxy, which
enforces the whole policy (and is, in every target, the one destination always allowed):

============  ======================================  ========================================
target        engine                                  enforces by itself
============  ======================================  ========================================
nftables      the kernel's packet filter              only the proxy (+ host-only rules by
iptables                                              address with --allow-direct)
cilium        Cilium: eBPF, DNS proxy, Envoy          DNS names, FQDN egress, TLS SNI, HTTP
                                                      method/path/Host, private ranges
kubernetes    NetworkPolicy (any CNI) + the proxy     only the proxy and kube-dns
seccomp       the container runtime's seccomp         no raw/packet/vsock sockets, io_uring,
                                                      namespaces (the sandbox's filter)
compose       Docker internal network + the proxy     only the proxy
============  ======================================  ========================================

Each target is pure: policy and options in, :class:`~.common.CompileResult` out. Heavy or
optional imports stay inside functions so ``egresslock run`` never pays for this package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from egresslock.compile.common import (
    Artifact,
    CompileOptions,
    CompileResult,
    PolicySource,
    ProxyRoute,
    needs_proxy,
)
from egresslock.errors import InputError
from egresslock.policy.model import Policy

Compiler = Callable[[Policy, PolicySource, CompileOptions], CompileResult]


@dataclass(frozen=True, slots=True)
class Target:
    """A compile target: its name, a one-line description for --help, and the options it
    reads besides the policy."""

    name: str
    summary: str
    options: tuple[str, ...]


TARGETS: tuple[Target, ...] = (
    Target("nftables", "default-deny OUTPUT for a container or VM (nft -f); the proxy is the "
           "only destination", ("proxy", "proxy_uid", "allow_direct", "resolve")),
    Target("iptables", "the same as iptables-restore files, IPv4 and IPv6",
           ("proxy", "proxy_uid", "allow_direct", "resolve")),
    Target("cilium", "a CiliumNetworkPolicy: DNS names, FQDNs, SNI and HTTP rules in the "
           "cluster, the proxy for the rest",
           ("namespace", "agent_label", "cluster_domain", "proxy_only")),
    Target("kubernetes", "default-deny NetworkPolicy for agent pods, and the proxy as a "
           "Deployment with its Service", ("namespace", "agent_label", "image", "replicas",
                                           "cluster_domain", "with_cilium")),
    Target("seccomp", "the sandbox's syscall filter as an OCI/Docker seccomp profile", ()),
    Target("compose", "the agent on an internal network, the proxy as its only bridge",
           ("image", "agent_image")),
)
TARGET_NAMES = tuple(t.name for t in TARGETS)


def target(name: str) -> Target:
    """The target called ``name``, or InputError listing the valid ones."""
    for t in TARGETS:
        if t.name == name:
            return t
    raise InputError(f"unknown target {name!r}; valid targets: {', '.join(TARGET_NAMES)}")


def compile_target(name: str, policy: Policy, source: PolicySource,
                   options: CompileOptions) -> CompileResult:
    """Compile ``policy`` for the target called ``name``."""
    return _compiler(target(name).name)(policy, source, options)


def _compiler(name: str) -> Compiler:
    if name == "nftables":
        from egresslock.compile.nftables import compile_nftables
        return compile_nftables
    if name == "iptables":
        from egresslock.compile.iptables import compile_iptables
        return compile_iptables
    if name == "cilium":
        from egresslock.compile.cilium import compile_cilium
        return compile_cilium
    if name == "kubernetes":
        from egresslock.compile.kubernetes import compile_kubernetes
        return compile_kubernetes
    if name == "seccomp":
        from egresslock.compile.seccomp import compile_seccomp
        return compile_seccomp
    from egresslock.compile.compose import compile_compose
    return compile_compose


__all__ = [
    "TARGETS",
    "TARGET_NAMES",
    "Artifact",
    "CompileOptions",
    "CompileResult",
    "PolicySource",
    "ProxyRoute",
    "Target",
    "compile_target",
    "needs_proxy",
    "target",
]
