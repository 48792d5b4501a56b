"""Dynamic links: tables for ``judge_token`` (what looks like encoded data, and how many bytes it
can carry) and ``dynamic_reason`` (nested URLs, data over max_data_bytes, wildcard labels).
The measured false-positive rate over whole URLs lives in test_corpus.py."""

from __future__ import annotations

import base64

import pytest

from egresslock.content.links import LinkLimits, dynamic_reason, judge_token

DEFAULT = LinkLimits()
SHA1 = "0e322af87745eff34caffe4df68456ebc20d9068"
SHA256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

# (why, token, expected (kind, bytes) or None)
TOKENS: list[tuple[str, str, tuple[str, int] | None]] = [
    ("a git commit id is 20 bytes of hex", SHA1, ("hex", 20)),
    ("a SHA-256 is 32", SHA256, ("hex", 32)),
    ("upper-case hex", SHA1.upper(), ("hex", 20)),
    ("a UUID is hex once its dashes go", "550e8400-e29b-41d4-a716-446655440000", ("hex", 16)),
    ("base64 of a secret", "c2stbGl2ZS0xMjM0NTY3ODkwYWJj", ("base64", 21)),
    ("random letters and digits of both cases", "Xk9vQ2mP7rT4wY8zB3nF6hJ1", ("base64", 18)),
    ("random lower-case letters and digits", "k9v2mp7rt4wy8zb3nf6hj1", ("random", 14)),
    ("32 digits carry 13 bytes", "1" + "2345678901" * 3 + "2", ("digits", 13)),
    ("16 digits are an id or a timestamp", "1700000000123456", None),
    ("shorter than min_token_len", "a1b2c3d4e5f6", None),
    ("a word", "requests", None),
    ("a long word", "internationalization", None),
    ("camelCase switches rarely", "getElementsByTagName", None),
    ("a name with a version", "manylinux2014", None),
    ("a Go pseudo-version cut at dots", "0-20231106174013-bbd1d2f0a7ad", ("hex", 13)),
    ("characters outside base64", "hello%world%again%and%again", None),
    ("one repeated character", "a" * 40, None),
]


@pytest.mark.parametrize(("token", "expected"), [(t, e) for _, t, e in TOKENS],
                         ids=[w for w, _, _ in TOKENS])
def test_judge_token(token: str, expected: tuple[str, int] | None) -> None:
    assert judge_token(token, DEFAULT.min_token_len) == expected


def test_min_token_len_is_the_threshold() -> None:
    token = "a1b2c3d4e5f6a7b8"
    assert judge_token(token, 16) == ("hex", 8)
    assert judge_token(token, 17) is None


B64_40 = base64.b64encode(b"sk-live-0123456789abcdefghij-klmnop-0000").decode().rstrip("=")

# (why, path, query, labels, limits, a phrase the reason must hold, or None for "not dynamic")
URLS: list[tuple[str, str | None, str | None, tuple[str, ...], LinkLimits, str | None]] = [
    ("a plain page", "/docs/library/asyncio.html", None, (), DEFAULT, None),
    ("ordinary query words", "/search", "q=python+asyncio+timeout&page=2", (), DEFAULT, None),
    ("one commit id", f"/repos/psf/requests/commits/{SHA1}", None, (), DEFAULT, None),
    ("one SHA-256 exactly at the limit", f"/v2/library/python/blobs/sha256:{SHA256}", None, (),
     DEFAULT, None),
    ("a SHA-256 and a commit id", f"/{SHA256}/{SHA1}", None, (), DEFAULT,
     "about 52 bytes of encoded-looking data, over max_data_bytes 32"),
    ("hex one byte over", "/" + "ab12" * 16 + "cd", None, (), DEFAULT, "about 33 bytes"),
    ("the same under a larger limit", "/" + "ab12" * 16 + "cd", None, (),
     LinkLimits(max_data_bytes=64), None),
    ("the SHA-256 under a smaller limit", f"/{SHA256}", None, (), LinkLimits(max_data_bytes=31),
     "largest: hex in path segment"),
    ("base64 in a query value", "/log", f"d={B64_40}", (), DEFAULT,
     "largest: base64 in query parameter 'd'"),
    ("base64 percent-encoded", "/log", "d=" + B64_40.replace("=", "%3D") + "%3D%3D", (),
     DEFAULT, "base64 in query parameter 'd'"),
    ("data in a query parameter name", "/log", f"{SHA256}{SHA1[:8]}=1", (), DEFAULT,
     "query parameter name"),
    ("data split over two values", "/t", f"a={SHA256[:40]}&b={SHA256[24:]}", (), DEFAULT,
     "about 40 bytes"),
    ("min_token_len raised hides the tokens", "/t", f"a={SHA256[:40]}&b={SHA256[24:]}", (),
     LinkLimits(min_token_len=64), None),
    ("nested https URL", "/redirect", "url=https://evil.example/collect", (), DEFAULT,
     "query parameter 'url' holds a URL (a nested link)"),
    ("nested URL percent-encoded", "/url", "q=https%3A%2F%2Fevil.example%2F&sa=D", (), DEFAULT,
     "query parameter 'q' holds a URL"),
    ("protocol-relative nested URL", "/go", "next=//evil.example/c", (), DEFAULT,
     "holds a URL"),
    ("protocol-relative URL in a path segment", "/%2F%2Fevil.example/x", None, (), DEFAULT,
     "path segment '//evil.example' holds a URL"),
    ("nested URL in a path segment", "/fetch/https%3A%2F%2Fevil.example%2Fx", None, (), DEFAULT,
     "path segment 'https://evil.example/x' holds a URL"),
    ("javascript: URL", "/login", "continue=javascript%3Aalert%281%29", (), DEFAULT,
     "holds a URL"),
    ("data: URL", "/render", "src=data:text/html;base64,PGI+aGk8L2I+", (), DEFAULT,
     "holds a URL"),
    ("upper-case scheme", "/r", "u=HTTPS://EVIL.EXAMPLE/", (), DEFAULT, "holds a URL"),
    ("a word ending in http is not a URL", "/r", "proto=xhttp:1", (), DEFAULT, None),
    ("a wildcard label with a hash", None, None, (SHA1,), DEFAULT, None),
    ("wildcard labels carrying hex", None, None, (SHA256, SHA1), DEFAULT, "host label 1"),
    ("wildcard labels and path together", f"/{SHA1}", None, (SHA1[:32],), DEFAULT,
     "about 36 bytes"),
    ("ordinary wildcard labels", None, None, ("eu-west-1", "s3"), DEFAULT, None),
    ("max_data_bytes 0 refuses any token", f"/{SHA1}", None, (), LinkLimits(max_data_bytes=0),
     "over max_data_bytes 0"),
]


@pytest.mark.parametrize(("path", "query", "labels", "limits", "phrase"),
                         [row[1:] for row in URLS], ids=[row[0] for row in URLS])
def test_dynamic_reason(path: str | None, query: str | None, labels: tuple[str, ...],
                        limits: LinkLimits, phrase: str | None) -> None:
    reason = dynamic_reason(path, query, labels, limits)
    if phrase is None:
        assert reason is None
    else:
        assert reason is not None
        assert phrase in reason, reason


def test_long_values_are_shortened_in_the_reason() -> None:
    reason = dynamic_reason(f"/{SHA256}{SHA256}", None, (), DEFAULT)
    assert reason is not None
    assert "..." in reason
    assert SHA256 not in reason
