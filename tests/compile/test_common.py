"""The shared decisions of every target: which rules need the proxy, host overlap, the refused
ranges, the agent's environment, the options' checks. Tables keyed by a sentence."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace
from typing import Any, cast

import pytest

from egresslock.compile.common import (
    BLOCKED_IPV4,
    BLOCKED_IPV6,
    CompileOptions,
    blocked_ranges,
    hosts_overlap,
    needs_proxy,
    proxy_environment,
    trust_environment,
)
from egresslock.errors import InputError
from egresslock.policy import parse_policy
from egresslock.policy.address import AddressClass, classify_address
from egresslock.policy.glob import parse_host_pattern

# Content checks off, so a rule shows only the reasons of its own keys.
QUIET = ("content: {detectors: {aws: false, github: false, slack: false, private_key: false, "
         "jwt: false, connection_string: false}}\n")


def policy(rules: str, extra: str = QUIET) -> Any:
    return parse_policy(f"version: 1\n{extra}rules:\n{rules}")


def reasons(rule: str, extra: str = QUIET) -> list[str]:
    loaded = policy(rule, extra)
    return needs_proxy(loaded.rules[0], loaded)


NEEDS_PROXY = [
    ("a host-only TLS rule to an exact name needs nothing",
     "  - {id: a, host: a.example, ports: [443]}", QUIET, []),
    ("inspection is the proxy's",
     "  - {id: a, host: a.example, ports: [443], methods: [GET], inspect: true, "
     "dynamic_links: allow}", QUIET, ["inspect: true"]),
    ("query parameter limits",
     "  - {id: a, host: a.example, ports: [80], query: {params: [q]}, dynamic_links: allow}",
     QUIET, ["query limits"]),
    ("a body cap", "  - {id: a, host: a.example, ports: [80], max_body_bytes: 0, "
     "dynamic_links: allow}", QUIET, ["max_body_bytes"]),
    ("upgrades", "  - {id: a, host: a.example, ports: [80], upgrades: [websocket], "
     "dynamic_links: allow}", QUIET, ["upgrades"]),
    ("header transforms", "  - {id: a, host: a.example, ports: [80], headers: {strip: [X-A]},"
     " dynamic_links: allow}", QUIET, ["headers"]),
    ("keyed hashes of query values", "  - {id: a, host: a.example, ports: [80], "
     "hash_query: [q], dynamic_links: allow}", QUIET, ["hash_query"]),
    ("a rule budget", "  - {id: a, host: a.example, ports: [443], budget: {requests: 5}}",
     QUIET, ["budget"]),
    ("a policy budget", "  - {id: a, host: a.example, ports: [443]}",
     QUIET + "budget: {requests: 5}\n", ["policy budget"]),
    ("dynamic links on plain HTTP (the default)", "  - {id: a, host: a.example, ports: [80]}",
     QUIET, ["dynamic_links"]),
    ("dynamic links in a wildcard's labels", "  - {id: a, host: '*.a.example', ports: [443]}",
     QUIET, ["dynamic_links"]),
    ("the credential detectors (on by default) on plain HTTP",
     "  - {id: a, host: a.example, ports: [80], dynamic_links: allow}", "",
     ["content.detectors"]),
    ("the detectors see nothing of an opaque tunnel to an exact name",
     "  - {id: a, host: a.example, ports: [443]}", "", []),
    ("secrets on plain HTTP", "  - {id: a, host: a.example, ports: [80], dynamic_links: allow}",
     QUIET + "secrets: [{name: s, value: hunter2hunter2}]\n", ["secrets (s)"]),
    ("a credential for the rule's host",
     "  - {id: a, host: a.b.example, ports: [443]}",
     QUIET + "credentials: [{name: TOKEN, value: x, hosts: ['*.b.example'], "
     "headers: [Authorization]}]\n", ["credential TOKEN"]),
    ("a credential for another host is no reason",
     "  - {id: a, host: a.example, ports: [443]}",
     QUIET + "credentials: [{name: TOKEN, value: x, hosts: [b.example], "
     "headers: [Authorization]}]\n", []),
    ("a deny rule on a name the wildcard covers",
     "  - {id: a, host: '*.a.example', ports: [443], dynamic_links: allow}\n"
     "  - {id: d, host: x.a.example, ports: [443], action: deny}", QUIET, ["deny rule d"]),
    ("a deny rule on another port is no reason",
     "  - {id: a, host: a.example, ports: [443]}\n"
     "  - {id: d, host: a.example, ports: [80], action: deny}", QUIET, []),
]


@pytest.mark.parametrize(("case", "rule", "extra", "expected"), NEEDS_PROXY,
                         ids=[c[0] for c in NEEDS_PROXY])
def test_needs_proxy(case: str, rule: str, extra: str, expected: list[str]) -> None:
    found = reasons(rule, extra)
    assert len(found) == len(expected), f"{case}: {found}"
    for reason, start in zip(found, expected, strict=True):
        assert reason.startswith(start), f"{case}: {found}"


def test_needs_proxy_reads_keys_the_model_does_not_have_yet() -> None:
    loaded = policy("  - {id: a, host: a.example, ports: [443]}")
    rule = loaded.rules[0]
    future = SimpleNamespace(**{k: getattr(rule, k) for k in type(rule).model_fields},
                             labels=["secret"], constrained_keys=rule.constrained_keys)
    assert any(r.startswith("labels:") for r in needs_proxy(cast(Any, future), loaded))


def test_deny_rules_get_no_reasons() -> None:
    loaded = policy("  - {id: d, host: a.example, action: deny}")
    assert needs_proxy(loaded.rules[0], loaded) == []


OVERLAP = [
    ("a.example", "a.example", True),
    ("a.example", "b.example", False),
    ("*.example.com", "a.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "*.a.example.com", True),
    ("*.a.example.com", "*.b.example.com", False),
    ("*.example.com", "a.example.com.evil.test", False),
]


@pytest.mark.parametrize(("a", "b", "expected"), OVERLAP)
def test_host_patterns_overlap_when_some_name_matches_both(a: str, b: str,
                                                           expected: bool) -> None:
    pa, pb = parse_host_pattern(a), parse_host_pattern(b)
    assert hosts_overlap(pa, pb) is expected
    assert hosts_overlap(pb, pa) is expected


def test_every_refused_range_is_refused_by_the_address_classifier() -> None:
    for cidr in (*BLOCKED_IPV4, *BLOCKED_IPV6):
        net = ipaddress.ip_network(cidr)
        for address in (net.network_address, net.broadcast_address):
            assert classify_address(address) is not AddressClass.GLOBAL, (cidr, address)


def test_every_range_the_classifier_refuses_is_listed() -> None:
    from egresslock.policy import address

    listed = [ipaddress.ip_network(c) for c in (*BLOCKED_IPV4, *BLOCKED_IPV6)]
    for table in (address._IPV4_TABLE, address._IPV6_TABLE):
        for _cls, networks in table:
            for net in networks:
                assert any(net.version == n.version and net.subnet_of(n)  # type: ignore[arg-type]
                           for n in listed), f"{net} is refused but not listed"


def test_allow_ranges_are_carved_out_of_the_refused_ranges() -> None:
    loaded = parse_policy("version: 1\nnetwork: {allow_ranges: ['10.20.0.0/16', "
                          "'172.16.0.0/12']}\n")
    ranges = {r.cidr: r.except_ for r in blocked_ranges(loaded, 4)}
    assert ranges["10.0.0.0/8"] == ("10.20.0.0/16",)
    assert "172.16.0.0/12" not in ranges
    assert blocked_ranges(parse_policy("version: 1\nnetwork: {block_private: false}\n"), 4) == []


def test_trust_environment_matches_egresslock_env() -> None:
    from egresslock.proxy import ca

    fake = SimpleNamespace(bundle_path="/b/bundle.pem", cert_path="/b/ca.pem")
    assert trust_environment("/b/bundle.pem", "/b/ca.pem") == ca.trust_environment(
        cast(Any, fake))


def test_proxy_environment_sets_both_cases_and_clears_no_proxy() -> None:
    env = proxy_environment("http://p:3128")
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://p:3128"
    assert env["NO_PROXY"] == env["no_proxy"] == ""


BAD_OPTIONS = [
    ({"namespace": "Agents"}, "namespace 'Agents'"),
    ({"agent_labels": {"bad key!": "x"}}, "agent label bad key!=x"),
    ({"agent_labels": {}}, "at least one"),
    ({"image": "has space"}, "image 'has space'"),
    ({"replicas": 0}, "replicas 0"),
    ({"proxy_port": 70000}, "70000"),
    ({"proxy_uid": "root; rm"}, "proxy user"),
    ({"cluster_domain": "-bad"}, "cluster domain"),
]


@pytest.mark.parametrize(("options", "named"), BAD_OPTIONS)
def test_options_name_the_bad_value(options: dict[str, Any], named: str) -> None:
    with pytest.raises(InputError, match=named.replace("(", r"\(")):
        CompileOptions(**options)
