"""``decide``: the one function every enforcement point asks.

It is pure (no I/O, no clock, no randomness) and total: whatever :class:`Request` it is given, it
returns a :class:`Decision` and never raises; an unexpected failure inside it is a deny, so a bug
fails closed. The order of the checks is the policy's meaning:

1. Every address the request will dial must pass ``network`` (block_private, allow_ranges).
   Rules cannot override this: a rule names a host, and the host's DNS is not under the rule
   writer's control.
2. The rules whose host pattern matches are found through the host index. None: default deny.
3. A matching ``action: deny`` rule wins over any allow rule.
4. The first allow rule, in file order, that matches port, method, path, query and body size
   allows. If none does, the refusal of the first rule that matched the host explains the deny,
   so a user reads "method POST not allowed by rule github-read", not "no rule matched".

A tunnel (layer ``connect`` or ``tls`` before any HTTP) shows only host and port. A rule that
constrains methods, paths, queries or bodies can allow a tunnel only by inspecting it; the
decision then says ``inspect=True`` and every inner request is decided again at layer ``http``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from egresslock.policy.compiled import CompiledPolicy, CompiledRule
from egresslock.policy.normalize import IPAddress, parse_ip_literal


class Layer(enum.Enum):
    """Which enforcement point asks: each logs under its own name."""

    HTTP = "http"
    CONNECT = "connect"
    TLS = "tls"
    DNS = "dns"
    DROP = "drop"
    SANITIZE = "sanitize"
    COURIER = "courier"
    MCP = "mcp"


_TUNNEL_LAYERS = frozenset({Layer.CONNECT, Layer.TLS})


class Verdict(enum.Enum):
    """ALLOW and DENY as enforced; REPORT is a deny that report mode lets through and logs."""

    ALLOW = "allow"
    DENY = "deny"
    REPORT = "report"


DEFAULT_RULE = "default"


@dataclass(frozen=True, slots=True)
class Request:
    """What an enforcement point knows about one attempt to send something out.

    ``host`` is normalised (:func:`egresslock.policy.normalize.normalize_host`) and ``path``
    normalised too; None means the layer cannot see that part (a tunnel has no method). A
    ``body_size`` of None means not yet known: the proxy then enforces the decision's
    ``body_limit`` as the body streams.
    """

    host: str
    port: int
    scheme: str = "http"
    method: str | None = None
    path: str | None = None
    query: str | None = None
    header_names: tuple[str, ...] = ()
    body_size: int | None = None
    addresses: tuple[IPAddress, ...] = ()
    layer: Layer = Layer.HTTP
    upgrade: str | None = None  # the protocol an Upgrade request asks for, lower-case
    origin: str = "agent"  # "courier" for the courier's own requests (rules with via: courier)

    def with_addresses(self, addresses: tuple[IPAddress, ...]) -> Request:
        """This request with the addresses it will dial: ``dataclasses.replace`` without its
        cost (a third of deciding a remembered request)."""
        return Request(self.host, self.port, self.scheme, self.method, self.path, self.query,
                       self.header_names, self.body_size, addresses, self.layer, self.upgrade,
                       self.origin)


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict, the id of the rule that decided (or "default"), and a sentence saying why."""

    verdict: Verdict
    rule_id: str
    reason: str
    inspect: bool = False
    body_limit: int | None = None

    @property
    def allowed(self) -> bool:
        """True when the request may proceed (ALLOW, or REPORT in report mode)."""
        return self.verdict is not Verdict.DENY


def _deny(rule_id: str, reason: str) -> Decision:
    return Decision(Verdict.DENY, rule_id, reason)


def decide(policy: CompiledPolicy, request: Request) -> Decision:
    """Decide one request. Never raises; fails closed."""
    try:
        decision = _decide(policy, request)
    except Exception as exc:  # a bug in a rule must never let a request through
        decision = _deny(DEFAULT_RULE, f"internal error while deciding ({type(exc).__name__}: "
                                       f"{exc}); denied to fail closed")
    if policy.report_only and decision.verdict is Verdict.DENY:
        return replace(decision, verdict=Verdict.REPORT,
                       reason=f"report mode, enforce would deny: {decision.reason}")
    return decision


