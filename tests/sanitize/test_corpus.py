"""The attack corpus (``corpus/*.yaml``): each case removed, kept, stable and cut-proof.

Every case is checked for what its write-up says must go and what must stay, then for the
sanitizer's three promises: sanitising the output again changes nothing; the output is the
same however the input is cut into two chunks; and nothing an independent renderer-and-
extractor (:mod:`tests.sanitize.extract`) finds in the output is forbidden by the policy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from egresslock import sanitize
from egresslock.policy import Policy
from tests.sanitize.extract import forbidden, html_urls, rendered_urls

CORPUS = Path(__file__).parent / "corpus"


def _cases() -> list[Any]:
    params = []
    for path in sorted(CORPUS.glob("*.yaml")):
        for case in yaml.safe_load(path.read_text(encoding="utf-8")):
            params.append(pytest.param(case, id=f"{path.stem}: {case['name']}"))
    return params


def _run(case: dict[str, Any], text: str, policy: Policy,
         removals: list[sanitize.Removal] | None = None) -> str:
    on_removal = removals.append if removals is not None else None
    if case.get("format") == "html":
        return sanitize.html(text, policy, on_removal=on_removal)
    return sanitize.markdown(text, policy, on_removal=on_removal)


@pytest.mark.parametrize("case", _cases())
def test_corpus_case(case: dict[str, Any], policy: Policy) -> None:
    text = case["input"]
    removals: list[sanitize.Removal] = []
    out = _run(case, text, policy, removals)
    for gone in case.get("gone") or []:
        assert gone not in out, f"{gone!r} survived in {out!r}"
    for kept in case.get("kept") or []:
        assert kept in out, f"{kept!r} is missing from {out!r}"
    expected = case.get("removals")
    if expected == 0:
        assert removals == [], [r.describe() for r in removals]
    elif expected is not None:
        assert len(removals) >= expected, [r.describe() for r in removals]
    if case.get("unchanged"):
        assert out == text
    assert _run(case, out, policy) == out, "sanitising the output again changed it"
    urls = html_urls(out) if case.get("format") == "html" else rendered_urls(out)
    assert forbidden(urls) == [], out


@pytest.mark.parametrize("case", [c for c in _cases() if c.values[0].get("format") != "html"])
def test_corpus_case_every_cut(case: dict[str, Any], policy: Policy) -> None:
    text = case["input"]
    whole = sanitize.markdown(text, policy)
    for cut in range(1, len(text)):
        stream = sanitize.Sanitizer(policy)
        out = stream.feed(text[:cut]) + stream.feed(text[cut:]) + stream.close()
        assert out == whole, f"cut at {cut}: {text[:cut]!r} | {text[cut:]!r}"
