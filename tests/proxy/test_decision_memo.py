"""The proxy's memo of decisions: it must answer exactly what ``decide`` answers, for every
request, and forget everything when the policy changes.

The memo keys a request by the fields its host's rules read, so the risk is a field left out of
the key while some rule reads it: two requests would then share an answer that only one of them
deserves. The property test asks a policy whose rules read every field, host by host, and
checks each answer of a warm memo against ``decide`` itself.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from egresslock.policy import Layer, Request, compile_policy, decide, parse_policy
from egresslock.policy.decide import DecisionMemo
from egresslock.policy.normalize import IPAddress
from egresslock.proxy.context import Limits, PolicyHolder, ProxyContext
from egresslock.proxy.resolver import Resolver

POLICY = """version: 1
network: {allow_ranges: ["10.0.0.0/8"]}
rules:
  - {id: plain, host: plain.test, ports: [80, 443]}
  - {id: reads, host: api.test, ports: [80], methods: [GET]}
  - {id: writes, host: api.test, ports: [80], methods: [POST], paths: ["/up/**"],
     max_body_bytes: 100}
  - {id: search, host: find.test, ports: [80], query: {params: [q], max_value_len: 5}}
  - {id: no-admin, host: "*.mixed.test", action: deny, ports: [80], paths: ["/admin/**"]}
  - {id: mixed, host: "*.mixed.test", ports: [80]}
  - {id: ws, host: ws.test, ports: [80], upgrades: [websocket]}
  - {id: hook, host: hook.test, ports: [80], via: courier}
"""

HOSTS = ["plain.test", "api.test", "find.test", "a.mixed.test", "ws.test", "hook.test",
         "other.test", "10.1.2.3", "127.0.0.1"]
ADDRESSES: list[tuple[IPAddress, ...]] = [
    (), (ipaddress.ip_address("10.0.0.1"),), (ipaddress.ip_address("127.0.0.1"),),
    (ipaddress.ip_address("169.254.169.254"),)]
LAYERS = [Layer.HTTP, Layer.CONNECT, Layer.TLS, Layer.DNS]
# Each field's values: enough that, for some host, each value gets a different answer.
VALUES: dict[str, list[object]] = {
    "host": list(HOSTS),
    "port": [80, 443, 8080],
    "scheme": ["http", "https"],
    "method": [None, "GET", "POST", "DELETE"],
    "path": [None, "/", "/up/x", "/admin/users", "/other"],
    "query": [None, "", "q=a", "q=toolong", "x=1", "q=a;b"],
    "header_names": [(), ("x-a",)],
    "body_size": [None, 0, 50, 500],
    "addresses": list(ADDRESSES),
    "layer": list(LAYERS),
    "upgrade": [None, "websocket", "h2c"],
    "origin": ["agent", "courier"],
}


def replaced(request: Request, name: str, value: object) -> Request:
    """``request`` with its field ``name`` set to ``value``. The field is picked at run time, so
    the value's type cannot be checked here: the VALUES of each field hold that field's type."""
    changes: dict[str, Any] = {name: value}
    return dataclasses.replace(request, **changes)


def variations() -> list[list[Request]]:
    """For each base request (every host, layer and allowed address), the requests that differ
    from it in exactly one field: a field the key leaves out while a rule reads it makes two of
    them share an answer."""
    groups = []
    for host, layer, addresses in itertools.product(HOSTS, LAYERS, ADDRESSES[:2]):
        base = Request(host, 80, "http", "POST", "/up/x", "q=a", (), 50, addresses, layer)
        groups.append([base] + [replaced(base, name, value)
                                for name, values in VALUES.items() for value in values])
    return groups


def test_memo_answers_exactly_what_decide_answers() -> None:
    assert set(VALUES) == {f.name for f in dataclasses.fields(Request)}  # a new field: add it
    policy = compile_policy(parse_policy(POLICY))
    for group in variations():
        memo = DecisionMemo(policy)
        for request in group + group:  # the second pass is answered from the memo
            assert memo.decide(request) == decide(policy, request), request


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(VALUES)), st.integers(0, 8)), max_size=60))
def test_memo_that_fills_and_clears_stays_exact(picks: list[tuple[str, int]]) -> None:
    """A tiny memo, cleared again and again, over requests that wander field by field."""
    policy = compile_policy(parse_policy(POLICY))
    memo = DecisionMemo(policy, max_entries=4)
    request = Request("api.test", 80, method="GET", path="/up/x", body_size=50)
    for name, index in picks:
        values = VALUES[name]
        request = replaced(request, name, values[index % len(values)])
        assert memo.decide(request) == decide(policy, request), request


def test_fields_a_host_rule_does_not_read_share_one_answer() -> None:
    policy = compile_policy(parse_policy(POLICY))
    memo = DecisionMemo(policy)
    first = memo.decide(Request("plain.test", 80, method="GET", path="/a", query="x=1"))
    again = memo.decide(Request("plain.test", 80, method="PUT", path="/b", body_size=9))
    assert first is again  # one entry: host-only rules read neither method nor path
    get = memo.decide(Request("api.test", 80, method="GET", path="/"))
    post = memo.decide(Request("api.test", 80, method="POST", path="/", body_size=5))
    assert get.allowed
    assert not post.allowed


def test_a_reload_starts_a_new_memo(tmp_path: Path) -> None:
    file = tmp_path / "policy.yaml"
    file.write_text("version: 1\nrules:\n  - {id: app, host: app.test, ports: [443]}\n")
    holder = PolicyHolder.from_file(file)
    ctx = ProxyContext(holder, lambda _row: None, Resolver(), Limits())
    request = Request("app.test", 443, "https", layer=Layer.CONNECT)
    assert ctx.decide(request).allowed
    file.write_text("version: 1\nrules:\n  - {id: app, host: app.test, ports: [443],"
                    " action: deny}\n")
    holder.reload()
    after = ctx.decide(request)
    assert not after.allowed
    assert after.rule_id == "app"


def test_replacing_the_compiled_policy_directly_starts_a_new_memo() -> None:
    allow = compile_policy(parse_policy(
        "version: 1\nrules:\n  - {id: app, host: app.test, ports: [443]}\n"))
    holder = PolicyHolder(None, allow)
    request = Request("app.test", 443, "https", layer=Layer.CONNECT)
    assert holder.decisions.decide(request).allowed
    holder.current = compile_policy(parse_policy("version: 1\nrules: []\n"))
    assert not holder.decisions.decide(request).allowed


def test_with_addresses_keeps_every_other_field() -> None:
    request = Request("h.test", 8080, "https", "POST", "/p", "q=1", ("x-a",), 7,
                      (ipaddress.ip_address("10.0.0.1"),), Layer.TLS, "websocket", "courier")
    for field in dataclasses.fields(Request):  # every field differs from its default
        assert getattr(request, field.name) != field.default, field.name
    addresses = (ipaddress.ip_address("10.0.0.2"),)
    assert request.with_addresses(addresses) == dataclasses.replace(request, addresses=addresses)
