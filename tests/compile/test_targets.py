"""Each target's choices on small policies: what it opens, what it leaves to the proxy, and the
notes it writes. The golden files show whole outputs; these name one behaviour each."""

from __future__ import annotations

from typing import Any

import pytest

from egresslock.errors import InputError
from tests.compile.helpers import compile_text, validate_cilium, yaml_documents

QUIET = ("content: {detectors: {aws: false, github: false, slack: false, private_key: false, "
         "jwt: false, connection_string: false}}\n")


def cilium(rules: str, extra: str = QUIET, **options: Any) -> tuple[dict[str, Any], str]:
    result = compile_text(f"version: 1\n{extra}rules:\n{rules}", "cilium", **options)
    document = yaml_documents(result)[0]
    validate_cilium(document)
    return document["spec"], result.artifacts[0].text


def direct(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The egress entries after the DNS and proxy ones."""
    return list(spec["egress"][2:])


def test_cilium_host_only_tls_rule_pins_the_sni() -> None:
    spec, _ = cilium("  - {id: a, host: api.example.com, ports: [443, 8443]}")
    assert direct(spec) == [{"toFQDNs": [{"matchName": "api.example.com"}], "toPorts": [
        {"ports": [{"port": "443", "protocol": "TCP"}, {"port": "8443", "protocol": "TCP"}],
         "serverNames": ["api.example.com"]}]}]
    dns = spec["egress"][0]["toPorts"][0]["rules"]["dns"]
    assert {"matchName": "api.example.com"} in dns


def test_cilium_host_only_plain_http_rule_still_pins_the_host_header() -> None:
    spec, _ = cilium("  - {id: a, host: a.example.com, ports: [80, 443], dynamic_links: allow}")
    ports = direct(spec)[0]["toPorts"]
    assert ports[0]["serverNames"] == ["a.example.com"]
    assert ports[1]["rules"] == {"http": [{"host": r"^a\.example\.com(:80)?$"}]}


def test_cilium_wildcard_uses_match_pattern_and_says_it_is_one_label() -> None:
    spec, text = cilium("  - {id: w, host: '*.cdn.example', ports: [443], "
                        "dynamic_links: allow}")
    assert direct(spec)[0]["toFQDNs"] == [{"matchPattern": "*.cdn.example"}]
    assert direct(spec)[0]["toPorts"][0]["serverNames"] == ["*.cdn.example"]
    assert "rule w: *.cdn.example covers one label in Cilium" in text


def test_cilium_ip_literal_rule_uses_a_cidr_and_no_sni() -> None:
    spec, _ = cilium("  - {id: ip, host: 198.51.100.20, ports: [443]}",
                     QUIET + "network: {allow_ranges: ['198.51.100.0/24']}\n")
    assert direct(spec) == [{"toCIDR": ["198.51.100.20/32"],
                             "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]


def test_cilium_leaves_an_address_block_private_refuses_to_the_proxy() -> None:
    spec, text = cilium("  - {id: meta, host: 169.254.169.254, ports: [80], "
                        "dynamic_links: allow}")
    assert direct(spec) == []
    assert "meta: address 169.254.169.254 (link-local) is blocked" in text


def test_cilium_plain_http_rule_is_method_by_path_with_the_host() -> None:
    spec, _ = cilium("  - {id: r, host: a.example, ports: [8080], methods: [GET, PUT], "
                     "paths: ['/x', '/y/*'], query: deny, dynamic_links: allow}")
    http = direct(spec)[0]["toPorts"][0]["rules"]["http"]
    assert [(h["method"], h["path"][:4]) for h in http] == [
        ("GET", "^/x$"), ("GET", "^/y/"), ("PUT", "^/x$"), ("PUT", "^/y/")]
    assert {h["host"] for h in http} == {r"^a\.example(:8080)?$"}


def test_cilium_query_deny_without_paths_still_refuses_queries() -> None:
    spec, _ = cilium("  - {id: r, host: a.example, ports: [80], query: deny, "
                     "dynamic_links: allow}")
    (rule,) = direct(spec)[0]["toPorts"][0]["rules"]["http"]
    assert rule["path"].startswith("^(/")
    assert not rule["path"].endswith(r"(\?.*)?$")


def test_cilium_other_ports_are_l4_with_a_note() -> None:
    spec, text = cilium("  - {id: ssh, host: git.example, ports: [22], dynamic_links: allow}")
    assert direct(spec)[0]["toPorts"] == [{"ports": [{"port": "22", "protocol": "TCP"}]}]
    assert "rule ssh: port 22 is opened at L4 only" in text


def test_cilium_deny_rules_on_addresses_become_egress_deny() -> None:
    spec, text = cilium("  - {id: d, host: 203.0.113.7, ports: [25], action: deny}\n"
                        "  - {id: n, host: gist.example, action: deny}")
    assert {"toCIDR": ["203.0.113.7/32"],
            "toPorts": [{"ports": [{"port": "25", "protocol": "TCP"}]}]} in spec["egressDeny"]
    assert "deny rule n: Cilium cannot deny by names" in text


def test_cilium_without_block_private_has_no_range_deny() -> None:
    spec, _ = cilium("  - {id: a, host: a.example, ports: [443]}",
                     QUIET + "network: {block_private: false}\n")
    assert "egressDeny" not in spec


def test_cilium_proxy_only_opens_nothing_but_dns_and_the_proxy() -> None:
    spec, text = cilium("  - {id: a, host: a.example, ports: [443]}", proxy_only=True)
    assert direct(spec) == []
    assert spec["egress"][0]["toPorts"][0]["rules"]["dns"] == [
        {"matchName": "egresslock-proxy.default.svc.cluster.local"}]
    assert "--proxy-only sends every rule through the proxy" in text


def test_cilium_report_mode_warns() -> None:
    result = compile_text("version: 1\nmode: report\n", "cilium")
    assert any("policy audit mode" in w for w in result.warnings)


def kubernetes(policy: str, **options: Any) -> dict[str, dict[str, Any]]:
    result = compile_text(policy, "kubernetes", **options)
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml_documents(result)}


def test_kubernetes_without_a_secret_runs_the_proxy_as_non_root() -> None:
    objects = kubernetes("version: 1\nrules: [{id: a, host: a.example, ports: [443]}]\n")
    pod = objects["Deployment/egresslock-proxy"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert all(v["name"] != "ca" for v in pod["volumes"])
    assert "--ca-dir" not in pod["containers"][0]["args"]
    env = objects["ConfigMap/egresslock-agent-env"]["data"]
    assert "SSL_CERT_FILE" not in env


def test_kubernetes_keyed_hashes_put_the_key_in_the_secret() -> None:
    objects = kubernetes("version: 1\nrules: [{id: a, host: a.example, ports: [80], "
                         "hash_query: [user]}]\n")
    pod = objects["Deployment/egresslock-proxy"]["spec"]["template"]["spec"]
    secret = next(v["secret"] for v in pod["volumes"] if v["name"] == "ca")
    assert secret["items"] == [{"key": "transform.key", "path": "transform.key"}]
    assert pod["securityContext"]["runAsUser"] == 0
    assert pod["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_kubernetes_with_cilium_and_one_replica_leave_objects_out() -> None:
    objects = kubernetes("version: 1\n", with_cilium=True, replicas=1)
    assert sorted(objects) == ["ConfigMap/egresslock-agent-env", "ConfigMap/egresslock-policy",
                               "Deployment/egresslock-proxy", "NetworkPolicy/egresslock-proxy",
                               "Service/egresslock-proxy"]


def test_kubernetes_proxy_may_reach_allow_ranges_on_the_rule_ports_only() -> None:
    objects = kubernetes("version: 1\nnetwork: {allow_ranges: ['10.20.0.0/16']}\n"
                         "rules: [{id: a, host: a.example, ports: [8080]}]\n")
    egress = objects["NetworkPolicy/egresslock-proxy"]["spec"]["egress"][1]
    assert egress["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert {"ipBlock": {"cidr": "10.20.0.0/16"}} in egress["to"]
    assert "10.0.0.0/8" in egress["to"][0]["ipBlock"]["except"]


def test_compose_without_inspection_mounts_no_ca() -> None:
    result = compile_text("version: 1\n", "compose", agent_image="registry.example/agent:1")
    document = yaml_documents(result)[0]
    agent = document["services"]["agent"]
    assert agent["image"] == "registry.example/agent:1"
    assert "volumes" not in agent
    assert "SSL_CERT_FILE" not in agent["environment"]
    assert "cap_add" not in document["services"]["proxy"]
    assert document["networks"]["agent"] == {"internal": True}


def test_packet_filter_needs_an_address_for_the_proxy() -> None:
    with pytest.raises(InputError, match="must be an IP address for the iptables target"):
        compile_text("version: 1\n", "iptables", proxy_host="proxy.internal")


def test_packet_filter_with_an_ipv6_proxy_allows_neighbour_discovery() -> None:
    result = compile_text("version: 1\n", "nftables", proxy_host="fd00::2", proxy_port=3128)
    text = result.artifacts[0].text
    assert "ip6 daddr fd00::2 tcp dport 3128 accept" in text
    assert "nd-neighbor-solicit" in text
    v6 = compile_text("version: 1\n", "iptables", proxy_host="fd00::2").artifacts[1].text
    assert "-A OUTPUT -d fd00::2/128 -p tcp -m tcp --dport 3128" in v6
