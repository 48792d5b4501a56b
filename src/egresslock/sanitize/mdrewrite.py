"""Rewriting a parsed unit of markdown: the blocks that hold something unsafe are written anew.

The output is markdown, because chat clients render markdown. A block (paragraph, heading,
table row, HTML block) in which everything may stay is copied from the input untouched. A block
with something to remove is rebuilt from its tokens:

- a removed link or image leaves its text (an image its alt text, flattened to plain text);
- a removed autolink or bare URL has no text but the URL, so it becomes "(link removed)";
- raw HTML is cleaned by nh3 (:mod:`egresslock.sanitize.htmlsafe`);
- kept links and images are written inline with ``<...>`` destinations, including those that
  were reference-style; reference definitions are always removed, so no ``[x]`` in the output
  can ever become a link in a renderer;
- all text is written with markdown's punctuation backslash-escaped, so text that was inside
  link syntax (a label, an alt text) cannot form a new link, image or HTML tag once the syntax
  around it is gone.

Rebuilding keeps the block's line structure (one output line per soft break) and puts back each
line's container prefix (``> ``, list indentation), so the block stays where it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from markdown_it.token import Token

from egresslock.errors import InputError
from egresslock.policy.normalize import parse_url
from egresslock.sanitize.htmlsafe import HtmlCleaner
from egresslock.sanitize.mdparse import ParsedUnit
from egresslock.sanitize.removal import Removal
from egresslock.sanitize.urls import LOOSE_URL, RULE_OF, SanitizePolicy

# What a removed autolink or bare URL leaves behind (escaped: it must not become a destination).
PLACEHOLDER = "\\(link removed\\)"
# Characters that open markdown constructs anywhere in a line. '!' and '(' need no escape once
# '[' and ']' have one; '#', '>', '+', '-', '=' and '1.' only matter where a line starts.
_ESCAPE = re.compile(r"([\\`*_\[\]<&|~])")
_LINE_START = re.compile(r"^([ \t]*)(?:([#>+=-])|(\d{1,9})([.)]))", re.MULTILINE)
# Text a lenient renderer could read as a tag although CommonMark does not
# (``<img src=https://x/?a=b>``: an unquoted value with '=' is not a CommonMark attribute).
_TAG_LIKE = re.compile(r"<[A-Za-z/!?]")
_MARKUP = frozenset({"em_open", "em_close", "strong_open", "strong_close", "s_open", "s_close"})
_PLAIN = frozenset({"text", "code_inline", "softbreak", "hardbreak"} | _MARKUP)
_CONTAINER = re.compile(r"[ \t>]*")
_ROW_PREFIX = re.compile(r"[ \t>]*(?:(?:[-+*]|\d{1,9}[.)])[ \t]+)?[ \t>]*")
_UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")

Edit = tuple[int, int, list[str]]  # replace lines [start, end) with these


@dataclass(frozen=True, slots=True)
class _Context:
    report: list[Removal]
    table: bool = False
    in_link: bool = False  # inside a link's text: no renderer links URLs there


class Rewriter:
    """Rewrites parsed units for one policy."""

    __slots__ = ("cleaner", "policy")

    def __init__(self, policy: SanitizePolicy) -> None:
        self.policy = policy
        self.cleaner = HtmlCleaner(policy)

    def rewrite(self, unit: ParsedUnit, report: list[Removal]) -> str:
        """The unit's text with every unsafe block rewritten; removals appended to ``report``."""
        edits: list[Edit] = []
        tokens = unit.tokens
        skip: set[int] = set()
        for index, token in enumerate(tokens):
            if index in skip:
                continue
            edit: Edit | None = None
            if token.type == "definition" and token.map:
                edit = _drop_definition(unit.lines, token.map)
            elif token.type == "html_block" and token.map:
                edit = self._html_block(unit.lines, token, report)
            elif token.type == "tr_open" and token.map:
                edit, cells = self._row(unit.lines, tokens, index, report)
                skip.update(cells)
            elif token.type == "inline" and token.map:
                edit = self._block(unit.lines, tokens[index - 1], token, report)
            if edit is not None:
                edits.append(edit)
        if not edits:
            return unit.text
        lines = list(unit.lines)
        for start, end, new in sorted(edits, reverse=True):
            lines[start:end] = new
        return "\n".join(lines)

    # --- blocks ------------------------------------------------------------------------------

    def _block(self, lines: list[str], parent: Token, token: Token,
               report: list[Removal]) -> Edit | None:
        assert token.map is not None
        text, changed = self.inline(token.children or [], _Context(report))
        if not changed:
            return None
        start, end = token.map
        if parent.type == "heading_open" and parent.markup.startswith("#"):
            line = lines[start]
            prefix = line[: line.index("#")] if "#" in line else _lead(_CONTAINER, line)
            return start, end, [f"{prefix}{parent.markup} {text}"]
        return start, end, _with_prefixes(lines, start, token.content, text)

    def _row(self, lines: list[str], tokens: list[Token], index: int,
             report: list[Removal]) -> tuple[Edit | None, list[int]]:
        """A table row: rebuilt whole when a cell changes or it has cells past the header's."""
        row = (tokens[index].map or [0])[0]
        cells: list[int] = []
        texts: list[str] = []
        changed = False
        i = index + 1
        while i < len(tokens) and tokens[i].type != "tr_close":
            if tokens[i].type == "inline":
                cells.append(i)
                text, cell_changed = self.inline(tokens[i].children or [],
                                                 _Context(report, table=True))
                texts.append(text)
                changed = changed or cell_changed
            i += 1
        line = lines[row]
        prefix = _lead(_ROW_PREFIX, line)
        body = line[len(prefix):].strip()
        # GFM drops cells past the header's count; a renderer that does not must not see them.
        written = len(_UNESCAPED_PIPE.split(body.strip("|")))
        if not changed and written <= len(texts):
            return None, cells
        return (row, row + 1, [prefix + "| " + " | ".join(texts) + " |"]), cells

    def _html_block(self, lines: list[str], token: Token,
                    report: list[Removal]) -> Edit | None:
        assert token.map is not None
        original = token.content.rstrip("\n")
        cleaned = self.cleaner.clean(token.content, report).rstrip("\n")
        if cleaned == original:
            return None
        if "\n\n" not in original:
            # A blank line would end the HTML block early and split it in two.
            cleaned = "\n".join(line for line in cleaned.split("\n") if line.strip())
        start, end = token.map
        return start, end, _with_prefixes(lines, start, original, cleaned)

    # --- inline ------------------------------------------------------------------------------

    def inline(self, children: list[Token], ctx: _Context) -> tuple[str, bool]:
        """Markdown for ``children`` and whether it differs in meaning from the source."""
        out: list[str] = []
        changed = False
        i = 0
        while i < len(children):
            token = children[i]
            kind = token.type
            if kind == "text":
                text, text_changed = self._text(token.content, ctx)
                out.append(text)
                changed = changed or text_changed
            elif kind == "softbreak":
                out.append("\n")
            elif kind == "hardbreak":
                out.append("\\\n")
            elif kind == "code_inline":
                out.append(_code(token.content, ctx.table))
            elif kind in _MARKUP:
                out.append(token.markup)
            elif kind == "link_open":
                end = _closing(children, i)
                text, link_changed = self._link(token, children[i + 1 : end], ctx)
                out.append(text)
                changed = changed or link_changed
                i = end + 1
                continue
            elif kind == "image":
                text, image_changed = self._image(token, ctx)
                out.append(text)
                changed = changed or image_changed
            elif kind == "html_inline":
                cleaned = self.cleaner.clean_tag(token.content, ctx.report)
                out.append(cleaned)
                changed = changed or cleaned != token.content
            elif kind == "footnote_ref":
                out.append(f"[^{(token.meta or {}).get('label', '')}]")
            else:
                out.append(escape(token.content))
            i += 1
        return _escape_line_starts("".join(out)), changed

    def _text(self, text: str, ctx: _Context) -> tuple[str, bool]:
        """Escaped text; a URL that linkify-it left in it (``src=https://...``, ``:www.x/y``:
        no word boundary before it) is judged anyway, since a looser linkifier would link it."""
        changed = _TAG_LIKE.search(text) is not None
        if ctx.in_link or ("://" not in text and "www." not in text.lower()):
            # A removed link's text is looked at again as plain text when the unit settles.
            return escape(text), changed
        parts: list[str] = []
        last = 0
        for found in LOOSE_URL.finditer(text):
            decision = self.policy.judge_text(found.group())
            if decision.allowed and "://" not in found.group():
                continue  # a mention
            if decision.allowed:
                parts += [escape(text[last : found.start()]), f"<{found.group()}>"]
                last = found.end()
                changed = True
                continue
            ctx.report.append(Removal.of_url("bare URL", RULE_OF["link"], found.group(),
                                             decision))
            parts += [escape(text[last : found.start()]), PLACEHOLDER]
            last = found.end()
            changed = True
        parts.append(escape(text[last:]))
        return "".join(parts), changed

    def _link(self, opening: Token, inner: list[Token], ctx: _Context) -> tuple[str, bool]:
        href = str(opening.attrs.get("href", ""))
        if opening.markup in ("autolink", "linkify"):
            shown = "".join(t.content for t in inner)
            if opening.markup == "linkify" and self._mention(shown, href):
                return escape(shown), False
            decision = self.policy.judge(href, "link")
            if decision.allowed:
                # A bare URL's end is where each linkifier decides it is (some take a code
                # span's backticks along): written as an autolink, its end is explicit.
                return f"<{href}>", opening.markup == "linkify"
            element = "autolink" if opening.markup == "autolink" else "bare URL"
            ctx.report.append(Removal.of_url(element, RULE_OF["link"], href, decision))
            return PLACEHOLDER, True
        label, changed = self.inline(inner, _Context(ctx.report, ctx.table, in_link=True))
        decision = self.policy.judge(href, "link")
        if not decision.allowed:
            ctx.report.append(Removal.of_url("link", RULE_OF["link"], href, decision))
            return label, True
        reference = (opening.meta or {}).get("form") == "reference"
        title = _title(opening.attrs.get("title"))
        return f"[{label}](<{href}>{title})", changed or reference

    def _image(self, token: Token, ctx: _Context) -> tuple[str, bool]:
        src = str(token.attrs.get("src", ""))
        alt = escape(plain_text(token.children or []).replace("\n", " "))
        decision = self.policy.judge(src, "image")
        if not decision.allowed:
            ctx.report.append(Removal.of_url("image", RULE_OF["image"], src, decision))
            return alt, True
        nested = any(c.type not in _PLAIN for c in token.children or [])
        reference = (token.meta or {}).get("form") == "reference"
        title = _title(token.attrs.get("title"))
        return f"![{alt}](<{src}>{title})", nested or reference

    def _mention(self, shown: str, href: str) -> bool:
        """A bare host name with nothing after it (see :meth:`SanitizePolicy.mention`)."""
        if "//" in shown or shown[:7].lower() == "mailto:":
            return False
        try:
            url = parse_url(href)
        except InputError:
            return False
        return url.path == "/" and url.query is None and self.policy.mention(url.host)


