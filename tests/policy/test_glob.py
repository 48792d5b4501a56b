"""Host and path patterns, checked against smokescreen's glob conformance cases.

A host pattern is an exact name or ``*.`` plus a domain of at least two labels; the star is one or
more whole labels and never the apex. A path pattern works on the normalised path: ``*`` within a
segment, ``**`` across segments. Patterns a reader could not predict are refused at load.
"""

from __future__ import annotations

import pytest

from egresslock.errors import InputError
from egresslock.policy import (
    Layer,
    Request,
    Verdict,
    compile_policy,
    decide,
    normalize_host,
    normalize_path,
    parse_policy,
)
from egresslock.policy.glob import parse_host_pattern, parse_path_pattern

# --- host patterns -----------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "host", "matches"), [
    pytest.param("*.example.com", "a.example.com", True, id="one label under the suffix"),
    pytest.param("*.example.com", "more.a.example.com", True, id="several labels"),
    pytest.param("*.example.com", "example.com", False, id="never the apex"),
    pytest.param("*.example.com", "badexample.com", False, id="not a longer label"),
    pytest.param("*.example.com", "example.com.evil.test", False, id="not a prefix of a name"),
    pytest.param("*.example.com", "a.example.com.evil.test", False,
                 id="not a subdomain under another domain"),
    pytest.param("*.example.com", "aexample.com", False, id="not without a dot"),
    pytest.param("*.example.com", "A.EXAMPLE.COM.", True, id="case and trailing dot ignored"),
    pytest.param("*.EXAMPLE.com.", "a.example.com", True, id="in the pattern too"),
    pytest.param("*.example.com", "a．example。com", True, id="full-width dots"),
    pytest.param("*.тест.example", "a.xn--e1aybc.example", True, id="IDN suffix, A-label host"),
    pytest.param("*.xn--e1aybc.example", "a.тест.example", True, id="A-label suffix, IDN host"),
    pytest.param("api.example.com", "api.example.com", True, id="exact name"),
    pytest.param("api.example.com", "API.Example.com.", True, id="exact, case and dot ignored"),
    pytest.param("api.example.com", "x.api.example.com", False, id="exact is not subdomains"),
    pytest.param("api.example.com", "api.example.com.evil.test", False,
                 id="exact is not a prefix"),
    pytest.param("тест.example", "xn--e1aybc.example", True, id="IDN equality"),
    pytest.param("127.0.0.1", "0x7f000001", True, id="an IP literal in another spelling"),
    pytest.param("[::1]", "0:0:0:0:0:0:0:1", True, id="an IPv6 literal in another spelling"),
])
def test_host_pattern_matches(pattern: str, host: str, matches: bool) -> None:
    assert parse_host_pattern(pattern).matches(normalize_host(host)) is matches


@pytest.mark.parametrize(("pattern", "needle"), [
    pytest.param("*", "would allow every host; name the hosts, or '*.example.com'",
                 id="star alone"),
    pytest.param("*.com", "top-level domain 'com'; name a domain of at least two labels",
                 id="a top-level domain"),
    pytest.param("*.com.", "top-level domain 'com'", id="a top-level domain with a dot"),
    pytest.param("login.*.example.com", "a wildcard is written '*.example.com'",
                 id="star in the middle"),
    pytest.param("a.*.com", "a wildcard is written '*.example.com'", id="star in the middle 2"),
    pytest.param("*x.com", "a wildcard is written '*.example.com'", id="star inside a label"),
    pytest.param("x*.example.com", "a wildcard is written '*.example.com'",
                 id="star at a label's end"),
    pytest.param("**.example.com", "a wildcard is written '*.example.com'", id="double star"),
    pytest.param("*.*.example.com", "a wildcard is written '*.example.com'", id="two stars"),
    pytest.param("example.*", "a wildcard is written '*.example.com'", id="star as the TLD"),
    pytest.param("*.127.0.0.1", "wildcard on an IP address", id="star on an IP"),
    pytest.param("*.", "empty host", id="star and a dot"),
    pytest.param("*.a b.com", "' '", id="a bad suffix"),
])
def test_host_pattern_refused_says_what_would_be_valid(pattern: str, needle: str) -> None:
    with pytest.raises(InputError) as info:
        parse_host_pattern(pattern)
    assert needle in str(info.value)


