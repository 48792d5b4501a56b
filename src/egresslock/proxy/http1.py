"""HTTP/1.1 message heads and body framing, sans-IO: bytes in, values out, no sockets.

Request and response heads are validated by llhttp (through httptools), the parser Node.js
uses, in its strict mode: conflicting Content-Length and Transfer-Encoding, duplicate
Content-Length, obs-fold, bare CR or LF, NUL and control bytes, and invalid tokens are all
rejected (RFC 9112 sections 2.2, 5.2, 6.1 and 6.3 list why each one enables request smuggling).
Anything llhttp rejects becomes :class:`ProtocolError`, the one error this module raises.

Bodies are framed here rather than by llhttp so that the proxy can count, cap and (later) scan
them as they stream. Chunked bodies are decoded and re-encoded canonically, so chunk extensions
and odd size spellings never reach an upstream that might read them differently.
"""

from __future__ import annotations

from dataclasses import dataclass

import httptools

from egresslock.errors import EgresslockError

MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE = 4096

# Hop-by-hop headers (RFC 9110 7.6.1) are consumed by the proxy, never forwarded.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization",
    b"proxy-authenticate", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})


class ProtocolError(EgresslockError):
    """Bytes that are not a valid HTTP/1.1 message; the proxy answers 400 and logs them."""


Headers = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class _Collector:
    url: bytes = b""
    status: int = 0
    headers: Headers | None = None
    complete: bool = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.headers is not None
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def header_value(headers: Headers, name: bytes) -> bytes | None:
    """The value of the first header called ``name`` (lower-case), or None."""
    for n, v in headers:
        if n.lower() == name:
            return v
    return None


@dataclass(frozen=True, slots=True)
class RequestHead:
    """A parsed request head. ``target`` is the raw request-target as the client sent it."""

    method: str
    target: str
    version: str
    headers: Headers
    keep_alive: bool
    upgrade: bool

    def get(self, name: bytes) -> bytes | None:
        """The value of the first header called ``name`` (lower-case), or None."""
        return header_value(self.headers, name)

    def get_all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name]


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A parsed response head."""

    status: int
    reason: bytes
    version: str
    headers: Headers
    keep_alive: bool

    def get(self, name: bytes) -> bytes | None:
        return header_value(self.headers, name)


def _keep_alive(version: str, headers: Headers) -> bool:
    """Persistence per RFC 9112 9.3: HTTP/1.1 unless "close", HTTP/1.0 only with "keep-alive".

    Computed here because llhttp resets its flags once a bodyless message completes, so its
    should_keep_alive() is wrong after a head alone."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    if b"close" in tokens:
        return False
    return version == "1.1" or b"keep-alive" in tokens


def parse_request_head(data: bytes) -> RequestHead:
    """Parse a complete request head (through the blank line). Raises ProtocolError."""
    collector = _Collector(headers=[])
    parser = httptools.HttpRequestParser(collector)
    upgrade = False
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        upgrade = True
    except httptools.HttpParserError as exc:
        raise ProtocolError(f"malformed request: {exc}") from exc
    if not collector.complete:
        raise ProtocolError("malformed request: incomplete head")
    version = parser.get_http_version()
    if version not in ("1.1", "1.0"):
        raise ProtocolError(f"HTTP version {version} is not supported; use HTTP/1.1")
    method = parser.get_method().decode("ascii")
    try:
        target = collector.url.decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError("malformed request: request-target is not ASCII") from exc
    assert collector.headers is not None
    return RequestHead(method, target, version, collector.headers,
                       _keep_alive(version, collector.headers), upgrade and method != "CONNECT")


def parse_response_head(data: bytes) -> ResponseHead:
    """Parse a complete response head. Raises ProtocolError."""
    collector = _Collector(headers=[])
    parser = httptools.HttpResponseParser(collector)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    except httptools.HttpParserError as exc:
        raise ProtocolError(f"malformed response from upstream: {exc}") from exc
    if not collector.complete:
        raise ProtocolError("malformed response from upstream: incomplete head")
    status_line = data.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ", 2)
    reason = parts[2] if len(parts) > 2 else b""
    assert collector.headers is not None
    version = parser.get_http_version()
    return ResponseHead(parser.get_status_code(), reason, version, collector.headers,
                        _keep_alive(version, collector.headers))


@dataclass(frozen=True, slots=True)
class Framing:
    """How a body is delimited: a length, chunked, none, or (responses only) until close."""

    kind: str  # "none" | "length" | "chunked" | "close"
    length: int = 0


NO_BODY = Framing("none")


def _content_length(value: bytes) -> int:
    # llhttp already rejected non-digits and duplicates; this guards the conversion.
    if not value.isdigit() or len(value) > 18:
        raise ProtocolError(f"invalid Content-Length {value!r}")
    return int(value)


