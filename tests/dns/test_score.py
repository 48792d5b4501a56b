"""``exfil_score``: ordinary names score low, data-carrying names high, secrets exactly 1.0."""

from __future__ import annotations

import base64

import pytest

from egresslock.dns.score import Score, exfil_score

# Fixed "random" data, so the table is the same on every run.
_B32_60 = "6ljx66idjs5kdq4a222tblnw4qouwau5esbjpdywx2tnuoui4eyf2ctyg2c3"
_HEX_60 = "c4b15c9b60b25c30f964e74f183b29572941e3673febfd31ff26211f8ab1"
_B64_60 = "bmmocblx3w43vwqhi5_quenugmgig6gpupwt08hhraf4vtxdr6bqqmj4dkz8"
_SPLIT_HEX = "3db4.6b79.b215.7102.14db.956b.15a9.c6c7.6d52.6679"


@pytest.mark.parametrize("name", [
    "www.github.com",
    "pypi.org",
    "registry.npmjs.org",
    "a1.b2.example.com",
    "github.com",
    "api.github.com",
    "files.pythonhosted.org",
    "objects.githubusercontent.com",
    "d111111abcdef8.cloudfront.net",
    "ec2-54-12-34-56.compute-1.amazonaws.com",
    "_dmarc.example.com",
    "localhost",
    "com",
    "",
])
def test_ordinary_names_score_low(name: str) -> None:
    assert exfil_score(name).value < 0.3, exfil_score(name)


@pytest.mark.parametrize(("name", "reason"), [
    (f"{_B32_60}.evil.com", "base32-looking label of 60 characters"),
    (f"{_B32_60}.com", "base32-looking label of 60 characters"),
    (f"{_HEX_60}.evil.com", "hex-looking label of 60 characters"),
    (f"{_B64_60}.evil.com", "base64url-looking label of 60 characters"),
    (f"{_B32_60}.{_B32_60[:40]}.t.evil.com", "longest label is 60 characters (DNS allows 63)"),
])
def test_data_names_score_high(name: str, reason: str) -> None:
    score = exfil_score(name)
    assert score.value > 0.7, score
    assert reason in score.reasons
    assert not score.secret


def test_many_short_labels_raise_the_score() -> None:
    score = exfil_score(f"{_SPLIT_HEX}.evil.com")
    assert score.value > 0.5, score
    assert "10 labels left of the registrable domain" in score.reasons


def test_upper_case_and_trailing_dot_do_not_change_the_score() -> None:
    assert exfil_score(f"{_B32_60.upper()}.Evil.COM.") == exfil_score(f"{_B32_60}.evil.com")


SECRET = "AKIAIOSFODNN7EXAMPLE/wJalrXUtnFEMI"
RAW = SECRET.encode()


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.mark.parametrize(("label", "form"), [
    pytest.param("x" + SECRET.lower().replace("/", "-"), None, id="plain with a changed char"),
    pytest.param(RAW.hex(), "hex", id="hex"),
    pytest.param("zz" + RAW.hex() + "00", "hex", id="hex inside other data"),
    pytest.param(_b32(RAW), "base32", id="base32"),
    *[pytest.param(_b32(b"p" * k + RAW + b"s"), "base32", id=f"base32 after {k} bytes")
      for k in range(1, 5)],
    pytest.param(_b64url(RAW), "base64url", id="base64url"),
    *[pytest.param(_b64url(b"p" * k + RAW + b"s"), "base64url", id=f"base64url after {k} bytes")
      for k in range(1, 3)],
    pytest.param(_b64url(b"pq" + RAW).upper(), "base64url", id="base64url in upper case"),
])
def test_secret_in_any_encoding_scores_one(label: str, form: str | None) -> None:
    # Labels are at most 63 characters: split the data as an exfiltrating tool would.
    labels = ".".join(label[i:i + 50] for i in range(0, len(label), 50))
    score = exfil_score(f"{labels}.evil.com".lower(), ["unrelated-secret-value", SECRET])
    if form is None:
        assert not score.secret
        return
    assert score.secret
    assert score.value == 1.0
    (reason,) = score.reasons
    # Reasons name the secret by position, never by value; base64url fragments without '-'
    # or '_' are the base64 ones too, and are named so.
    assert reason.startswith("secret #2 ")
    assert f"({form.removesuffix('url')}" in reason


def test_plain_secret_is_found() -> None:
    score = exfil_score("token-s3cr3tvalue.evil.com", ["S3CR3TVALUE"])
    assert score.reasons == ("secret #1 in the name (plain)",)


def test_short_secrets_do_not_match_by_chance() -> None:
    # "ab" is 6162 in hex and "cafe" is plain in many names: fragments under 6 characters are
    # ignored rather than refusing half the internet.
    assert not exfil_score("cafe.6162.example.com", ["ab", "cafe"]).secret


def test_score_is_validated() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        Score(1.5)
