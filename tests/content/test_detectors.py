"""Built-in detectors: each credential shape found as sent and percent-encoded, each group
switchable, and the realistic look-alikes (the shape's prefix alone) left alone.

The credentials below are made up to the issuers' published formats; none is live.
"""

from __future__ import annotations

import pytest

from egresslock.content.detectors import DETECTORS, enabled
from egresslock.content.scanner import Kind, Scanner

# (detector name, group, text holding the shape)
SHAPES: list[tuple[str, str, str]] = [
    ("aws-access-key-id", "aws", "aws_access_key_id = AKIAZ7Q3LTRM4XWPY2BN\n"),
    ("aws-access-key-id", "aws", "{\"AccessKeyId\": \"ASIAQ2ZB7LTRM4XWPY3N\"}"),
    ("aws-secret-access-key", "aws",
     "aws_secret_access_key=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\n"),
    ("aws-secret-access-key", "aws",
     "AWS_SECRET_ACCESS_KEY: \"q7Xv2+Lm9TkR4/pZ8wNc3YhB6sJd0FgU5aQe1VyO\""),
    ("github-token", "github", "Authorization: token ghp_R8kq2ZbV1mXc9Lp4Tn7Ws0Yd3Fh6Ja5Ue2Qo"),
    ("github-token", "github", "GH_TOKEN=gho_R8kq2ZbV1mXc9Lp4Tn7Ws0Yd3Fh6Ja5Ue2Qo;"),
    # github_pat_, 22 characters, '_', 59 characters
    ("github-fine-grained-token", "github",
     "github_pat_11ABCDEFG0aB3dE5gH7jK9_" + "mN0pQ2rS4tU6vW8xY1zA3" * 2 + "bC5dE7fG9hJ2kL4mN"),
    ("slack-token", "slack", "SLACK_BOT_TOKEN=xoxb-2214512345-4831234567890-AbCdEfGhIjKlMnOp"),
    ("slack-webhook", "slack",
     "url: https://hooks.slack.com/services/T0123ABCD/B0456EFGH/xR7tLm4WpZ9fQ2kV8nYc"),
    ("private-key", "private_key", "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA"),
    ("private-key", "private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk"),
    ("private-key", "private_key", "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqG"),
    ("jwt", "jwt", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
                   "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
    ("database-url", "connection_string",
     "DATABASE_URL=postgres://app:Tr0ub4dor3@db.internal:5432/prod"),
    ("database-url", "connection_string", "mongodb+srv://admin:s3cr3tPass@cluster0.example.net/"),
    ("database-url", "connection_string", "redis://default:hunter22@cache:6379/0"),
    ("azure-connection-string", "connection_string",
     "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey=" + "Zm9vYmFyYmF6cXV4" * 5
     + "==;EndpointSuffix=core.windows.net"),
    ("azure-connection-string", "connection_string",
     "Endpoint=sb://acme.servicebus.windows.net/;SharedAccessKeyName=root;"
     "SharedAccessKey=q7Xv2Lm9TkR4pZ8wNc3YhB6sJd0FgU5aQe1VyO="),
]


def _percent_every_other(text: str) -> bytes:
    return "".join(f"%{ord(c):02X}" if i % 2 else c for i, c in enumerate(text)).encode()


def _scan(text: bytes, switches: dict[str, bool] | None = None) -> list[str]:
    return [h.name for h in Scanner([], enabled(switches or {})).scan(text)]


@pytest.mark.parametrize(("name", "text"), [(n, t) for n, _, t in SHAPES],
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(SHAPES)])
def test_shape_found(name: str, text: str) -> None:
    hits = Scanner([], DETECTORS).scan(text.encode(), "in the body")
    assert name in [h.name for h in hits]
    hit = next(h for h in hits if h.name == name)
    assert hit.kind is Kind.DETECTOR
    assert hit.encoding == "as is"
    assert name in hit.describe()


@pytest.mark.parametrize(("name", "text"), [(n, t) for n, _, t in SHAPES],
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(SHAPES)])
def test_shape_found_percent_encoded(name: str, text: str) -> None:
    hits = Scanner([], DETECTORS).scan(_percent_every_other(text))
    found = {h.name: h.encoding for h in hits}
    assert found.get(name, "").startswith("percent-encoded"), found


@pytest.mark.parametrize(("name", "group", "text"), SHAPES,
                         ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(SHAPES)])
def test_group_switched_off_stops_it(name: str, group: str, text: str) -> None:
    assert name not in _scan(text.encode(), {group: False})
    others = {g: False for g in {d.group for d in DETECTORS} if g != group}
    assert name in _scan(text.encode(), others)


def test_jwt_switch_named_in_the_issue() -> None:
    jwt = next(t for n, _, t in SHAPES if n == "jwt").encode()
    assert _scan(jwt) == ["jwt"]
    assert _scan(jwt, {"jwt": False}) == []


def test_enabled_keeps_every_group_missing_from_switches() -> None:
    assert enabled({}) == DETECTORS
    assert {d.group for d in enabled({"aws": False})} == (
        {d.group for d in DETECTORS} - {"aws"})


LOOKALIKES = [
    "The AKIA prefix marks long-term AWS access keys.",
    "AKIA" + "Z7Q3LTRM4XWPY2B",            # one character short
    "akiaz7q3ltrm4xwpy2bn",                   # lower-case: not an access key id
    "Asia/Tokyo and ASIA-PACIFIC regions",
    "aws_secret_access_key=<your secret key here>",
    "JWTs start with eyJ, which is base64 for {\"",
    "eyJhbGciOiJIUzI1NiJ9",                   # a header without payload or signature
    "postgres://db.internal:5432/prod",
    "postgres://app@db.internal/prod",        # a user, no password
    "postgresql://localhost/test?sslmode=disable",
    "see https://hooks.slack.com/services/ for webhook docs",
    "xoxb-",                                  # the prefix alone
    "ghp_ is the prefix of a GitHub personal access token",
    "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE",
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU",
    "AccountKey=<key>;",
    "github_pat_ tokens are fine-grained",
]


@pytest.mark.parametrize("text", LOOKALIKES)
def test_lookalike_not_found(text: str) -> None:
    assert _scan(text.encode()) == []
