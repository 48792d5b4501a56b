"""The dynamic-link detector measured on two corpora (tests/content/corpus/): its false-positive
rate on ordinary URLs an agent fetches (target: at most 1%), and its catch rate on
exfiltration-style URLs (target: all of them).

Each URL is parsed as the proxy parses it (``parse_url``) and judged with the default
:class:`LinkLimits`. Host labels left of the last two are judged as wildcard labels, as if a rule
``*.<domain>`` had matched: stricter than a rule for the exact host, and the same for both
corpora.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from egresslock.content.links import LinkLimits, dynamic_reason
from egresslock.policy import parse_url

CORPUS = Path(__file__).parent / "corpus"
MAX_FALSE_POSITIVE_RATE = 0.01
_XFAIL = "  # xfail: "


def _lines(name: str) -> list[tuple[str, str | None]]:
    """(URL, xfail note or None) for each non-comment line of a corpus file."""
    out = []
    for line in (CORPUS / name).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        url, _, note = line.partition(_XFAIL)
        out.append((url.strip(), note or None))
    return out


def judge(url: str) -> str | None:
    parsed = parse_url(url)
    labels = tuple(parsed.host.split("."))[:-2]
    return dynamic_reason(parsed.path, parsed.query, labels, LinkLimits())


ORDINARY = [url for url, _ in _lines("ordinary_urls.txt")]
DYNAMIC = _lines("dynamic_urls.txt")


def test_corpora_are_large_enough_and_distinct() -> None:
    assert len(ORDINARY) >= 400
    assert len(DYNAMIC) >= 60
    assert len(set(ORDINARY)) == len(ORDINARY)
    assert not set(ORDINARY) & {url for url, _ in DYNAMIC}
    assert all(note is None for _, note in _lines("ordinary_urls.txt"))


def test_false_positive_rate_on_ordinary_urls() -> None:
    flagged = [(url, why) for url in ORDINARY if (why := judge(url)) is not None]
    rate = len(flagged) / len(ORDINARY)
    listing = "\n".join(f"  {url}\n    -> {why}" for url, why in flagged)
    assert rate <= MAX_FALSE_POSITIVE_RATE, (
        f"false-positive rate {rate:.2%} ({len(flagged)}/{len(ORDINARY)}) is over "
        f"{MAX_FALSE_POSITIVE_RATE:.0%}; flagged:\n{listing}")


def test_every_ordinary_url_parses() -> None:
    for url in ORDINARY:
        parse_url(url)


def _dynamic_params() -> list[Any]:
    return [pytest.param(url, marks=pytest.mark.xfail(strict=True, reason=note) if note else (),
                         id=url[:90]) for url, note in DYNAMIC]


@pytest.mark.parametrize("url", _dynamic_params())
def test_exfiltration_url_flagged(url: str) -> None:
    assert judge(url) is not None, f"not flagged: {url}"