_IDN_RULES = compile_policy(parse_policy("""
version: 1
rules:
  - {id: idn, host: "тест.example.com", ports: [80]}
  - {id: wild, host: "*.example.org", ports: [80]}
"""))


@pytest.mark.parametrize(("raw", "rule_id"), [
    pytest.param("xn--e1aybc.example.com", "idn", id="A-label request, U-label rule"),
    pytest.param("ТЕСТ.example.com.", "idn", id="upper-case U-label and trailing dot"),
    pytest.param("тест.example.org", "wild", id="IDN subdomain of a wildcard"),
    pytest.param("MORE.A.example.org.", "wild", id="deep subdomain, case and trailing dot"),
])
def test_host_pattern_matches_through_the_compiled_index(raw: str, rule_id: str) -> None:
    # decide finds rules through a label index, not HostPattern.matches: the same facts hold.
    d = decide(_IDN_RULES, Request(normalize_host(raw), 80, method="GET", path="/"))
    assert (d.verdict, d.rule_id) == (Verdict.ALLOW, rule_id)


# --- path patterns -----------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "path", "matches"), [
    pytest.param("/a/*", "/a/b", True, id="star matches one segment"),
    pytest.param("/a/*", "/a/b/c", False, id="star does not cross a slash"),
    pytest.param("/a/*", "/a", False, id="star needs the slash before it"),
    pytest.param("/a/*.json", "/a/x.json", True, id="star within a segment"),
    pytest.param("/a/*.json", "/a/x/y.json", False, id="star within a segment only"),
    pytest.param("/a/b*c", "/a/bxyc", True, id="star in the middle of a segment"),
    pytest.param("/a/**", "/a/b/c/d", True, id="double star crosses segments"),
    pytest.param("/a/**", "/a", True, id="trailing double star matches the dir itself"),
    pytest.param("/a/**", "/a/", True, id="and the dir with a slash"),
    pytest.param("/a/**", "/ab", False, id="but not a longer name"),
    pytest.param("/a/**/z", "/a/z", True, id="inner double star matches no segment"),
    pytest.param("/a/**/z", "/a/b/c/z", True, id="inner double star matches several"),
    pytest.param("/a/**/z", "/a/b/c/zz", False, id="inner double star keeps the tail exact"),
    pytest.param("/**", "/anything/at/all", True, id="all paths"),
    pytest.param("/repos/acme/**", "/repos/acme/x/issues", True, id="the README example"),
    pytest.param("/repos/acme/**", "/repos/acme-evil/x", False, id="not a sibling prefix"),
    pytest.param("/~u/*", "/%7Eu/x", True, id="the pattern is decoded like requests"),
    pytest.param("/%7eu/*", "/~u/x", True, id="in both directions"),
    pytest.param("/a%2fb", "/a%2Fb", True, id="encoded slash literal, hex case folded"),
    pytest.param("/files/.*", "/files/.env", True, id="dotfiles pattern"),
    pytest.param("/x", "/X", False, id="paths are case-sensitive"),
])
def test_path_pattern_matches(pattern: str, path: str, matches: bool) -> None:
    assert parse_path_pattern(pattern).matches(normalize_path(path)) is matches


