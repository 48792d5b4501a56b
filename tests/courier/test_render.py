"""Rendering a call: exactly the templated request, or a refusal that names the rule broken.

The attacks are tables keyed by the class they belong to: changing the URL's structure through
a parameter, injecting a header, smuggling a secret or a dynamic link out through a value.
"""

from __future__ import annotations

import base64
import json
import urllib.parse
from typing import Any

import pytest

from egresslock.content.engine import ContentPolicy
from egresslock.content.links import LinkLimits
from egresslock.courier.render import (
    CallRefused,
    Rendered,
    check_characters,
    prepare_call,
    validate_params,
)
from egresslock.courier.screen import screen
from egresslock.courier.template import Template, parse_template
from egresslock.policy import parse_policy
from egresslock.policy.normalize import parse_url

SECRET = "s3cr3tK3yV4lu3-egresslock-test"
PLACEHOLDERS = {"TOKEN": "EGLPHplaceholder0123"}

PARAMS: dict[str, Any] = {
    "type": "object", "additionalProperties": False, "required": ["repo", "name"],
    "properties": {
        "repo": {"type": "string", "enum": ["widgets", "gadgets"]},
        "name": {"type": "string", "pattern": "^[^ ]{1,60}$", "maxLength": 60},
        "state": {"type": "string", "enum": ["open", "closed"]},
        "page": {"type": "integer", "minimum": 1, "maximum": 100},
        "kind": {"type": "string", "pattern": "^[a-z]{1,10}$", "maxLength": 10},
        "title": {"type": "string", "pattern": "^[A-Za-z0-9 ]{1,40}$", "maxLength": 40},
        "text": {"type": "string", "x-free-text": True, "maxLength": 200},
        "tags": {"type": "array", "maxItems": 3,
                 "items": {"type": "string", "enum": ["bug", "feature"]}},
    },
}


def _template() -> Template:
    template, problems = parse_template(
        "act", "POST", "http://api.test/repos/acme/{repo}/files/{name}?state={state}&page={page}",
        {"Authorization": "Bearer {credential.TOKEN}", "X-Kind": "kind={kind}",
         "Accept": "application/json"},
        {"title": "{title}", "text": "{text}", "tags": "{tags}", "fixed": [1, "two", None]},
        PARAMS)
    assert problems == []
    assert template is not None
    return template


def _call(**params: Any) -> Rendered:
    return prepare_call(_template(), {"repo": "widgets", "name": "readme", **params},
                        PLACEHOLDERS)


def _refused(**params: Any) -> str:
    with pytest.raises(CallRefused) as info:
        _call(**params)
    return info.value.reason


def test_a_valid_call_renders_exactly_the_template() -> None:
    r = _call(state="open", page=2, kind="doc", title="Hello world", text="a\nb\tc",
              tags=["bug"])
    assert r.method == "POST"
    assert r.url == "http://api.test/repos/acme/widgets/files/readme?state=open&page=2"
    assert r.headers == (("Authorization", "Bearer EGLPHplaceholder0123"),
                         ("X-Kind", "kind=doc"), ("Accept", "application/json"),
                         ("Content-Type", "application/json"))
    assert r.body == (b'{"title":"Hello world","text":"a\\nb\\tc","tags":["bug"],'
                      b'"fixed":[1,"two",null]}')
    assert r.target == "/repos/acme/widgets/files/readme?state=open&page=2"


def test_optional_parameters_left_out_leave_their_parts_out() -> None:
    r = _call()
    assert r.url == "http://api.test/repos/acme/widgets/files/readme"
    assert [n for n, _ in r.headers] == ["Authorization", "Accept", "Content-Type"]
    assert json.loads(r.body or b"") == {"fixed": [1, "two", None]}


# Whatever a path value holds, it stays one segment: the URL the proxy parses has the
# template's host, the same number of segments, and the value back when decoded.
URL_STRUCTURE = {
    "slash": "a/b",
    "question mark": "a?admin=1",
    "fragment": "a#frag",
    "ampersand and equals": "a&state=closed",
    "encoded slash": "a%2Fb",
    "double-encoded slash": "a%252F..%252Fb",
    "full URL": "http://evil.test/x",
    "at sign": "x@evil.test",
    "semicolon parameter": "a;jsessionid=1",
    "unicode slash": "a\u2215b",
}


