"""``BodyDecoder``: Content-Encoding undone incrementally, bombs stopped at the limit, and every
failure one :class:`DecodeError` whose message says what was wrong."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib
from collections.abc import Callable, Iterator

import brotli
import pytest

from egresslock.content.decode import BodyDecoder, DecodeError

TEXT = b"{\"prompt\": \"summarise this\", \"n\": 1}\n" * 2000 + b"token=Sk-Live-9fQ2xR7tLm4WpZ\n"
MiB = 1 << 20


def _deflate_raw(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


CODINGS: list[tuple[str, Callable[[bytes], bytes]]] = [
    ("gzip", gzip.compress),
    ("x-gzip", gzip.compress),
    ("deflate", zlib.compress),          # zlib-wrapped, as RFC 9110 8.4.1.2 says
    ("deflate", _deflate_raw),           # raw, as some clients send it
    ("br", brotli.compress),
    ("gzip, br", lambda d: brotli.compress(gzip.compress(d))),  # gzip applied first
    ("deflate, gzip", lambda d: gzip.compress(zlib.compress(d))),
    ("identity, gzip", gzip.compress),
    ("GZIP", gzip.compress),
]
IDS = ["gzip", "x-gzip", "deflate-zlib", "deflate-raw", "br", "gzip-then-br",
       "deflate-then-gzip", "identity-gzip", "upper-case"]


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def _drain(d: BodyDecoder, data: bytes, size: int) -> None:
    """Feed ``data`` in chunks of ``size`` and throw the output away, as a scanner would."""
    for chunk in _chunks(data, size):
        for _ in d.feed(chunk):
            pass


def _decode(coding: str, data: bytes, size: int, limit: int = 64 * MiB) -> bytes:
    d = BodyDecoder(coding, limit)
    return b"".join(piece for chunk in _chunks(data, size) for piece in d.feed(chunk))


@pytest.mark.parametrize(("coding", "encode"), CODINGS, ids=IDS)
@pytest.mark.parametrize("size", [1, 7, 4096, 1 << 30])
def test_decodes_in_chunks(coding: str, encode: Callable[[bytes], bytes], size: int) -> None:
    data = encode(TEXT)
    if size == 1 and len(data) > 4000:
        data = encode(TEXT[-2000:])
        assert _decode(coding, data, size) == TEXT[-2000:]
        return
    assert _decode(coding, data, size) == TEXT


@pytest.mark.parametrize("coding", ["", "identity", " identity "])
def test_identity_passes_through_and_counts(coding: str) -> None:
    d = BodyDecoder(coding, 100)
    assert d.identity
    assert list(d.feed(b"x" * 100)) == [b"x" * 100]
    with pytest.raises(DecodeError, match="expands past 100 bytes"):
        list(d.feed(b"x"))


def _zeros_gzip(total: int) -> Iterator[bytes]:
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    for _ in range(total // MiB):
        yield c.compress(bytes(MiB))
    yield c.flush()


def _zeros_br(total: int) -> Iterator[bytes]:
    c = brotli.Compressor(quality=1)
    for _ in range(total // MiB):
        yield c.process(bytes(MiB))
    yield c.finish()


@pytest.mark.parametrize(("coding", "bomb"), [("gzip", _zeros_gzip), ("br", _zeros_br)])
def test_bomb_refused_at_the_limit_without_holding_the_output(
        coding: str, bomb: Callable[[int], Iterator[bytes]]) -> None:
    """200 MiB of zeros (about 200 KB gzipped) against a 16 MiB limit: refused as soon as the
    output passes the limit, and the decoder never holds more than a piece of it."""
    compressed = b"".join(bomb(200 * MiB))
    assert len(compressed) < 300_000
    limit = 16 * MiB
    d = BodyDecoder(coding, limit)
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match="decompression bomb") as info:
            _drain(d, compressed, 64 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "16777216" in str(info.value)
    assert "max_decoded_bytes" in str(info.value)
    # Stopped within one piece of the limit: pieces are 1 MiB, and brotli's
    # output_buffer_limit only stops the buffer growing, so a br piece can reach about 2 MiB.
    assert limit < d.produced <= limit + 2 * MiB
    assert peak < 8 * MiB, f"peak {peak} bytes held while decoding"


def test_limit_counts_across_chunks() -> None:
    d = BodyDecoder("gzip", 1000)
    data = gzip.compress(b"a" * 999)
    assert b"".join(d.feed(data)) == b"a" * 999
    d = BodyDecoder("gzip", 1000)
    with pytest.raises(DecodeError, match="expands past 1000 bytes"):
        _drain(d, gzip.compress(b"a" * 1001), 3)


@pytest.mark.parametrize(("coding", "data"), [
    ("gzip", b"this is not gzip at all"),
    ("gzip", gzip.compress(TEXT)[:10] + b"\xff" * 50),
    ("deflate", b"\x78\x9c" + b"\xff" * 40),
    ("br", b"\xff\xff\xff\xff not brotli"),
    ("gzip, br", brotli.compress(b"plain text, not gzip")),
])
def test_invalid_data_raises_decode_error(coding: str, data: bytes) -> None:
    d = BodyDecoder(coding, MiB)
    with pytest.raises(DecodeError, match="not valid for its content encoding"):
        list(d.feed(data))


@pytest.mark.parametrize("coding", ["compress", "zstd", "gzip, zstd", "bzip2"])
def test_unknown_coding_refused_with_what_is_read(coding: str) -> None:
    with pytest.raises(DecodeError) as info:
        BodyDecoder(coding, MiB)
    message = str(info.value)
    assert repr(coding.rsplit(", ", maxsplit=1)[-1]) in message
    assert "gzip, deflate and br" in message


@pytest.mark.parametrize(("coding", "body"), [
    ("gzip", gzip.compress(b"hello ") + gzip.compress(b"token=Sk-Live-9fQ2xR7tLm4WpZ")),
    ("deflate", zlib.compress(b"hello ") + zlib.compress(b"token=Sk-Live-9fQ2xR7tLm4WpZ")),
], ids=["gzip-two-members", "deflate-trailing-stream"])
def test_data_after_the_first_stream_is_decoded_or_refused(coding: str, body: bytes) -> None:
    d = BodyDecoder(coding, MiB)
    try:
        decoded = b"".join(d.feed(body))
    except DecodeError:
        return  # refusing the trailing bytes is as good as decoding them
    assert b"token=Sk-Live-9fQ2xR7tLm4WpZ" in decoded