def request_framing(head: RequestHead) -> Framing:
    """Body framing of a request (RFC 9112 6.3): chunked, a length, or no body."""
    te = head.get(b"transfer-encoding")
    if te is not None:
        if te.strip().lower() != b"chunked":
            raise ProtocolError(f"Transfer-Encoding {te!r} is not supported; only chunked")
        return Framing("chunked")
    cl = head.get(b"content-length")
    if cl is not None:
        length = _content_length(cl)
        return Framing("length", length) if length else NO_BODY
    return NO_BODY


def response_framing(head: ResponseHead, request_method: str) -> Framing:
    """Body framing of a response to ``request_method`` (RFC 9112 6.3)."""
    if request_method == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
        return NO_BODY
    te = head.get(b"transfer-encoding")
    if te is not None:
        codings = [c.strip().lower() for c in te.split(b",")]
        if codings[-1] == b"chunked":
            return Framing("chunked")
        return Framing("close")
    cl = head.get(b"content-length")
    if cl is not None:
        return Framing("length", _content_length(cl))
    return Framing("close")


class ChunkedDecoder:
    """Decodes a chunked body incrementally. ``feed`` returns data chunks; ``done`` after the
    last chunk and its trailer section. Chunk extensions are dropped and trailers discarded."""

    __slots__ = ("_buf", "_remaining", "_state", "done")

    def __init__(self) -> None:
        self._buf = b""
        self._remaining = 0
        self._state = "size"  # size | data | data_crlf | trailer
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        out: list[bytes] = []
        buf = self._buf + data if self._buf else data
        pos = 0
        n = len(buf)
        while pos < n and not self.done:
            if self._state == "data":
                take = min(self._remaining, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "data_crlf"
                continue
            end = buf.find(b"\r\n", pos)
            if end < 0:
                if n - pos > MAX_CHUNK_LINE:
                    raise ProtocolError("chunk line too long")
                break
            line = buf[pos:end]
            pos = end + 2
            if self._state == "size":
                self._remaining = self._parse_size(line)
                self._state = "data" if self._remaining else "trailer"
            elif self._state == "data_crlf":
                if line:
                    raise ProtocolError("chunk data longer than its declared size")
                self._state = "size"
            elif line == b"":  # trailer: header lines until an empty line
                self.done = True
            elif b"\n" in line or b"\r" in line or b":" not in line:
                raise ProtocolError("malformed chunked trailer")
        self._buf = buf[pos:]
        return out

    def leftover(self) -> bytes:
        """Bytes fed after the end of the body (the next pipelined message), once ``done``."""
        return self._buf if self.done else b""

    @staticmethod
    def _parse_size(line: bytes) -> int:
        size = line.split(b";", 1)[0]
        if not size or len(size) > 16 or any(c not in b"0123456789abcdefABCDEF" for c in size):
            raise ProtocolError(f"invalid chunk size {line[:32]!r}")
        if b"\r" in line or b"\n" in line:
            raise ProtocolError("bare CR or LF in a chunk size line")
        return int(size, 16)


def encode_chunk(data: bytes) -> bytes:
    """One chunk in canonical form."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


def serialize_headers(headers: Headers) -> bytes:
    return b"".join(b"%s: %s\r\n" % (n, v) for n, v in headers)


def strip_hop_by_hop(headers: Headers) -> Headers:
    """Drop hop-by-hop headers and any header the Connection header names."""
    named: set[bytes] = set()
    for n, v in headers:
        if n.lower() == b"connection":
            named.update(t.strip().lower() for t in v.split(b","))
    return [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP and n.lower() not in named]


def simple_response(status: int, reason: str, text: str, extra: Headers | None = None,
                    close: bool = False) -> bytes:
    """A short text/plain response the proxy itself produces (403, 400, 502, ...)."""
    body = (text.rstrip("\n") + "\n").encode("utf-8", "replace")
    headers: Headers = [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()),
        *(extra or []),
    ]
    if close:
        headers.append((b"Connection", b"close"))
    return b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (
        status, reason.encode(), serialize_headers(headers), body)


def header_safe(text: str) -> bytes:
    """Text for a header value: printable ASCII only, so a reason can never split a header."""
    return "".join(c if 0x20 <= ord(c) < 0x7F else "?" for c in text).encode("ascii")[:1024]


def deny_response(rule_id: str, reason: str, close: bool = False) -> bytes:
    """The 403 of a denied request: ``X-Egresslock-Deny: <rule>; <reason>`` and the same words."""
    value = header_safe(f"{rule_id}; {reason}")
    return simple_response(403, "Forbidden", f"egresslock: denied: {rule_id}; {reason}",
                           [(b"X-Egresslock-Deny", value)], close)
