"""``via: courier``: a rule only the courier's own requests may use."""

from __future__ import annotations

from egresslock.policy import Layer, Request, Verdict, compile_policy, decide, parse_policy

POLICY = """\
version: 1
rules:
  - {id: issues, host: api.example.com, ports: [80], methods: [POST], paths: ["/issues"],
     via: courier}
  - {id: read, host: api.example.com, ports: [80], methods: [GET]}
  - {id: hooks, host: hooks.example.com, ports: [80], via: courier}
"""


def _decide(origin: str, host: str, method: str = "POST",
            layer: Layer = Layer.HTTP) -> tuple[Verdict, str, str]:
    policy = compile_policy(parse_policy(POLICY))
    d = decide(policy, Request(host, 80, "http", method, "/issues", None, layer=layer,
                               origin=origin))
    return d.verdict, d.rule_id, d.reason


def test_the_courier_may_use_it() -> None:
    assert _decide("courier", "api.example.com")[:2] == (Verdict.ALLOW, "issues")
    assert _decide("courier", "hooks.example.com")[:2] == (Verdict.ALLOW, "hooks")


def test_the_agent_may_not_and_is_told_why() -> None:
    verdict, rule, reason = _decide("agent", "api.example.com")
    assert verdict is Verdict.DENY
    assert rule == "read"
    assert reason == ("method POST not allowed by rule read (allows GET); rule issues accepts "
                      "only the courier's requests (via: courier); call its action instead")
    verdict, rule, reason = _decide("agent", "hooks.example.com")
    assert (verdict, rule) == (Verdict.DENY, "hooks")
    assert "accepts only the courier's requests" in reason


def test_the_agents_other_rules_still_apply() -> None:
    assert _decide("agent", "api.example.com", method="GET")[:2] == (Verdict.ALLOW, "read")


def test_a_name_only_the_courier_uses_is_not_answered_to_the_agent() -> None:
    assert _decide("agent", "hooks.example.com", layer=Layer.DNS)[0] is Verdict.DENY
    assert _decide("courier", "hooks.example.com", layer=Layer.DNS)[0] is Verdict.ALLOW
    assert _decide("agent", "api.example.com", layer=Layer.DNS)[0] is Verdict.ALLOW
