"""``StreamScanner``: a secret split across chunks is found before any byte of it is released.

The invariant, checked at every split point of small bodies (exhaustively for two chunks, by
hypothesis for many): the bytes released before the hit are a prefix of the body that ends
before the secret's encoded form begins, so they never hold its first characters; and a clean
body is released whole (``feed`` outputs plus ``finish()``) wherever it is cut.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egresslock.content.detectors import DETECTORS
from egresslock.content.scanner import Hit, Scanner, StreamScanner
from tests.content.helpers import SECRET, SECRET_NAME, json_escaped, percent_subset, scanner

# Lower-case prose without the secret's first characters in any case ("sk-l").
FILLER = (b"lorem ipsum dolor sit amet, consectetur adipiscing elit; sed do eiusmod tempor "
          b"incididunt ut labore et dolore magna aliqua. ") * 8

ENCODINGS: dict[str, Callable[[bytes], bytes]] = {
    "plain": lambda s: s,
    "hex": lambda s: s.hex().encode(),
    "base64 alignment 1": lambda s: base64.b64encode(b"\x07" + s),
    "percent-encoded twice": lambda s: percent_subset(s, 3, twice=True),
    "json escapes": json_escaped,
}


def _body(encoded: bytes) -> bytes:
    return FILLER[:700] + encoded + FILLER[:120]


def _run(stream: StreamScanner, chunks: list[bytes]) -> tuple[bytes, list[Hit]]:
    """Feed ``chunks`` as a proxy would: stop at the first hit; released bytes and hits."""
    released = b""
    for chunk in chunks:
        out, hits = stream.feed(chunk)
        released += out
        if hits:
            return released, hits
    return released + stream.finish(), []


def _cut(body: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted(points), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(edges)]


def _assert_withheld(body: bytes, encoded: bytes, released: bytes, hits: list[Hit]) -> None:
    assert [h.name for h in hits] == [SECRET_NAME]
    assert body.startswith(released)
    assert len(released) <= body.index(encoded)
    assert encoded[:4].lower() not in released.lower()


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_secret_split_in_two_at_every_point(encoding: str) -> None:
    encoded = ENCODINGS[encoding](SECRET)
    body = _body(encoded)
    assert encoded[:4].lower() not in FILLER.lower()
    sc = scanner()
    for i in range(len(body) + 1):
        released, hits = _run(StreamScanner(sc), [body[:i], body[i:]])
        _assert_withheld(body, encoded, released, hits)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(ENCODINGS)), st.lists(st.integers(0, 10_000), max_size=12))
def test_secret_split_into_many_chunks(encoding: str, points: list[int]) -> None:
    encoded = ENCODINGS[encoding](SECRET)
    body = _body(encoded)
    chunks = _cut(body, [p % (len(body) + 1) for p in points])
    released, hits = _run(StreamScanner(scanner()), chunks)
    _assert_withheld(body, encoded, released, hits)


def test_clean_body_released_whole_at_every_split() -> None:
    # '+', '%' and '\\' make every decoded view run; the secret's near-miss is there too.
    body = FILLER[:500] + b"a+b%20c\\u0041 " + SECRET[:-1] + FILLER[:300]
    sc = scanner()
    for i in range(len(body) + 1):
        released, hits = _run(StreamScanner(sc), [body[:i], body[i:]])
        assert hits == []
        assert released == body


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5_000), max_size=20))
def test_clean_body_released_whole_in_many_chunks(points: list[int]) -> None:
    body = FILLER * 4
    released, hits = _run(StreamScanner(scanner()), _cut(body, [p % len(body) for p in points]))
    assert (released, hits) == (body, [])


def test_release_starts_once_hold_back_is_passed() -> None:
    sc = scanner()
    stream = StreamScanner(sc)
    out, _ = stream.feed(b"x" * sc.hold_back)
    assert out == b""
    out, _ = stream.feed(b"y" * 10)
    assert out == b"x" * 10
    assert stream.finish() == b"x" * (sc.hold_back - 10) + b"y" * 10


def test_detector_shape_split_across_chunks() -> None:
    """Detectors hold back the longest shape they confirm (512 bytes, x9 for escapes)."""
    sc = Scanner([], DETECTORS)
    key = b"AKIA" + b"Q2ZB7LTRM4XWPY3N"
    body = FILLER * 12 + b"aws_access_key_id = " + key + b"\n" + FILLER
    start = body.index(key)
    for i in range(0, len(body), 97):
        released, hits = _run(StreamScanner(sc), [body[:i], body[i:]])
        assert [h.name for h in hits] == ["aws-access-key-id"]
        assert len(released) <= start
        assert b"AKIA" not in released


def test_empty_scanner_passes_chunks_through() -> None:
    stream = StreamScanner(Scanner([]))
    assert stream.feed(b"abc") == (b"abc", [])
    assert stream.finish() == b""
