"""What the packet-filter targets (nftables, iptables) allow: the proxy, and with
``--allow-direct`` the addresses of host-only rules.

A packet filter sees addresses and ports, nothing else. It cannot tell which name a connection is
for (one CDN address serves thousands of names), nor read a method, path or body. So the default
is the seed's pattern: the proxy is the only destination, and it enforces the whole policy.
``--allow-direct`` opens, for each allow rule that states nothing but a host and ports, the
addresses that host resolved to when the policy was compiled; the caveat printed with it says
what that gives away.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from egresslock.compile.common import (
    CompileOptions,
    ProxyRoute,
    allow_rules,
    needs_proxy,
)
from egresslock.errors import InputError
from egresslock.policy.compiled import compile_policy
from egresslock.policy.glob import parse_host_pattern
from egresslock.policy.model import Policy, Rule
from egresslock.policy.normalize import IPAddress, join_authority, parse_ip_literal

CDN_CAVEAT = (
    "--allow-direct opens addresses, not names: whatever else is served from those addresses "
    "(CDNs and shared hosting serve many names from one address) is reachable too, with no "
    "check of the name, path or content, and nothing of it reaches the audit log. Addresses "
    "change; compile again to refresh them. Prefer the proxy."
)


@dataclass(frozen=True, slots=True)
class DirectAllow:
    """One rule opened by address: TCP to these addresses on these ports."""

    rule_id: str
    addresses: tuple[IPAddress, ...]
    ports: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class NetfilterPlan:
    """Everything the nftables and iptables renderers need, decided once."""

    proxy: IPAddress
    proxy_port: int
    proxy_uid: str | None
    direct: tuple[DirectAllow, ...]
    via_proxy: tuple[ProxyRoute, ...]
    notes: tuple[str, ...]
    warnings: tuple[str, ...]
    report_only: bool

    @property
    def uses_ipv6(self) -> bool:
        return self.proxy.version == 6 or any(
            a.version == 6 for d in self.direct for a in d.addresses)


def plan_netfilter(policy: Policy, options: CompileOptions, target: str) -> NetfilterPlan:
    """Decide what the packet filter allows. Pure: addresses come from ``options.resolved``."""
    proxy = parse_ip_literal(options.proxy_host)
    if proxy is None:
        raise InputError(f"--proxy host {options.proxy_host!r} must be an IP address for the "
                         f"{target} target: a packet filter matches addresses, not names")
    notes: list[str] = []
    warnings: list[str] = []
    direct: list[DirectAllow] = []
    via_proxy: list[ProxyRoute] = []
    checker = compile_policy(policy).addresses
    for rule in allow_rules(policy):
        if not options.allow_direct:
            via_proxy.append(ProxyRoute(rule.id, ("a packet filter allows only the proxy "
                                                  "(--allow-direct opens host-only rules)",)))
            continue
        reasons = _packet_filter_reasons(rule, policy)
        addresses: list[IPAddress] = []
        if not reasons:
            found = _addresses(rule, options)
            for address in found:
                verdict = checker.check(address)
                if verdict.allowed:
                    addresses.append(address)
                else:
                    notes.append(f"rule {rule.id}: left out {address}: {verdict.reason}")
            if not found:
                reasons = [f"no address known for {rule.host} (pass --resolve "
                           f"{rule.host}:ADDRESS)"]
            elif not addresses:
                reasons = [f"every address of {rule.host} is refused by network.block_private"]
        if reasons:
            via_proxy.append(ProxyRoute(rule.id, tuple(reasons)))
            continue
        ordered = tuple(sorted(set(addresses), key=lambda a: (a.version, int(a))))
        direct.append(DirectAllow(rule.id, ordered, tuple(sorted(set(rule.ports)))))
    if direct:
        warnings.append(CDN_CAVEAT)
    if proxy.is_loopback and options.proxy_uid is None:
        where = join_authority(str(proxy), options.proxy_port)
        warnings.append(f"the proxy at {where} is on this "
                        "machine, whose egress these rules block too: pass --proxy-uid with "
                        "the proxy's user so that its own connections can leave")
    if policy.mode == "report":
        warnings.append("mode is 'report': the rules log what they would drop, and accept it")
    return NetfilterPlan(proxy, options.proxy_port, options.proxy_uid, tuple(direct),
                         tuple(via_proxy), tuple(notes), tuple(warnings),
                         policy.mode == "report")


def _packet_filter_reasons(rule: Rule, policy: Policy) -> list[str]:
    reasons = needs_proxy(rule, policy)
    constrained = rule.constrained_keys()
    if constrained and not rule.inspect:
        reasons.append(f"{', '.join(constrained)}: a packet filter cannot see requests")
    host = parse_host_pattern(rule.host)
    if host.exact is None:
        reasons.append("a wildcard name has no addresses to open")
    return reasons


def _addresses(rule: Rule, options: CompileOptions) -> list[IPAddress]:
    host = parse_host_pattern(rule.host)
    assert host.exact is not None
    literal = parse_ip_literal(host.exact)
    if literal is not None:
        return [literal]
    out: list[IPAddress] = []
    for text in options.resolved.get(host.exact, ()):
        try:
            out.append(ipaddress.ip_address(text))
        except ValueError as exc:
            raise InputError(f"resolved address {text!r} of {host.exact} is not an IP "
                             "address") from exc
    return out
