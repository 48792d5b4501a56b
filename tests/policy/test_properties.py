"""Properties of the policy core, checked on generated input (hypothesis).

The invariants are those of h11's fuzz harness, applied to our parsers: every input either
normalises or raises :class:`InputError`, never anything else; what normalises is a fixed point
(normalising it again changes nothing, so a rule and a request can never disagree on a spelling);
and ``decide`` is total: it returns a decision for any request and fails closed.
"""

from __future__ import annotations

import ipaddress
import os
import string
from collections.abc import Callable

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

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
    parse_url,
)
from egresslock.policy.glob import parse_host_pattern
from egresslock.policy.normalize import IPAddress, _normalize_host_full

# Modest by default so the file runs in a few seconds; a deeper run:
#   EGRESSLOCK_FUZZ_EXAMPLES=50000 .venv/bin/pytest tests/policy/test_properties.py
SETTINGS = settings(max_examples=int(os.environ.get("EGRESSLOCK_FUZZ_EXAMPLES", "400")),
                    deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies --------------------------------------------------------------------------------

# Characters that matter to host parsing: label characters, dots and their look-alikes, IPv6 and
# IPv4 literal syntax, URL delimiters, and letters that UTS-46 maps or punycodes.
_HOST_CHARS = (
    string.ascii_letters + string.digits + "-_.:[]%@/\\?#"
    + "\u3002\uff0e\uff61"  # ideographic / full-width / half-width full stops
    + "\uff21\uff41\uff10\uff19"  # full-width A, a, 0, 9
    + "тесüßΣσ\u00ad\u200b\u0301"  # Cyrillic, Latin-1, sharp s, sigma, soft hyphen, ZWSP, accent
)
_LABEL = st.text(alphabet=string.ascii_lowercase + string.digits + "-", min_size=1, max_size=12)
_IDN_LABEL = st.text(alphabet="abcтестüßΣ", min_size=1, max_size=8)
_IPV4_PART = st.one_of(
    st.integers(0, 300).map(str),
    st.integers(0, 0xFFFFFFFF).map(hex),
    st.integers(0, 0o777).map(lambda n: "0" + oct(n)[2:]),
)


def _ipv4_spellings() -> st.SearchStrategy[str]:
    return st.lists(_IPV4_PART, min_size=1, max_size=5).map(".".join)


def _ipv6_text() -> st.SearchStrategy[str]:
    return st.ip_addresses(v=6).map(lambda a: f"[{a}]")


HOSTS = st.one_of(
    st.text(alphabet=_HOST_CHARS, max_size=40),
    st.lists(st.one_of(_LABEL, _IDN_LABEL), min_size=1, max_size=5).map(".".join),
    _ipv4_spellings(),
    _ipv6_text(),
    st.ip_addresses().map(str),
    st.text(max_size=20),
)

_PATH_CHARS = string.ascii_letters[:6] + string.digits + "./%;~-_!$&'()*+,=:@\\?# " + "eEfF"
PATHS = st.one_of(
    st.text(alphabet=_PATH_CHARS, max_size=30).map(lambda s: "/" + s),
    st.lists(st.sampled_from(["a", ".", "..", "%2e", "%2E%2e", ".%2e", "%2F", "%2f", "%5C",
                              "%7e", "%7E", "%41", "%c3%a9", ";x", "..;", "", "%", "%0", "b%2Fc"]),
             max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.text(max_size=20),
)
_QUERY_CHARS = string.ascii_letters[:4] + string.digits + "=&%+/?;" + "fF"
QUERIES = st.text(alphabet=_QUERY_CHARS, max_size=20)
URLS = st.one_of(
    st.builds(
        lambda scheme, host, port, path, query: (
            f"{scheme}://{host}{port}{path}{'' if query is None else '?' + query}"
        ),
        st.sampled_from(["http", "https", "HTTP", "ftp", ""]),
        HOSTS,
        st.one_of(st.just(""), st.integers(0, 70000).map(lambda p: f":{p}"), st.just(":")),
        PATHS,
        st.one_of(st.none(), QUERIES),
    ),
    st.text(max_size=40),
)


def _result(fn: Callable[[str], object], raw: str) -> object | None:
    """Call ``fn``; None on InputError, and any other exception fails the test."""
    try:
        return fn(raw)
    except InputError:
        return None


# --- parse or raise InputError, and fixed points -----------------------------------------------


@SETTINGS
@given(HOSTS)
def test_normalize_host_is_idempotent_or_raises_input_error(raw: str) -> None:
    first = _result(normalize_host, raw)
    if first is not None:
        assert isinstance(first, str)
        assert normalize_host(first) == first


_ASCII_HOSTS = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "-_.", max_size=70),
    st.lists(st.one_of(_LABEL, st.sampled_from(["xn--e1aybc", "0x1f", "017", "a" * 63, "A-b",
                                                "a" * 64, "", "-a", "a-", "_"])),
             min_size=1, max_size=6).map(".".join),
    st.builds(lambda s, dot: s + dot, st.text(alphabet="ab.", max_size=260), st.sampled_from(
        ["", "."])),
)


