"""Credential placeholders: made to the real value's length, swapped only in the named headers,
redacted back in responses across every chunk boundary, and loaded with a warning per missing
source."""

from __future__ import annotations

import base64

import pytest

from egresslock.content.credentials import (
    MIN_LENGTH,
    PREFIX,
    Binding,
    Redactor,
    load_bindings,
    make_placeholder,
    sandbox_environment,
)
from egresslock.errors import InputError
from egresslock.policy import parse_policy
from egresslock.policy.glob import parse_host_pattern

REAL = "ghp_R8kq2ZbV1mXc9Lp4Tn7Ws0Yd3Fh6Ja5Ue2Qo"


@pytest.mark.parametrize("real", [REAL, "x" * MIN_LENGTH, "pässwörd-ünïcode-1234"])
def test_placeholder_same_length_and_recognisable(real: str) -> None:
    p = make_placeholder(real)
    assert len(p.encode()) == len(real.encode())
    assert p.startswith(PREFIX)
    assert p.isascii()
    assert p.isalnum()
    assert p != make_placeholder(real)  # random each time


def test_short_value_refused() -> None:
    with pytest.raises(InputError, match=f"is 15 bytes long; .* at least {MIN_LENGTH}"):
        make_placeholder("x" * 15)


def _binding(real: str = REAL) -> Binding:
    return Binding("GITHUB_TOKEN", real.encode(), make_placeholder(real).encode(),
                   (parse_host_pattern("api.github.com"), parse_host_pattern("*.github.com")),
                   frozenset({"authorization", "x-api-key"}))


def _basic(user: bytes, password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(user + b":" + password)


def test_swap_in_named_header() -> None:
    b = _binding()
    assert b.swap_header("Authorization", b"token " + b.placeholder) == b"token " + b.real
    assert b.swap_header("X-API-Key", b.placeholder) == b.real


def test_no_swap_in_other_header() -> None:
    b = _binding()
    assert b.swap_header("X-Other", b.placeholder) == b.placeholder


@pytest.mark.parametrize("prefix", [b"Basic ", b"basic ", b"BASIC "])
def test_swap_inside_basic_auth(prefix: bytes) -> None:
    """git and pip send a token as the password of Basic authentication."""
    b = _binding()
    sent = prefix + _basic(b"x-access-token", b.placeholder)[6:]
    swapped = b.swap_header("authorization", sent)
    assert swapped[:6] == prefix
    assert base64.b64decode(swapped[6:]) == b"x-access-token:" + b.real


@pytest.mark.parametrize("value", [b"Basic !!!not-base64", _basic(b"user", b"other-password")])
def test_basic_auth_without_placeholder_untouched(value: bytes) -> None:
    assert _binding().swap_header("authorization", value) == value


def test_serves_named_hosts_only() -> None:
    b = _binding()
    assert b.serves("api.github.com")
    assert b.serves("uploads.github.com")
    assert not b.serves("github.com.evil.example")
    assert not b.serves("example.com")
    assert b.where() == ("header authorization, x-api-key of requests to api.github.com, "
                         "*.github.com")


def test_redactor_across_every_split_point() -> None:
    b = _binding()
    body = b"{\"token\": \"" + b.real + b"\", \"echo\": \"" + b.real + b"\"}\n"
    expected = body.replace(b.real, b.placeholder)
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1, 7):
            r = Redactor([b])
            out = r.feed(body[:i]) + r.feed(body[i:j]) + r.feed(body[j:]) + r.finish()
            assert out == expected, (i, j)
            assert b.real not in out


def test_redactor_byte_at_a_time_and_two_bindings() -> None:
    a = _binding()
    c = Binding("OTHER", b"sk-other-real-value-000", make_placeholder("sk-other-real-value-000")
                .encode(), (parse_host_pattern("api.github.com"),), frozenset({"x-key"}))
    body = b"a=" + a.real + b"&c=" + c.real + b"&end"
    r = Redactor([a, c])
    out = b"".join(r.feed(body[k:k + 1]) for k in range(len(body))) + r.finish()
    assert out == b"a=" + a.placeholder + b"&c=" + c.placeholder + b"&end"


POLICY = """
version: 1
rules:
  - id: gh
    host: api.github.com
credentials:
  - name: GITHUB_TOKEN
    env: REAL_GITHUB_TOKEN
    hosts: [api.github.com]
    headers: [Authorization]
  - name: NPM_TOKEN
    env: REAL_NPM_TOKEN
    hosts: [registry.npmjs.org]
    headers: [Authorization]
  - name: SHORT_TOKEN
    value: short
    hosts: [example.com]
    headers: [X-Key]
"""


def test_load_bindings_warns_for_missing_env_and_short_values() -> None:
    policy = parse_policy(POLICY)
    bindings, warnings = load_bindings(policy, {"REAL_GITHUB_TOKEN": REAL})
    assert [b.name for b in bindings] == ["GITHUB_TOKEN"]
    assert bindings[0].real == REAL.encode()
    assert bindings[0].headers == frozenset({"authorization"})
    assert len(warnings) == 2
    assert "REAL_NPM_TOKEN is not set" in warnings[0]
    assert "NPM_TOKEN is not set inside the sandbox" in warnings[0]
    assert "SHORT_TOKEN" in warnings[1]
    assert "at least 16" in warnings[1]
    # the value itself ("short") is never in a warning, only the credential's name
    assert all("short" not in w.lower().replace("short_token", "") for w in warnings)


def test_sandbox_environment_holds_placeholders_only() -> None:
    policy = parse_policy(POLICY)
    bindings, _ = load_bindings(policy, {"REAL_GITHUB_TOKEN": REAL})
    env, remove = sandbox_environment(bindings, policy)
    assert env == {"GITHUB_TOKEN": bindings[0].placeholder.decode()}
    assert REAL not in env.values()
    assert {"REAL_GITHUB_TOKEN", "REAL_NPM_TOKEN", "NPM_TOKEN", "SHORT_TOKEN"} <= set(remove)