def escape(text: str) -> str:
    """Backslash-escape markdown's punctuation: the text renders the same and forms nothing."""
    return _ESCAPE.sub(r"\\\1", text)


def _escape_line_starts(text: str) -> str:
    """Escape what would start a heading, quote, list or setext underline at a line's start
    (a removed link's label can begin a line: ``[# x](...)`` must not become a heading)."""
    return _LINE_START.sub(_line_start, text)


def _line_start(found: re.Match[str]) -> str:
    if found.group(2):
        return f"{found.group(1)}\\{found.group(2)}"
    return f"{found.group(1)}{found.group(3)}\\{found.group(4)}"


def plain_text(children: list[Token]) -> str:
    """What a renderer shows as an image's alt text: the text of its tokens, nested ones too."""
    parts: list[str] = []
    for token in children:
        if token.type in ("text", "code_inline"):
            parts.append(token.content)
        elif token.type in ("softbreak", "hardbreak"):
            parts.append(" ")
        elif token.children:
            parts.append(plain_text(token.children))
    return "".join(parts)


def _closing(children: list[Token], start: int) -> int:
    depth = 0
    for j in range(start, len(children)):
        if children[j].type == "link_open":
            depth += 1
        elif children[j].type == "link_close":
            depth -= 1
            if depth == 0:
                return j
    return len(children) - 1


