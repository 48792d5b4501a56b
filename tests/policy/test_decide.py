"""``decide``: decision tables over one policy, each row a request and the decision it must get.

The policy below is written as a user would write it; every row names the behaviour it pins
down. Rows that are attacks (DNS rebinding, IP literal spellings, suffix tricks) live in tests
named after their class.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace

import pytest

from egresslock.policy import (
    CompiledPolicy,
    Decision,
    Layer,
    Request,
    Verdict,
    compile_policy,
    decide,
    normalize_host,
    parse_policy,
)
from egresslock.policy.normalize import IPAddress
from egresslock.policy.probe import probe

POLICY = """
version: 1
network:
  block_private: true
  allow_ranges: [10.20.0.0/16, "fd00:20::/32"]
rules:
  - id: github-read
    host: api.github.com
    ports: [443]
    methods: [GET, HEAD]
    paths: ["/repos/acme/**"]
    query: {params: [page, per_page], max_value_len: 8}
    max_body_bytes: 0
    inspect: true
  - id: no-gists
    host: gist.github.com
    action: deny
  - id: github-any
    host: "*.github.com"
    ports: [443]
  - id: pypi
    host: pypi.org
    ports: [443]
  - id: plain-read
    host: plain.test
    ports: [80]
    methods: [GET]
  - id: upload
    host: upload.test
    ports: [80]
    methods: [POST, PUT]
    max_body_bytes: 1000
  - id: search
    host: search.test
    ports: [80]
    query: {params: [q]}
  - id: static
    host: static.test
    ports: [80]
    query: deny
  - id: app-no-admin
    host: app.test
    ports: [80]
    paths: ["/admin/**"]
    action: deny
  - id: app
    host: app.test
    ports: [80, 8080]
  - id: first
    host: twice.test
    ports: [80]
  - id: second
    host: twice.test
    ports: [80]
  - id: internal-api
    host: internal.test
    ports: [80]
  - id: metadata-by-ip
    host: 169.254.169.254
    ports: [80]
  - id: test-server
    host: 10.20.0.5
    ports: [8080]
  - id: v6-literal
    host: "[2606:4700::1111]"
    ports: [443]
  - id: inspect-only
    host: inspected.test
    ports: [443]
    inspect: true
  - id: deny-post-inspected
    host: strict.test
    ports: [443]
    methods: [POST]
    action: deny
    inspect: true
  - id: strict
    host: strict.test
    ports: [443]
    inspect: true
