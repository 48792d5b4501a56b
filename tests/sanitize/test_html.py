"""HTML through nh3 and the policy: exact outputs, as a table keyed by a sentence."""

from __future__ import annotations

import pytest

from egresslock import sanitize
from egresslock.sanitize import SanitizePolicy

CASES = [
    ("an allowed link gains rel noopener noreferrer",
     '<a href="https://docs.acme-corp.example/x" target="_blank">x</a>',
     '<a href="https://docs.acme-corp.example/x" rel="noopener noreferrer">x</a>'),
    ("a forbidden link keeps its text",
     '<a href="https://evil.example/?d=1">read</a>', '<a rel="noopener noreferrer">read</a>'),
    ("an image without its source becomes its alt text",
     '<p><img src="https://evil.example/x.png" alt="a chart"></p>', "<p>a chart</p>"),
    ("formatting, details and tables stay",
     "<details><summary>More</summary><table><tr><td colspan=2><kbd>k</kbd></td></tr></table>"
     "</details>",
     '<details><summary>More</summary><table><tbody><tr><td colspan="2"><kbd>k</kbd></td></tr>'
     "</tbody></table></details>"),
    ("a URL in text is removed, a mention is not",
     "<p>go to https://evil.example/?d=1 or python.org</p>",
     "<p>go to (link removed) or python.org</p>"),
    ("an allowed URL in text stays",
     "<p>see https://docs.acme-corp.example/a</p>", "<p>see https://docs.acme-corp.example/a</p>"),
    ("comments, scripts and styles go with their content",
     "a<!-- ![x](https://evil.example/) --><script>x()</script><style>p{}</style>b", "ab"),
]


@pytest.mark.parametrize(("why", "html", "expected"), CASES, ids=[c[0] for c in CASES])
def test_html(compiled: SanitizePolicy, why: str, html: str, expected: str) -> None:
    assert sanitize.html(html, compiled) == expected


def test_each_dropped_url_is_reported_once(compiled: SanitizePolicy) -> None:
    removals: list[sanitize.Removal] = []
    sanitize.html('<img src="https://evil.example/a.png" srcset="https://evil.example/b.png 2x">'
                  '<iframe src="https://evil.example/f"></iframe><form></form>', compiled,
                  on_removal=removals.append)
    assert [(r.element, r.rule, r.host) for r in removals] == [
        ("html <img>", "output.images", "evil.example"),
        ("html <img>", "html", "evil.example"),
        ("html <iframe>", "html", "evil.example"),
        ("html <form>", "html", None),
    ]
