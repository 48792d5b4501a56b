"""What every compile target shares: the source's identity, the options, the output values, the
one answer to "which rules need the proxy", and the file header that says so.

A target is a pure function from a validated :class:`~egresslock.policy.model.Policy` (plus the
text it came from, for the header's hash) to :class:`Artifact` values. Nothing here reads files,
resolves names or talks to a cluster: the command line does that and passes the results in, so
the same policy and options always give byte-identical output, which the golden tests rely on.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from egresslock import __version__
from egresslock.errors import InputError
from egresslock.policy.glob import HostPattern, parse_host_pattern
from egresslock.policy.loader import HTTPS_PORTS
from egresslock.policy.model import Policy, QueryLimits, Rule
from egresslock.policy.normalize import parse_ip_literal

DROP_LOG_PREFIX = "egresslock-drop: "
REPORT_LOG_PREFIX = "egresslock-report: "
DEFAULT_PROXY_PORT = 3128
DEFAULT_METRICS_PORT = 9090
DEFAULT_AGENT_LABELS: Mapping[str, str] = MappingProxyType({"egresslock.dev/agent": "true"})
PROXY_NAME = "egresslock-proxy"
PROXY_LABELS: Mapping[str, str] = MappingProxyType({
    "app.kubernetes.io/name": PROXY_NAME,
    "app.kubernetes.io/part-of": "egresslock",
})

# A DNS-1123 label: what Kubernetes accepts as a namespace or object name.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Label keys are an optional DNS-subdomain prefix and a name; values are at most 63 characters.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_LABEL_NAME}$")
_LABEL_VALUE = re.compile(rf"^({_LABEL_NAME})?$")
_IMAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$")
_USER = re.compile(r"^([0-9]{1,10}|[a-z_][a-z0-9_-]{0,31})$")


@dataclass(frozen=True, slots=True)
class PolicySource:
    """Where a policy came from, for the header of every generated file."""

    name: str
    text: str
    sha256: str

    @classmethod
    def from_text(cls, name: str, text: str) -> PolicySource:
        return cls(name, text, hashlib.sha256(text.encode("utf-8")).hexdigest())


@dataclass(frozen=True, slots=True)
class CompileOptions:
    """Every option of every target; each target reads the ones that concern it.

    ``resolved`` maps a normalised host name to the addresses ``--allow-direct`` may open; the
    command line fills it from ``--resolve`` pins and, for names without a pin, from DNS, so a
    target never resolves anything itself.
    """

    proxy_host: str = "127.0.0.1"
    proxy_port: int = DEFAULT_PROXY_PORT
    proxy_uid: str | None = None
    allow_direct: bool = False
    resolved: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    namespace: str = "default"
    agent_labels: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_AGENT_LABELS))
    image: str = f"egresslock:{__version__}"
    agent_image: str | None = None
    replicas: int = 2
    cluster_domain: str = "cluster.local"
    proxy_only: bool = False
    with_cilium: bool = False
    metrics_port: int = DEFAULT_METRICS_PORT

    def __post_init__(self) -> None:
        if not 1 <= self.proxy_port <= 65535:
            raise InputError(f"proxy port {self.proxy_port} must be 1-65535")
        if not _DNS_LABEL.match(self.namespace):
            raise InputError(f"namespace {self.namespace!r} must be a DNS label: lower-case "
                             "letters, digits and '-', like 'agents'")
        if not _DNS_NAME.match(self.cluster_domain):
            raise InputError(f"cluster domain {self.cluster_domain!r} must be a DNS name, "
                             "like 'cluster.local'")
        if not self.agent_labels:
            raise InputError("agent labels must name at least one KEY=VALUE, like "
                             "egresslock.dev/agent=true")
        for key, value in self.agent_labels.items():
            if not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
                raise InputError(f"agent label {key}={value} is not a valid Kubernetes label; "
                                 "write KEY=VALUE like app=agent or example.com/role=agent")
        for name, image in (("image", self.image), ("agent image", self.agent_image)):
            if image is not None and not _IMAGE.match(image):
                raise InputError(f"{name} {image!r} is not a container image reference, "
                                 "like egresslock:0.1.0 or registry.example/agent:1.2")
        if not 1 <= self.replicas <= 100:
            raise InputError(f"replicas {self.replicas} must be 1-100")
        if self.proxy_uid is not None and not _USER.match(self.proxy_uid):
            raise InputError(f"proxy user {self.proxy_uid!r} must be a numeric uid or a user "
                             "name like 'egresslock'")


@dataclass(frozen=True, slots=True)
class Artifact:
    """One generated file: its name under ``--out`` and its whole text."""

    name: str
    text: str
    kind: Literal["yaml", "json", "nft", "iptables"]


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    """An allow rule this target cannot express, and why: it is reachable only through the
    proxy, which enforces the whole policy."""

    rule_id: str
    reasons: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CompileResult:
    """What a target produced, and what it could not express."""

    target: str
    artifacts: tuple[Artifact, ...]
    via_proxy: tuple[ProxyRoute, ...]
    warnings: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """The machine-readable account printed by ``compile --json``."""
        return {
            "target": self.target,
            "files": [a.name for a in self.artifacts],
            "via_proxy": [{"rule": r.rule_id, "reasons": list(r.reasons)}
                          for r in self.via_proxy],
            "warnings": list(self.warnings),
        }


# --- which rules need the proxy ----------------------------------------------------------------

# Rule keys whose meaning lives only in the proxy: it rewrites or counts what a request carries.
# They are read with getattr, so a policy model without one of them yet costs nothing, and a rule
# that sets one is routed through the proxy the day the key exists.
PROXY_ONLY_RULE_KEYS: Mapping[str, str] = MappingProxyType({
    "headers": "only the proxy removes request headers",
    "hash_query": "only the proxy hashes query values before they leave",
    "hash_json": "only the proxy hashes JSON fields before they leave",
    "redact_json": "only the proxy redacts JSON fields before they leave",
    "budget": "only the proxy counts requests and bytes against a budget",
    "labels": "only the proxy tracks flow labels (no write down)",
})


def is_set(value: object) -> bool:
    """A key counts as set when it holds something: not None, False, empty or 'allow'."""
    return value not in (None, False, "", "allow") and value not in ([], {})


def needs_proxy(rule: Rule, policy: Policy) -> list[str]:
    """Why ``rule`` can only be enforced by the egresslock proxy, in words; empty when an
    engine that sees names, ports, TLS SNI, methods and paths (Cilium with its DNS and L7
    proxies) enforces it just as well.

    Content checks (``secrets``, the built-in ``content.detectors``, ``dynamic_links``) count
    only where the proxy sees content: plain HTTP, an inspected tunnel, or the labels of a
    wildcard name. Of an opaque TLS tunnel to an exact name the proxy sees that name and
    nothing else, so for such a rule Cilium's name and SNI checks are the same decision.
    Targets with less sight add their own reasons (a packet filter cannot see a method).
    Deny rules are not allowances and get no reasons; see :func:`overlapping_denies`.
    """
    if rule.action == "deny":
        return []
    reasons: list[str] = []
    if rule.inspect:
        reasons.append("inspect: true: methods, paths, queries and bodies of HTTPS are checked "
                       "after the proxy decrypts them")
    if isinstance(rule.query, QueryLimits):
        reasons.append("query limits: only the proxy parses query parameters")
    if rule.max_body_bytes is not None:
        reasons.append("max_body_bytes: only the proxy counts request body bytes")
    if rule.upgrades:
        reasons.append("upgrades: only the proxy limits which protocols a request may switch to")
    for key, why in PROXY_ONLY_RULE_KEYS.items():
        if is_set(getattr(rule, key, None)):
            reasons.append(f"{key}: {why}")
    host = parse_host_pattern(rule.host)
    for credential in policy.credentials:
        if any(hosts_overlap(host, parse_host_pattern(h)) for h in credential.hosts):
            reasons.append(f"credential {credential.name}: the proxy puts the real value on "
                           "the wire for this host")
    for key in ("budget", "labels"):
        if is_set(getattr(policy, key, None)):
            reasons.append(f"policy {key}: {PROXY_ONLY_RULE_KEYS[key]}")
    if proxy_sees_content(rule):
        reasons.extend(_content_reasons(rule, policy))
    for deny in overlapping_denies(rule, policy):
        reasons.append(f"deny rule {deny.id} covers some of the same names and ports, and a "
                       "name cannot be subtracted from an allowance outside the proxy")
    return reasons


def proxy_sees_content(rule: Rule) -> bool:
    """True when the proxy can read what a rule's traffic carries, in the request or in the
    name: a port other than 443/8443 (plain HTTP), inspection, or a wildcard host."""
    return (rule.inspect or any(p not in HTTPS_PORTS for p in rule.ports)
            or parse_host_pattern(rule.host).exact is None)


def _content_reasons(rule: Rule, policy: Policy) -> list[str]:
    reasons: list[str] = []
    if policy.secrets:
        names = ", ".join(s.name for s in policy.secrets)
        reasons.append(f"secrets ({names}): only the proxy scans what leaves for them")
    detectors = enabled_detectors(policy)
    if detectors:
        reasons.append(f"content.detectors ({', '.join(detectors)}): only the proxy scans "
                       "requests for credentials")
    if is_set(getattr(rule, "dynamic_links", None)):
        reasons.append("dynamic_links (on unless set to allow): only the proxy refuses URLs "
                       "that carry data")
    return reasons


def enabled_detectors(policy: Policy) -> list[str]:
    """The built-in credential detectors the policy leaves on (all, unless switched off)."""
    detectors = getattr(getattr(policy, "content", None), "detectors", None)
    if detectors is None:
        return []
    return [name for name, on in detectors.model_dump().items() if on is True]


def uses_keyed_hashes(policy: Policy) -> bool:
    """True when some rule hashes values: the proxy then needs its key (``transform.key``)."""
    return any(is_set(getattr(r, k, None)) for r in policy.rules
               for k in ("hash_query", "hash_json"))


def hosts_overlap(a: HostPattern, b: HostPattern) -> bool:
    """True when some host name matches both patterns."""
    if a.exact is not None and b.exact is not None:
        return a.exact == b.exact
    if a.exact is not None:
        return b.matches(a.exact)
    if b.exact is not None:
        return a.matches(b.exact)
    assert a.suffix is not None
    assert b.suffix is not None
    return (a.suffix == b.suffix or a.suffix.endswith("." + b.suffix)
            or b.suffix.endswith("." + a.suffix))


def overlapping_denies(rule: Rule, policy: Policy) -> list[Rule]:
    """The deny rules that share a name and a port with allow ``rule``."""
    host = parse_host_pattern(rule.host)
    return [d for d in policy.rules
            if d.action == "deny" and set(d.ports) & set(rule.ports)
            and hosts_overlap(host, parse_host_pattern(d.host))]


def allow_rules(policy: Policy) -> list[Rule]:
    return [r for r in policy.rules if r.action == "allow"]


def all_via_proxy(policy: Policy, why: str) -> tuple[ProxyRoute, ...]:
    """Every allow rule, through the proxy for one target-wide reason."""
    return tuple(ProxyRoute(r.id, (why,)) for r in allow_rules(policy))


# --- addresses ---------------------------------------------------------------------------------

# The ranges network.block_private refuses, as CIDRs an address-level engine can hold. They mirror
# egresslock.policy.address (a test checks that every one classifies as non-global there, and
# that every range there is covered here). IPv6 outside 2000::/3 is unassigned and refused, so
# its complement is listed as three prefixes.
BLOCKED_IPV4 = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "255.255.255.255/32",
)
BLOCKED_IPV6 = (
    "::/3", "4000::/2", "8000::/1",
    "2001::/23", "2001:2::/48", "2001:db8::/32", "2002::/16", "3fff::/20",
)


@dataclass(frozen=True, slots=True)
class BlockedRange:
    """A range block_private refuses, minus the policy's allow_ranges inside it."""

    cidr: str
    except_: tuple[str, ...]


