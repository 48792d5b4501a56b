"""Reading the TLS ClientHello of a tunnel, sans-IO: the server name it asks for, nothing more.

A CONNECT names one host; the TLS handshake inside names another in its SNI extension, and under
inspection each HTTP request names a third in Host. Domain fronting works by making them
differ, so the proxy reads the SNI before a byte is forwarded and refuses a tunnel whose SNI is
missing or names another host (DESIGN.md, hard rule 2). Structures from RFC 8446 section 4.1.2
and RFC 6066 section 3.
"""

from __future__ import annotations

from dataclasses import dataclass

from egresslock.errors import EgresslockError

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_EXT_SERVER_NAME = 0x0000
_EXT_ALPN = 0x0010
MAX_HELLO_BYTES = 64 * 1024


class NotTLS(EgresslockError):
    """The first bytes of a tunnel are not a TLS ClientHello."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the proxy learns from a ClientHello: SNI (None when absent) and ALPN offers."""

    server_name: str | None
    alpn: tuple[str, ...]


def looks_like_tls(data: bytes) -> bool:
    """True when ``data`` begins like a TLS handshake record (content type 22, version 3.x)."""
    return len(data) >= 3 and data[0] == _HANDSHAKE and data[1] == 3


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise NotTLS("ClientHello is truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")

    def vec(self, length_bytes: int) -> bytes:
        n = int.from_bytes(self.take(length_bytes), "big")
        return self.take(n)


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Parse a ClientHello from the start of a tunnel.

    Returns None when more bytes are needed, raises :class:`NotTLS` when the bytes cannot be a
    ClientHello. Handles a handshake message split across several records.
    """
    if len(data) < 5:
        if data and data[0] != _HANDSHAKE:
            raise NotTLS("first byte is not a TLS handshake record")
        return None
    if not looks_like_tls(data):
        raise NotTLS("first bytes are not a TLS handshake record")
    # Reassemble the handshake message from consecutive handshake records.
    message = b""
    pos = 0
    while True:
        if len(data) < pos + 5:
            return None
        if data[pos] != _HANDSHAKE:
            raise NotTLS("handshake interrupted by another record type")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > 16384 + 2048:
            raise NotTLS(f"invalid TLS record length {length}")
        if len(data) < pos + 5 + length:
            return None
        message += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                raise NotTLS("first handshake message is not a ClientHello")
            needed = 4 + int.from_bytes(message[1:4], "big")
            if needed > MAX_HELLO_BYTES:
                raise NotTLS("ClientHello is too large")
            if len(message) >= needed:
                return _parse_hello_body(message[4:needed])


def _parse_hello_body(body: bytes) -> ClientHello:
    r = _Reader(body)
    r.take(2)  # legacy_version
    r.take(32)  # random
    r.vec(1)  # legacy_session_id
    r.vec(2)  # cipher_suites
    r.vec(1)  # legacy_compression_methods
    if r.pos == len(body):
        return ClientHello(None, ())
    extensions = _Reader(r.vec(2))
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    seen: set[int] = set()
    while extensions.pos < len(extensions.data):
        ext_type = extensions.u16()
        ext = extensions.vec(2)
        if ext_type in seen:
            raise NotTLS(f"duplicate TLS extension {ext_type}")  # RFC 8446 4.2
        seen.add(ext_type)
        if ext_type == _EXT_SERVER_NAME:
            server_name = _parse_sni(ext)
        elif ext_type == _EXT_ALPN:
            alpn = _parse_alpn(ext)
    return ClientHello(server_name, alpn)


def _parse_sni(ext: bytes) -> str:
    names = _Reader(_Reader(ext).vec(2))
    host: str | None = None
    while names.pos < len(names.data):
        name_type = names.u8()
        name = names.vec(2)
        if name_type == 0:
            if host is not None:
                raise NotTLS("more than one host_name in SNI")  # RFC 6066 3
            try:
                host = name.decode("ascii")
            except UnicodeDecodeError as exc:
                raise NotTLS("SNI host_name is not ASCII") from exc
    if host is None:
        raise NotTLS("SNI extension without a host_name")
    return host


def _parse_alpn(ext: bytes) -> tuple[str, ...]:
    protocols = _Reader(_Reader(ext).vec(2))
    out: list[str] = []
    while protocols.pos < len(protocols.data):
        out.append(protocols.vec(1).decode("ascii", "replace"))
    return tuple(out)