def _code(content: str, table: bool) -> str:
    if table:
        content = content.replace("|", "\\|")
    longest = max((len(run) for run in re.findall(r"`+", content)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if (content[:1] == "`" or content[-1:] == "`" or (
        content[:1] == " " and content[-1:] == " " and content.strip())) else ""
    return f"{fence}{pad}{content}{pad}{fence}"


def _title(title: str | int | float | None) -> str:
    if not title:
        return ""
    text = str(title).replace("\n", " ")
    for char in ("\\", '"', "&"):
        text = text.replace(char, "\\" + char)
    return f' "{text}"'


def _drop_definition(lines: list[str], span: list[int]) -> Edit:
    """Blank a reference definition's lines, keeping each line's container prefix."""
    start, end = span
    first = lines[start]
    out = [first[: first.index("[")] if "[" in first else ""]
    out += [_lead(_CONTAINER, line) for line in lines[start + 1 : end]]
    return start, end, out


def _with_prefixes(lines: list[str], start: int, content: str, new: str) -> list[str]:
    """``new`` as source lines, each after the container prefix of the line it replaces."""
    old = content.split("\n")
    prefixes: list[str] = []
    last = len(old) - 1
    for i, part in enumerate(old):
        source = lines[start + i] if start + i < len(lines) else ""
        if i == last:
            source = source.rstrip()
        if part and source.endswith(part):
            prefixes.append(source[: len(source) - len(part)])
        else:
            prefixes.append(_lead(_CONTAINER, source))
    out = []
    for i, part in enumerate(new.split("\n")):
        prefix = prefixes[min(i, last)]
        out.append((prefix + part) if part else prefix.rstrip(" \t") if i else prefix)
    return out


def _lead(pattern: re.Pattern[str], line: str) -> str:
    """The part of ``line`` that ``pattern`` (all optional, so it always matches) covers."""
    found = pattern.match(line)
    return found.group() if found else ""
