"""The encoded forms of a secret that a scanner looks for, and the decodings of a haystack.

Two halves of one argument. A secret can leave in a form computed from its bytes alone (hex,
base64 at each alignment, base32): those forms become fixed patterns. It can also leave in a form
that changes per character at the sender's whim (percent-encoding of any subset of characters,
``+`` for space, JSON ``\\u`` escapes): no finite set of patterns covers those, so the haystack is
decoded instead and the decoded text scanned with the same patterns. Matching is done on
lower-cased bytes, so plain text and hex match in any case; the base64 forms, whose case carries
information, are confirmed against the original bytes (:attr:`Form.exact`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass

# Fragments shorter than this would match ordinary text by chance (a 6-character base64 run
# appears in any megabyte of compressed-looking data).
MIN_FRAGMENT = 8
# A value shorter than this is not looked for at all: "cafe" is in too many names and texts.
MIN_PLAIN = 6


@dataclass(frozen=True, slots=True)
class Form:
    """One way a secret appears on the wire: ``pattern`` lower-cased for matching, ``exact``
    the case-sensitive bytes to confirm (None when case carries no information)."""

    encoding: str
    pattern: bytes
    exact: bytes | None = None


def aligned(data: bytes, encode: Callable[[bytes], bytes], bits: int, group: int) -> list[bytes]:
    """The parts of ``encode(data)`` that do not depend on neighbouring bytes, at each of the
    ``group`` byte offsets ``data`` can start at inside a longer encoded stream.

    Character ``i`` of the encoding covers bits ``[bits*i, bits*i + bits)`` of the input: the
    first characters may mix in bytes before ``data`` and the last ones bytes after it, so both
    ends are cut and only characters made of ``data``'s bits alone are kept.
    """
    out = []
    for offset in range(group):
        encoded = encode(bytes(offset) + data)
        start = -(-8 * offset // bits)
        stop = 8 * (offset + len(data)) // bits
        out.append(encoded[start:stop])
    return out


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data).rstrip(b"=")


def _b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _b32(data: bytes) -> bytes:
    return base64.b32encode(data).rstrip(b"=")


def forms(value: bytes) -> list[Form]:
    """Every fixed form of ``value`` worth looking for, deduplicated, shortest-safe only."""
    found: dict[bytes, Form] = {}

    def add(encoding: str, fragment: bytes, case_matters: bool) -> None:
        if len(fragment) < (MIN_PLAIN if encoding == "plain" else MIN_FRAGMENT):
            return
        key = fragment.lower()
        if key not in found:
            found[key] = Form(encoding, key, fragment if case_matters else None)

    add("plain", value, False)
    add("hex", value.hex().encode("ascii"), False)
    for frag in aligned(value, _b64, 6, 3):
        add("base64", frag, True)
    for frag in aligned(value, _b64url, 6, 3):
        add("base64url", frag, True)
    # base32 is how DNS tunnels spell data (one case, digits 2-7); it is also cheap here.
    for frag in aligned(value, _b32, 5, 5):
        add("base32", frag, False)
    return list(found.values())


_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")
_ESCAPE = re.compile(rb"\\(?:u([0-9A-Fa-f]{4})|x([0-9A-Fa-f]{2})|([/\\]))")


def _unpercent(m: re.Match[bytes]) -> bytes:
    return bytes((int(m.group(1), 16),))


def percent_decode(data: bytes, plus: bool = True) -> bytes:
    """``%XX`` decoded (and ``+`` as space when ``plus``); malformed escapes stay as they are."""
    if plus:
        data = data.replace(b"+", b" ")
    return _PERCENT.sub(_unpercent, data)


def _unescape(m: re.Match[bytes]) -> bytes:
    if m.group(3):
        return m.group(3)
    code = int(m.group(1) or m.group(2), 16)
    return chr(code).encode("utf-8", "surrogatepass")


def unescape(data: bytes) -> bytes:
    """JSON and JavaScript escapes (``\\u0041``, ``\\x41``, ``\\/``, ``\\\\``) decoded."""
    return _ESCAPE.sub(_unescape, data)


def views(data: bytes, plus: bool = True) -> list[tuple[str, bytes]]:
    """``data`` and each decoding of it that could hide a secret, named for the hit's record.

    Percent-decoding and unescaping are applied once and twice (``%2541`` is ``%41`` is ``A``;
    ``\\\\u0041`` is ``\\u0041`` is ``A``).
    Each decoding only when its marker byte occurs, so ordinary text costs one pass; ``plus``
    says whether ``+`` alone (a space in form encoding) is such a marker.
    """
    out = [("", data)]
    if b"%" in data or (plus and b"+" in data):
        once = percent_decode(data, plus)
        out.append(("percent-encoded", once))
        if b"%" in once:
            out.append(("percent-encoded twice", percent_decode(once)))
    if b"\\" in data:
        unescaped = unescape(data)
        out.append(("escaped", unescaped))
        if b"\\" in unescaped:  # escaped inside an escaped string: JSON in JSON
            out.append(("escaped twice", unescape(unescaped)))
    return out
