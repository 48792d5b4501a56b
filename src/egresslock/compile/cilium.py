"""``--target cilium``: one CiliumNetworkPolicy (cilium.io/v2) for the agent pods.

What Cilium enforces here, in the kernel (eBPF) and in its Envoy and DNS proxies:

- DNS only to kube-dns, through Cilium's DNS proxy, and only for the names the policy opens
  directly plus the egresslock proxy's Service name. Any other query is refused, so a prompt-
  injected agent cannot carry data out in DNS labels (the classic subdomain exfiltration).
- ``toFQDNs`` for each rule Cilium can express; the addresses those names resolved to through
  the DNS proxy are the only ones opened, so there is no rebinding window.
- ``serverNames`` (TLS SNI) for host-only rules on 443/8443; ``rules.http`` (method, path, Host)
  for plain-HTTP rules, with egresslock's globs as anchored regexes (:mod:`.httpregex`).
- egress to the egresslock proxy pods, for everything else (:func:`~.common.needs_proxy`).
- ``egressDeny`` for what Cilium can deny outright: the ranges ``network.block_private``
  refuses (cloud metadata at 169.254.169.254 among them) and deny rules on IP literals. Deny
  wins over every allow of every policy, so another policy added later cannot reopen them.
  Cilium's CIDR selectors never match pods or nodes of the cluster, so kube-dns and the proxy
  stay reachable when pod addresses fall in RFC 1918 space.

A deny rule on a *name* has no Cilium form (``egressDeny`` takes no ``toFQDNs``), so allow rules
that share a name and port with one go through the proxy instead (see ``needs_proxy``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from egresslock.compile.common import (
    PROXY_LABELS,
    PROXY_NAME,
    CompileOptions,
    CompileResult,
    PolicySource,
    ProxyRoute,
    allow_rules,
    blocked_ranges,
    header_lines,
    host_cidr,
    literal_address,
    needs_proxy,
    ports_text,
)
from egresslock.compile.httpregex import host_regex, path_regex
from egresslock.compile.render import object_file_name, yaml_artifact
from egresslock.policy.address import AddressPolicy
from egresslock.policy.compiled import compile_policy
from egresslock.policy.glob import HostPattern, parse_host_pattern
from egresslock.policy.loader import HTTPS_PORTS
from egresslock.policy.model import Policy, Rule

POLICY_NAME = "egresslock-agent"
KUBE_DNS = {"k8s:io.kubernetes.pod.namespace": "kube-system", "k8s:k8s-app": "kube-dns"}


@dataclass
class _Plan:
    """What the rules add up to, collected in one pass over them."""

    egress: list[dict[str, Any]] = field(default_factory=list)
    deny: list[dict[str, Any]] = field(default_factory=list)
    dns_names: set[str] = field(default_factory=set)
    dns_patterns: set[str] = field(default_factory=set)
    via_proxy: list[ProxyRoute] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def compile_cilium(policy: Policy, source: PolicySource,
                   options: CompileOptions) -> CompileResult:
    """The CiliumNetworkPolicy for ``policy``; see the module docstring."""
    plan = _Plan()
    checker = compile_policy(policy).addresses
    for rule in allow_rules(policy):
        _allow(rule, policy, options, checker, plan)
    _denies(policy, plan)
    document = _document(source, options, plan)
    warnings = []
    if policy.mode == "report":
        warnings.append("mode is 'report', but a CiliumNetworkPolicy enforces; to only watch, "
                        "turn on Cilium's policy audit mode for the agent endpoints")
    notes = ["", *_usage(options), *plan.notes, *warnings]
    header = header_lines(source, "cilium", plan.via_proxy, notes)
    artifact = yaml_artifact(object_file_name(document), header, document)
    return CompileResult("cilium", (artifact,), tuple(plan.via_proxy), tuple(warnings))


def _usage(options: CompileOptions) -> list[str]:
    return [
        "Needs Cilium with its L7 (Envoy) and DNS proxies, which are on by default. Deploy the "
        "proxy with: egresslock compile --target kubernetes --with-cilium "
        f"--namespace {options.namespace}; this policy replaces the agent NetworkPolicies that "
        "target would otherwise add (an L4-only allow of DNS next to this one would lift the "
        "DNS name limits).",
        "Give agent pods dnsConfig ndots: 1 (Kubernetes sets 5): Cilium refuses the search-list "
        "expansions of a name (api.example.com.NAMESPACE.svc...), and glibc stops at a refusal "
        "instead of trying the name itself.",
    ]


def _allow(rule: Rule, policy: Policy, options: CompileOptions, checker: AddressPolicy,
           plan: _Plan) -> None:
    host = parse_host_pattern(rule.host)
    reasons = needs_proxy(rule, policy)
    if options.proxy_only:
        reasons.append("--proxy-only sends every rule through the proxy")
    address = literal_address(host)
    if address is not None:
        verdict = checker.check(address)
        if not verdict.allowed:
            reasons.append(verdict.reason)
    http_rules: list[dict[str, Any]] | None = None
    if not reasons and rule.constrains_requests:
        http_rules, why = _http_rules(rule, host)
        if why:
            reasons.append(why)
    if reasons:
        plan.via_proxy.append(ProxyRoute(rule.id, tuple(reasons)))
        return
    entry: dict[str, Any] = {}
    if address is not None:
        entry["toCIDR"] = [host_cidr(address)]
    elif host.exact is not None:
        entry["toFQDNs"] = [{"matchName": host.exact}]
        plan.dns_names.add(host.exact)
    else:
        entry["toFQDNs"] = [{"matchPattern": f"*.{host.suffix}"}]
        plan.dns_patterns.add(f"*.{host.suffix}")
        plan.notes.append(f"rule {rule.id}: *.{host.suffix} covers one label in Cilium "
                          f"(a.{host.suffix}, not a.b.{host.suffix}); deeper names are "
                          "reachable through the proxy")
    entry["toPorts"] = _to_ports(rule, host, http_rules, plan)
    plan.egress.append(entry)


def _port_list(ports: list[int]) -> list[dict[str, str]]:
    return [{"port": str(p), "protocol": "TCP"} for p in sorted(set(ports))]


def _to_ports(rule: Rule, host: HostPattern, http_rules: list[dict[str, Any]] | None,
              plan: _Plan) -> list[dict[str, Any]]:
    if http_rules is not None:
        plan.notes.append(f"rule {rule.id}: Cilium's HTTP rules do not say whether a request "
                          "may switch protocols; Envoy may pass an Upgrade (WebSocket) on an "
                          "allowed path, which the proxy would refuse")
        return [{"ports": _port_list(rule.ports), "rules": {"http": http_rules}}]
    out: list[dict[str, Any]] = []
    tls = [p for p in rule.ports if p in HTTPS_PORTS]
    plain = [p for p in rule.ports if p == 80]
    other = [p for p in rule.ports if p not in HTTPS_PORTS and p != 80]
    if tls and literal_address(host) is None:
        name = host.exact if host.exact is not None else f"*.{host.suffix}"
        out.append({"ports": _port_list(tls), "serverNames": [name]})
    elif tls:
        other += tls  # an IP literal has no SNI to require
    if plain:
        # Host-only on port 80 still pins the Host header: one address serves many names.
        out.append({"ports": _port_list(plain),
                    "rules": {"http": [{"host": host_regex(host, plain)}]}})
    if other:
        out.append({"ports": _port_list(other)})
        plan.notes.append(f"rule {rule.id}: port {ports_text(other)} is opened at L4 only; "
                          "Cilium cannot tell which name a connection there is for")
    return out


def _http_rules(rule: Rule, host: HostPattern) -> tuple[list[dict[str, Any]], str | None]:
    """Method x path x Host entries for a plain-HTTP rule, or the reason it has no form here."""
    paths: list[str | None] = [None]
    if rule.paths is not None or rule.query == "deny":
        paths = []
        for pattern in rule.paths or ["/**"]:
            regex = path_regex(pattern, rule.query != "deny")
            if regex is None:
                return [], (f"path pattern {pattern!r} has a wildcard segment of dots and "
                            "stars, which could match a dot segment Cilium does not normalise")
            paths.append(regex)
    methods: list[str | None] = list(rule.methods) if rule.methods is not None else [None]
    host_match = host_regex(host, rule.ports)
    out: list[dict[str, Any]] = []
    for method in methods:
        for path in paths:
            item: dict[str, Any] = {}
            if method is not None:
                item["method"] = method
            if path is not None:
                item["path"] = path
            item["host"] = host_match
            out.append(item)
    return out, None


def _denies(policy: Policy, plan: _Plan) -> None:
    ranges = [r for v in (4, 6) for r in blocked_ranges(policy, v)]
    if ranges:
        cidrs: list[dict[str, Any]] = []
        for r in ranges:
            item: dict[str, Any] = {"cidr": r.cidr}
            if r.except_:
                item["except"] = list(r.except_)
            cidrs.append(item)
        plan.deny.append({"toCIDRSet": cidrs})
    for rule in policy.rules:
        if rule.action != "deny":
            continue
        address = literal_address(parse_host_pattern(rule.host))
        if address is not None and rule.methods is None and rule.paths is None:
            plan.deny.append({"toCIDR": [host_cidr(address)],
                              "toPorts": [{"ports": _port_list(rule.ports)}]})
            continue
        what = ("names" if address is None else "methods and paths")
        plan.notes.append(f"deny rule {rule.id}: Cilium cannot deny by {what}; nothing here "
                          "allows what it denies, and overlapping allow rules go through the "
                          "proxy, which enforces it")


def _document(source: PolicySource, options: CompileOptions, plan: _Plan) -> dict[str, Any]:
    proxy_fqdn = f"{PROXY_NAME}.{options.namespace}.svc.{options.cluster_domain}"
    dns: list[dict[str, str]] = [{"matchName": n} for n in sorted(plan.dns_names | {proxy_fqdn})]
    dns += [{"matchPattern": p} for p in sorted(plan.dns_patterns)]
    egress: list[dict[str, Any]] = [
        {"toEndpoints": [{"matchLabels": dict(KUBE_DNS)}],
         "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}], "rules": {"dns": dns}}]},
        {"toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": options.namespace,
                                          **PROXY_LABELS}}],
         "toPorts": [{"ports": [{"port": str(options.proxy_port), "protocol": "TCP"}]}]},
        *plan.egress,
    ]
    spec: dict[str, Any] = {
        "description": f"egresslock: egress of agent pods, compiled from {source.name}",
        "endpointSelector": {"matchLabels": dict(options.agent_labels)},
        "enableDefaultDeny": {"egress": True, "ingress": False},
        "egress": egress,
    }
    if plan.deny:
        spec["egressDeny"] = plan.deny
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {
            "name": POLICY_NAME,
            "namespace": options.namespace,
            "labels": {"app.kubernetes.io/managed-by": "egresslock"},
            "annotations": {"egresslock.dev/policy-sha256": source.sha256},
        },
        "spec": spec,
    }
