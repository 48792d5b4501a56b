"""Dynamic links: URLs whose path, query or subdomain labels carry data.

``https://allowed.example/log?d=c2stbGl2ZS0xMjM0NTY3OA`` is a request to an allowed host and a
write of 18 bytes to whoever reads that host's logs. The seed pattern's answer is to forbid
dynamically generated links. A URL is judged by the data its variable parts could carry:

- a nested URL in a query value or path segment (``?url=https://...``, the EchoLeak pattern:
  an allowed redirector or image proxy carries the real destination);
- tokens that look like encoded data: hex runs (``3f9a...``), base64 and base64url runs, and
  random-looking mixes of letters and digits, each counted at the bytes it can carry (hex 4 bits a
  character, base64 6, a random alphanumeric mix about 5.2);
- their sum over the whole URL against ``max_data_bytes``.

Words, numbers, versions and ordinary names are not data: a token counts only when it is at
least ``min_token_len`` characters and looks encoded (an alphabet test, the entropy of its
characters and how often it switches between letters, digits and symbols; English and code
identifiers switch rarely, base64 about two times in three). The default thresholds let through
one content hash per URL (a 64-character SHA-256 is 32 bytes; PyPI's file paths, Docker blob
digests and Git commit ids all pass) and stop a second one; docs/content.md shows the
false-positive rate measured on the corpus in tests/content/corpus/.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

_SPLIT = re.compile(r"[/?&=;,.:~!$'()*@ +\[\]{}|\"<>\\]+")
_HEX = frozenset("0123456789abcdefABCDEF")
_NESTED = re.compile(r"(?:^|[^a-z])(?:https?|ftp|wss?|file|data|javascript):(?://|[a-z0-9%])|"
                     r"^//[a-z0-9-]+\.[a-z]", re.IGNORECASE)
_B64 = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_")


@dataclass(frozen=True, slots=True)
class LinkLimits:
    """The thresholds (``content.dynamic_links`` or a rule's ``dynamic_links``)."""

    max_data_bytes: int = 32
    min_token_len: int = 16


@dataclass(frozen=True, slots=True)
class Token:
    """A part of a URL judged to carry data: where, what it looks like, and how many bytes."""

    where: str
    kind: str
    data_bytes: int


def _class(c: str) -> int:
    if c.islower():
        return 0
    if c.isupper():
        return 1
    if c.isdigit():
        return 2
    return 3


def _entropy(text: str) -> float:
    n = len(text)
    return -sum(k / n * math.log2(k / n) for k in Counter(text).values())


def judge_token(token: str, min_len: int) -> tuple[str, int] | None:
    """(kind, bytes it can carry) when ``token`` looks like encoded data, else None."""
    n = len(token)
    if n < min_len:
        return None
    if token.isdigit():
        # Ids and timestamps are digits; a long digit run still carries 3.3 bits a digit.
        return ("digits", n * 415 // 1000) if n >= 2 * min_len else None
    stripped = token.replace("-", "")
    if len(stripped) >= min_len and all(c in _HEX for c in stripped) and any(
            c.isdigit() for c in stripped):
        return "hex", len(stripped) // 2
    if not all(c in _B64 for c in token):
        return None
    switches = sum(_class(a) != _class(b) for a, b in itertools.pairwise(token))
    rate = switches / (n - 1)
    digits = sum(c.isdigit() for c in token)
    has_upper = any(c.isupper() for c in token)
    has_lower = any(c.islower() for c in token)
    entropy = _entropy(token)
    # A random string of n characters shows close to log2(n) bits of entropy per character up
    # to about 32 characters; past that the sample is too small to show the whole alphabet.
    if entropy < 0.8 * math.log2(min(n, 32)):
        return None
    if has_upper and has_lower:
        # Words and identifiers switch class rarely; base64 about two times in three.
        if digits and rate >= 0.3:
            return "base64", n * 3 // 4
        return None
    # One letter case: base32 (digits 2-7) and base36 switch only at digits, 0.3 on average,
    # so judge by the share of digits instead; a name with a version number has one run.
    if digits and 0.08 <= digits / n <= 0.7 and rate >= 0.12:
        return "random", n * 65 // 100
    if n >= 24 and entropy >= 0.85 * math.log2(min(n, 26)):
        return "letters", n * 58 // 100
    return None


def _decode(part: str) -> str:
    return unquote_to_bytes(part.replace("+", " ")).decode("utf-8", "replace")


def _deep(text: str) -> str:
    """``text`` percent-decoded until no escape is left (at most twice more)."""
    for _ in range(2):
        if "%" not in text:
            break
        text = unquote_to_bytes(text).decode("utf-8", "replace")
    return text


_WORD_SEP = re.compile(r"[-_]")
_UNNEEDED = re.compile(r"%(?:3[0-9]|[46][1-9A-Fa-f]|[57][0-9Aa])")  # escaped letters, digits
_HEXRUN = re.compile(r"^[0-9a-fA-F]+$")


def _pieces(text: str, min_len: int) -> list[str]:
    whole = text.rstrip("=")
    if len(whole) >= min_len and all(c in _B64 for c in whole) and ("/" in whole or "+" in whole):
        return [whole]  # standard base64 holds '/' and '+': judge it whole
    out = []
    for token in _SPLIT.split(text):
        parts = _WORD_SEP.split(token)
        if len(parts) > 1 and ((len(parts) - 1) * 10 >= len(token) or any(
                len(p) >= min_len and _HEXRUN.match(p) for p in parts)):
            out += parts  # words joined by '-' or '_' (a wheel tag), or a name-<digest>
        else:
            out.append(token)
    return out


def _tokens(text: str, where: str, limits: LinkLimits, raw: str = "") -> list[Token]:
    found = []
    short = []
    for token in _pieces(text, limits.min_token_len):
        judged = judge_token(token, limits.min_token_len)
        if judged is not None:
            found.append(Token(where, judged[0], judged[1]))
            continue
        judged = judge_token(token, 8)
        if judged is not None:
            short.append(Token(where, "short " + judged[0], judged[1]))
    unneeded = len(_UNNEEDED.findall(raw))
    if unneeded >= 4:  # RFC 3986 2.3: letters and digits never need escaping
        found.append(Token(where, "needlessly percent-encoded", unneeded))
    return found + short


def dynamic_reason(path: str | None, query: str | None, labels: tuple[str, ...],
                   limits: LinkLimits) -> str | None:
    """Why a URL is a dynamic link (a sentence), or None when it carries no data to speak of.

    ``path`` and ``query`` are as sent (percent-encoded); ``labels`` are the host labels a
    wildcard rule matched (``a1b2.cdn.example`` under ``*.cdn.example`` gives ``("a1b2",)``).
    """
    tokens: list[Token] = []
    for i, label in enumerate(labels):
        tokens += _tokens(label, f"host label {i + 1}", limits)
    if path:
        for segment in path.split("/"):
            if not segment:
                continue
            decoded = _decode(segment)
            if _NESTED.search(_deep(decoded)):
                return f"path segment {_show(decoded)} holds a URL (a nested link)"
            tokens += _tokens(decoded, f"path segment {_show(decoded)}", limits, segment)
    if query:
        for pair in query.split("&"):
            name, _, value = pair.partition("=")
            decoded = _decode(value)
            shown = _decode(name)[:40]
            if _NESTED.search(_deep(decoded)):
                return f"query parameter {shown!r} holds a URL (a nested link)"
            tokens += _tokens(_decode(name), f"query parameter name {shown!r}", limits, name)
            tokens += _tokens(decoded, f"query parameter {shown!r}", limits, value)
    shorts = [t for t in tokens if t.kind.startswith("short ")]
    if len(shorts) < 3:
        tokens = [t for t in tokens if not t.kind.startswith("short ")]
    total = sum(t.data_bytes for t in tokens)
    if total <= limits.max_data_bytes:
        return None
    worst = max(tokens, key=lambda t: t.data_bytes)
    return (f"URL carries about {total} bytes of encoded-looking data, over max_data_bytes "
            f"{limits.max_data_bytes} (largest: {worst.kind} in {worst.where}, "
            f"{worst.data_bytes} bytes)")


def _show(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")
