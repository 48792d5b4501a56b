"""Transforms on allowed requests: header allow/strip, keyed hashes of query values and JSON
fields, redaction; each returns the sentences the audit row records."""

from __future__ import annotations

import json
from typing import Any

import pytest

from egresslock.content.transform import (
    REDACTED,
    filter_headers,
    hash_query,
    hash_value,
    transform_json,
)
from egresslock.errors import InputError

KEY = b"k" * 32
HEADERS = [
    (b"Host", b"api.example.com"), (b"User-Agent", b"curl/8.5"), (b"Accept", b"*/*"),
    (b"Cookie", b"session=abc"), (b"Authorization", b"Bearer xyz"),
    (b"Content-Length", b"12"), (b"Transfer-Encoding", b"chunked"), (b"X-Trace", b"1"),
    (b"x-trace", b"2"),
]

# (why, allow, strip, keep, header names left, audit sentences)
HEADER_ROWS: list[tuple[str, list[str] | None, list[str] | None, frozenset[str], list[str],
                        list[str]]] = [
    ("strip one; cookie and authorization always go", None, ["User-Agent"], frozenset(),
     ["Host", "Accept", "Content-Length", "Transfer-Encoding", "X-Trace", "x-trace"],
     ["stripped header user-agent", "stripped header cookie",
      "stripped header authorization"]),
    ("strip nothing named still strips credentials", None, [], frozenset(),
     ["Host", "User-Agent", "Accept", "Content-Length", "Transfer-Encoding", "X-Trace",
      "x-trace"],
     ["stripped header cookie", "stripped header authorization"]),
    ("allow keeps only those, and framing", ["accept"], None, frozenset(),
     ["Host", "Accept", "Content-Length", "Transfer-Encoding"],
     ["stripped header user-agent", "stripped header cookie", "stripped header authorization",
      "stripped header x-trace"]),
    ("allow may name authorization", ["Accept", "Authorization"], None, frozenset(),
     ["Host", "Accept", "Authorization", "Content-Length", "Transfer-Encoding"],
     ["stripped header user-agent", "stripped header cookie", "stripped header x-trace"]),
    ("keep protects a header the proxy inserted", ["Accept"], None,
     frozenset({"authorization"}),
     ["Host", "Accept", "Authorization", "Content-Length", "Transfer-Encoding"],
     ["stripped header user-agent", "stripped header cookie", "stripped header x-trace"]),
    ("strip cannot remove framing headers", None, ["Content-Length", "Host"], frozenset(),
     ["Host", "User-Agent", "Accept", "Content-Length", "Transfer-Encoding", "X-Trace",
      "x-trace"],
     ["stripped header cookie", "stripped header authorization"]),
]


@pytest.mark.parametrize(("allow", "strip", "keep", "left", "changes"),
                         [row[1:] for row in HEADER_ROWS], ids=[row[0] for row in HEADER_ROWS])
def test_filter_headers(allow: list[str] | None, strip: list[str] | None, keep: frozenset[str],
                        left: list[str], changes: list[str]) -> None:
    out, said = filter_headers(HEADERS, allow, strip, keep)
    assert [n.decode() for n, _ in out] == left
    assert sorted(said) == sorted(changes)
    assert all(v == dict(HEADERS)[n] for n, v in out if n in dict(HEADERS))


def test_hash_value_is_stable_keyed_and_short() -> None:
    h = hash_value(KEY, "alice@example.com")
    assert h == hash_value(KEY, "alice@example.com")
    assert h != hash_value(b"j" * 32, "alice@example.com")
    assert h != hash_value(KEY, "bob@example.com")
    assert h.startswith("hmac-")
    assert len(h) == 5 + 32
    assert "alice" not in h


# (why, query, params, expected query with H(v) for the hash of v, audit sentences)
QUERY_ROWS: list[tuple[str, str, list[str], str, list[str]]] = [
    ("one param hashed, others untouched", "user=alice&page=2", ["user"],
     "user=H(alice)&page=2", ["hashed query parameter user"]),
    ("every occurrence, one sentence", "id=1&id=2&x=y", ["id"], "id=H(1)&id=H(2)&x=y",
     ["hashed query parameter id"]),
    ("percent-encoded name and value", "user%5Fid=a%40b.c&q=x+y", ["user_id"],
     "user%5Fid=H(a@b.c)&q=x+y", ["hashed query parameter user_id"]),
    ("plus is a space in the value", "q=hello+world", ["q"], "q=H(hello world)",
     ["hashed query parameter q"]),
    ("a name without '=' is left", "user&page=1", ["user"], "user&page=1", []),
    ("no such param", "a=1&b=2", ["user"], "a=1&b=2", []),
    ("empty value hashed too", "user=&a=1", ["user"], "user=H()&a=1",
     ["hashed query parameter user"]),
]