@SETTINGS
@given(_ASCII_HOSTS)
def test_normalize_host_fast_path_agrees_with_the_full_path(raw: str) -> None:
    fast = _result(normalize_host, raw)
    full = _result(_normalize_host_full, raw)
    assert fast == full


@SETTINGS
@given(PATHS)
def test_normalize_path_is_idempotent_or_raises_input_error(raw: str) -> None:
    first = _result(normalize_path, raw)
    if first is not None:
        assert isinstance(first, str)
        assert normalize_path(first) == first


@SETTINGS
@given(URLS)
def test_parse_url_is_idempotent_or_raises_input_error(raw: str) -> None:
    url = _result(parse_url, raw)
    if url is not None:
        text = str(url)
        again = parse_url(text)
        assert again == url
        assert str(again) == text


@SETTINGS
@given(st.ip_addresses())
def test_every_ip_address_is_its_own_normal_form(address: IPAddress) -> None:
    host = f"[{address}]" if address.version == 6 else str(address)
    assert ipaddress.ip_address(normalize_host(host)) == address


@SETTINGS
@given(st.integers(0, 0xFFFFFFFF))
def test_every_ipv4_spelling_reaches_the_same_address(value: int) -> None:
    dotted = str(ipaddress.IPv4Address(value))
    for spelling in (str(value), hex(value), "0" + oct(value)[2:], dotted + "."):
        assert normalize_host(spelling) == dotted


# --- wildcards ---------------------------------------------------------------------------------


_SUFFIX_LABEL = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=8)
# The last label is letters, so no suffix is IPv4-shaped and every "*.suffix" loads.
_SUFFIXES = st.builds(lambda labels, tld: ".".join([*labels, tld]),
                      st.lists(_SUFFIX_LABEL, min_size=1, max_size=2),
                      st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=4))
_SUBDOMAIN_LABELS = st.lists(st.one_of(_SUFFIX_LABEL, _IDN_LABEL), min_size=1,
                             max_size=2).map(".".join)
# Prepended to a suffix these give a subdomain (labels and a dot or a look-alike dot), a longer
# label that merely ends like the suffix ("ax", "a-"), or the apex: what a match must tell apart.
_BEFORE_SUFFIX = st.one_of(
    st.builds(lambda labels, dot: labels + dot, _SUBDOMAIN_LABELS,
              st.sampled_from([".", "\u3002", "\uff0e"])),
    st.builds(lambda labels, joint: labels + joint, _SUBDOMAIN_LABELS,
              st.sampled_from(["", "x", "-"])),
    st.just(""),
)


@SETTINGS
@given(_SUFFIXES, st.one_of(_BEFORE_SUFFIX, HOSTS))
def test_a_host_matching_a_wildcard_ends_in_its_suffix(suffix: str, before: str) -> None:
    """Matched as the proxy matches, through the compiled label index and ``decide``: a rule for
    ``*.suffix`` finds and allows exactly the hosts that end in ``.suffix`` once normalised."""
    policy = compile_policy(parse_policy(
        f"version: 1\nrules:\n  - {{id: w, host: '*.{suffix}', ports: [80]}}\n"))
    for raw in (before + suffix, before):
        host = _result(normalize_host, raw)
        if not isinstance(host, str):
            continue
        subdomain = host.endswith("." + suffix)
        assert bool(policy.index.lookup(host)) is subdomain, host
        verdict = decide(policy, Request(host, 80, method="GET", path="/")).verdict
        assert (verdict is Verdict.ALLOW) is subdomain, host


@SETTINGS
@given(st.lists(_LABEL, min_size=2, max_size=3).map(".".join),
       st.lists(st.one_of(_LABEL, _IDN_LABEL), min_size=1, max_size=3).map(".".join),
       st.sampled_from([".", "\u3002", "\uff0e"]),
       st.booleans(), st.booleans())
