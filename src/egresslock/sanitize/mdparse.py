"""Parsing one unit of markdown with markdown-it-py, configured to see every way to a URL.

The parser is CommonMark plus the GFM pieces that create or hide links (tables, strikethrough,
autolinked bare URLs through linkify-it) and footnotes, with raw HTML on. Three changes to its
defaults matter for security:

- ``validateLink`` accepts everything. markdown-it's own check turns ``javascript:`` links into
  text; another renderer may not, so every link must reach the policy, which keeps only https.
- Bare URLs are found as markdown-it's GFM preset finds them (while parsing, where a URL can
  swallow the backticks of a code span after it, so what looks like code elsewhere would be
  raw HTML in such a renderer; and in text split at escapes), and again *after* escapes and
  entities are joined into text. Otherwise ``https\\://evil.example`` or
  ``https&#58;//evil.example`` would stay text here and become a link in a renderer whose
  autolinker runs on the rendered text.
- Reference definitions come out as tokens (``inline_definitions``) with their lines, so they can
  be removed, and link and image tokens are marked with their form (inline or reference), so
  references can be rewritten inline: the output never holds a definition.

Units are parsed on their own (see :mod:`egresslock.sanitize.stream`); definitions of earlier
(and, for held units, later) units come in through ``env``. :class:`ParsedUnit` says what the
stream needs to know: whether the unit ends inside an open fence or HTML block, which labels in
it could still become references, and whether the parser's nesting limit was reached or the
parser failed (content past the limit is invisible to the parser but not to a renderer, so
such a unit is not trusted).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.common.utils import normalizeReference
from markdown_it.rules_block.html_block import HTML_SEQUENCES
from markdown_it.rules_core.linkify import linkify as linkify_rule
from markdown_it.rules_inline.state_inline import StateInline
from markdown_it.token import Token
from mdit_py_plugins.footnote import footnote_plugin

MAX_NESTING = 40
# An innermost [...] pair, with backslash escapes as single characters: a possible label.
_LABEL = re.compile(r"\[((?:\\.|[^\[\]\\])*)\]", re.DOTALL)


@dataclass
class Definitions:
    """Reference definitions and footnote labels seen so far; the first of a label wins."""

    refs: dict[str, dict[str, Any]] = field(default_factory=dict)
    footnotes: set[str] = field(default_factory=set)
    version: int = 0  # grows when a new label is learned

    def env(self) -> dict[str, Any]:
        """A fresh markdown-it ``env`` that knows these definitions."""
        return {"references": dict(self.refs),
                "footnotes": {"refs": {":" + label: -1 for label in self.footnotes},
                              "list": {}}}

    def learn(self, env: dict[str, Any]) -> None:
        for label, ref in env.get("references", {}).items():
            if label not in self.refs:
                self.refs[label] = ref
                self.version += 1
        for key in env.get("footnotes", {}).get("refs", {}):
            if key[1:] not in self.footnotes:
                self.footnotes.add(key[1:])
                self.version += 1

    def defines(self, label: str) -> bool:
        if label.startswith("^"):
            return label[1:] in self.footnotes
        return label in self.refs


@dataclass(frozen=True, slots=True)
class ParsedUnit:
    """The tokens of one unit and what the stream needs to know about them."""

    text: str
    lines: list[str]
    tokens: list[Token]
    env: dict[str, Any]
    open_end: re.Pattern[str] | None  # set when the unit ends inside a fence or HTML block
    candidates: frozenset[str]        # labels that a later definition could turn into links
    unchecked: bool                   # too deep for the parser, or the parser failed


def build_parser(*, footnotes: bool = True) -> MarkdownIt:
    """A markdown-it-py parser for sanitising (never for rendering: its HTML would be unsafe).

    ``footnotes=False`` is the dialect of renderers without footnotes, where ``[^1]: url`` is
    a reference definition and a footnote's indented paragraphs are code; a unit that holds
    ``[^`` must be safe in both (see :mod:`egresslock.sanitize.stream`).
    """
    md = MarkdownIt("commonmark", {"html": True, "linkify": True, "typographer": False,
                                   "inline_definitions": True, "maxNesting": MAX_NESTING})
    md.enable(["table", "strikethrough", "linkify"])
    if footnotes:
        md.use(footnote_plugin, inline=False, move_to_end=False)
    assert md.linkify is not None  # linkify-it-py is a dependency
    md.linkify.set({"fuzzy_email": False})
    # Any top-level domain, not linkify-it's short list: GFM links www.anything.dev/?d=...,
    # and renderers with the full IANA list link bare names under new TLDs. linkify-it joins
    # these entries into its host regex as written, so one entry can be a pattern.
    md.linkify.tlds([r"[^\W\d_]{2,63}", r"xn--[a-z0-9-]{1,59}"])
    md.linkify = _GatedLinkify(md.linkify)
    md.validateLink = _accept  # type: ignore[method-assign]
    # Bare URLs once where markdown-it's GFM preset finds them (text split at escapes), then
    # again in the joined text, as an autolinker that runs on rendered text finds them.
    md.core.ruler.after("text_join", "linkify_joined", linkify_rule)
    for name in ("link", "image"):
        md.inline.ruler.at(name, _mark_form(name))
    return md


def _accept(url: str) -> bool:
    return True


# Every URL linkify-it can find has one of these; text without them is not worth its regexes.
URL_HINT = re.compile(r"//|(?i:mailto:|www\.|localhost)|\.[^\s.]")


class _GatedLinkify:
    """linkify-it behind a cheap test, and without its pretest of the raw paragraph.

    markdown-it runs ``pretest`` on the paragraph's source before looking at its text, so
    ``https:\\/\\/evil.example`` (escaped slashes) fails it although its text is a URL. Here
    the source passes whenever it holds an escape or entity, and the text is tested as joined.
    """

    def __init__(self, real: Any) -> None:
        self._real = real

    def pretest(self, text: str) -> bool:
        return "\\" in text or "&" in text or URL_HINT.search(text) is not None

    def test(self, text: str) -> bool:
        return URL_HINT.search(text) is not None and bool(self._real.test(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _mark_form(name: str) -> Any:
    """Wrap the link or image rule so that its token records inline or reference form."""
    from markdown_it.rules_inline import image, link

    rule = link if name == "link" else image

    def marked(state: StateInline, silent: bool) -> bool:
        first = len(state.tokens)
        if not rule(state, silent):
            return False
        if not silent:
            # An inline link ends with ')'; every reference form ends with ']'. The first token
            # pushed may be pending text from before the link, so look for the link's own.
            form = "inline" if state.src[state.pos - 1] == ")" else "reference"
            for token in state.tokens[first:]:
                if token.type in ("link_open", "image"):
                    token.meta = {**(token.meta or {}), "form": form}
                    break
        return True

    return marked


def parse_unit(md: MarkdownIt, text: str, defs: Definitions, *, final: bool) -> ParsedUnit:
    """Parse ``text`` with ``defs`` known. ``final`` units are not checked for an open end.

    A unit the parser fails on comes back ``unchecked``: it is not trusted, whatever it holds.
    markdown-it-py 4.3 raises IndexError on ``> - <pre>\\n> `` and RuntimeError ("inline rule
    didn't increment state.pos") from its linkify rule on some reference-like text; any error
    of the parser is treated the same, since the alternative is passing text through unseen.
    """
    env = defs.env()
    lines = text.split("\n")
    try:
        tokens = md.parse(text, env)
    except Exception:  # fail closed on any parser bug (see above)
        return ParsedUnit(text, lines, [], env, None, frozenset(), unchecked=True)
    line_max = len(lines) - 1 if text.endswith("\n") else len(lines)
    open_end = None if final else _open_end(tokens, lines, line_max)
    return ParsedUnit(text, lines, tokens, env, open_end, _candidates(tokens),
                      unchecked=_too_deep(tokens))


def _open_end(tokens: list[Token], lines: list[str], line_max: int) -> re.Pattern[str] | None:
    """The pattern of the line that would close a fence or HTML block left open at the end.

    A unit ends with blank lines; a top-level fence or HTML block whose lines run to the end
    swallowed them, so it is still open and the next unit is inside it, not after it.
    """
    for token in reversed(tokens):
        if token.level != 0 or token.map is None:
            continue
        if token.map[1] != line_max:
            return None
        if token.type == "fence":
            char, count = re.escape(token.markup[0]), len(token.markup)
            return re.compile(rf"^ {{0,3}}{char}{{{count},}}[ \t]*\n", re.MULTILINE)
        if token.type == "html_block":
            first = lines[token.map[0]].lstrip(" ")
            for opening, closing, _ in HTML_SEQUENCES[:5]:
                if opening.search(first):
                    return closing
        return None
    return None


def _candidates(tokens: list[Token]) -> frozenset[str]:
    """Labels that could still become references: only when some bracket was left as text."""
    leftover = False
    contents: list[str] = []
    for token in tokens:
        if token.type != "inline":
            continue
        contents.append(token.content)
        if not leftover and _text_has_bracket(token.children or []):
            leftover = True
    if not leftover:
        return frozenset()
    found = set()
    for content in contents:
        for match in _LABEL.finditer(content):
            label = match.group(1)
            if label.startswith("^"):
                found.add(label)
            else:
                normal = normalizeReference(label)
                if normal:
                    found.add(normal)
    return frozenset(found)


def _text_has_bracket(children: list[Token]) -> bool:
    for child in children:
        if child.type == "text" and ("[" in child.content or "]" in child.content):
            return True
        if child.children and _text_has_bracket(child.children):
            return True
    return False


def _too_deep(tokens: list[Token]) -> bool:
    for token in tokens:
        if token.level >= MAX_NESTING - 1:
            return True
        if token.children and _too_deep(token.children):
            return True
    return False
