"""The streaming sanitizer: markdown in as it is generated, safe markdown out, never a prefix of
something unsafe.

Why units. A model's answer arrives a few bytes at a time, and a renderer shows each prefix.
``![a](https://evil.example/?d=`` is harmless text until the ``)`` arrives, so nothing can be
released before the construct it belongs to is complete. The sanitizer cuts the stream into
*units* at top-level block boundaries: a blank line followed by a line that starts in column
one. Text after such a boundary cannot change how the text before it parses, with three
exceptions, each handled:

1. A fenced code block or an HTML block of the kinds that run past blank lines (``<pre>``,
   ``<!--``...) may still be open at the boundary. markdown-it says so (the block runs to the
   unit's end), and the unit is held and joined with what follows until a closing line arrives.
   Joining is always safe; only cutting in the wrong place is not.
2. Reference definitions may come after their use: ``![x][ref]`` early, ``[ref]: https://...``
   at the end (EchoLeak's shape). A unit in which some bracketed text was not a link could become
   one when a definition for its label arrives, so it is held, and everything after it, until
   every such label is defined or the stream closes. References are then written as inline
   links and definitions removed (:mod:`egresslock.sanitize.mdrewrite`), so the output never
   depends on a definition. The cost: an answer with bracketed text (``[1]``, ``[x]``) that is
   never defined streams no further than that point until it ends.
3. Footnote references work the same way as link references.

Renderers disagree about footnotes: without them ``[^1]: url`` is a reference definition and a
footnote's indented paragraph is code. A unit holding ``[^`` is therefore settled in both
dialects, so that it is safe whichever its reader uses.

Decisions depend only on each unit's text and on the definitions before it (or, for held
units, all of them), never on where chunks were cut, so the output for any chunking equals the
output for the whole text.

Why it is fast. markdown-it-py parses about 1-2 MB/s, so a unit with nothing that could make a
link, image, HTML, definition, fence or bare URL (no ``[ ] < & \\``, no ``//``, ``mailto:``,
fence markers or host-like names) is copied without parsing, and so is a unit that is exactly
one fenced code block. The cutting itself looks only at new text and the last blank line
before it, and units that wait are kept as lists, so feeding a megabyte in 100-byte chunks
costs about what feeding it whole does.

Why it converges. A rewritten unit is sanitised again (as a fresh document: no definitions)
until nothing changes, so the output is a fixed point: sanitising it again gives it back, and
nothing that a second look would find can remain. A unit that does not settle within a few
passes, nests deeper than the parser follows, or makes the parser fail, is replaced by a
note.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Literal

from egresslock.policy.model import Policy
from egresslock.sanitize.htmlsafe import HtmlCleaner
from egresslock.sanitize.mdparse import Definitions, ParsedUnit, build_parser, parse_unit
from egresslock.sanitize.mdrewrite import Rewriter
from egresslock.sanitize.removal import OnRemoval, Removal
from egresslock.sanitize.urls import SanitizePolicy, compiled

Format = Literal["markdown", "html"]

# A line end, a blank line, then a line that starts a new top-level block in column one (only
# the last blank line is matched: a run of them would make the search quadratic).
_BOUNDARY = re.compile(r"\n[ \t]*\n(?=[^ \t\n])")
# Anything that could make a link, image, raw HTML, definition, footnote, fence or scheme URL;
# past these, only a host name (see _host_hint) can still make a bare URL.
_TRIGGERS = ("[", "]", "<", "&", "\\", "```", "~~~", "//")
_AFTER_DOT_IN_PROSE = frozenset(" \t\n.")
# A unit that opens with a fence in column one: a code block, if nothing follows its closing.
_FENCE = re.compile(r"(`{3,})[^`\n]*\n|(~{3,})[^\n]*\n")
_MAX_PASSES = 6
# Parses of a held unit before all its labels are defined; past this it waits for them or
# for the end, so definitions arriving one by one cannot make a large unit parse again and again.
_MAX_TRIES = 4
_UNSETTLED = "\\(content removed: it could not be checked safely\\)"
_WHITESPACE = frozenset(" \t\n")


class Engine:
    """The parser and rewriter of one sanitizer (markdown-it's linkify keeps per-call state, so
    each sanitizer has its own; building one takes well under a millisecond)."""

    __slots__ = ("_hosts", "cleaner", "md", "md_plain", "policy", "rewriter")

    def __init__(self, policy: SanitizePolicy) -> None:
        self.policy = policy
        self.md = build_parser()
        self.md_plain = build_parser(footnotes=False)
        self.rewriter = Rewriter(policy)
        self.cleaner = HtmlCleaner(policy)
        assert self.md.linkify is not None
        linkify = self.md.linkify.re
        self._hosts = re.compile(f"{linkify['schema_test']}|{linkify['host_fuzzy_test']}",
                                 re.IGNORECASE)

    def inert(self, text: str) -> bool:
        """True when ``text`` cannot hold a link, image, HTML, definition, fence or bare URL.

        Fixed substrings first (``in`` runs at memory speed), then a hint of a host name,
        and only then linkify-it's host regex: most of a megabyte of prose stops at the first.
        """
        if any(needle in text for needle in _TRIGGERS):
            return False
        return not _host_hint(text) or self._hosts.search(text) is None

    def parse(self, text: str, defs: Definitions, *, final: bool,
              plain: bool = False) -> ParsedUnit:
        """Parse with footnotes, or (``plain``) as a renderer without them would."""
        return parse_unit(self.md_plain if plain else self.md, text, defs, final=final)


class _Segmenter:
    """Cuts text into units at boundaries, looking only at new text and a short tail.

    A boundary is a line end, one blank line and the first character of the next line, so a
    match needs at most the last two line ends of what is held: ``_tail`` is that part when it
    is whitespace. Keeping only it (not every blank line held) keeps a stream of blank lines,
    fed a few bytes at a time, linear.
    """

    __slots__ = ("_held", "_tail")

    def __init__(self) -> None:
        self._held: list[str] = []
        self._tail = ""

    def feed(self, text: str) -> list[str]:
        search = self._tail + text
        base = len(self._tail)
        units: list[str] = []
        cut = 0  # in text
        for match in _BOUNDARY.finditer(search):
            end = match.end() - base
            self._held.append(text[cut:end])
            units.append("".join(self._held))
            self._held = []
            cut = end
        rest = text[cut:]
        if rest:
            self._held.append(rest)
        self._tail = _tail_of((self._tail if cut == 0 else "") + rest)
        return units

    def close(self) -> str:
        rest = "".join(self._held)
        self._held, self._tail = [], ""
        return rest


def _tail_of(text: str) -> str:
    """The trailing whitespace of ``text`` from its second-to-last line end: all a boundary
    that the next text completes can start in."""
    end = len(text)
    start = end
    while start > 0 and text[start - 1] in _WHITESPACE:
        start -= 1
    last = text.rfind("\n", start, end)
    if last < 0:
        return ""
    previous = text.rfind("\n", start, last)
    return text[previous if previous >= 0 else last : end]


@dataclass(slots=True)
class _Unit:
    """A unit in order of output: ``output`` is None while it waits for definitions of
    ``candidates``, labels its last parse (with definitions at ``version``) left as text."""

    text: str
    candidates: frozenset[str]
    output: str | None
    version: int = 0
    tries: int = 0


class _Units:
    """Parses, holds and rewrites units in order; see the module docstring."""

    def __init__(self, engine: Engine, *, hold: bool, settle: bool,
                 report: list[Removal], plain: bool = False) -> None:
        self.engine = engine
        self.hold = hold
        self.settle = settle
        self.plain = plain
        self.report = report
        self.defs = Definitions()
        self.queue: deque[_Unit] = deque()
        self.open: tuple[list[str], re.Pattern[str]] | None = None

    def push(self, text: str) -> str:
        if self.open is not None:
            parts, closer = self.open
            parts.append(text)
            if closer.search(text) is None:
                return ""
            self.open = None
            text = "".join(parts)
        self._add(text, final=False)
        return self._drain()

    def finish(self, rest: str) -> str:
        if self.open is not None:
            rest = "".join(self.open[0]) + rest
            self.open = None
        if rest:
            self._add(rest, final=True)
        self.hold = False
        return self._drain()

    def _add(self, text: str, *, final: bool) -> None:
        if self.engine.inert(text):
            self.queue.append(_Unit(text, frozenset(), text))
            return
        fence = _fenced(text)
        if fence is not None:
            if final or fence is _CODE:
                self.queue.append(_Unit(text, frozenset(), text))
            else:
                self.open = ([text], fence)
            return
        parsed = self.engine.parse(text, self.defs, final=final, plain=self.plain)
        if parsed.open_end is not None:
            self.open = ([text], parsed.open_end)
            return
        self.defs.learn(parsed.env)
        if self.hold and not self._ready(parsed.candidates):
            self.queue.append(_Unit(text, parsed.candidates, None, self.defs.version))
        else:
            self.queue.append(_Unit(text, frozenset(), self._final(parsed)))

    def _ready(self, candidates: frozenset[str]) -> bool:
        return all(self.defs.defines(label) for label in candidates)

    def _drain(self) -> str:
        out: list[str] = []
        while self.queue:
            head = self.queue[0]
            if head.output is None and not self._settle_head(head):
                break
            assert head.output is not None
            out.append(head.output)
            self.queue.popleft()
        return "".join(out)

    def _settle_head(self, head: _Unit) -> bool:
        """Give the waiting head its output if no later definition can change its parse:
        every label it left as text is defined, or a parse with the definitions known now
        leaves no bracket as text (then all its links are fixed: the first definition wins)."""
        if not self.hold or self._ready(head.candidates):
            head.output = self._final(self.engine.parse(head.text, self.defs, final=True,
                                                        plain=self.plain))
            return True
        if head.tries >= _MAX_TRIES or head.version == self.defs.version or not any(
                self.defs.defines(label) for label in head.candidates):
            return False
        parsed = self.engine.parse(head.text, self.defs, final=True, plain=self.plain)
        head.version = self.defs.version
        head.tries += 1
        if self._ready(parsed.candidates):
            head.output = self._final(parsed)
            return True
        head.candidates = parsed.candidates
        return False

    def _final(self, parsed: ParsedUnit) -> str:
        if parsed.unchecked:
            self.report.append(Removal("content", "sanitize", "nested deeper than the "
                                       "parser follows, or not parseable, so it could not be "
                                       "checked"))
            return _unsettled(parsed.text)
        out = self.engine.rewriter.rewrite(parsed, self.report)
        if self.settle and (out != parsed.text or "[^" in out):
            out = self._settle(out)
        # mode: report shows what enforce would remove, and changes nothing.
        return parsed.text if self.engine.policy.report_only else out

    def _settle(self, text: str) -> str:
        """Sanitise ``text`` as a fresh document until it no longer changes: with and, where
        ``[^`` appears, without footnotes, until neither dialect finds anything."""
        for _ in range(_MAX_PASSES):
            report: list[Removal] = []
            again = sanitize_once(self.engine, text, report)
            if "[^" in again:
                again = sanitize_once(self.engine, again, report, plain=True)
            self.report.extend(report)
            if again == text:
                return text
            text = again
        self.report.append(Removal("content", "sanitize", "rewriting did not settle, so the "
                                   "content could not be checked"))
        return _unsettled(text)


_CODE = re.compile("")


def _host_hint(text: str) -> bool:
    """Whether ``text`` has what every host name linkify-it finds has: a dot followed by a
    name character (prose puts a space after its dots), or www., mailto:, localhost."""
    find = text.find
    end = len(text) - 1
    dot = find(".")
    while 0 <= dot < end:
        if text[dot + 1] not in _AFTER_DOT_IN_PROSE:
            return True
        dot = find(".", dot + 1)
    lowered = text.lower()
    return "www." in lowered or "mailto:" in lowered or "localhost" in lowered


def _unsettled(text: str) -> str:
    """The note that replaces a unit, followed by the unit's own line ends (its boundary)."""
    body = text.rstrip("\n")
    return _UNSETTLED + (text[len(body):] or "\n")


def _fenced(text: str) -> re.Pattern[str] | None:
    """For a unit that opens with a fence: _CODE when it is that code block and nothing else,
    the closing line's pattern when the block is still open, else None (parse it).

    At a unit's start (column one, after a blank line or at the start of the text) a fence
    line opens a fenced code block, whatever came before: no container continues there.
    """
    opening = _FENCE.match(text)
    if opening is None:
        return None
    marker = opening.group(1) or opening.group(2)
    char, count = re.escape(marker[0]), len(marker)
    closing = re.compile(rf"^ {{0,3}}{char}{{{count},}}[ \t]*$", re.MULTILINE)
    found = closing.search(text, opening.end())
    if found is None:
        return re.compile(rf"^ {{0,3}}{char}{{{count},}}[ \t]*\n", re.MULTILINE)
    return _CODE if not text[found.end():].strip(" \t\n") else None


def sanitize_once(engine: Engine, text: str, report: list[Removal], *,
                  plain: bool = False) -> str:
    """One pass over a whole text: no definitions from outside, no holding, no settling."""
    segmenter = _Segmenter()
    units = _Units(engine, hold=False, settle=False, report=report, plain=plain)
    out = [units.push(unit) for unit in segmenter.feed(text)]
    out.append(units.finish(segmenter.close()))
    return "".join(out)


class Sanitizer:
    """Streams markdown (or buffers HTML) through the policy.

    ``feed`` returns the output that is safe to show now; ``close`` the rest. Whatever the
    chunking, the concatenated output equals ``sanitize.markdown`` of the whole text. Every
    removal is appended to :attr:`removals` and passed to ``on_removal`` as it is decided.
    With a policy in ``mode: report`` the input comes out unchanged and removals are still
    reported. HTML is not streamed: nh3 needs the whole document, so ``feed`` returns "".
    """

    def __init__(self, policy: Policy | SanitizePolicy, *, fmt: Format = "markdown",
                 on_removal: OnRemoval | None = None) -> None:
        if fmt not in ("markdown", "html"):
            raise ValueError(f"format {fmt!r} must be 'markdown' or 'html'")
        self.policy = compiled(policy)
        policy = self.policy
        self.format: Format = fmt
        self.removals: list[Removal] = []
        self._on_removal = on_removal
        self._engine = Engine(policy)
        self._segmenter = _Segmenter()
        self._report: list[Removal] = []
        self._units = _Units(self._engine, hold=True, settle=True, report=self._report)
        self._cr = False
        self._html: list[str] = []
        self._closed = False

    def feed(self, chunk: str) -> str:
        """Take the next piece of the answer; return what may be shown now."""
        if self._closed:
            raise RuntimeError("feed() after close(): this Sanitizer has finished")
        text = self._normalize(chunk)
        if self.format == "html":
            self._html.append(text)
            return ""
        pieces = [self._units.push(unit) for unit in self._segmenter.feed(text)]
        return self._emit("".join(pieces))

    def close(self) -> str:
        """The end of the answer: return everything not yet returned."""
        if self._closed:
            return ""
        self._closed = True
        text = "\n" if self._cr else ""
        self._cr = False
        if self.format == "html":
            whole = "".join(self._html) + text
            out = self._settle_html(whole)
            return self._emit(whole if self.policy.report_only else out)
        pieces = [self._units.push(unit) for unit in self._segmenter.feed(text)]
        pieces.append(self._units.finish(self._segmenter.close()))
        return self._emit("".join(pieces))

    def _settle_html(self, html: str) -> str:
        """Clean until nh3's output is its own fixed point (a browser drops a newline after
        ``<pre>``, so one pass can still change on the next)."""
        for _ in range(_MAX_PASSES):
            again = self._engine.cleaner.clean(html, self._report) if html else ""
            if again == html:
                return html
            html = again
        return ""

    def _normalize(self, chunk: str) -> str:
        """CommonMark line endings (CR LF and CR are LF) and NUL as U+FFFD; a CR at the end of
        a chunk waits to see whether an LF follows."""
        if self._cr:
            chunk = "\r" + chunk
            self._cr = False
        if chunk.endswith("\r"):
            chunk = chunk[:-1]
            self._cr = True
        if "\r" in chunk:
            chunk = chunk.replace("\r\n", "\n").replace("\r", "\n")
        if "\0" in chunk:
            chunk = chunk.replace("\0", "\ufffd")
        return chunk

    def _emit(self, out: str) -> str:
        for removal in self._report:
            self.removals.append(removal)
            if self._on_removal is not None:
                self._on_removal(removal)
        self._report.clear()
        return out