def test_any_spelling_of_a_subdomain_matches_its_wildcard(
    suffix: str, prefix: str, dot: str, upper: bool, trailing: bool
) -> None:
    try:
        pattern = parse_host_pattern("*." + suffix)
        host = normalize_host(prefix + dot + (suffix.upper() if upper else suffix)
                              + ("." if trailing else ""))
    except InputError:
        assume(False)
        return
    assert pattern.matches(host)
    assert host.endswith("." + normalize_host(suffix))


# --- decide is total ---------------------------------------------------------------------------

_POLICY = compile_policy(parse_policy("""
version: 1
network:
  allow_ranges: [10.20.0.0/16]
rules:
  - {id: exact, host: api.example.com, ports: [443], methods: [GET], paths: ["/a/**"],
     query: {params: [page], max_value_len: 4}, max_body_bytes: 10, inspect: true}
  - {id: wild, host: "*.example.com", ports: [80, 443]}
  - {id: deny, host: bad.example.com, action: deny}
  - {id: deny-path, host: app.test, ports: [80], paths: ["/admin/**"], action: deny}
  - {id: app, host: app.test, ports: [80], query: deny}
  - {id: lit, host: 10.20.0.5, ports: [8080]}
  - {id: v6, host: "[2606:4700::1111]"}
"""))
_REPORT = compile_policy(parse_policy("version: 1\nmode: report\nrules:\n"
                                      "  - {id: a, host: app.test, ports: [80], methods: [GET]}\n"))

_KNOWN_HOSTS = st.sampled_from(["api.example.com", "x.example.com", "bad.example.com", "app.test",
                                "10.20.0.5", "2606:4700::1111", "127.0.0.1", "example.com"])
_METHODS = st.one_of(st.none(), st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE"]),
                     st.text(max_size=8))
_LAYERS = st.sampled_from(list(Layer))


@SETTINGS
@given(st.builds(
    Request,
    host=st.one_of(st.text(max_size=30), HOSTS, _KNOWN_HOSTS),
    port=st.integers(-1, 70000),
    scheme=st.text(max_size=6),
    method=_METHODS,
    path=st.one_of(st.none(), st.text(max_size=30), PATHS),
    query=st.one_of(st.none(), st.text(max_size=30), QUERIES),
    header_names=st.lists(st.text(max_size=10), max_size=3).map(tuple),
    body_size=st.one_of(st.none(), st.integers(-10, 10**12)),
    addresses=st.lists(st.ip_addresses(), max_size=3).map(tuple),
    layer=_LAYERS,
))
def test_decide_never_raises_on_any_request(request_: Request) -> None:
    for policy in (_POLICY, _REPORT):
        decision = decide(policy, request_)
        assert decision.rule_id
        assert decision.reason


def _well_formed(host: str, path: str | None, query: str | None) -> tuple[str, str | None,
                                                                           str | None]:
    """Normalise a request's parts as an enforcement point would; reject what it would refuse."""
    try:
        norm_host = normalize_host(host)
        norm_path = normalize_path(path) if path is not None else None
        norm_query = parse_url("http://x.test/?" + query).query if query is not None else None
    except InputError:
        assume(False)
        raise
    return norm_host, norm_path, norm_query


@SETTINGS
@given(
    host=st.one_of(_KNOWN_HOSTS, HOSTS),
    port=st.integers(1, 65535) | st.sampled_from([80, 443, 8080]),
    method=_METHODS.filter(lambda m: m is None or m.isascii()),
    path=st.one_of(st.none(), PATHS, st.sampled_from(["/a/b", "/admin/x", "/"])),
    query=st.one_of(st.none(), QUERIES, st.sampled_from(["page=1", "page=12345", "x=1"])),
    body_size=st.one_of(st.none(), st.integers(0, 10**9)),
    addresses=st.lists(st.ip_addresses(), max_size=3).map(tuple),
    layer=_LAYERS,
)
def test_decide_never_fails_internally_on_a_well_formed_request(
    host: str, port: int, method: str | None, path: str | None, query: str | None,
    body_size: int | None, addresses: tuple[IPAddress, ...], layer: Layer,
) -> None:
    norm_host, norm_path, norm_query = _well_formed(host, path, query)
    request_ = Request(norm_host, port, "http", method, norm_path, norm_query, (), body_size,
                       addresses, layer)
    for policy in (_POLICY, _REPORT):
        decision = decide(policy, request_)
        assert "internal error" not in decision.reason, decision
