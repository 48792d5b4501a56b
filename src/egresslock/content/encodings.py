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
import codecs
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
_escape_decode: Callable[[bytes], tuple[bytes, int]] = codecs.escape_decode
_HEXPAIR = {f"{a}{b}".encode(): bytes((int(a + b, 16),))
            for a in "0123456789abcdefABCDEF" for b in "0123456789abcdefABCDEF"}


def percent_decode(data: bytes, plus: bool = True) -> bytes:
    """``%XX`` decoded (and ``+`` as space when ``plus``); malformed escapes stay as they are."""
    if plus:
        data = data.replace(b"+", b" ")
    if b"%" not in data:
        return data
    # Fast path, in C (about 800 MB/s): with every backslash doubled, '%XX' spelled '\xXX' is
    # exactly what the bytes-escape codec decodes. A malformed escape ('%zz', a '%' at the
    # end) makes it refuse, and the careful path below takes over.
    try:
        decoded: bytes = _escape_decode(data.replace(b"\\", b"\\\\").replace(b"%", b"\\x"))[0]
    except ValueError:
        return _percent_decode_slowly(data)
    return decoded


def _percent_decode_slowly(data: bytes) -> bytes:
    # Split on '%' and look each pair up: about twice as fast as a regex with a callback.
    parts = data.split(b"%")
    out = [parts[0]]
    pair = _HEXPAIR.get
    for part in parts[1:]:
        byte = pair(part[:2])
        if byte is None:
            out += (b"%", part)
        else:
            out += (byte, part[2:])
    return b"".join(out)


def _unescape(m: re.Match[bytes]) -> bytes:
    if m.group(3):
        return m.group(3)
    code = int(m.group(1) or m.group(2), 16)
    return chr(code).encode("utf-8", "surrogatepass")


# Unicode tag characters (U+E0020-U+E007E) are invisible and spell ASCII one for one ("ASCII
# smuggling"): in UTF-8 they are F3 A0 80 A0 to F3 A0 81 BE.
_TAG = re.compile(rb"\xf3\xa0([\x80\x81])([\x80-\xbf])")


def _untag_one(m: re.Match[bytes]) -> bytes:
    return bytes(((m.group(1)[0] & 0x3F) << 6 | (m.group(2)[0] & 0x3F),))


def untag(data: bytes) -> bytes:
    """Unicode tag characters replaced by the ASCII they spell."""
    return _TAG.sub(_untag_one, data)


def unescape(data: bytes) -> bytes:
    """JSON and JavaScript escapes (``\\u0041``, ``\\x41``, ``\\/``, ``\\\\``) decoded."""
    return _ESCAPE.sub(_unescape, data)


class Views:
    """The decodings of a haystack worth scanning, and only where they can matter.

    A match that spans no decoded escape is the same bytes in the haystack as sent, so the
    first pass already found it; a match that spans one lies within ``radius`` bytes of it
    (the longest pattern, at the worst 9 bytes a character: ``%2541``). So a decoding is scanned
    only in windows around escapes that decode to a byte some pattern holds (``relevant``): a
    JSON body whose escapes spell accented letters and newlines, or a page with a few escapes,
    costs one pass, not three. The escapes that matter are found by a regular expression that
    matches only them, so the others cost no Python work at all; when windows would cover most
    of the haystack it is decoded whole.
    """

    __slots__ = ("_escape", "_percent", "plus", "radius")

    def __init__(self, relevant: frozenset[int], radius: int, plus: bool) -> None:
        codes = sorted(relevant | {ord("%"), ord("\\")} | {
            b - 0x20 for b in relevant if 0x61 <= b <= 0x7A})  # upper case of each letter
        alternation = b"|".join(b"%02x" % c for c in codes if c < 0x80)
        self._percent = re.compile(rb"%(?i:" + alternation + rb")")
        # A pattern with non-ASCII bytes (UTF-8) can be spelled with any \u escape above 0x7f.
        wide = rb"|u[0-9a-fA-F]{4}" if any(c >= 0x80 for c in codes) else b""
        self._escape = re.compile(rb"\\(?:(?i:u00(?:" + alternation + rb")|x(?:" +
                                  alternation + rb"))|[/\\]" + wide + rb")")
        self.radius = radius
        self.plus = plus

    def __call__(self, data: bytes) -> list[tuple[str, bytes]]:
        out = [("", data)]
        if b"%" in data:
            for part in self._parts(data, self._percent):
                once = percent_decode(part, plus=False)
                out.append(("percent-encoded", once))
                if b"%" in once:
                    out.append(("percent-encoded twice", percent_decode(once, plus=False)))
        if self.plus and b"+" in data:
            # '+' as space (form encoding) is a second reading of the same bytes: a secret
            # with a space may be sent with '+', one with a '+' with the '+' kept.
            spaced = percent_decode(data, plus=True)
            out.append(("form-encoded", spaced))
            if b"%" in spaced:
                out.append(("form-encoded twice", percent_decode(spaced, plus=True)))
        if b"\xf3\xa0" in data:
            out.append(("in invisible Unicode tag characters", untag(data)))
        if b"\\" in data:
            for part in self._parts(data, self._escape):
                unescaped = unescape(part)
                out.append(("escaped", unescaped))
                if b"\\" in unescaped:  # escaped inside an escaped string: JSON in JSON
                    out.append(("escaped twice", unescape(unescaped)))
        return out

    def _parts(self, data: bytes, pattern: re.Pattern[bytes]) -> list[bytes]:
        """The windows of ``data`` around the escapes ``pattern`` finds, or ``data`` whole
        when they would cover most of it, or nothing when there are none."""
        windows: list[list[int]] = []
        covered, most = 0, len(data) // 2
        for m in pattern.finditer(data):
            start, end = max(0, m.start() - self.radius), m.end() + self.radius
            if windows and start <= windows[-1][1]:
                covered += end - windows[-1][1]
                windows[-1][1] = end
            else:
                covered += end - start
                windows.append([start, end])
            if covered > most:
                return [data]
        return [data[a:b] for a, b in windows]


def views(data: bytes, plus: bool = True) -> list[tuple[str, bytes]]:
    """``data`` and each decoding of it, whole: percent-decoding and unescaping once and twice
    (``%2541`` is ``%41`` is ``A``; ``\\\\u0041`` is ``\\u0041`` is ``A``), ``+`` as space
    when ``plus``. :class:`Views` is the scanner's faster form of the same."""
    return Views(frozenset(range(256)), max(len(data), 1), plus)(data)
