"""``Scanner``: a declared secret found in every encoding the issue names, by name, never by value.

Each row is a haystack an agent could send and the encoding the hit must report. The negative
rows are ordinary text and near-misses (the secret minus its last byte, in each encoding): a
scanner that matched on a prefix would refuse them.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest

from egresslock.content.encodings import percent_decode, unescape, views
from egresslock.content.scanner import Hit, Kind, Needle, Scanner
from tests.content.helpers import (
    SECRET,
    SECRET_NAME,
    SPACED,
    SPACED_NAME,
    b32_label_split,
    b64_in_blob,
    hex_label_split,
    json_escaped,
    percent_subset,
    scanner,
)

Encoder = Callable[[bytes], bytes]


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


# (row id, encoder, the encoding the hit reports). Base64 rows only promise "base64...": where
# the secret's fragment holds no '+' or '/', its base64 and base64url forms are the same bytes.
FOUND: list[tuple[str, Encoder, str]] = [
    ("plain", lambda s: b"token=" + s + b"&x=1", "plain"),
    ("plain upper-cased", lambda s: b"{\"k\": \"" + s.upper() + b"\"}", "plain"),
    ("plain lower-cased", lambda s: b"note: " + s.lower() + b".", "plain"),
    *[(f"base64 alignment {k}", lambda s, k=k: b64_in_blob(s, k, 0, False, k), "base64")
      for k in range(3)],
    *[(f"base64url alignment {k}", lambda s, k=k: b64_in_blob(s, k, 0, True, k), "base64")
      for k in range(3)],
    *[(f"base64 inside a blob, {before}+{after} random bytes around",
       lambda s, b=before, a=after: b64_in_blob(s, b, a, False, b * a), "base64")
      for before, after in ((100, 57), (301, 2), (4096, 4096))],
    *[(f"base64url inside a blob, {before}+{after} random bytes around",
       lambda s, b=before, a=after: b64_in_blob(s, b, a, True, b + a), "base64")
      for before, after in ((64, 1), (1000, 999))],
    ("base64 with padding, then percent-encoded",
     lambda s: b"d=" + _b64(s).replace(b"+", b"%2B").replace(b"/", b"%2F").replace(b"=", b"%3D"),
     "base64"),
    ("hex lower-case", lambda s: b"h=" + s.hex().encode(), "hex"),
    ("hex upper-case", lambda s: b"h=" + s.hex().upper().encode(), "hex"),
    ("hex inside a hex blob", lambda s: (b"\x01\x02\x03" + s + b"\xff").hex().encode(), "hex"),
    *[(f"percent-encoding of a random subset, seed {seed}",
       lambda s, seed=seed: b"q=" + percent_subset(s, seed), "plain, percent-encoded")
      for seed in range(4)],
    ("percent-encoding of every byte",
     lambda s: b"q=" + "".join(f"%{b:02X}" for b in s).encode(), "plain, percent-encoded"),
    *[(f"percent-encoding twice of a random subset, seed {seed}",
       lambda s, seed=seed: b"q=" + percent_subset(s, seed, twice=True),
       "plain, percent-encoded twice")
      for seed in range(4)],
    ("JSON \\u escapes of every byte", lambda s: b"{\"k\":\"" + json_escaped(s) + b"\"}",
     "plain, escaped"),
    ("JSON \\u escape of one byte, \\/ elsewhere",
     lambda s: b"{\"k\":\"\\/" + json_escaped(s[:1]) + s[1:] + b"\"}", "plain, escaped"),
]


@pytest.mark.parametrize(("encode", "encoding"), [(e, enc) for _, e, enc in FOUND],
                         ids=[row[0] for row in FOUND])
def test_secret_found_in_every_encoding(encode: Encoder, encoding: str) -> None:
    hits = scanner().scan(encode(SECRET), "in the body")
    assert [h.name for h in hits] == [SECRET_NAME]
    hit = hits[0]
    assert hit.kind is Kind.SECRET
    assert hit.encoding.startswith(encoding), hit.encoding
    assert hit.where == "in the body"


@pytest.mark.parametrize(("encode", "encoding"), [(e, enc) for _, e, enc in FOUND],
                         ids=[row[0] for row in FOUND])
def test_hit_names_the_secret_never_its_value(encode: Encoder, encoding: str) -> None:
    text = scanner().scan(encode(SECRET), "in the URL")[0].describe()
    assert SECRET_NAME in text
    assert "in the URL" in text
    for spelling in (SECRET, SECRET.lower(), SECRET.hex().encode(), _b64(SECRET)):
        assert spelling.decode().lower() not in text.lower()


def test_plus_for_space() -> None:
    """Form encoding spells a space '+': a secret holding spaces is found that way too."""
    hits = scanner().scan(b"q=" + SPACED.replace(b" ", b"+") + b"&lang=en")
    assert [(h.name, h.encoding) for h in hits] == [(SPACED_NAME, "plain, form-encoded")]


def test_plus_for_space_mixed_with_percent() -> None:
    hits = scanner().scan(b"q=correct%20horse+battery+st%61ple")
    assert [h.name for h in hits] == [SPACED_NAME]


def test_secret_with_plus_partly_percent_encoded_while_another_secret_has_a_space() -> None:
    plus = Scanner([Needle("plus", b"abc+def+ghi12345", Kind.SECRET),
                    Needle(SPACED_NAME, SPACED, Kind.SECRET)])
    assert [h.name for h in plus.scan(b"q=abc+def%2Bghi12345")] == ["plus"]


def test_secret_with_plus_partly_percent_encoded() -> None:
    """The same haystack is found when no needle holds a space ('+' then stays literal)."""
    plus = Scanner([Needle("plus", b"abc+def+ghi12345", Kind.SECRET)])
    assert [h.name for h in plus.scan(b"q=abc+def%2Bghi12345")] == ["plus"]


def test_non_ascii_secret_in_json_escapes() -> None:
    """``json.dumps`` escapes non-ASCII as \\u00e4; the decoded text is matched as UTF-8."""
    s = Scanner([Needle("umlaut", "pässwörd-geheim-42".encode(), Kind.SECRET)])
    body = json.dumps({"k": "pässwörd-geheim-42"}).encode()
    assert b"\\u00e4" in body
    assert [h.name for h in s.scan(body)] == ["umlaut"]


# -- DNS names --------------------------------------------------------------------------------

NAMES: list[tuple[str, str, str]] = [
    ("plain, lower-cased by DNS", SECRET.decode().lower() + ".evil.example", "plain"),
    ("hex in one label", SECRET.hex() + ".evil.example", "hex"),
    ("hex split across labels", hex_label_split(SECRET, 10) + ".evil.example", "hex"),
    ("hex upper-case split unevenly",
     SECRET.hex().upper()[:7] + "." + SECRET.hex().upper()[7:] + ".evil.example", "hex"),
    ("base32 in one label", b32_label_split(SECRET, 63) + ".t.example", "base32"),
    ("base32 split across labels", b32_label_split(SECRET, 8) + ".t.example", "base32"),
    ("base64url lower-cased", _b64url(SECRET).decode().lower() + ".evil.example", "base64"),
    ("trailing dot, upper-case", (SECRET.hex() + ".EVIL.EXAMPLE.").upper(), "hex"),
]


@pytest.mark.parametrize(("name", "encoding"), [(n, e) for _, n, e in NAMES],
                         ids=[row[0] for row in NAMES])
def test_secret_found_in_dns_name(name: str, encoding: str) -> None:
    hits = scanner().scan_name(name)
    assert [h.name for h in hits] == [SECRET_NAME], name
    assert hits[0].encoding.startswith(encoding)
    assert "name" in hits[0].where
    assert SECRET.decode().lower() not in hits[0].describe().lower()


@pytest.mark.parametrize("name", [
    "pypi.org", "files.pythonhosted.org", "registry-1.docker.io",
    "d1a2b3c4e5f6.cloudfront.net", "0e322af87745eff34caffe4d.example",
    hex_label_split(SECRET[:-1], 10) + ".evil.example",
])
def test_ordinary_and_near_miss_names_are_clean(name: str) -> None:
    assert scanner().scan_name(name) == []


# -- negatives ----------------------------------------------------------------------------------

ORDINARY = [
    b"The quick brown fox jumps over the lazy dog. " * 40,
    json.dumps({"model": "gpt", "messages": [{"role": "user", "content": "Summarise RFC 9110"}],
                "temperature": 0.2}).encode(),
    b"<html><head><title>Docs</title></head><body><p>Hello &amp; welcome</p></body></html>",
    b"name=Ada+Lovelace&email=ada%40example.com&comment=Sk-Live+is+a+product+name",
    base64.b64encode(bytes(range(256)) * 8),
    b"sk-live-" + b"0" * 40,
]


@pytest.mark.parametrize("text", ORDINARY, ids=["prose", "json", "html", "form", "b64", "zeros"])
def test_ordinary_text_finds_nothing(text: bytes) -> None:
    assert scanner(detectors=True).scan(text) == []


NEAR = SECRET[:-1]
NEAR_MISSES: list[tuple[str, bytes]] = [
    ("plain", b"t=" + NEAR + b"&"),
    ("plain upper", NEAR.upper()),
    ("hex", NEAR.hex().encode()),
    *[(f"base64 alignment {k}", base64.b64encode(bytes(k) + NEAR)) for k in range(3)],
    *[(f"base64url alignment {k}", base64.urlsafe_b64encode(bytes(k) + NEAR)) for k in range(3)],
    ("percent-encoded", b"q=" + "".join(f"%{b:02x}" for b in NEAR).encode()),
    ("percent-encoded twice", b"q=" + "".join(f"%25{b:02x}" for b in NEAR).encode()),
    ("json escapes", json_escaped(NEAR)),
    ("first byte changed", b"X" + SECRET[1:]),
]


@pytest.mark.parametrize("text", [t for _, t in NEAR_MISSES], ids=[n for n, _ in NEAR_MISSES])
def test_near_miss_finds_nothing(text: bytes) -> None:
    assert scanner().scan(text) == []


# -- the scanner's own contract -----------------------------------------------------------------

def test_each_needle_reported_once_with_where() -> None:
    body = SECRET + b" " + SECRET.hex().encode() + b" " + base64.b64encode(SECRET)
    hits = scanner().scan(body, "in the body")
    assert hits == [Hit(SECRET_NAME, Kind.SECRET, "plain", "in the body")]


def test_two_secrets_both_named() -> None:
    hits = scanner().scan(SECRET + b" and " + SPACED)
    assert sorted(h.name for h in hits) == sorted([SECRET_NAME, SPACED_NAME])


def test_empty_scanner_and_empty_values() -> None:
    empty = Scanner([Needle("none", b"", Kind.SECRET)])
    assert empty.empty
    assert empty.scan(b"anything") == []
    assert scanner().scan(b"") == []


@pytest.mark.parametrize(("kind", "words"), [
    (Kind.SECRET, "secret"), (Kind.PLACEHOLDER, "placeholder of credential"),
    (Kind.CREDENTIAL, "real value of credential"), (Kind.DETECTOR, "credential-shaped value"),
])
def test_describe_names_the_kind(kind: Kind, words: str) -> None:
    assert Hit("x", kind, "hex", "in the URL").describe() == f"{words} x in the URL (hex)"


def test_views_decode_once_twice_and_escapes() -> None:
    """The decodings the scanner runs its automaton over, each named for the hit's record."""
    assert views(b"plain") == [("", b"plain")]
    assert dict(views(b"%2541+b"))["percent-encoded twice"] == b"A+b"
    assert dict(views(b"%2541+b"))["form-encoded twice"] == b"A b"
    assert dict(views(b"a\\u0041\\/"))["escaped"] == b"aA/"
    assert percent_decode(b"%zz%4") == b"%zz%4"  # malformed escapes stay as they are
    assert unescape(b"\\x41") == b"A"


def test_secret_in_invisible_unicode_tag_characters() -> None:
    """Tag characters (U+E0020-U+E007E) spell ASCII invisibly ("ASCII smuggling")."""
    secret = b"canary-7f3a9c2e41d8b6"
    hidden = "".join(chr(0xE0000 + c) for c in secret).encode()
    s = Scanner([Needle("canary", secret, Kind.SECRET)])
    hits = s.scan(b"a note " + hidden + b" ends")
    assert [(h.name, h.encoding) for h in hits] == [
        ("canary", "plain, in invisible Unicode tag characters")]
    assert s.scan("ordinary text \U000e0041 with one tag".encode()) == []
