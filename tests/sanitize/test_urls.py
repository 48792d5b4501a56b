"""The URL decision (:meth:`SanitizePolicy.judge`), as a table keyed by a sentence."""

from __future__ import annotations

import pytest

from egresslock.policy import parse_policy
from egresslock.sanitize import SanitizePolicy
from egresslock.sanitize.urls import compiled as compile_cached
from tests.sanitize.conftest import POLICY_TEXT, SECRET

CASES = [
    # (why, url, use, allowed, words in the reason)
    ("an allowed image path", "https://cdn.acme-corp.example/img/a/b.png", "image", True, ""),
    ("an allowed link host, any path", "https://docs.acme-corp.example/x/y?page=2", "link",
     True, ""),
    ("a fragment to an allowed host", "https://docs.acme-corp.example/guide#install", "link",
     True, ""),
    ("an image host is not a link host", "https://cdn.acme-corp.example/img/a.png", "link",
     False, "not in output.links"),
    ("a link host is not an image host", "https://docs.acme-corp.example/a.png", "image",
     False, "not in output.images"),
    ("a path outside the allowed ones", "https://cdn.acme-corp.example/other/a.png", "image",
     False, "allows /img/**"),
    ("plain http", "http://cdn.acme-corp.example/img/a.png", "image", False, "scheme http:"),
    ("javascript", "javascript:alert(1)", "link", False, "scheme javascript:"),
    ("data", "data:image/png;base64,AAAA", "image", False, "scheme data:"),
    ("relative", "/img/a.png", "image", False, "relative"),
    ("protocol-relative", "//cdn.acme-corp.example/img/a.png", "image", False, "relative"),
    ("userinfo", "https://cdn.acme-corp.example@evil.example/img/a.png", "image", False,
     "ambiguous"),
    ("a backslash", "https://cdn.acme-corp.example\\img\\a.png", "image", False, "ambiguous"),
    ("a dot segment", "https://cdn.acme-corp.example/img/../x.png", "image", False,
     "ambiguous"),
    ("a space", "https://cdn.acme-corp.example/img/a b.png", "image", False, "ambiguous"),
    ("another port", "https://cdn.acme-corp.example:444/img/a.png", "image", False,
     "port 444"),
    ("the default port spelt out", "https://cdn.acme-corp.example:443/img/a.png", "image",
     True, ""),
    ("a suffix trick", "https://cdn.acme-corp.example.evil.example/img/a.png", "image", False,
     "not in output.images"),
    ("upper-case host", "https://CDN.ACME-CORP.EXAMPLE/img/a.png", "image", True, ""),
    ("a declared secret", f"https://docs.acme-corp.example/?q={SECRET}", "link", False,
     "secret demo-token"),
    ("a secret percent-encoded", "https://docs.acme-corp.example/?q=%73%6b-live-4f9a2c7e1b8d3f"
     "60a5c2", "link", False, "secret demo-token"),
    ("a credential shape", "https://docs.acme-corp.example/?k=AKIAIOSFODNN7EXAMPLE", "link",
     False, "credential-shaped"),
    ("a nested URL", "https://docs.acme-corp.example/go?to=https://evil.example/", "link",
     False, "nested link"),
    ("too much encoded data", "https://docs.acme-corp.example/?a=3f9a2c7e1b8d3f60a5c2d4e6f8a0"
     "b2c4d6e8f0a1b3c5d7e9f1a3b5c7d9e1f3a5b7c9d1", "link", False, "dynamic link"),
    ("invisible tag characters", "https://docs.acme-corp.example/?q=%F3%A0%81%81", "link",
     False, "invisible"),
]


@pytest.mark.parametrize(("why", "url", "use", "allowed", "words"), CASES,
                         ids=[c[0] for c in CASES])
def test_judge(compiled: SanitizePolicy, why: str, url: str, use: str, allowed: bool,
               words: str) -> None:
    decision = compiled.judge(url, use)  # type: ignore[arg-type]
    assert decision.allowed is allowed, decision.reason
    assert words in decision.reason


def test_a_secret_hides_the_path_from_logs(compiled: SanitizePolicy) -> None:
    decision = compiled.judge(f"https://evil.example/{SECRET}", "image")
    assert decision.secret
    assert decision.host == "evil.example"


@pytest.mark.parametrize(("host", "mention"), [
    ("python.org", True), ("setup.py", True), ("www.example.com", True),
    ("c2stbGl2ZS00ZjlhMmM3ZTFiOGQzZjYwYTVjMg.evil.example", False),
    ("sk-live-4f9a2c7e1b8d3f60a5c2.evil.example", False),
])
def test_bare_host_mentions(compiled: SanitizePolicy, host: str, mention: bool) -> None:
    assert compiled.mention(host) is mention


def test_secrets_from_the_environment_and_warnings() -> None:
    policy = parse_policy(POLICY_TEXT.replace(
        "secrets:\n", "secrets:\n  - {name: env-token, env: SANITIZE_TEST_TOKEN}\n"
                      "  - {name: missing, env: SANITIZE_TEST_MISSING}\n"))
    judge = SanitizePolicy.from_policy(policy, environ={"SANITIZE_TEST_TOKEN": "tok-9f8e7d6c5b4a"})
    assert not judge.judge("https://docs.acme-corp.example/?t=tok-9f8e7d6c5b4a", "link").allowed
    assert any("SANITIZE_TEST_MISSING" in w for w in judge.warnings)


def test_a_policy_is_compiled_once_per_object() -> None:
    policy = parse_policy(POLICY_TEXT)
    assert compile_cached(policy) is compile_cached(policy)
    assert compile_cached(parse_policy(POLICY_TEXT)) is not compile_cached(policy)


@pytest.mark.parametrize("url", [
    f"/log?d={SECRET}", f"https://evil.example/a b?d={SECRET}",
    "https://evil.example/a b?d=QUERYDATA",
    f"https://user@evil.example/?d={SECRET}", f"https://evil.example/?d={SECRET}#frag",
])
def test_reasons_never_quote_the_query(compiled: SanitizePolicy, url: str) -> None:
    """Reasons go to the audit log; the URL may hold exactly what must not be logged."""
    decision = compiled.judge(url, "image")
    assert not decision.allowed
    assert SECRET not in decision.reason
    assert "QUERYDATA" not in decision.reason
