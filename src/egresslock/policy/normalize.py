"""Normalisation of hosts, IP literals, URLs and paths: one spelling for each thing.

Every rule and every request goes through these functions before a rule sees it, so two spellings
of the same destination can never get two different decisions. Where an input is ambiguous, where
two reasonable parsers (the proxy's and an upstream server's) could read it differently, it is
refused with :class:`InputError` instead of guessed at: what is checked must be what is sent.

References: WHATWG URL Standard (IPv4 parser, host parsing), RFC 3986 (paths, percent-encoding),
UTS #46 (IDNA mapping), RFC 9112 section 3.2 (request targets).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

import idna

from egresslock.errors import InputError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS = {"http": 80, "https": 443}

# Characters UTS-46 maps to "." (ideographic, full-width and half-width full stops). They are
# mapped before splitting so "evil。com" cannot pass as one label.
_DOT_LOOKALIKES = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})
# A DNS label as it may appear on the wire. Underscore is outside RFC 952 but real (service labels,
# some bucket names) and harmless to matching, so it is accepted.
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_MAX_HOST = 253
# What a label could be instead, for the two refusals of IDNA 2008 (RFC 5891, 5892): an A-label
# that does not decode, and a U-label with a code point IDNA does not allow.
_A_LABEL_HINT = "the A-label of a name IDNA 2008 accepts, like 'xn--e1aybc' for 'тест'"
_U_LABEL_HINT = ("labels are a-z, 0-9, '-' and '_', or letters and digits IDNA 2008 accepts "
                 "after UTS-46 mapping, like 'тест'; symbols and emoji are not")
# Delimiters of URLs: a host holding one was cut from its URL wrongly, or is an attack on a parser.
_NEVER_IN_HOST = frozenset("/\\@?#")
_IPV4_NUMBER = re.compile(r"^(?:0[xX][0-9a-fA-F]*|[0-9]+)$")
# 2**32 has 10 decimal digits; anything far longer is out of range without converting it.
_MAX_DECIMAL_DIGITS = 64


def parse_ipv4_number(part: str) -> int:
    """Read one dotted part as WHATWG's IPv4 parser does: 0x hex, leading-0 octal, else decimal.

    A decimal part of thousands of digits would make ``int`` raise ValueError (CPython's
    int-to-str limit, CVE-2020-10735); it is out of range for any IPv4 address, so it is refused.
    """
    if part[0] != "0" and len(part) > _MAX_DECIMAL_DIGITS:
        raise InputError(f"{part[:20]!r}... has a part out of range for an IPv4 address")
    if part[:2] in ("0x", "0X"):
        return int(part[2:], 16) if len(part) > 2 else 0
    if len(part) > 1 and part[0] == "0":
        if any(c not in "01234567" for c in part):
            raise InputError(f"{part!r} is not a valid octal number in an IPv4 address")
        return int(part, 8)
    return int(part, 10)


def parse_ipv4_literal(text: str) -> ipaddress.IPv4Address | None:
    """Parse every spelling an HTTP client may accept for an IPv4 address.

    ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1`` and ``127.0.0.1`` all give
    127.0.0.1. Returns None when ``text`` is not IPv4-shaped (its last label is not a number);
    raises InputError when it is shaped like one but invalid (``1.2.3.256``, ``08.1.1.1``), since
    a name whose last label is numeric can never be a valid DNS name either.
    """
    parts = text.split(".")
    if parts and parts[-1] == "" and len(parts) > 1:
        parts.pop()
    if not parts or not _IPV4_NUMBER.match(parts[-1]):
        return None
    if len(parts) > 4 or not all(_IPV4_NUMBER.match(p) for p in parts):
        raise InputError(f"{text!r} looks like an IPv4 address but is not one")
    numbers = [parse_ipv4_number(p) for p in parts]
    last = numbers.pop()
    if any(n > 255 for n in numbers) or last >= 256 ** (5 - len(parts)):
        raise InputError(f"{text!r} has a part out of range for an IPv4 address")
    value = last
    for i, n in enumerate(numbers):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


# Hosts repeat: an agent talks to a handful of APIs thousands of times. Both functions are pure
# and their results immutable, so a bounded cache spares the proxy re-parsing the same names.
@functools.lru_cache(maxsize=8192)
def parse_ip_literal(text: str) -> IPAddress | None:
    """Return the address a host string denotes, or None if it is a name.

    IPv6 may come bracketed (as in URLs) or bare. Zone identifiers (``fe80::1%eth0``) are refused:
    they name an interface of the proxy's host, which no agent has reason to choose.
    """
    if text.startswith("[") or ":" in text:
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        if "%" in inner:
            raise InputError(f"IPv6 zone identifiers are not allowed: {text!r}")
        try:
            return ipaddress.IPv6Address(inner)
        except ValueError as exc:
            raise InputError(f"{text!r} is not a valid IPv6 address") from exc
    return parse_ipv4_literal(text)


# The common case: an ASCII name of valid labels, no A-label ("xn--") among them, whose last label
# is not a number. For it, every step of the full path below is the identity but lower-casing and
# dropping one trailing dot, so it is answered by one regex (the proxy normalises every request's
# host, and a policy of 100,000 rules normalises each host twice: when validated, when compiled).
_PLAIN_NAME = re.compile(
    r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.?"
)


@functools.lru_cache(maxsize=8192)
def normalize_host(raw: str) -> str:
    """Return the one spelling of a host: lower-case A-labels, no trailing dot, IPs canonical.

    IPv6 addresses come back without brackets, in RFC 5952 form. Raises InputError naming the
    character or label that no hostname may hold.
    """
    # isascii() first: str.lower() maps some non-ASCII characters to ASCII (KELVIN SIGN to "k").
    if raw.isascii() and len(raw) <= _MAX_HOST + 1:
        lowered = raw.lower()
        if "xn--" not in lowered and _PLAIN_NAME.fullmatch(lowered):
            name = lowered[:-1] if lowered.endswith(".") else lowered
            if len(name) <= _MAX_HOST and not _IPV4_NUMBER.match(name.rpartition(".")[2]):
                return name
    return _normalize_host_full(raw)


def _normalize_host_full(raw: str) -> str:
    if not raw:
        raise InputError("empty host")
    for c in raw:
        if ord(c) < 0x21 or ord(c) == 0x7F or c in _NEVER_IN_HOST:
            raise InputError(f"host {raw!r} holds {c!r}, which no hostname may hold")
    host = raw.translate(_DOT_LOOKALIKES)
    address = parse_ip_literal(host)
    if address is not None:
        return str(address)
    if host.endswith("."):
        host = host[:-1]
    if not host:
        raise InputError(f"host {raw!r} is empty once its trailing dot is removed")
    try:
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
    except idna.IDNAError as exc:
        raise InputError(f"host {raw!r} cannot be mapped by UTS-46: {exc}") from exc
    mapped = mapped.translate(_DOT_LOOKALIKES)
    labels = mapped.split(".")
    out: list[str] = []
    for label in labels:
        out.append(_normalize_label(label, raw))
    result = ".".join(out)
    if len(result) > _MAX_HOST:
        raise InputError(f"host {raw!r} is {len(result)} bytes long; DNS allows {_MAX_HOST}")
    # UTS-46 can map a name into IPv4 shape ("１２７.０.０.１" → "127.0.0.1"): check again.
    address = parse_ip_literal(result)
    return str(address) if address is not None else result


def _normalize_label(label: str, raw: str) -> str:
    if not label:
        raise InputError(f"host {raw!r} has an empty label")
    if label.isascii():
        label = label.lower()
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError as exc:
                raise InputError(
                    f"host {raw!r} has an invalid Punycode label {label!r} ({exc}): a label "
                    f"beginning 'xn--' must be {_A_LABEL_HINT}"
                ) from exc
        elif not _LABEL.match(label):
            bad = next((c for c in label if not (c.isalnum() or c in "-_")), None)
            if bad is not None:
                raise InputError(f"host {raw!r} holds {bad!r}, which no hostname may hold")
            raise InputError(
                f"host {raw!r} has label {label!r}: labels are 1-63 characters of a-z, 0-9, "
                "'-' and '_', and do not begin or end with '-'"
            )
        return label
    try:
        return idna.alabel(label).decode("ascii")
    except idna.IDNAError as exc:
        raise InputError(
            f"host {raw!r}: label {label!r} cannot be written in Punycode ({exc}): "
            f"{_U_LABEL_HINT}"
        ) from exc


# --- paths -------------------------------------------------------------------------------------

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters RFC 3986 allows raw in a path segment besides unreserved (sub-delims, ":" and "@").
_SEGMENT_RAW = _UNRESERVED | frozenset("!$&'()*+,;=:@")
_HEX = frozenset("0123456789abcdefABCDEF")


# A segment of characters allowed raw and no escape, which decoding leaves as it is.
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@]*")


def decode_segment(segment: str, raw: str) -> str:
    """Percent-decode unreserved characters, keep the rest encoded with upper-case hex."""
    if _PLAIN_SEGMENT.fullmatch(segment):
        return segment
    out: list[str] = []
    i = 0
    n = len(segment)
    while i < n:
        c = segment[i]
        if c == "%":
            hexpair = segment[i + 1 : i + 3]
            if len(hexpair) != 2 or not set(hexpair) <= _HEX:
                raise InputError(f"path {raw!r} has a malformed percent-escape {segment[i:i+3]!r}")
            value = int(hexpair, 16)
            char = chr(value)
            if value < 0x20 or value == 0x7F:
                raise InputError(f"path {raw!r} encodes the control byte %{hexpair.upper()}")
            if char == "\\":
                raise InputError(
                    f"path {raw!r} encodes a backslash (%5C), which some servers read as '/'"
                )
            out.append(char if char in _UNRESERVED else "%" + hexpair.upper())
            i += 3
            continue
        if c not in _SEGMENT_RAW:
            if c == "\\":
                raise InputError(f"path {raw!r} holds a backslash, which some servers read as '/'")
            if ord(c) < 0x21 or ord(c) == 0x7F:
                raise InputError(f"path {raw!r} holds the control or space byte {c!r}")
            if ord(c) > 0x7E:
                raise InputError(f"path {raw!r} holds the raw non-ASCII character {c!r}; "
                                 "clients send it percent-encoded")
            raise InputError(f"path {raw!r} holds {c!r}, which must be percent-encoded")
        out.append(c)
        i += 1
    return "".join(out)


_PARAMS = re.compile(r";|%3B")


def hides_dot_segment(decoded: str) -> bool:
    """True when some server would read ``decoded`` (one segment) as, or with, a dot segment.

    Besides ``.`` and ``..`` themselves: a server that decodes ``%2F`` before resolving dot
    segments reads ``a%2F..%2Fb`` as three segments, and Tomcat and Spring drop path parameters,
    so ``..;x`` is ``..`` to them (Orange Tsai, "Breaking Parser Logic", Black Hat USA 2018).
    """
    return any(
        _PARAMS.split(piece, maxsplit=1)[0] in (".", "..") for piece in decoded.split("%2F")
    )


def normalize_path(raw: str) -> str:
    """Return the one spelling of a request path (without query), or raise InputError.

    Unreserved characters are decoded and every other escape is upper-cased, so ``/%7Eu`` and
    ``/~u`` are one path, while ``%2F`` stays an escape inside its segment and is never a
    separator. Dot segments (also ``%2E``, and ``..`` behind ``%2F`` or before a ``;`` path
    parameter), interior empty segments (``//``), backslashes (raw or ``%5C``) and control bytes
    are refused: servers disagree on them, and what the proxy checks must be what the upstream
    serves.
    """
    if not raw.startswith("/"):
        raise InputError(f"path {raw!r} must begin with '/'")
    segments = raw[1:].split("/")
    out: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        decoded = decode_segment(segment, raw)
        if hides_dot_segment(decoded):
            raise InputError(f"path {raw!r} has the dot segment {segment!r}")
        if decoded == "" and index != last:
            raise InputError(f"path {raw!r} has an empty segment ('//'), which servers read "
                             "differently")
        out.append(decoded)
    return "/" + "/".join(out)


# --- URLs --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class URL:
    """A URL after normalisation: every field is in its one canonical spelling."""

    scheme: str
    host: str
    port: int
    path: str
    query: str | None

    @property
    def authority(self) -> str:
        default = DEFAULT_PORTS.get(self.scheme) == self.port
        return join_authority(self.host, None if default else self.port)

    @property
    def target(self) -> str:
        """The origin-form request target: path and query."""
        return self.path if self.query is None else f"{self.path}?{self.query}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}{self.target}"


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# Control bytes, space, DEL and backslash: the first one found names the refusal.
_URL_REFUSED = re.compile(r"[\x00-\x20\x7f\\]")
_QUERY_RAW = _SEGMENT_RAW | frozenset("/?%")
_QUERY_PLAIN = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def join_authority(host: str, port: int | None = None) -> str:
    """``host[:port]`` with an IPv6 literal in brackets: the inverse of :func:`split_authority`."""
    if ":" in host:
        host = f"[{host}]"
    return host if port is None else f"{host}:{port}"


def split_authority(authority: str, default_port: int) -> tuple[str, int]:
    """Split ``host[:port]`` (IPv6 bracketed) into a normalised host and a port."""
    if "@" in authority:
        raise InputError(f"authority {authority!r} has userinfo ('user@'), which is refused: "
                         "it hides the real host from readers of the URL")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise InputError(f"authority {authority!r} has an unclosed '['")
        host_part, rest = authority[: end + 1], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise InputError(f"authority {authority!r} has {rest!r} after the IPv6 address")
        port_part = rest[1:] if rest else None
    else:
        host_part, sep, port_part_s = authority.partition(":")
        port_part = port_part_s if sep else None
        if port_part is not None and ":" in port_part:
            raise InputError(f"authority {authority!r} has more than one ':'; bracket IPv6 hosts")
    port = default_port
    if port_part is not None:
        if not port_part.isascii() or not port_part.isdigit():
            raise InputError(f"port {port_part!r} in {authority!r} must be a number 1-65535")
        # Leading zeros are accepted ("0080"), but thousands of digits are not converted: int()
        # would raise ValueError past CPython's int-to-str limit instead of InputError.
        stripped = port_part.lstrip("0")
        if len(stripped) > 5:
            raise InputError(f"port {port_part[:20]!r}... in {authority[:60]!r} must be 1-65535")
        port = int(port_part)
        if not 1 <= port <= 65535:
            raise InputError(f"port {port} in {authority!r} must be 1-65535")
    return normalize_host(host_part), port


def parse_url(raw: str) -> URL:
    """Parse an absolute http(s) URL strictly, as a forward proxy receives it.

    Refused rather than guessed: userinfo, backslashes, spaces, control bytes and CR/LF anywhere,
    fragments (a request target never carries one, RFC 9112 3.2), schemes other than http and
    https, empty or out-of-range ports, and everything :func:`normalize_host` and
    :func:`normalize_path` refuse.
    """
    bad = _URL_REFUSED.search(raw)
    if bad is not None:
        c = bad.group()
        if c == "\\":
            raise InputError(f"URL {raw!r} holds a backslash, which browsers read as '/'")
        raise InputError(f"URL {raw!r} holds the control or space byte {c!r}")
    if "#" in raw:
        raise InputError(f"URL {raw!r} has a fragment ('#'); request targets never carry one")
    m = _SCHEME.match(raw)
    if not m:
        raise InputError(f"URL {raw!r} has no scheme; use http:// or https://")
    scheme = m.group(1).lower()
    if scheme not in DEFAULT_PORTS:
        raise InputError(f"URL {raw!r} has scheme {scheme!r}; only http and https are proxied")
    rest = raw[m.end() :]
    if not rest.startswith("//"):
        raise InputError(f"URL {raw!r} must have '//' after '{scheme}:'")
    rest = rest[2:]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, target = rest[:cut], rest[cut:]
    if not authority:
        raise InputError(f"URL {raw!r} has no host")
    host, port = split_authority(authority, DEFAULT_PORTS[scheme])
    path_part, qmark, query = target.partition("?")
    path = normalize_path(path_part or "/")
    return URL(scheme, host, port, path, normalize_query(query, raw) if qmark else None)


def normalize_query(query: str, raw: str) -> str:
    """Check a query string's characters; it is kept as sent, since servers parse it themselves."""
    if not _QUERY_PLAIN.fullmatch(query):
        for c in query:
            if c not in _QUERY_RAW:
                raise InputError(f"query of {raw!r} holds {c!r}, which must be percent-encoded")
    if _BAD_ESCAPE.search(query):
        raise InputError(f"query of {raw!r} has a malformed percent-escape")
    return query