def _expand(expected: str) -> str:
    out, rest = "", expected
    while "H(" in rest:
        head, _, tail = rest.partition("H(")
        value, _, rest = tail.partition(")")
        out += head + hash_value(KEY, value)
    return out + rest


@pytest.mark.parametrize(("query", "params", "expected", "changes"),
                         [row[1:] for row in QUERY_ROWS], ids=[row[0] for row in QUERY_ROWS])
def test_hash_query(query: str, params: list[str], expected: str, changes: list[str]) -> None:
    assert hash_query(query, params, KEY) == (_expand(expected), changes)


def test_hash_query_keys_differ() -> None:
    a, _ = hash_query("user=alice", ["user"], KEY)
    b, _ = hash_query("user=alice", ["user"], b"j" * 32)
    assert a != b
    assert "alice" not in a + b


DOC = {"user": {"email": "a@example.com", "id": 7}, "a/b": "slash", "t~x": "tilde",
       "items": [{"secret": "s1", "n": 1}, {"secret": "s2", "n": 2}],
       "prompt": "tell me everything"}

Path = tuple[str | int, ...]

# (why, hash pointers, redact pointers, {path in the document: expected value}, audit sentences)
JSON_ROWS: list[tuple[str, list[str], list[str], dict[Path, object], list[str]]] = [
    ("hash a nested string", ["/user/email"], [], {("user", "email"): "H(a@example.com)"},
     ["hashed /user/email"]),
    ("hash a number in its JSON spelling", ["/user/id"], [], {("user", "id"): "H(7)"},
     ["hashed /user/id"]),
    ("~1 is a slash in a key", ["/a~1b"], [], {("a/b",): "H(slash)"}, ["hashed /a/b"]),
    ("~0 is a tilde", ["/t~0x"], [], {("t~x",): "H(tilde)"}, ["hashed /t~x"]),
    ("array index", [], ["/items/1/secret"],
     {("items", 1, "secret"): REDACTED, ("items", 0, "secret"): "s1"},
     ["redacted /items/1/secret"]),
    ("* is every element", [], ["/items/*/secret"],
     {("items", 0, "secret"): REDACTED, ("items", 1, "secret"): REDACTED},
     ["redacted /items/0/secret", "redacted /items/1/secret"]),
    ("* is every member", ["/user/*"], [],
     {("user", "email"): "H(a@example.com)", ("user", "id"): "H(7)"},
     ["hashed /user/email", "hashed /user/id"]),
    ("hash and redact together", ["/user/email"], ["/prompt"],
     {("user", "email"): "H(a@example.com)", ("prompt",): REDACTED},
     ["hashed /user/email", "redacted /prompt"]),
    ("redact a whole object", [], ["/user"], {("user",): REDACTED}, ["redacted /user"]),
]


def _get(doc: Any, path: Path) -> Any:
    for part in path:
        doc = doc[part]
    return doc


@pytest.mark.parametrize(("hashes", "redacts", "expect", "changes"),
                         [row[1:] for row in JSON_ROWS], ids=[row[0] for row in JSON_ROWS])
def test_transform_json(hashes: list[str], redacts: list[str], expect: dict[Path, object],
                        changes: list[str]) -> None:
    body, said = transform_json(json.dumps(DOC).encode(), hashes, redacts, KEY)
    doc = json.loads(body)
    for path, value in expect.items():
        want = _expand(value) if isinstance(value, str) and value.startswith("H(") else value
        assert _get(doc, path) == want, path
    assert said == changes


@pytest.mark.parametrize(("hashes", "redacts"), [
    (["/missing"], []), ([], ["/items/9/secret"]), (["/items/x"], []),
    (["/user/email/deeper"], []),
])
def test_missing_pointers_change_nothing(hashes: list[str], redacts: list[str]) -> None:
    body = json.dumps(DOC).encode()
    assert transform_json(body, hashes, redacts, KEY) == (body, [])


@pytest.mark.parametrize("body", [b"not json", b"{\"a\": 1", b"\xff\xfe", b""])
def test_non_json_body_raises_input_error(body: bytes) -> None:
    with pytest.raises(InputError, match="body is not JSON"):
        transform_json(body, ["/a"], [], KEY)


def test_transformed_body_is_compact_utf8() -> None:
    body, _ = transform_json(json.dumps({"a": "ü", "b": "x"}).encode(), [], ["/b"], KEY)
    assert body == "{\"a\":\"ü\",\"b\":\"[redacted]\"}".encode()
