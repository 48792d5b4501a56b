"""Undo a request body's Content-Encoding (gzip, deflate, br) so its text can be scanned.

A secret gzipped is still a secret. The decoder is incremental, so a body is decompressed as it
streams, and it counts what it produces: a body that expands past ``limit`` bytes is refused as a
decompression bomb, without ever holding more than one chunk's output. An encoding the proxy cannot
undo is refused too, since a body that cannot be read cannot be checked.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any, Protocol

# Output is produced in pieces of at most this size, so a small compressed chunk that expands
# enormously is stopped at the limit without ever being held whole.
_PIECE = 1 << 20


class DecodeError(Exception):
    """The body cannot be decoded, or expands past the limit; the message says which."""


class _Decompressor(Protocol):
    def pieces(self, data: bytes) -> Iterator[bytes]: ...


class _Zlib:
    """gzip, or ``deflate``: zlib-wrapped per RFC 9110, though some clients send it raw."""

    def __init__(self, gzip: bool) -> None:
        self._gzip = gzip
        self._d: Any = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        self._first = b""

    def pieces(self, data: bytes) -> Iterator[bytes]:
        if self._d is None:
            self._first += data
            if len(self._first) < 2:
                return
            wrapped = (self._first[0] & 0x0F) == 8 and (
                (self._first[0] << 8) | self._first[1]) % 31 == 0
            self._d = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
            data, self._first = self._first, b""
        while data:
            out = self._d.decompress(data, _PIECE)
            data = self._d.unconsumed_tail
            if out:
                yield out
            if self._d.eof and (data or self._d.unused_data):
                # Bytes after the end of the stream: gzip allows more members (RFC 1952 2.2)
                # and receivers decode them all, so they are decoded and scanned too; after a
                # deflate stream they are refused, since a receiver might read them somehow.
                rest = self._d.unused_data + data
                if not self._gzip:
                    raise zlib.error("data after the end of the deflate stream")
                self._d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                data = rest


class _Brotli:
    def __init__(self) -> None:
        import brotli

        self._d: Any = brotli.Decompressor()

    def pieces(self, data: bytes) -> Iterator[bytes]:
        try:
            out = self._d.process(data, output_buffer_limit=_PIECE)
            while out:
                yield out
                if self._d.can_accept_more_data():
                    return
                out = self._d.process(b"", output_buffer_limit=_PIECE)
        except Exception as exc:  # brotli.error is not exported under one name
            raise zlib.error(str(exc)) from exc


def _new(coding: str) -> _Decompressor:
    if coding in ("gzip", "x-gzip"):
        return _Zlib(gzip=True)
    if coding == "deflate":
        return _Zlib(gzip=False)
    if coding == "br":
        return _Brotli()
    raise DecodeError(f"content encoding {coding!r} cannot be scanned; egresslock reads "
                      "gzip, deflate and br")


class BodyDecoder:
    """Decodes a body through the codings of its Content-Encoding header, last applied first."""

    __slots__ = ("_stages", "limit", "produced")

    def __init__(self, content_encoding: str, limit: int) -> None:
        codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
        codings = [c for c in codings if c != "identity"]
        self._stages = [_new(c) for c in reversed(codings)]
        self.limit = limit
        self.produced = 0

    @property
    def identity(self) -> bool:
        return not self._stages

    def feed(self, data: bytes) -> Iterator[bytes]:
        """Decoded pieces of ``data``; raises :class:`DecodeError` past the limit."""
        try:
            for piece in self._through(data, 0):
                self.produced += len(piece)
                if self.produced > self.limit:
                    raise DecodeError(
                        f"body expands past {self.limit} bytes when decompressed "
                        "(content.max_decoded_bytes): refused as a decompression bomb")
                yield piece
        except zlib.error as exc:
            raise DecodeError(f"body is not valid for its content encoding: {exc}") from exc

    def _through(self, data: bytes, stage: int) -> Iterator[bytes]:
        if stage == len(self._stages):
            yield data
            return
        for piece in self._stages[stage].pieces(data):
            yield from self._through(piece, stage + 1)