"""


@pytest.fixture(scope="module")
def policy() -> CompiledPolicy:
    return compile_policy(parse_policy(POLICY, "decide.yaml"))


def http(host: str, path: str = "/", method: str = "GET", port: int = 80,
         query: str | None = None, body_size: int | None = None,
         addresses: tuple[IPAddress, ...] = ()) -> Request:
    return Request(normalize_host(host), port, "http", method, path, query, (), body_size,
                   addresses, Layer.HTTP)


def https(host: str, path: str = "/", method: str = "GET", query: str | None = None,
          body_size: int | None = None) -> Request:
    """An inner request of an inspected tunnel, decided at layer http."""
    return replace(http(host, path, method, 443, query, body_size), scheme="https")


def connect(host: str, port: int = 443, layer: Layer = Layer.CONNECT,
            addresses: tuple[IPAddress, ...] = ()) -> Request:
    return Request(normalize_host(host), port, "https", addresses=addresses, layer=layer)


def dns(host: str, addresses: tuple[IPAddress, ...] = ()) -> Request:
    return Request(normalize_host(host), 53, addresses=addresses, layer=Layer.DNS)


def ips(*texts: str) -> tuple[IPAddress, ...]:
    return tuple(ipaddress.ip_address(t) for t in texts)


def check(decision: Decision, verdict: Verdict, rule_id: str, reason: str) -> None:
    assert decision.verdict is verdict, decision
    assert decision.rule_id == rule_id, decision
    assert reason in decision.reason, decision


# --- the main table ----------------------------------------------------------------------------

TABLE = [
    # default deny
    pytest.param(http("unknown.test"), Verdict.DENY, "default", "no rule allows host unknown.test",
                 id="a host no rule names is denied by default"),
    pytest.param(http("github.com"), Verdict.DENY, "default", "no rule allows host github.com",
                 id="a wildcard rule does not cover the apex"),
    # deny wins
    pytest.param(connect("gist.github.com"), Verdict.DENY, "no-gists",
                 "denied by rule no-gists", id="deny wins over a later wildcard allow"),
    pytest.param(https("gist.github.com"), Verdict.DENY, "no-gists", "denied by rule no-gists",
                 id="deny wins at the http layer too"),
    pytest.param(http("app.test", "/admin/users"), Verdict.DENY, "app-no-admin",
                 "denied by rule app-no-admin", id="a deny rule's path wins over an allow"),
    pytest.param(http("app.test", "/admin"), Verdict.DENY, "app-no-admin",
                 "denied by rule app-no-admin", id="trailing /** denies the dir itself"),
    pytest.param(http("app.test", "/public"), Verdict.ALLOW, "app", "allowed by rule app",
                 id="outside the deny rule's paths the allow applies"),
    pytest.param(http("app.test", "/admin/x", port=8080), Verdict.ALLOW, "app",
                 "allowed by rule app", id="a deny rule applies only on its ports"),
    # first allow wins
    pytest.param(http("twice.test"), Verdict.ALLOW, "first", "allowed by rule first",
                 id="the first matching allow rule in file order decides"),
    pytest.param(https("api.github.com", "/repos/acme/x"), Verdict.ALLOW, "github-read",
                 "allowed by rule github-read", id="the exact rule comes first in the file"),
    pytest.param(https("api.github.com", "/repos/other/x", "POST"), Verdict.ALLOW,
                 "github-any", "allowed by rule github-any",
                 id="a later wildcard allow still allows what the first rule refused"),
    # methods, with a readable reason
    pytest.param(http("plain.test", method="POST"), Verdict.DENY, "plain-read",
                 "method POST not allowed by rule plain-read (allows GET)",
                 id="a method outside the rule is denied, naming the rule and what it allows"),
    pytest.param(http("plain.test", method="GET"), Verdict.ALLOW, "plain-read",
                 "allowed by rule plain-read", id="an allowed method"),
    # ports
    pytest.param(http("plain.test", port=8080), Verdict.DENY, "plain-read",
                 "port 8080 not allowed by rule plain-read (allows 80)",
                 id="a port outside the rule is denied with the ports it allows"),
    pytest.param(http("app.test", port=8080), Verdict.ALLOW, "app", "allowed by rule app",
                 id="any listed port is allowed"),
    # paths
    pytest.param(http("app.test", "/"), Verdict.ALLOW, "app", "allowed by rule app",
                 id="no paths key means any path"),
    # queries
    pytest.param(http("search.test", "/", query="q=egress"), Verdict.ALLOW, "search",
                 "allowed by rule search", id="a listed query parameter"),
    pytest.param(http("search.test", "/", query="q=a&q=b"), Verdict.ALLOW, "search",
                 "allowed by rule search", id="a listed parameter twice"),
    pytest.param(http("search.test", "/", query="q=a&d=c2VjcmV0"), Verdict.DENY, "search",
                 "query parameter 'd' not allowed by rule search (allows q)",
                 id="an unlisted query parameter"),
    pytest.param(http("search.test", "/", query="%71=a"), Verdict.ALLOW, "search",
                 "allowed by rule search", id="parameter names are percent-decoded"),
    pytest.param(http("search.test", "/", query="q%3Dx=1"), Verdict.DENY, "search",
                 "query parameter 'q=x' not allowed", id="an encoded = stays in the name"),
    pytest.param(http("search.test", "/", query="q=%ff"), Verdict.DENY, "search",
                 "query parameter 'q' is not UTF-8 once decoded", id="a value that is not UTF-8"),
    pytest.param(http("search.test", "/", query="%ff=1"), Verdict.DENY, "search",
                 "not UTF-8 once decoded", id="a name that is not UTF-8 is refused"),
    pytest.param(http("search.test", "/", query="q=a;token=x"), Verdict.DENY, "search",
                 "query holds ';', which some servers read as a separator",
                 id="a semicolon could smuggle a parameter past the list"),
    pytest.param(http("search.test", "/", query="q=a%3Btoken=x"), Verdict.ALLOW, "search",
                 "allowed by rule search", id="an encoded semicolon is data"),
    pytest.param(http("search.test", "/", query=""), Verdict.ALLOW, "search",
                 "allowed by rule search", id="an empty query"),
    pytest.param(http("static.test", "/", query="v=1"), Verdict.DENY, "static",
                 "query string not allowed by rule static", id="query: deny"),
    pytest.param(http("static.test", "/"), Verdict.ALLOW, "static", "allowed by rule static",
                 id="query: deny allows no query"),
    pytest.param(http("static.test", "/", query=""), Verdict.ALLOW, "static",
                 "allowed by rule static", id="query: deny allows an empty query"),
    pytest.param(https("api.github.com", "/repos/acme/x", query="page=2&per_page=100"),
                 Verdict.ALLOW, "github-read", "allowed by rule github-read",
                 id="values within max_value_len"),
    pytest.param(https("plain-api.github.com", "/", query="x=1"), Verdict.ALLOW, "github-any",
                 "allowed by rule github-any", id="no query key means any query"),
    # bodies
    pytest.param(http("upload.test", method="POST", body_size=1000), Verdict.ALLOW, "upload",
                 "allowed by rule upload", id="a body at the cap"),
    pytest.param(http("upload.test", method="POST", body_size=1001), Verdict.DENY, "upload",
                 "body of 1001 bytes over max_body_bytes 1000 by rule upload",
                 id="a body over the cap"),
    pytest.param(http("upload.test", method="GET", body_size=10), Verdict.DENY, "upload",
                 "method GET not allowed by rule upload (allows POST, PUT)",
                 id="methods are listed sorted"),
    # IP literal hosts
    pytest.param(http("10.20.0.5", port=8080), Verdict.ALLOW, "test-server",
                 "allowed by rule test-server", id="an IP literal in allow_ranges"),
    pytest.param(http("0x0a140005", port=8080), Verdict.ALLOW, "test-server",
                 "allowed by rule test-server", id="an IP literal in another spelling"),
    pytest.param(connect("[2606:4700::1111]"), Verdict.ALLOW, "v6-literal",
                 "allowed by rule v6-literal", id="an IPv6 literal"),
]


@pytest.mark.parametrize(("request_", "verdict", "rule_id", "reason"), TABLE)
def test_decide(policy: CompiledPolicy, request_: Request, verdict: Verdict, rule_id: str,
                reason: str) -> None:
    check(decide(policy, request_), verdict, rule_id, reason)


def test_reason_names_the_rule_and_what_it_allows(policy: CompiledPolicy) -> None:
    only_github = compile_policy(parse_policy(
        "version: 1\nrules:\n  - id: github-read\n    host: api.github.com\n"
        "    methods: [GET, HEAD]\n    inspect: true\n"))
    decision = decide(only_github, https("api.github.com", "/repos", "POST"))
    assert decision.reason == "method POST not allowed by rule github-read (allows GET, HEAD)"
    assert decision.rule_id == "github-read"
    assert not decision.allowed


@pytest.mark.parametrize(("request_", "reason"), [
    pytest.param(https("api.github.com", "/repos/other/x"), "path /repos/other/x not allowed",
                 id="path"),
    pytest.param(https("api.github.com", "/repos/acme/x", query="page=123456789"),
                 "query parameter 'page' has a 9-character value, over max_value_len 8",
                 id="query value length"),
    pytest.param(https("api.github.com", "/repos/acme/x", query="token=x"),
                 "query parameter 'token' not allowed by rule github-read (allows page, per_page)",
                 id="query parameter"),
    pytest.param(https("api.github.com", "/repos/acme/x", body_size=1),
                 "body of 1 bytes over max_body_bytes 0 by rule github-read", id="body"),
])
def test_each_constraint_of_one_rule_explains_its_deny(request_: Request, reason: str) -> None:
    alone = compile_policy(parse_policy(POLICY.split("  - id: no-gists", 1)[0]))
    decision = decide(alone, request_)
    check(decision, Verdict.DENY, "github-read", reason)


# --- bodies whose size is not yet known --------------------------------------------------------


@pytest.mark.parametrize(("request_", "body_limit"), [
    pytest.param(http("upload.test", method="POST"), 1000,
                 id="a streamed body gets the rule's cap to enforce"),
    pytest.param(https("api.github.com", "/repos/acme/x"), 0, id="a zero cap is a cap"),
    pytest.param(http("app.test"), None, id="no cap, no limit"),
])
def test_body_limit(policy: CompiledPolicy, request_: Request, body_limit: int | None) -> None:
    decision = decide(policy, request_)
    assert decision.verdict is Verdict.ALLOW
    assert decision.body_limit == body_limit


# --- tunnels: connect and tls layers -----------------------------------------------------------


@pytest.mark.parametrize(("request_", "verdict", "rule_id", "inspect", "reason"), [
    pytest.param(connect("pypi.org"), Verdict.ALLOW, "pypi", False, "allowed by rule pypi",
                 id="a host-only rule allows a tunnel without inspection"),
    pytest.param(connect("pypi.org", layer=Layer.TLS), Verdict.ALLOW, "pypi", False,
                 "allowed by rule pypi", id="the tls layer decides like connect"),
    pytest.param(connect("pypi.org", 80), Verdict.DENY, "pypi", False,
                 "port 80 not allowed by rule pypi (allows 443)", id="a tunnel on another port"),
    pytest.param(connect("api.github.com"), Verdict.ALLOW, "github-read", True,
                 "allowed by rule github-read", id="a constraining rule inspects its tunnel"),
    pytest.param(connect("inspected.test"), Verdict.ALLOW, "inspect-only", True,
                 "allowed by rule inspect-only", id="inspect without constraints"),
    pytest.param(connect("strict.test"), Verdict.ALLOW, "strict", True,
                 "allowed by rule strict", id="an inspecting deny rule makes the tunnel inspect"),
    pytest.param(connect("plain.test", 80), Verdict.DENY, "plain-read", False,
                 "rule plain-read constrains requests to plain.test but cannot see inside a "
                 "tunnel without inspect: true", id="a CONNECT past a constraining HTTP rule"),
    pytest.param(connect("app.test", 80), Verdict.DENY, "app-no-admin", False,
                 "rule app-no-admin denies some requests to app.test but cannot see inside a "
                 "tunnel without inspect: true", id="a CONNECT past a path deny rule"),
    pytest.param(connect("unknown.test"), Verdict.DENY, "default",
                 False, "no rule allows host unknown.test", id="default deny for tunnels"),
])
def test_tunnel(policy: CompiledPolicy, request_: Request, verdict: Verdict, rule_id: str,
                inspect: bool, reason: str) -> None:
    decision = decide(policy, request_)
    check(decision, verdict, rule_id, reason)
    assert decision.inspect is inspect


def test_inner_requests_of_an_inspected_tunnel_are_decided_again(policy: CompiledPolicy) -> None:
    assert decide(policy, connect("strict.test")).inspect
    check(decide(policy, https("strict.test", "/x", "POST")), Verdict.DENY,
          "deny-post-inspected", "denied by rule deny-post-inspected")
    check(decide(policy, https("strict.test", "/x", "GET")), Verdict.ALLOW, "strict",
          "allowed by rule strict")


# --- the DNS layer -----------------------------------------------------------------------------


@pytest.mark.parametrize(("request_", "verdict", "rule_id", "reason"), [
    pytest.param(dns("pypi.org"), Verdict.ALLOW, "pypi", "name allowed by rule pypi",
                 id="a name some rule allows"),
    pytest.param(dns("x.y.github.com"), Verdict.ALLOW, "github-any",
                 "name allowed by rule github-any", id="a name under a wildcard"),
    pytest.param(dns("plain.test"), Verdict.ALLOW, "plain-read", "name allowed by rule plain-read",
                 id="a constraining rule still needs the name"),
    pytest.param(dns("app.test"), Verdict.ALLOW, "app", "name allowed by rule app",
                 id="a path deny rule does not deny the name"),
    pytest.param(dns("gist.github.com"), Verdict.DENY, "no-gists",
                 "name gist.github.com denied by rule no-gists", id="a host deny rule does"),
    pytest.param(dns("c2VjcmV0.exfil.test"), Verdict.DENY, "default",
                 "no rule allows host c2vjcmv0.exfil.test", id="data in a subdomain label"),
    pytest.param(dns("pypi.org", addresses=ips("127.0.0.1")), Verdict.DENY, "default",
                 "address 127.0.0.1 (loopback) is blocked",
                 id="an answer pointing at loopback is refused"),
])
def test_dns(policy: CompiledPolicy, request_: Request, verdict: Verdict, rule_id: str,
             reason: str) -> None:
    check(decide(policy, request_), verdict, rule_id, reason)


# --- addresses: DNS rebinding, metadata, IP literals -------------------------------------------


@pytest.mark.parametrize(("request_", "reason"), [
    pytest.param(http("app.test", addresses=ips("127.0.0.1")),
                 "address 127.0.0.1 (loopback) is blocked by network.block_private",
                 id="an allowed name resolving to loopback"),
    pytest.param(http("app.test", addresses=ips("169.254.169.254")),
                 "address 169.254.169.254 (link-local) is blocked",
                 id="an allowed name resolving to the metadata service"),
    pytest.param(connect("pypi.org", addresses=ips("8.8.8.8", "10.0.0.1")),
                 "address 10.0.0.1 (private) is blocked",
                 id="one private address among public ones"),
    pytest.param(connect("pypi.org", addresses=ips("::ffff:127.0.0.1")),
                 "carrying 127.0.0.1", id="an IPv4-mapped answer"),
    pytest.param(connect("pypi.org", addresses=ips("64:ff9b::a9fe:a9fe")),
                 "carrying 169.254.169.254", id="a NAT64 answer"),
    pytest.param(connect("pypi.org", addresses=ips("::1")), "(loopback)", id="IPv6 loopback"),
    pytest.param(http("app.test", addresses=ips("10.21.0.1")), "(private)",
                 id="a private address outside allow_ranges"),
])
def test_dns_rebinding_attack_is_denied(policy: CompiledPolicy, request_: Request,
                                        reason: str) -> None:
    decision = decide(policy, request_)
    check(decision, Verdict.DENY, "default", reason)
    assert f"(host {request_.host})" in decision.reason


@pytest.mark.parametrize(("address", "cls"), [
    pytest.param("10.0.0.1", "private", id="10.0.0.1"),
    pytest.param("172.16.0.1", "private", id="172.16.0.1"),
    pytest.param("192.168.0.1", "private", id="192.168.0.1"),
    pytest.param("100.64.0.1", "cgnat", id="100.64.0.1"),
    pytest.param("127.0.0.1", "loopback", id="127.0.0.1"),
    pytest.param("169.254.169.254", "link-local", id="169.254.169.254"),
    pytest.param("255.255.255.255", "broadcast", id="255.255.255.255"),
    pytest.param("::1", "loopback", id="::1"),
    pytest.param("ff02::2", "multicast", id="ff02::2"),
    pytest.param("64:ff9b::ac1c:5", "ipv6-embedded-ipv4, carrying 172.28.0.5", id="NAT64"),
    pytest.param("2002:c000:201::1", "ipv6-embedded-ipv4, carrying 192.0.2.1", id="6to4"),
    pytest.param("2001:0:4136:e378:8000:63bf:3fff:fdd2",
                 "ipv6-embedded-ipv4, carrying 192.0.2.45", id="Teredo"),
])
@pytest.mark.parametrize("layer", [Layer.HTTP, Layer.CONNECT, Layer.DNS])
def test_non_global_address_attack_is_denied_at_every_layer(
        policy: CompiledPolicy, address: str, cls: str, layer: Layer) -> None:
    # smokescreen's addresses that are not global unicast, behind a host a rule allows at every
    # layer: block_private refuses each wherever an address is learnt (answer, dial, request).
    request_ = Request("internal.test", 80, "http", "GET", "/", addresses=ips(address),
                       layer=layer)
    check(decide(policy, request_), Verdict.DENY, "default",
          f"address {address} ({cls}) is blocked by network.block_private")


@pytest.mark.parametrize("request_", [
    pytest.param(http("internal.test", addresses=ips("10.20.3.4")), id="allow_ranges IPv4"),
    pytest.param(http("internal.test", addresses=ips("fd00:20::1")), id="allow_ranges IPv6"),
    pytest.param(http("internal.test", addresses=ips("8.8.8.8")), id="a public address"),
])
def test_allow_ranges_exempt_from_block_private(policy: CompiledPolicy,
                                                request_: Request) -> None:
    check(decide(policy, request_), Verdict.ALLOW, "internal-api", "allowed by rule internal-api")


@pytest.mark.parametrize("host", [
    pytest.param("169.254.169.254", id="dotted"),
    pytest.param("2852039166", id="decimal"),
    pytest.param("0xa9fea9fe", id="hex"),
    pytest.param("0251.0376.0251.0376", id="octal"),
    pytest.param("169.254.43518", id="short"),
    pytest.param("[::ffff:169.254.169.254]", id="IPv4-mapped"),
])
def test_ip_literal_spellings_attack_on_the_metadata_service(policy: CompiledPolicy,
                                                            host: str) -> None:
    # Even a rule naming the address cannot open it: block_private is checked before rules.
    decision = decide(policy, http(host))
    assert decision.verdict is Verdict.DENY
    assert decision.rule_id == "default"
    assert "is blocked by network.block_private" in decision.reason


def test_block_private_off_lets_rules_decide() -> None:
    open_policy = compile_policy(parse_policy(
        POLICY.replace("block_private: true", "block_private: false")))
    check(decide(open_policy, http("169.254.169.254")), Verdict.ALLOW, "metadata-by-ip",
          "allowed by rule metadata-by-ip")
    check(decide(open_policy, http("app.test", addresses=ips("127.0.0.1"))), Verdict.ALLOW,
          "app", "allowed by rule app")
    # Still default deny for hosts no rule names.
    check(decide(open_policy, http("127.0.0.1")), Verdict.DENY, "default",
          "no rule allows host 127.0.0.1")


@pytest.mark.parametrize("host", [
    pytest.param("api.github.com.evil.test", id="allowed name as a prefix"),
    pytest.param("evilgithub.com", id="allowed name as a suffix without a dot"),
    pytest.param("pypi.org.evil.test", id="exact name as a prefix"),
])
def test_suffix_trick_attack_is_denied(policy: CompiledPolicy, host: str) -> None:
    check(decide(policy, connect(host)), Verdict.DENY, "default", f"no rule allows host {host}")


# --- report mode -------------------------------------------------------------------------------


def test_report_mode_allows_and_says_what_enforce_would_deny() -> None:
    text = POLICY.replace("version: 1\n", "version: 1\nmode: report\n")
    report = compile_policy(parse_policy(text))
    decision = decide(report, http("plain.test", method="POST"))
    assert decision.verdict is Verdict.REPORT
    assert decision.allowed is True
    assert decision.rule_id == "plain-read"
    assert decision.reason == ("report mode, enforce would deny: method POST not allowed by rule "
                               "plain-read (allows GET)")
    default = decide(report, http("unknown.test"))
    assert (default.verdict, default.allowed, default.rule_id) == (Verdict.REPORT, True, "default")
    rebinding = decide(report, http("app.test", addresses=ips("127.0.0.1")))
    assert rebinding.verdict is Verdict.REPORT
    allowed = decide(report, http("app.test"))
    assert allowed.verdict is Verdict.ALLOW
    assert allowed.reason == "allowed by rule app"


def test_enforce_mode_deny_is_not_allowed(policy: CompiledPolicy) -> None:
    decision = decide(policy, http("unknown.test"))
    assert decision.verdict is Verdict.DENY
    assert decision.allowed is False


# --- fail closed -------------------------------------------------------------------------------


def test_an_internal_error_is_a_deny(policy: CompiledPolicy) -> None:
    # An un-normalised host that looks like a bad IPv4 address makes the literal parser raise
    # inside decide; the request must be denied, not crash the caller or pass.
    decision = decide(policy, Request("1.2.3.999", 80, method="GET", path="/"))
    assert decision.verdict is Verdict.DENY
    assert decision.reason.startswith("internal error while deciding (InputError")
    assert decision.reason.endswith("denied to fail closed")


def test_decide_is_pure(policy: CompiledPolicy) -> None:
    request_ = http("plain.test", method="POST")
    assert decide(policy, request_) == decide(policy, request_)


# --- probe: what egresslock check reports ------------------------------------------------------


@pytest.mark.parametrize(("url", "method", "layer", "verdict", "rule_id", "inspect"), [
    pytest.param("https://api.github.com/repos/acme/x?page=2", "GET", Layer.HTTP, Verdict.ALLOW,
                 "github-read", True, id="an inspected tunnel is decided inside"),
    pytest.param("https://strict.test/x", "POST", Layer.HTTP, Verdict.DENY,
                 "deny-post-inspected", True,
                 id="a request denied inside an inspected tunnel was inspected"),
    pytest.param("https://pypi.org/simple/", "POST", Layer.CONNECT, Verdict.ALLOW, "pypi", False,
                 id="an uninspected tunnel is decided on host and port"),
    pytest.param("http://plain.test/", "DELETE", Layer.HTTP, Verdict.DENY, "plain-read", False,
                 id="plain HTTP is decided on the request"),
    pytest.param("https://gist.github.com/", "GET", Layer.CONNECT, Verdict.DENY, "no-gists",
                 False, id="a denied tunnel stops at connect"),
    pytest.param("http://0xa9fea9fe/latest/meta-data/", "GET", Layer.HTTP, Verdict.DENY,
                 "default", False, id="a metadata URL in hex"),
])
def test_probe(policy: CompiledPolicy, url: str, method: str, layer: Layer, verdict: Verdict,
               rule_id: str, inspect: bool) -> None:
    result = probe(policy, url, method)
    assert (result.layer, result.decision.verdict, result.decision.rule_id) == (
        layer, verdict, rule_id)
    # Whether the proxy decrypts: the tunnel's answer, not the inner request's decision.
    assert result.inspect is inspect


def test_probe_checks_pinned_addresses(policy: CompiledPolicy) -> None:
    result = probe(policy, "http://app.test/", resolve={"APP.test.": ["127.0.0.1"]})
    assert result.decision.verdict is Verdict.DENY
    assert "loopback" in result.decision.reason
    unpinned = probe(policy, "http://app.test/")
    assert unpinned.decision.verdict is Verdict.ALLOW
    assert any("--resolve" in note for note in unpinned.notes)


@pytest.mark.parametrize(("method", "path", "needle"), [
    pytest.param(None, "/repos/acme/x", "constrains methods, and layer http gave none",
                 id="missing-method-fails-closed"),
    pytest.param("GET", None, "constrains paths, and layer http gave none",
                 id="missing-path-fails-closed"),
])
def test_an_enforcement_point_that_leaves_out_method_or_path_gets_a_deny(
        method: str | None, path: str | None, needle: str) -> None:
    policy = compile_policy(parse_policy(
        "version: 1\nrules:\n  - id: read\n    host: api.example.com\n    ports: [80]\n"
        "    methods: [GET]\n    paths: ['/repos/acme/**']\n"))
    d = decide(policy, Request("api.example.com", 80, method=method, path=path))
    assert d.verdict is Verdict.DENY
    assert needle in d.reason
