"""A policy compiled for deciding: rules as plain slotted values, hosts in an index keyed by label.

Compiling happens once per load (or reload); deciding happens for every request, DNS query and
packet, so all the work that can move here does. The host index keeps exact names in one dict and
wildcard suffixes in another: finding the rules for ``a.b.example.com`` is one lookup for the name
and one per parent domain, whatever the number of rules. Candidates keep their order in the file.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote_plus

from egresslock.memo import Memo
from egresslock.policy.address import AddressPolicy
from egresslock.policy.glob import PathPattern, parse_host_pattern, parse_path_pattern
from egresslock.policy.model import Policy, QueryLimits, Rule


@dataclass(frozen=True, slots=True)
class CompiledQuery:
    """``query:`` as a check: deny every query, or allow only these names and lengths."""

    deny: bool
    params: frozenset[str] | None
    max_value_len: int | None

    def refuse(self, query: str, by: str) -> str | None:
        """Return why ``query`` is refused (``by`` names the rule), or None if it is allowed."""
        if not query:
            return None
        if self.deny:
            return f"query string not allowed {by}"
        if ";" in query:
            # Some servers split parameters on ';' as well as '&' (the HTML 4 recommendation,
            # Python's parse_qsl before 3.9.2): "page=1;token=x" would smuggle a parameter
            # past the list, so a raw ';' is refused as ambiguous. '%3B' is plain data.
            return f"query holds ';', which some servers read as a separator; refused {by}"
        for pair in query.split("&"):
            if not pair:
                continue
            raw_name, _, raw_value = pair.partition("=")
            try:
                name = unquote_plus(raw_name, errors="strict")
                value = unquote_plus(raw_value, errors="strict")
            except UnicodeDecodeError:
                return f"query parameter {raw_name!r} is not UTF-8 once decoded, refused {by}"
            if self.params is not None and name not in self.params:
                allowed = ", ".join(sorted(self.params)) or "none"
                return f"query parameter {name!r} not allowed {by} (allows {allowed})"
            if self.max_value_len is not None and len(value) > self.max_value_len:
                return (f"query parameter {name!r} has a {len(value)}-character value, over "
                        f"max_value_len {self.max_value_len} {by}")
        return None


_T = TypeVar("_T")


def _share(pool: dict[frozenset[Any], frozenset[Any]] | None,
           value: frozenset[_T]) -> frozenset[_T]:
    """``value``, or an equal set already in ``pool``."""
    if pool is None:
        return value
    found: frozenset[_T] = pool.setdefault(value, value)
    return found


class CompiledRule:
    """One rule, ready to match. Holds only immutable values."""

    __slots__ = (
        "action_deny", "constrains", "courier_only", "host", "id", "index", "inspect", "level",
        "max_body_bytes", "methods", "paths", "ports", "query", "reads", "upgrades",
    )

    def __init__(self, rule: Rule, index: int,
                 shared: dict[frozenset[Any], frozenset[Any]] | None = None) -> None:
        # ``shared`` lets the rules of one policy share equal sets (most rules list the same
        # ports): at 100,000 rules that is 200,000 fewer long-lived objects, which spares a full
        # pass of CPython's cyclic GC over the heap and was a third of the compile time.
        self.id = rule.id
        self.index = index
        self.host = parse_host_pattern(rule.host)
        self.action_deny = rule.action == "deny"
        self.ports = _share(shared, frozenset(rule.ports))
        self.methods = (
            _share(shared, frozenset(rule.methods)) if rule.methods is not None else None
        )
        self.paths: tuple[PathPattern, ...] | None = (
            tuple(parse_path_pattern(p) for p in rule.paths) if rule.paths is not None else None
        )
        q = rule.query
        self.query: CompiledQuery | None
        if q == "allow":
            self.query = None
        elif isinstance(q, QueryLimits):
            self.query = CompiledQuery(
                False, frozenset(q.params) if q.params is not None else None, q.max_value_len
            )
        else:
            self.query = CompiledQuery(True, None, None)
        self.max_body_bytes = rule.max_body_bytes
        self.inspect = rule.inspect
        self.upgrades = _share(shared, frozenset(rule.upgrades or ()))
        self.constrains = rule.constrains_requests
        self.reads = rule.reads
        self.level = rule.level
        self.courier_only = rule.via == "courier"

    def __repr__(self) -> str:
        return f"CompiledRule({self.id!r}, host={self.host.text!r})"


class HostIndex:
    """Rules by host: exact names in one dict, ``*.suffix`` patterns keyed by suffix."""

    __slots__ = ("_exact", "_wild")

    def __init__(self, rules: list[CompiledRule]) -> None:
        self._exact: dict[str, list[CompiledRule]] = {}
        self._wild: dict[str, list[CompiledRule]] = {}
        for rule in rules:
            if rule.host.exact is not None:
                self._exact.setdefault(rule.host.exact, []).append(rule)
            else:
                assert rule.host.suffix is not None
                self._wild.setdefault(rule.host.suffix, []).append(rule)

    def lookup(self, host: str) -> list[CompiledRule]:
        """Rules whose host pattern matches the normalised ``host``, in file order."""
        found = self._exact.get(host)
        groups = [found] if found else []
        if self._wild:
            start = host.find(".")
            while start >= 0:
                hit = self._wild.get(host[start + 1 :])
                if hit:
                    groups.append(hit)
                start = host.find(".", start + 1)
        if not groups:
            return []
        if len(groups) == 1:
            return groups[0]
        return sorted((r for g in groups for r in g), key=lambda r: r.index)


class CompiledPolicy:
    """Everything :func:`egresslock.policy.decide.decide` needs, built once from a Policy."""

    __slots__ = ("addresses", "by_id", "courier_only", "index", "levels", "report_only", "rules",
                 "source")

    def __init__(self, policy: Policy) -> None:
        self.source = policy
        self.report_only = policy.mode == "report"
        shared: dict[frozenset[Any], frozenset[Any]] = {}
        self.rules = tuple(CompiledRule(r, i, shared) for i, r in enumerate(policy.rules))
        self.index = HostIndex(list(self.rules))
        self.by_id = {r.id: r for r in self.rules}
        self.courier_only = any(r.courier_only for r in self.rules)
        self.levels: tuple[str, ...] = tuple(policy.levels or ())
        self.addresses = AddressPolicy(
            policy.network.block_private,
            (ipaddress.ip_network(c) for c in policy.network.allow_ranges),
        )


def compile_policy(policy: Policy) -> CompiledPolicy:
    """Compile a validated policy. Pure; raises nothing for a policy that validated."""
    # The policy is kept with its compilation, so its id cannot pass to another object while
    # the entry lasts.
    return _COMPILED.get(id(policy), lambda: (policy, CompiledPolicy(policy)))[1]


# Compiled policies by the (immutable) policy they came from: 10,000 rules take about 170 ms
# to compile. Kept only where remembering is on (the warm server; see egresslock.memo).
_COMPILED: Memo[int, tuple[Policy, CompiledPolicy]] = Memo()
