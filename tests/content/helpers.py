"""Encoders and fixtures shared by the content tests: the ways an agent could spell a secret.

Each encoder takes the secret's bytes and returns the haystack an attacker would send; the
tables in the test modules pair each with the encoding the scanner must report.
"""

from __future__ import annotations

import base64
import random

from egresslock.content.detectors import DETECTORS
from egresslock.content.scanner import Kind, Needle, Scanner

# Mixed case, digits and punctuation, so that case-sensitive forms (base64) and percent-encoding
# both matter. Its last byte 'Z' (0x5a) has non-zero top 2, 4 and 6 bits: the base64 of the
# secret minus that byte, zero-padded, cannot end in the same partial character, so the
# near-miss rows are true misses at every alignment.
SECRET = b"Sk-Live-9fQ2xR7tLm4WpZ"
SECRET_NAME = "stripe-live"
SPACED = b"correct horse battery staple"
SPACED_NAME = "passphrase"


def needles() -> list[Needle]:
    return [Needle(SECRET_NAME, SECRET, Kind.SECRET), Needle(SPACED_NAME, SPACED, Kind.SECRET)]


def scanner(detectors: bool = False) -> Scanner:
    return Scanner(needles(), DETECTORS if detectors else ())


def rng(seed: int) -> random.Random:
    return random.Random(seed)  # noqa: S311  reproducible test data, not key material


def percent_subset(data: bytes, seed: int, twice: bool = False) -> bytes:
    """``data`` with a random half of its bytes percent-encoded (``%2541`` when ``twice``)."""
    r = rng(seed)
    out = []
    for b in data:
        if r.random() < 0.5:
            out.append(f"%25{b:02X}" if twice else f"%{b:02x}" if r.random() < 0.5
                       else f"%{b:02X}")
        else:
            out.append(chr(b))
    return "".join(out).encode("latin-1")


def json_escaped(data: bytes) -> bytes:
    """Every byte as a JSON ``\\u00XX`` escape, as ``json.dumps`` spells control characters."""
    return "".join(f"\\u{b:04x}" for b in data).encode("ascii")


def b64_in_blob(data: bytes, before: int, after: int, urlsafe: bool, seed: int) -> bytes:
    """``data`` between random bytes, the whole blob base64-encoded: the secret sits at
    alignment ``before % 3`` inside an encoding computed over bytes it does not own."""
    r = rng(seed)
    blob = r.randbytes(before) + data + r.randbytes(after)
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(blob)


def b32_label_split(data: bytes, size: int) -> str:
    """``data`` base32-encoded, lower-cased and cut into DNS labels of ``size`` characters."""
    enc = base64.b32encode(data).decode().rstrip("=").lower()
    return ".".join(enc[i:i + size] for i in range(0, len(enc), size))


def hex_label_split(data: bytes, size: int) -> str:
    enc = data.hex()
    return ".".join(enc[i:i + size] for i in range(0, len(enc), size))