class DecisionMemo:
    """:func:`decide` for one compiled policy, remembering its answers.

    ``decide`` is pure, so an answer can be reused for any request that agrees with an earlier
    one on every field the decision reads. Which fields those are depends on the rules that
    name the host: method, path, query and body size are read only when one of them constrains
    that part, so a host whose rules are host-only is decided once per port, addresses, layer
    and upgrade, whatever the paths. Nothing else is remembered: content checks, budgets,
    the session's mark and credentials run per request outside ``decide``. The memo belongs to
    one compiled policy; a reload makes a new policy and so a new memo. Both tables are cleared
    when they reach ``max_entries``, which bounds the memory a stream of distinct requests
    can take.
    """

    __slots__ = ("_answers", "_reads", "max_entries", "policy")

    def __init__(self, policy: CompiledPolicy, max_entries: int = 4096) -> None:
        self.policy = policy
        self.max_entries = max_entries
        self._answers: dict[tuple[object, ...], Decision] = {}
        # host -> (method, path, query, body size): which of them the host's rules read.
        self._reads: dict[str, tuple[bool, bool, bool, bool]] = {}

    def decide(self, request: Request) -> Decision:
        host = request.host
        reads = self._reads.get(host)
        if reads is None:
            reads = _fields_read(self.policy.index.lookup(host))
            if len(self._reads) >= self.max_entries:
                self._reads.clear()
            self._reads[host] = reads
        key = (host, request.port, request.scheme, request.layer, request.addresses,
               request.upgrade, request.origin,
               request.method if reads[0] else None, request.path if reads[1] else None,
               request.query if reads[2] else None, request.body_size if reads[3] else None)
        found = self._answers.get(key)
        if found is None:
            found = decide(self.policy, request)
            if len(self._answers) >= self.max_entries:
                self._answers.clear()
            self._answers[key] = found
        return found


def _fields_read(candidates: list[CompiledRule]) -> tuple[bool, bool, bool, bool]:
    """Whether deciding among ``candidates`` reads a request's method, path, query, body size."""
    return (any(r.methods is not None for r in candidates),
            any(r.paths is not None for r in candidates),
            any(r.query is not None for r in candidates),
            any(r.max_body_bytes is not None for r in candidates))


def _decide(policy: CompiledPolicy, request: Request) -> Decision:
    host = request.host
    for address in _addresses(request):
        verdict = policy.addresses.check(address)
        if not verdict.allowed:
            return _deny(DEFAULT_RULE, f"{verdict.reason} (host {host})")

    candidates = policy.index.lookup(host)
    if candidates and policy.courier_only and request.origin != "courier":
        courier = [r for r in candidates if r.courier_only]
        if courier:
            why = (f"rule {courier[0].id} accepts only the courier's requests (via: "
                   "courier); call its action instead")
            mine = [r for r in candidates if not r.courier_only]
            if not mine:
                return _deny(courier[0].id, why)
            decision = _decide_rules(mine, host, request)
            if decision.verdict is Verdict.DENY:
                return replace(decision, reason=f"{decision.reason}; {why}")
            return decision
    if not candidates:
        return _deny(DEFAULT_RULE, f"no rule allows host {host}")
    return _decide_rules(candidates, host, request)


def _decide_rules(candidates: list[CompiledRule], host: str, request: Request) -> Decision:
    """The decision among the rules whose host pattern matched (addresses already passed)."""
    if request.layer is Layer.DNS:
        return _decide_name(candidates, host)

    port = request.port
    tunnel = request.layer in _TUNNEL_LAYERS
    inspect = False
    for rule in candidates:
        if not rule.action_deny or port not in rule.ports:
            continue
        if tunnel and rule.constrains:
            if not rule.inspect:
                return _deny(rule.id, f"rule {rule.id} denies some requests to {host} but "
                                      "cannot see inside a tunnel without inspect: true")
            inspect = True
        elif _deny_matches(rule, request):
            return _deny(rule.id, f"denied by rule {rule.id}")

    best: tuple[int, Decision] | None = None
    for rule in candidates:
        if rule.action_deny:
            continue
        if port not in rule.ports:
            if best is None:
                ports = ", ".join(str(p) for p in sorted(rule.ports))
                best = (_STAGE_PORT, _deny(rule.id, f"port {port} not allowed by rule "
                                                    f"{rule.id} (allows {ports})"))
            continue
        if tunnel:
            if rule.constrains and not rule.inspect:
                if best is None or best[0] < _STAGE_METHOD:
                    best = (_STAGE_METHOD, _deny(rule.id, f"rule {rule.id} constrains requests "
                                                          f"to {host} but cannot see inside a "
                                                          "tunnel without inspect: true"))
                continue
            inspect = inspect or rule.inspect or any(
                r.inspect for r in candidates if port in r.ports
            )
            return Decision(Verdict.ALLOW, rule.id, f"allowed by rule {rule.id}", inspect)
        found = _refusal_stage(rule, request)
        if found is None:
            return Decision(Verdict.ALLOW, rule.id, f"allowed by rule {rule.id}",
                            body_limit=rule.max_body_bytes)
        if best is None or found[0] > best[0]:
            best = (found[0], _deny(rule.id, found[1]))
    if best is not None:
        return best[1]
    return _deny(candidates[0].id, f"no allow rule for host {host}")