def blocked_ranges(policy: Policy, version: int) -> list[BlockedRange]:
    """The refused ranges of one IP version, with allow_ranges carved out.

    An allow range inside a refused one becomes an exception; a refused range inside an allow
    range disappears. CIDRs nest or are disjoint, so nothing else can happen.
    """
    if not policy.network.block_private:
        return []
    allowed = [ipaddress.ip_network(c) for c in policy.network.allow_ranges]
    allowed = [a for a in allowed if a.version == version]
    out: list[BlockedRange] = []
    for cidr in BLOCKED_IPV4 if version == 4 else BLOCKED_IPV6:
        net = ipaddress.ip_network(cidr)
        if any(net.subnet_of(a) for a in allowed):  # type: ignore[arg-type]
            continue
        inside = sorted(str(a) for a in allowed if a != net and a.subnet_of(net))  # type: ignore[arg-type]
        out.append(BlockedRange(cidr, tuple(inside)))
    return out


def literal_address(pattern: HostPattern) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address of a rule whose host is an IP literal, else None."""
    return parse_ip_literal(pattern.exact) if pattern.exact is not None else None


def host_cidr(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return f"{address}/{address.max_prefixlen}"


# --- environment of the agent ------------------------------------------------------------------

def proxy_environment(url: str) -> dict[str, str]:
    """The proxy variables, both cases, as ``egresslock env --proxy URL`` prints them.

    NO_PROXY is set empty on purpose: an inherited NO_PROXY would send some hosts around the
    proxy, where (in a cluster) only the kernel-level allowances apply.
    """
    out: dict[str, str] = {}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        out[name] = out[name.lower()] = url
    out["NO_PROXY"] = out["no_proxy"] = ""
    return out


def trust_environment(bundle: str, cert: str) -> dict[str, str]:
    """The CA variables of ``egresslock env`` for a bundle and certificate at these paths.

    Mirrors :func:`egresslock.proxy.ca.trust_environment` (a test keeps them equal) without
    importing the proxy and its cryptography.
    """
    return {
        "SSL_CERT_FILE": bundle, "REQUESTS_CA_BUNDLE": bundle, "CURL_CA_BUNDLE": bundle,
        "NODE_EXTRA_CA_CERTS": cert, "PIP_CERT": bundle, "GIT_SSL_CAINFO": bundle,
    }


def inspects(policy: Policy) -> bool:
    """True when some rule decrypts: then the proxy needs the CA and clients must trust it."""
    return any(r.inspect for r in policy.rules)


# --- the header --------------------------------------------------------------------------------

def header_lines(source: PolicySource, target: str, via_proxy: Iterable[ProxyRoute],
                 notes: Iterable[str] = ()) -> list[str]:
    """The comment every generated file starts with: origin, hash, and what this target leaves
    to the proxy. Returned without comment markers; each format adds its own."""
    lines = [
        f"Generated by egresslock {__version__} (egresslock compile --target {target}) "
        f"from {source.name}",
        f"policy sha256: {source.sha256}",
        "Do not edit: change the policy and compile again.",
    ]
    routes = list(via_proxy)
    if routes:
        lines.append("Rules this target cannot express; they are reachable only through the "
                     "egresslock proxy:")
        for route in routes:
            lines.append(f"  {route.rule_id}: {'; '.join(route.reasons)}")
    else:
        lines.append("Every allow rule of the policy is expressed here; the proxy still "
                     "enforces the whole policy for traffic sent to it.")
    for note in notes:
        lines.append(note)
    return lines


def comment_block(lines: Iterable[str], marker: str = "#") -> str:
    return "".join(f"{marker} {line}".rstrip() + "\n" for line in lines)


def ports_text(ports: Iterable[int]) -> str:
    return ", ".join(str(p) for p in sorted(set(ports)))
