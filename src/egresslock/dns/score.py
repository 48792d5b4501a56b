"""How much a DNS name looks like it carries data: the signal for DNS exfiltration.

A name is a write channel: whoever runs the authoritative server of ``evil.example`` reads every
``<data>.evil.example`` a resolver asks about, so a lookup that is refused still reaches nobody,
but one that is forwarded leaks its labels. The stub logs a score with every query so that a
reader of the audit log can find the queries that looked like data, and refuses any name that
holds a declared secret (DESIGN.md, hard rule 6: no secret leaves in a DNS name, in any encoding).

The heuristics follow the published detectors (e.g. Farnham & Atlasis, "Detecting DNS Tunneling",
SANS 2013; the label-length and entropy features of most IDS rules): encoded data makes long
labels, many labels, high character entropy, alphabets of hex/base32/base64, and many digits.
Each feature maps to 0..1 and the features combine as independent evidence,
``1 - prod(1 - weight * feature)``, so one strong feature alone can reach about 0.6 and agreeing
features push towards 1. Only the labels left of the registrable part count: the domain an
attacker owns is fixed per campaign, the data rides in front of it. "Registrable part" is
approximated as the last two labels (no public-suffix list: ``co.uk`` names are scored one label
too strictly, which errs towards noticing).

A secret match is not a heuristic: any hit scores exactly 1.0.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from egresslock.content.scanner import Kind, Needle, Scanner

# Encoded fragments shorter than this match ordinary names by chance ("cafe" is hex).
_MIN_FRAGMENT = 6
_HEX = frozenset("0123456789abcdef")
_BASE32 = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_BASE64URL = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
_DIGITS = frozenset("0123456789")
_ENCODED_MIN_LENGTH = 16
_DIGIT_RUNS = re.compile(r"[0-9]+")

# weight of each feature in the combination (see the module docstring)
_W_LONGEST, _W_TOTAL, _W_ENTROPY, _W_ALPHABET, _W_DIGITS, _W_LABELS = 0.6, 0.4, 0.6, 0.5, 0.3, 0.4


@dataclass(frozen=True, slots=True)
class Score:
    """How data-like a name looks, 0 (an ordinary name) to 1 (certainly data), and why.

    ``secret`` is True when the name holds one of the given secrets (``value`` is then 1.0): the
    one finding that is a fact, not a guess, and that the stub refuses on.
    """

    value: float
    reasons: tuple[str, ...] = ()
    secret: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.value <= 1.0:
            raise ValueError(f"score {self.value} must be between 0 and 1")


def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))


@functools.lru_cache(maxsize=64)
def _scanner(secrets: tuple[str, ...]) -> Scanner:
    """One scanner per list of secrets, each named by its 1-based position."""
    return Scanner([Needle(f"#{i}", s.encode("utf-8"), Kind.SECRET)
                    for i, s in enumerate(secrets, start=1) if s])


def _secret_hits(name: str, secrets: Sequence[str]) -> list[str]:
    return [h.describe() for h in _scanner(tuple(secrets)).scan_name(name)]


def _entropy(text: str) -> float:
    counts = Counter(text)
    total = len(text)
    return -sum(c / total * math.log2(c / total) for c in counts.values())


def _alphabet(label: str) -> str | None:
    """The encoding a label looks like, or None. Needs both letters and digits: long words and
    long numbers are other features' business."""
    if len(label) < _ENCODED_MIN_LENGTH:
        return None
    chars = set(label)
    if not chars & _DIGITS or chars <= _DIGITS:
        return None
    if chars <= _HEX:
        return "hex"
    if chars <= _BASE32 and not chars & frozenset("0189"):
        return "base32"
    # Words joined by a number ("my-balancer-1234567890") are base64url's alphabet too; encoded
    # data scatters its digits, so ask for more than one run of them.
    if chars <= _BASE64URL and len(_DIGIT_RUNS.findall(label)) >= 2:
        return "base64url"
    return None


def exfil_score(name: str, secrets: Sequence[str] = (),
                find: Callable[[str], list[str]] | None = None) -> Score:
    """Score ``name`` (lower-case, no trailing dot) for carrying data; 1.0 if it holds a secret.

    ``secrets`` are the values that must never leave; they are looked for in every encoding
    :class:`~egresslock.content.scanner.Scanner` knows (plain, hex, base32, base64url at every
    alignment, split across labels). Reasons name a secret by its 1-based position in
    ``secrets``, never by its value. ``find`` replaces that search: it returns the reasons for
    a name (``egresslock run`` passes the content policy's, which names secrets by name).
    """
    name = name.lower().rstrip(".")
    hits = find(name) if find is not None else _secret_hits(name, secrets) if secrets else []
    if hits:
        return Score(1.0, tuple(hits), secret=True)
    labels = [label for label in name.split(".") if label]
    data = labels[:-2] if len(labels) >= 3 else labels[:-1]
    if not data:
        return Score(0.0)
    text = "".join(data)
    evidence: list[tuple[float, float, str]] = []

    longest = max(data, key=len)
    evidence.append((_W_LONGEST, _clip((len(longest) - 20) / 30),
                     f"longest label is {len(longest)} characters (DNS allows 63)"))
    total = len(".".join(data))
    evidence.append((_W_TOTAL, _clip((total - 40) / 80),
                     f"{total} characters left of the registrable domain"))
    entropy = _entropy(text)
    evidence.append((_W_ENTROPY, _clip((entropy - 3.0) / 1.3) * _clip((len(text) - 12) / 36),
                     f"entropy {entropy:.2f} bits per character over {len(text)} characters"))
    encoded = [(len(label), kind) for label in data if (kind := _alphabet(label)) is not None]
    if encoded:
        length, kind = max(encoded)
        evidence.append((_W_ALPHABET, _clip((length - 12) / 20),
                         f"{kind}-looking label of {length} characters"))
    digits = sum(c in _DIGITS for c in text)
    if len(text) >= 8:
        ratio = digits / len(text)
        evidence.append((_W_DIGITS, _clip((ratio - 0.3) / 0.4), f"digit ratio {ratio:.2f}"))
    evidence.append((_W_LABELS, _clip((len(data) - 3) / 5),
                     f"{len(data)} labels left of the registrable domain"))

    remaining = 1.0
    reasons = []
    for weight, feature, reason in evidence:
        if feature > 0:
            remaining *= 1 - weight * feature
            reasons.append(reason)
    return Score(round(1 - remaining, 3), tuple(reasons))