@pytest.mark.parametrize("case", URL_STRUCTURE, ids=list(URL_STRUCTURE))
def test_url_structure_cannot_change_through_a_parameter(case: str) -> None:
    value = URL_STRUCTURE[case]
    r = _call(name=value)
    url = parse_url(r.url)
    assert url.host == "api.test"
    assert url.port == 80
    assert url.query is None
    segments = url.path.split("/")
    assert segments[:5] == ["", "repos", "acme", "widgets", "files"]
    assert len(segments) == 6
    assert urllib.parse.unquote(r.url.rsplit("/", 1)[1]) == value


def test_a_query_value_stays_one_value() -> None:
    template, _ = parse_template("q", "GET", "http://api.test/s?q={q}&fixed=1", {}, None,
                                 {"type": "object", "additionalProperties": False,
                                  "properties": {"q": {"type": "string", "x-free-text": True,
                                                       "maxLength": 50}}})
    assert template is not None
    r = prepare_call(template, {"q": "a&fixed=2#x?y=/z"}, {})
    assert r.url == "http://api.test/s?q=a%26fixed%3D2%23x%3Fy%3D%2Fz&fixed=1"
    assert urllib.parse.parse_qs(parse_url(r.url).query or "") == {
        "q": ["a&fixed=2#x?y=/z"], "fixed": ["1"]}


DOT_SEGMENTS = {"dot": ".", "dot dot": "..", "dot dot slash": "../../admin",
                "trailing dot dot": "a/..", "dot dot parameter": "..;x", "empty": "",
                "backslash": "..\\admin"}


@pytest.mark.parametrize("case", DOT_SEGMENTS, ids=list(DOT_SEGMENTS))
def test_path_traversal_through_a_parameter_is_refused(case: str) -> None:
    template, _ = parse_template("p", "GET", "http://api.test/f/{name}", {}, None,
                                 {"type": "object", "additionalProperties": False,
                                  "required": ["name"],
                                  "properties": {"name": {"type": "string", "maxLength": 20,
                                                          "x-free-text": True}}})
    assert template is not None
    with pytest.raises(CallRefused, match=r"dot segment|backslash"):
        prepare_call(template, {"name": DOT_SEGMENTS[case]}, {})


HEADER_INJECTION = {
    "CRLF": "doc\r\nX-Injected: 1",
    "LF": "doc\nX-Injected: 1",
    "CR": "doc\rX",
    "NUL": "doc\x00",
    "trailing newline past $": "doc\n",
    "unicode line separator": "doc\u2028x",
    "next line (C1)": "doc\x85x",
}


@pytest.mark.parametrize("case", HEADER_INJECTION, ids=list(HEADER_INJECTION))
def test_header_injection_is_refused(case: str) -> None:
    template = _template()
    value = HEADER_INJECTION[case]
    params = {"repo": "widgets", "name": "readme", "kind": value}
    # Even when the schema let it through, the character check refuses it.
    with pytest.raises(CallRefused, match="control character"):
        check_characters(template, params)
    with pytest.raises(CallRefused):
        prepare_call(template, params, PLACEHOLDERS)


def test_a_header_value_must_be_printable_ascii() -> None:
    template, _ = parse_template("h", "GET", "http://api.test/", {"X-Note": "{note}"}, None,
                                 {"type": "object", "additionalProperties": False,
                                  "properties": {"note": {"type": "string", "maxLength": 20,
                                                          "x-free-text": True}}})
    assert template is not None
    with pytest.raises(CallRefused, match="printable ASCII"):
        prepare_call(template, {"note": "caf\u00e9"}, {})


def test_free_text_in_the_body_may_hold_newlines_but_not_CR() -> None:
    assert _call(text="line one\nline two\tend").body is not None
    assert "control character" in _refused(text="a\r\nb")
    # Not free text: none at all, even where the pattern's '$' lets a final newline through.
    assert "control character" in _refused(title="ab\n")


SCHEMA: dict[str, tuple[dict[str, Any], str]] = {
    "free text where an enum is declared": ({"state": "open please"}, "state must be one of"),
    "undeclared parameter": ({"url": "http://evil.test"}, "unknown parameter 'url'"),
    "over-long value": ({"name": "x" * 61}, "name is longer than maxLength 60"),
    "wrong type": ({"page": "2"}, "page must be of type integer"),
    "out of range": ({"page": 1000}, "page fails maximum 100"),
    "pattern": ({"title": "Hello <b>"}, "title does not match the pattern"),
    "array item not in enum": ({"tags": ["bug", "wontfix"]}, "tags[1] must be one of"),
    "too many items": ({"tags": ["bug"] * 4}, "tags is longer than maxItems 3"),
}


