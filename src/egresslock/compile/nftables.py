"""``--target nftables``: default-deny OUTPUT for a container or VM, in nft's own language.

The ruleset lives in a table of its own (``inet egresslock``, both IP versions), which the file
first creates, then deletes and defines again: ``nft -f`` runs the file as one transaction, so a
reload replaces the rules atomically and never touches the tables of Docker, firewalld or
anything else. Only the output hook is used, as in the sandbox's own ruleset
(:mod:`egresslock.sandbox.nft`): what this machine sends is the whole question.

Loopback is matched by destination (127.0.0.0/8, ::1), not by the ``lo`` interface: a packet to
one of the machine's other addresses also leaves through ``lo``, and a service listening there
is no business of the agent's. Dropped TCP gets a reset, so a client fails at once instead of
retrying SYNs (each of which would be one more log line); log lines are rate-limited so a
flood cannot fill the kernel log, and the counters count every drop.
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

TABLE = "egresslock"
FILE_NAME = "egresslock.nft"
LOG_RATE = "limit rate 10/second burst 50 packets"


def compile_nftables(policy: Policy, source: PolicySource,
                     options: CompileOptions) -> CompileResult:
    """The nftables ruleset for ``policy``; see the module docstring for its shape."""
    plan = plan_netfilter(policy, options, "nftables")
    header = header_lines(source, "nftables", plan.via_proxy, _notes(plan))
    text = "#!/usr/sbin/nft -f\n" + comment_block(header) + "\n" + ruleset(plan)
    return CompileResult("nftables", (Artifact(FILE_NAME, text, "nft"),), plan.via_proxy,
                         plan.warnings)


def _notes(plan: NetfilterPlan) -> list[str]:
    final = ("logged (prefix 'egresslock-report: ') and accepted: the policy is in report mode"
             if plan.report_only else
             "logged (prefix 'egresslock-drop: ', at most 10 lines a second) and dropped; TCP "
             "gets a reset so clients fail at once")
    return [
        "",
        "OUTPUT is default-deny. Accepted: loopback, packets of connections already accepted, "
        f"TCP to the proxy at {join_authority(str(plan.proxy), plan.proxy_port)}"
        + (f", everything user {plan.proxy_uid} sends" if plan.proxy_uid else "")
        + (", and the direct rules below" if plan.direct else "") + f". The rest is {final}.",
        "DNS is not allowed: clients send names to the proxy, which resolves them itself.",
        "On a VM that renews a DHCP lease, allow UDP 68->67 as well, or the lease expires.",
        f"Apply: nft -f {FILE_NAME} (replaces only the table inet {TABLE}). "
        f"Check: nft -c -f {FILE_NAME}. Remove: nft delete table inet {TABLE}.",
        *plan.notes,
    ]


def ruleset(plan: NetfilterPlan) -> str:
    """The table itself. nft 1.0.6 wants each closing brace on a line of its own."""
    family = "ip" if plan.proxy.version == 4 else "ip6"
    rules = [
        'ip daddr 127.0.0.0/8 accept comment "loopback"',
        'ip6 daddr ::1 accept comment "loopback"',
        'ct state established,related accept comment "packets of connections already accepted"',
    ]
    if plan.uses_ipv6:
        # Without neighbour discovery no IPv6 packet reaches even the proxy (RFC 4861).
        rules.append("icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }"
                     ' accept comment "IPv6 neighbour discovery"')
    rules.append(f"{family} daddr {plan.proxy} tcp dport {plan.proxy_port} accept "
                 'comment "the egresslock proxy"')
    if plan.proxy_uid is not None:
        rules.append(f'meta skuid {plan.proxy_uid} accept comment "the proxy\'s own connections"')
    for allow in plan.direct:
        ports = ", ".join(str(p) for p in allow.ports)
        for version, fam in ((4, "ip"), (6, "ip6")):
            addresses = ", ".join(str(a) for a in allow.addresses if a.version == version)
            if addresses:
                rules.append(f"{fam} daddr {{ {addresses} }} tcp dport {{ {ports} }} accept "
                             f'comment "rule {allow.rule_id} (direct)"')
    if plan.report_only:
        rules += [f'{LOG_RATE} log prefix "{REPORT_LOG_PREFIX}" level warn',
                  'counter accept comment "report mode: log, do not drop"']
    else:
        rules += [f'{LOG_RATE} log prefix "{DROP_LOG_PREFIX}" level warn',
                  "meta l4proto tcp counter reject with tcp reset",
                  "counter drop"]
    body = "".join(f"\t\t{rule}\n" for rule in rules)
    return (
        f"table inet {TABLE}\n"
        f"delete table inet {TABLE}\n\n"
        f"table inet {TABLE} {{\n"
        "\tchain output {\n"
        "\t\ttype filter hook output priority 0; policy drop;\n"
        f"{body}"
        "\t}\n"
        "}\n"
    )
