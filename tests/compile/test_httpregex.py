"""Path globs and host patterns as Cilium's anchored regexes.

The invariant that matters: a regex is never wider than the proxy. Whatever request path and
query it accepts, the proxy would accept too (the path normalises and the glob matches). It may
be narrower, but not for ordinary paths. Python's ``re`` stands in for RE2 here; the generated
expressions use only the syntax the two share (module docstring of ``httpregex``).
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egresslock.compile.httpregex import host_regex, path_regex
from egresslock.errors import InputError
from egresslock.policy.glob import parse_host_pattern, parse_path_pattern
from egresslock.policy.normalize import normalize_path

PATHS = [
    ("/repos/acme/**", "/repos/acme", True),
    ("/repos/acme/**", "/repos/acme/", True),
    ("/repos/acme/**", "/repos/acme/x/y.json", True),
    ("/repos/acme/**", "/repos/acme/x/?page=2", True),
    ("/repos/acme/**", "/repos/acmex", False),
    ("/repos/acme/**", "/repos/acme/../admin", False),
    ("/repos/acme/**", "/repos/acme/%2e%2e/admin", False),
    ("/repos/acme/**", "/repos/acme/x%2F..%2F..%2Fadmin", False),
    ("/repos/acme/**", "/repos/acme/..;/admin", False),
    ("/repos/acme/**", "/repos/acme/a%5Cb", False),
    ("/repos/acme/**", "/repos/acme/.hidden", True),
    ("/repos/acme/**", "/repos/acme/...", True),
    ("/repos/*/issues", "/repos/acme/issues", True),
    ("/repos/*/issues", "/repos/acme/x/issues", False),
    ("/repos/*/issues", "/repos/../issues", False),
    ("/repos/*/issues", "/repos//issues", False),
    ("/a/**/z", "/a/z", True),
    ("/a/**/z", "/a/b/c/z", True),
    ("/a/**/z", "/a/z/x", False),
    ("/~user/*.txt", "/~user/notes.txt", True),
    ("/%7Euser/*.txt", "/~user/notes.txt", True),
    ("/dir/", "/dir/", True),
    ("/dir/", "/dir", False),
    ("/v1/search", "/v1/search?q=x", True),
    ("/v1/search", "/v1/search#x", False),
]


@pytest.mark.parametrize(("pattern", "path", "expected"), PATHS)
def test_path_regex_table(pattern: str, path: str, expected: bool) -> None:
    regex = path_regex(pattern, query_allowed=True)
    assert regex is not None
    assert (re.fullmatch(regex, path) is not None) is expected


def test_query_deny_leaves_out_the_query_tail() -> None:
    regex = path_regex("/v1/items", query_allowed=False)
    assert regex is not None
    assert re.fullmatch(regex, "/v1/items")
    assert not re.fullmatch(regex, "/v1/items?x=1")
    assert not re.fullmatch(regex, "/v1/items?")


def test_wildcards_made_only_of_dots_have_no_regex() -> None:
    assert path_regex("/a/.*", True) is None
    assert path_regex("/a/*.", True) is None
    assert path_regex("/a/*", True) is not None


def test_regexes_are_anchored_and_avoid_perl_only_syntax() -> None:
    for pattern in ("/repos/acme/**", "/a/**/z", "/x/*.txt", "/"):
        regex = path_regex(pattern, True)
        assert regex is not None
        assert regex.startswith("^")
        assert regex.endswith("$")
        for perl_only in ("(?", "*?", "\\d"):
            assert perl_only not in regex


SEGMENTS = st.sampled_from(["a", "b", "x.json", ".", "..", "%2e", "%2E%2e", ".%2e", "a%2Fb",
                            "..%2F..", "a;b", "..;x", ".;x", "%41", "~u", "%7e", "", "...",
                            ".hidden", "a%5Cb", "%00", "%3B", "%20", "a b", "*", "-_~"])
PATTERN_SEGMENTS = st.sampled_from(["a", "b", "*", "**", "*.json", "x*", ".hidden", "~u",
                                    "%41", "*-*"])


@settings(max_examples=400, deadline=None)
@given(st.lists(PATTERN_SEGMENTS, min_size=1, max_size=4), st.lists(SEGMENTS, max_size=5),
       st.sampled_from(["", "?", "?q=1", "?a=b&c=d"]), st.booleans())
def test_a_path_regex_is_never_wider_than_the_proxy(pattern_segments: list[str],
                                                    segments: list[str], query: str,
                                                    query_allowed: bool) -> None:
    pattern = "/" + "/".join(pattern_segments)
    try:
        glob = parse_path_pattern(pattern)
    except InputError:
        return
    regex = path_regex(pattern, query_allowed)
    if regex is None:
        return
    path = "/" + "/".join(segments)
    if re.fullmatch(regex, path + query) is None:
        return
    assert query_allowed or not query
    normalized = normalize_path(path)  # raises if the proxy would refuse the path
    assert glob.matches(normalized), (pattern, path, regex)


@settings(max_examples=200, deadline=None)
@given(st.lists(PATTERN_SEGMENTS, min_size=1, max_size=4),
       st.lists(st.sampled_from(["a", "b", "x.json", "~u", "A", "k-1_2", "...", ".h"]),
                max_size=5))
def test_a_path_regex_accepts_ordinary_paths_the_proxy_accepts(pattern_segments: list[str],
                                                               segments: list[str]) -> None:
    pattern = "/" + "/".join(pattern_segments)
    try:
        glob = parse_path_pattern(pattern)
    except InputError:
        return
    regex = path_regex(pattern, True)
    path = "/" + "/".join(segments)
    if regex is not None and glob.matches(normalize_path(path)):
        assert re.fullmatch(regex, path), (pattern, path, regex)


HOSTS = [
    ("api.example.com", [80], "api.example.com", True),
    ("api.example.com", [80], "api.example.com:80", True),
    ("api.example.com", [80], "api.example.com:8080", False),
    ("api.example.com", [80], "apixexample.com", False),
    ("api.example.com", [80], "api.example.com.evil.test", False),
    ("*.example.com", [80, 8080], "a.b.example.com:8080", True),
    ("*.example.com", [80], "example.com", False),
    ("*.example.com", [80], "evil.test/.example.com", False),
    ("10.20.0.5", [8080], "10.20.0.5:8080", True),
    ("10.20.0.5", [8080], "10a20b0c5:8080", False),
    ("[2001:db8::1]", [80], "[2001:db8::1]", True),
]


@pytest.mark.parametrize(("pattern", "ports", "header", "expected"), HOSTS)
def test_host_regex_table(pattern: str, ports: list[int], header: str, expected: bool) -> None:
    regex = host_regex(parse_host_pattern(pattern), ports)
    assert (re.fullmatch(regex, header) is not None) is expected
