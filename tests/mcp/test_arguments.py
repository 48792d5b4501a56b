"""What a call's arguments carry: every string found, URLs found in text, links judged. Pure."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egresslock.content.links import LinkLimits
from egresslock.mcp.arguments import argument_refusal, link_reason, strings, urls_in

LIMITS = LinkLimits()
DATA = "UHJpdmF0ZSByb2FkbWFwOiBhY3F1aXNpdGlvbiBvZiBJbml0ZWNoIGNsb3NlcyBzb29u"


def test_strings_are_found_at_any_depth_with_their_pointers() -> None:
    value = {"a": "x", "b/c": [1, "y", {"d~": "z"}], "n": None}
    assert list(strings(value)) == [
        ("/a (name)", "a"), ("/a", "x"), ("/b~1c (name)", "b/c"), ("/b~1c/1", "y"),
        ("/b~1c/2/d~0 (name)", "d~"), ("/b~1c/2/d~0", "z"), ("/n (name)", "n")]


def test_deep_nesting_is_refused_not_recursed_without_bound() -> None:
    value: Any = "x"
    for _ in range(100):
        value = [value]
    refusal = argument_refusal({"v": value}, lambda _: [], LIMITS)
    assert refusal is not None
    assert "nest deeper than 64 levels" in refusal[0]


@pytest.mark.parametrize(("text", "found"), [
    ("see https://example.com/a.", ["https://example.com/a"]),
    ("[doc](https://example.com/a_(b)) and http://x.example/?q=1!",
     ["https://example.com/a_(b)", "http://x.example/?q=1"]),
    ("![img](https://example.com/p.png)", ["https://example.com/p.png"]),
    ('<a href="https://example.com/x">', ["https://example.com/x"]),
    ("HTTPS://EXAMPLE.COM/x", ["HTTPS://EXAMPLE.COM/x"]),
    ("ftp://example.com/x and mailto:a@b.c", []),
])
def test_urls_in_text(text: str, found: list[str]) -> None:
    assert urls_in(text) == found


@pytest.mark.parametrize(("url", "fragment"), [
    # sentence-free table: the URL, and a fragment of the reason (None: clean)
    ("https://docs.example.com/guide/install", None),
    ("https://github.com/acme/app/commit/3f9a1c2b4d5e6f708192a3b4c5d6e7f8091a2b3c", None),
    (f"https://attacker.example/p.png?d={DATA}", "URL carries about"),
    ("https://ok.example/r?u=https%3A%2F%2Fattacker.example%2Fx", "holds a URL (a nested link)"),
    ("https://ok.example/https:%2F%2Fattacker.example", "holds a URL (a nested link)"),
    (f"https://{DATA[:60].lower()}.attacker.example/", "host label"),
    (f"https://app.example/page#{DATA}", "fragment: URL carries"),
    ("https://user:pw@attacker.example/", "cannot judge"),
    ("https://attacker.example/a\\b", "cannot judge"),
])
def test_links_are_judged_as_the_proxy_judges_a_request_target(url: str,
                                                               fragment: str | None) -> None:
    reason = link_reason(url, LIMITS)
    if fragment is None:
        assert reason is None
    else:
        assert reason is not None
        assert fragment in reason


def test_secrets_are_checked_before_links_and_report_their_findings() -> None:
    def finder(text: str) -> list[str]:
        return ["secret key (base64)"] if "S3CRET" in text else []

    args = {"body": f"https://attacker.example/?d={DATA}", "title": "S3CRET"}
    assert argument_refusal(args, finder, LIMITS) == (
        "argument /title holds secret key (base64)", ("secret key (base64)",))


def test_clean_arguments_pass() -> None:
    args = {"title": "Bug in install docs", "body": "See https://docs.example.com/install.",
            "labels": ["bug", "docs"], "count": 3}
    assert argument_refusal(args, lambda _: [], LIMITS) is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=20)


@given(st.dictionaries(st.text(max_size=8), json_values, max_size=4))
def test_any_json_arguments_are_judged_without_an_exception(args: dict[str, Any]) -> None:
    refusal = argument_refusal(args, lambda _: [], LIMITS)
    assert refusal is None or isinstance(refusal[0], str)


@given(st.text(max_size=60))
def test_any_text_after_a_scheme_is_judged_or_refused_without_an_exception(tail: str) -> None:
    for url in urls_in(f"see https://{tail} and http://a.example/{tail}"):
        reason = link_reason(url, LIMITS)
        assert reason is None or isinstance(reason, str)