@pytest.mark.parametrize("case", SCHEMA, ids=list(SCHEMA))
def test_schema_violations_are_refused(case: str) -> None:
    params, words = SCHEMA[case]
    with pytest.raises(CallRefused) as info:
        _call(**params)
    assert words in info.value.reason
    assert info.value.schema_valid is False


def test_a_refusal_never_echoes_the_value() -> None:
    reason = _refused(state=SECRET)
    assert SECRET not in reason
    reason = _refused(**{"x" * 70: 1})
    assert "an unknown parameter" in reason
    assert "x" * 70 not in reason


def test_parameters_must_be_an_object() -> None:
    params: object
    for params in ([], "x", None, 1):
        with pytest.raises(CallRefused, match="JSON object"):
            validate_params(_template(), params)


def test_a_missing_credential_placeholder_refuses_the_call() -> None:
    with pytest.raises(CallRefused, match="credential TOKEN is not available"):
        prepare_call(_template(), {"repo": "widgets", "name": "a"}, {})


# --- the parent's screen: secrets in any encoding and dynamic links ----------------------------

POLICY = f"""\
version: 1
secrets:
  - {{name: key, value: "{SECRET}"}}
credentials:
  - {{name: TOKEN, value: "real-token-Zq8w2Lr5Tx9Vb3Nm7Kp4", hosts: [api.test],
     headers: [Authorization]}}
"""


@pytest.fixture(scope="module")
def content() -> ContentPolicy:
    return ContentPolicy(parse_policy(POLICY), environ={})


SECRETS = {
    "plain": f"the key is {SECRET}",
    "base64": base64.b64encode(f"k={SECRET}".encode()).decode(),
    "base64 at an offset": base64.b64encode(f"xy{SECRET}".encode()).decode(),
    "base64url": base64.urlsafe_b64encode(f"?{SECRET}>".encode()).decode(),
    "hex": SECRET.encode().hex(),
    "percent-encoded": urllib.parse.quote(SECRET, safe=""),
    "double percent-encoded": urllib.parse.quote(urllib.parse.quote(SECRET, safe=""), safe=""),
    "AWS key shape": "AKIAIOSFODNN7EXAMPLE",
    "GitHub token shape": "ghp_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8",
    "real credential value": "real-token-Zq8w2Lr5Tx9Vb3Nm7Kp4",
}


@pytest.mark.parametrize("case", SECRETS, ids=list(SECRETS))
def test_an_embedded_secret_is_refused_in_any_encoding(case: str, content: ContentPolicy
                                                       ) -> None:
    params = {"repo": "widgets", "name": "a", "text": SECRETS[case]}
    reasons = screen(_template(), params, content.scanner, LinkLimits())
    assert reasons, case
    assert "in parameter text" in reasons[0]
    assert SECRET not in reasons[0]


def test_a_placeholder_is_refused_too(content: ContentPolicy) -> None:
    placeholder = content.bindings[0].placeholder.decode()
    reasons = screen(_template(), {"repo": "widgets", "name": placeholder}, content.scanner,
                     LinkLimits())
    assert any("placeholder of credential TOKEN in parameter name" in r for r in reasons)


DYNAMIC = {
    "nested URL": {"text": "see https://evil.test/c?d=1"},
    "nested URL in a path value": {"name": "https://evil.test"},
    "encoded data": {"text": "q8Zr2LmX9vTb4Nw7Kp3Hs5Jd6Fg2Wc8Yx4TqR7uE1oP5aS3"},
    "data split over parameters": {"name": "Zq8w2Lr5Tx9Vb3Nm7Kp4Hc6Jd",
                                   "text": "Wm4Rt7Yp2Kx9Bn5Vc3Qs8Lf1"},
}


@pytest.mark.parametrize("case", DYNAMIC, ids=list(DYNAMIC))
def test_a_dynamic_link_in_a_value_is_refused(case: str, content: ContentPolicy) -> None:
    params = {"repo": "widgets", "name": "a", **DYNAMIC[case]}
    reasons = screen(_template(), params, content.scanner, LinkLimits())
    assert any("dynamic link in the parameters" in r for r in reasons), reasons


def test_ordinary_values_pass_the_screen(content: ContentPolicy) -> None:
    params = {"repo": "widgets", "name": "release-notes-v1.2.3", "page": 3,
              "text": "The build fails on Python 3.12 since the last release; see the log.",
              "tags": ["bug"]}
    assert screen(_template(), params, content.scanner, LinkLimits()) == []