@pytest.mark.parametrize(("pattern", "needle"), [
    pytest.param("/a**", "'**' must be a whole segment", id="double star inside a segment"),
    pytest.param("/a/**b", "'**' must be a whole segment", id="double star before a name"),
    pytest.param("/a/***", "'**' must be a whole segment", id="triple star"),
    pytest.param("a/**", "must begin with '/'", id="relative"),
    pytest.param("/a/../b", "dot or empty segment", id="a dot segment could never match"),
    pytest.param("/a/%2e%2e/b", "dot or empty segment", id="an encoded dot segment"),
    pytest.param("/a//b", "dot or empty segment", id="an empty segment could never match"),
    pytest.param("/a%5c*", "backslash", id="an encoded backslash"),
    pytest.param("/a b", "space", id="a space"),
    pytest.param("/a?b", "'?'", id="a query mark"),
])
def test_path_pattern_refused_says_what_would_be_valid(pattern: str, needle: str) -> None:
    with pytest.raises(InputError) as info:
        parse_path_pattern(pattern)
    assert needle in str(info.value)


# --- encoded slashes through decide ------------------------------------------------------------

_REPOS = compile_policy(parse_policy("""
version: 1
rules:
  - id: acme-repos
    host: api.example.com
    ports: [80]
    paths: ["/repos/acme/*", "/repos/acme/*/issues/**"]
  - id: any-repo
    host: repos.example.com
    ports: [80]
    paths: ["/repos/*"]
"""))


def _decide_path(host: str, path: str) -> Verdict:
    return decide(_REPOS, Request(host, 80, method="GET", path=path, layer=Layer.HTTP)).verdict


@pytest.mark.parametrize(("raw", "normalised"), [
    pytest.param("/repos/acme%2Fother", "/repos/acme%2Fother", id="encoded slash in the owner"),
    pytest.param("/repos/acme%2fother", "/repos/acme%2Fother", id="lower-case encoded slash"),
    pytest.param("/repos/%61cme%2Fother", "/repos/acme%2Fother", id="with an encoded letter"),
])
def test_encoded_slash_attack_cannot_cross_a_pattern(raw: str, normalised: str) -> None:
    path = normalize_path(raw)
    assert path == normalised
    # "acme%2Fother" is one segment: "/repos/acme/*" needs a real slash after "acme".
    assert _decide_path("api.example.com", path) is Verdict.DENY


@pytest.mark.parametrize("raw", [
    pytest.param("/repos/acme%2F..%2Fother", id="dot dot between encoded slashes"),
    pytest.param("/repos/acme/x%2F..%2F..%2Fother", id="climbing out of a star segment"),
    pytest.param("/repos/x%2F..%2F..%2Fadmin", id="climbing out of the only segment"),
    pytest.param("/repos/acme/%2e%2e/other", id="encoded dot segment"),
    pytest.param("/repos/acme/..;/other", id="Tomcat path parameter"),
    pytest.param("/repos/acme/%2e%2e%5cother", id="encoded backslash"),
    pytest.param("/repos/acme/x%2F..", id="a trailing dot dot behind an encoded slash"),
])
def test_path_traversal_attack_never_reaches_a_rule(raw: str) -> None:
    # The proxy refuses (403) any path normalize_path refuses, before any rule is asked.
    with pytest.raises(InputError):
        normalize_path(raw)


@pytest.mark.parametrize(("host", "path", "verdict"), [
    pytest.param("api.example.com", "/repos/acme/widget", Verdict.ALLOW, id="one segment"),
    pytest.param("api.example.com", "/repos/acme/widget/issues/1", Verdict.ALLOW,
                 id="double star under a star"),
    pytest.param("api.example.com", "/repos/acme%2Fother", Verdict.DENY,
                 id="encoded slash is not the slash the pattern needs"),
    pytest.param("api.example.com", "/repos/acme/a%2Fb/issues", Verdict.ALLOW,
                 id="encoded slash stays inside the star's segment"),
    pytest.param("api.example.com", "/repos/other/widget", Verdict.DENY, id="another owner"),
    pytest.param("repos.example.com", "/repos/acme%2Fwidget", Verdict.ALLOW,
                 id="a star segment may hold an encoded slash"),
    pytest.param("repos.example.com", "/repos/acme/widget", Verdict.DENY,
                 id="but a real slash is a second segment"),
])
def test_encoded_slash_decisions(host: str, path: str, verdict: Verdict) -> None:
    assert _decide_path(host, normalize_path(path)) is verdict
