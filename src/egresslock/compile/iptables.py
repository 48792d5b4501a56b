"""``--target iptables``: the nftables ruleset's twin for machines managed with iptables.

iptables keeps IPv4 and IPv6 in separate tables, so the target writes two files, one for
``iptables-restore`` and one for ``ip6tables-restore``. Both are needed: IPv4 rules alone leave
every IPv6 route open. Each file is a whole ``filter`` table: ``iptables-restore`` replaces the
table it is given, INPUT and FORWARD included, which suits a container or a VM that exists to run
the agent. On a machine whose filter table holds other rules, use the nftables target, which
touches only a table of its own.

The drop path is a chain of its own (``EGRESSLOCK-DROP``) so that log, reset and drop are one
jump and ``iptables -L EGRESSLOCK-DROP -v`` counts every refused packet.
"""

from __future__ import annotations

from egresslock.compile.common import (
    DROP_LOG_PREFIX,
    REPORT_LOG_PREFIX,
    Artifact,
    CompileOptions,
    CompileResult,
    PolicySource,
    comment_block,
    header_lines,
)
from egresslock.compile.direct import NetfilterPlan, plan_netfilter
from egresslock.policy.model import Policy
from egresslock.policy.normalize import join_authority

FILE_V4 = "egresslock.rules.v4"
FILE_V6 = "egresslock.rules.v6"
DROP_CHAIN = "EGRESSLOCK-DROP"
# multiport takes at most 15 ports in one match (iptables-extensions(8)).
_MULTIPORT_MAX = 15


def compile_iptables(policy: Policy, source: PolicySource,
                     options: CompileOptions) -> CompileResult:
    """Two iptables-restore files (IPv4, IPv6) for ``policy``."""
    plan = plan_netfilter(policy, options, "iptables")
    artifacts = []
    for version, name, tool in ((4, FILE_V4, "iptables-restore"),
                                (6, FILE_V6, "ip6tables-restore")):
        header = header_lines(source, "iptables", plan.via_proxy,
                              _notes(plan, version, name, tool))
        text = comment_block(header) + table(plan, version)
        artifacts.append(Artifact(name, text, "iptables"))
    return CompileResult("iptables", tuple(artifacts), plan.via_proxy, plan.warnings)


def _notes(plan: NetfilterPlan, version: int, name: str, tool: str) -> list[str]:
    proxy = (f"TCP to the proxy at {join_authority(str(plan.proxy), plan.proxy_port)}"
             if plan.proxy.version == version else
             f"nothing else: the proxy ({plan.proxy}) is an IPv{plan.proxy.version} address")
    final = ("logged (prefix 'egresslock-report: ') and accepted: the policy is in report mode"
             if plan.report_only else
             "logged (prefix 'egresslock-drop: ', at most 10 lines a second) and dropped; TCP "
             "gets a reset so clients fail at once")
    return [
        "",
        f"IPv{version} OUTPUT is default-deny. Accepted: loopback, packets of connections "
        f"already accepted, {proxy}"
        + (f", everything user {plan.proxy_uid} sends" if plan.proxy_uid else "")
        + (", and the direct rules below" if plan.direct else "") + f". The rest is {final}.",
        "DNS is not allowed: clients send names to the proxy, which resolves them itself.",
        f"Apply: {tool} {name} (replaces the whole filter table: INPUT and FORWARD become "
        f"empty ACCEPT chains). Check: {tool} --test {name}.",
        *plan.notes,
    ]


def table(plan: NetfilterPlan, version: int) -> str:
    """One ``*filter`` table in iptables-save format."""
    loopback = "127.0.0.0/8" if version == 4 else "::1/128"
    lines = [
        "*filter",
        ":INPUT ACCEPT [0:0]",
        ":FORWARD ACCEPT [0:0]",
        ":OUTPUT DROP [0:0]",
        f":{DROP_CHAIN} - [0:0]",
        f'-A OUTPUT -d {loopback} -m comment --comment "loopback" -j ACCEPT',
        "-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
    ]
    if version == 6 and plan.uses_ipv6:
        # Without neighbour discovery no IPv6 packet reaches even the proxy (RFC 4861).
        for kind in ("neighbour-solicitation", "neighbour-advertisement", "router-solicitation"):
            lines.append(f"-A OUTPUT -p ipv6-icmp -m icmp6 --icmpv6-type {kind} -j ACCEPT")
    if plan.proxy.version == version:
        lines.append(f"-A OUTPUT -d {plan.proxy}/{plan.proxy.max_prefixlen} -p tcp -m tcp "
                     f'--dport {plan.proxy_port} -m comment --comment "the egresslock proxy" '
                     "-j ACCEPT")
    if plan.proxy_uid is not None:
        lines.append(f"-A OUTPUT -m owner --uid-owner {plan.proxy_uid} "
                     "-m comment --comment \"the proxy's own connections\" -j ACCEPT")
    for allow in plan.direct:
        for address in allow.addresses:
            if address.version != version:
                continue
            for start in range(0, len(allow.ports), _MULTIPORT_MAX):
                ports = ",".join(str(p) for p in allow.ports[start:start + _MULTIPORT_MAX])
                lines.append(f"-A OUTPUT -d {address}/{address.max_prefixlen} -p tcp -m "
                             f'multiport --dports {ports} -m comment --comment "rule '
                             f'{allow.rule_id} (direct)" -j ACCEPT')
    lines.append(f"-A OUTPUT -j {DROP_CHAIN}")
    limit = "-m limit --limit 10/sec --limit-burst 50"
    if plan.report_only:
        lines += [f'-A {DROP_CHAIN} {limit} -j LOG --log-prefix "{REPORT_LOG_PREFIX}" '
                  "--log-level 4",
                  f"-A {DROP_CHAIN} -j ACCEPT"]
    else:
        lines += [f'-A {DROP_CHAIN} {limit} -j LOG --log-prefix "{DROP_LOG_PREFIX}" '
                  "--log-level 4",
                  f"-A {DROP_CHAIN} -p tcp -j REJECT --reject-with tcp-reset",
                  f"-A {DROP_CHAIN} -j DROP"]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