def _addresses(request: Request) -> tuple[IPAddress, ...]:
    host = request.host
    if host and (":" in host or host[-1].isdigit()):
        literal = parse_ip_literal(host)
        if literal is not None and literal not in request.addresses:
            return (literal, *request.addresses)
    return request.addresses


# How far a request got into a rule before it was refused. When several allow rules name the
# host, the deny is explained by the rule that matched furthest: a POST refused by a read rule
# (method) and by a write rule (body size) is explained by the write rule.
_STAGE_PORT, _STAGE_METHOD, _STAGE_PATH, _STAGE_QUERY, _STAGE_UPGRADE, _STAGE_BODY = range(6)


def _deny_matches(rule: CompiledRule, request: Request) -> bool:
    """A deny rule matches by method and path (the loader refuses query and body caps on deny
    rules), whatever else the request carries: an upgrade or a body never escapes a deny."""
    if rule.methods is not None and request.method is not None and (
        request.method not in rule.methods
    ):
        return False
    return not (rule.paths is not None and request.path is not None and not any(
        p.matches(request.path) for p in rule.paths))


def _refusal_stage(rule: CompiledRule, request: Request) -> tuple[int, str] | None:
    by = f"by rule {rule.id}"
    # A rule that constrains methods or paths allows only what it could check: a request whose
    # enforcement point left them out is refused, not waved through.
    if rule.methods is not None and request.method is None:
        return _STAGE_PORT, (f"rule {rule.id} constrains methods, and layer "
                             f"{request.layer.value} gave none")
    if rule.paths is not None and request.path is None:
        return _STAGE_PORT, (f"rule {rule.id} constrains paths, and layer "
                             f"{request.layer.value} gave none")
    if rule.methods is not None and request.method is not None and (
        request.method not in rule.methods
    ):
        allowed = ", ".join(sorted(rule.methods))
        return _STAGE_METHOD, f"method {request.method} not allowed {by} (allows {allowed})"
    if rule.paths is not None and request.path is not None and not any(
        p.matches(request.path) for p in rule.paths
    ):
        return _STAGE_PATH, f"path {request.path} not allowed {by}"
    if rule.query is not None and request.query:
        why = rule.query.refuse(request.query, by)
        if why is not None:
            return _STAGE_QUERY, why
    if request.upgrade is not None and request.upgrade not in rule.upgrades:
        allowed = ", ".join(sorted(rule.upgrades)) or "none"
        return _STAGE_UPGRADE, (f"upgrade to {request.upgrade} not allowed {by} "
                                f"(allows {allowed})")
    if rule.max_body_bytes is not None and request.body_size is not None and (
        request.body_size > rule.max_body_bytes
    ):
        return _STAGE_BODY, (f"body of {request.body_size} bytes over max_body_bytes "
                             f"{rule.max_body_bytes} {by}")
    return None


def _decide_name(candidates: list[CompiledRule], host: str) -> Decision:
    """A DNS answer for ``host`` is allowed when some allow rule could use it on some port."""
    blocked: set[int] = set()
    for rule in candidates:
        if rule.action_deny and not rule.constrains:
            blocked |= rule.ports
    for rule in candidates:
        if not rule.action_deny and not rule.ports <= blocked:
            return Decision(Verdict.ALLOW, rule.id, f"name allowed by rule {rule.id}")
    denier = next(r for r in candidates if r.action_deny and not r.constrains) if blocked else None
    if denier is not None:
        return _deny(denier.id, f"name {host} denied by rule {denier.id}")
    return _deny(candidates[0].id, f"no allow rule for name {host}")
