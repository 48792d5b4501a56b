"""Property tests of the sanitizer's three promises, on markdown built from risky fragments.

1. Sanitising twice equals sanitising once (the output is a fixed point).
2. The output for any chunking of the input equals the output for the whole text.
3. Nothing an independent renderer-and-extractor finds in the output is forbidden.

The fragments are the pieces attacks are made of: link and image syntax in halves, reference
definitions before and after their use, fences, raw HTML, container markers, escapes,
entities, secrets and bare URLs, so that hypothesis combines them in ways no corpus lists.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egresslock import sanitize
from egresslock.sanitize import SanitizePolicy
from tests.sanitize.conftest import SECRET
from tests.sanitize.extract import forbidden, html_urls, rendered_urls

FRAGMENTS = [
    "text", " ", "word ", "\n", "\n\n", "  ", "\t", "> ", "- ", "* ", "1. ", "# ", "    ",
    "```", "~~~", "```\n", "| a | b |\n|---|---|\n", "---", "===", "[", "]", "(", ")", "!",
    "<", ">", "&", "&#58;", "&#x2F;", "\\", "*", "_", "`", ":", "/", "//", "?", "=", "#",
    "https://evil.example/x?d=1", "https://docs.acme-corp.example/a",
    "https://cdn.acme-corp.example/img/a.png", "javascript:alert(1)", "www.evil.example/p",
    "setup.py", "![a](https://evil.example/i.png)", "![b](https://cdn.acme-corp.example/img/b.png)",
    "[c](https://docs.acme-corp.example/c)", "[d](https://evil.example/d)", "[r]", "![r]",
    "[x][r]", "[r]: https://evil.example/r\n", "[s]: https://docs.acme-corp.example/s\n",
    "[s]", "[^1]", "[^1]: note [e](https://evil.example/e)\n",
    "<img src=https://evil.example/h.png>", '<a href="https://evil.example/">', "</a>",
    "<div>", "</div>", "<pre>", "</pre>", "<!--", "-->", "<https://evil.example/auto>",
    "<kbd>", '<img src="https://cdn.acme-corp.example/img/ok.png">', SECRET,
    f"https://docs.acme-corp.example/?q={SECRET}", "é", "\u200b", "\r\n", "[^1]:", "\n    ",
    "<pre>\n", "x=https://docs.acme-corp.example/a", "| a | b | c |\n", "&lt;img ",
    "<!-- x -->\n", "www.docs.acme-corp.example/x", "<div>\n", "\\", "![", "](",
]

markdown_text = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join),
    st.text(alphabet=st.sampled_from("[]()!<>:/\\`*_#-> \n\tabc&;=?"), max_size=60),
)
SETTINGS = settings(max_examples=int(os.environ.get("SANITIZE_EXAMPLES", "500")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(markdown_text)
def test_sanitising_twice_equals_once(compiled: SanitizePolicy, text: str) -> None:
    once = sanitize.markdown(text, compiled)
    assert sanitize.markdown(once, compiled) == once


@SETTINGS
@given(markdown_text, st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_chunked_equals_whole(compiled: SanitizePolicy, text: str, cuts: list[int]) -> None:
    whole = sanitize.markdown(text, compiled)
    points = sorted({min(c, len(text)) for c in cuts})
    stream = sanitize.Sanitizer(compiled)
    out = []
    last = 0
    for point in [*points, len(text)]:
        out.append(stream.feed(text[last:point]))
        last = point
    out.append(stream.close())
    assert "".join(out) == whole


@SETTINGS
@given(markdown_text)
def test_no_forbidden_url_in_rendered_output(compiled: SanitizePolicy, text: str) -> None:
    out = sanitize.markdown(text, compiled)
    assert forbidden(rendered_urls(out)) == [], out


@SETTINGS
@given(markdown_text)
def test_html_output_holds_no_forbidden_url(compiled: SanitizePolicy, text: str) -> None:
    out = sanitize.html(text, compiled)
    assert forbidden(html_urls(out)) == [], out
    assert sanitize.html(out, compiled) == out
