"""One multi-pattern pass that finds secrets, credentials and placeholders in any encoding.

Every declared secret contributes its fixed forms (:func:`egresslock.content.encodings.forms`),
every enabled detector its anchors, every credential placeholder and real credential value its
forms too; all become one Aho-Corasick automaton over lower-cased bytes. A scan runs the automaton
over each view of the haystack (as sent, percent-decoded once and twice, unescaped), confirms the
case-sensitive forms and the detectors' regular expressions at the candidate positions, and
returns :class:`Hit` values that name what was found and how, never its value.

:class:`StreamScanner` scans a body as it streams and holds back the last bytes of each chunk
until the next chunk shows they are not the start of a secret: a secret split across chunks is
found, and no byte of it has left when it is.
"""

from __future__ import annotations

import enum
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from egresslock.content.detectors import Detector
from egresslock.content.encodings import Form, Views, forms
from egresslock.memo import Memo


class Kind(enum.Enum):
    """What a pattern stands for: each kind is enforced differently."""

    SECRET = "secret"  # noqa: S105  a declared secret: never leaves
    DETECTOR = "detector"        # a credential shape: never leaves
    PLACEHOLDER = "placeholder"  # a credential placeholder: only in its headers to its hosts
    CREDENTIAL = "credential"    # a real credential value: never sent by the agent itself


@dataclass(frozen=True, slots=True)
class Needle:
    """A value to look for: a declared secret, a credential or its placeholder."""

    name: str
    value: bytes
    kind: Kind


@dataclass(frozen=True, slots=True)
class Hit:
    """One finding: which needle (by name), what kind, and in what encoding."""

    name: str
    kind: Kind
    encoding: str
    where: str = ""  # "in the URL", "in the body", ...

    def describe(self) -> str:
        what = {Kind.SECRET: "secret", Kind.DETECTOR: "credential-shaped value",
                Kind.PLACEHOLDER: "placeholder of credential",
                Kind.CREDENTIAL: "real value of credential"}[self.kind]
        where = f" {self.where}" if self.where else ""
        return f"{what} {self.name}{where} ({self.encoding})"


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    kind: Kind
    form: Form | None          # None for a detector anchor
    detector: Detector | None


class _Engine(Protocol):
    def find(self, view: bytes) -> list[tuple[int, int, int]]:
        """(pattern index, start, end) of every match, case-insensitive for ASCII."""


class _Hyperscan:
    """Hyperscan: SIMD literal matching, about 3 GB/s on a thousand secret forms here, and
    case-insensitive without a lower-cased copy of the haystack. x86-64 only."""

    def __init__(self, patterns: list[bytes]) -> None:
        import re

        import hyperscan

        self._hs = hyperscan
        self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        flags = hyperscan.HS_FLAG_CASELESS | hyperscan.HS_FLAG_SOM_LEFTMOST
        # Each literal as a regular expression matching exactly its bytes.
        expressions = [re.escape(p.decode("latin-1")).encode("latin-1") for p in patterns]
        self._db.compile(expressions=expressions, ids=list(range(len(patterns))),
                         elements=len(patterns), flags=[flags] * len(patterns))
        self._lock = threading.Lock()  # one scratch space: one scan at a time

    def find(self, view: bytes) -> list[tuple[int, int, int]]:
        found: list[tuple[int, int, int]] = []

        def on_match(index: int, start: int, end: int, flags: int, context: object) -> None:
            found.append((index, start, end))

        with self._lock:
            self._db.scan(view, match_event_handler=on_match)
        return found


class _AhoCorasick:
    """ahocorasick-rs's DFA over a lower-cased copy: about 300 MB/s on a thousand forms; the
    engine where Hyperscan is not available."""

    def __init__(self, patterns: list[bytes]) -> None:
        import ahocorasick_rs

        self._ac = ahocorasick_rs.BytesAhoCorasick(
            patterns, implementation=ahocorasick_rs.Implementation.DFA)

    def find(self, view: bytes) -> list[tuple[int, int, int]]:
        return self._ac.find_matches_as_indexes(view.lower(), overlapping=True)


def _engine(patterns: list[bytes]) -> _Engine:
    """The fastest multi-pattern engine this machine has; both find the same matches."""
    kind = "aho-corasick" if os.environ.get("EGRESSLOCK_MATCHER") == "aho-corasick" else "any"
    return _ENGINES.get((kind, tuple(patterns)), lambda: _make_engine(kind, patterns))


def _make_engine(kind: str, patterns: list[bytes]) -> _Engine:
    if kind == "any":
        try:
            return _Hyperscan(patterns)
        except ImportError:
            pass
    return _AhoCorasick(patterns)


# Compiled engines by pattern set: compiling is most of a scanner's cost, and an engine finds the
# same matches for whoever asks. Kept only where remembering is on (the warm server).
_ENGINES: Memo[tuple[str, tuple[bytes, ...]], _Engine] = Memo()


_CACHED_SIZE = 512
_CACHE_ENTRIES = 4096


class Scanner:
    """Finds every needle and detector in bytes, in every supported encoding. What it finds
    never changes; it only remembers the answers for short inputs."""

    __slots__ = ("_ac", "_cache", "_entries", "_spaced", "_views", "hold_back", "names")

    def __init__(self, needles: Iterable[Needle], detectors: Iterable[Detector] = ()) -> None:
        by_pattern: dict[bytes, list[_Entry]] = {}
        longest = 0
        names = []
        for needle in needles:
            if not needle.value:
                continue
            names.append(needle.name)
            for form in forms(needle.value):
                by_pattern.setdefault(form.pattern, []).append(
                    _Entry(needle.name, needle.kind, form, None))
                longest = max(longest, len(form.pattern))
        for det in detectors:
            for anchor in det.anchors:
                by_pattern.setdefault(anchor, []).append(
                    _Entry(det.name, Kind.DETECTOR, None, det))
            # A detector's shape is confirmed from its anchor; its shortest full match (an AWS
            # key id is 20 characters, a fine-grained GitHub token 93) must fit in a window.
            longest = max(longest, 100)
        self.names: tuple[str, ...] = tuple(names)
        patterns = list(by_pattern)
        self._entries = [by_pattern[p] for p in patterns]
        self._ac = _engine(patterns) if patterns else None
        # Hosts, paths and header blocks repeat: short inputs' results are remembered (a
        # proxied request asks about its name three times: DNS, the proxy, the log).
        self._cache: dict[tuple[bytes, str, bool], list[Hit]] = {}
        # A match in the '+'-as-space reading that is not in the bytes as sent must span a
        # decoded '+', so it is a pattern with a space: that reading gets a small automaton of
        # those alone (a base64 body full of '+' costs a fraction of a second full pass).
        spaced = [i for i, p in enumerate(patterns) if b" " in p]
        self._spaced = (_engine([patterns[i] for i in spaced]), spaced) if spaced else None
        # A secret percent-encoded twice takes 9 bytes a character (%2541), escaped 6 (\u0041):
        # a stream keeps this much unsent until the next bytes show it holds no secret's start.
        self.hold_back = 9 * longest
        relevant = {b for pattern in by_pattern for b in pattern}
        if any(e.detector is not None for entries in by_pattern.values() for e in entries):
            # A detector's shape continues past its anchor: any letter, digit or separator.
            relevant |= set(b"abcdefghijklmnopqrstuvwxyz0123456789_-/+=.:@ ")
        # '+' decodes to a space: only worth a second reading when some needle holds a space.
        self._views = Views(frozenset(relevant), self.hold_back,
                            plus=any(b" " in p for p in by_pattern))

    @property
    def empty(self) -> bool:
        return self._ac is None

    def scan(self, data: bytes, where: str = "", caseless: bool = False) -> list[Hit]:
        """Every hit in ``data`` (bytes as sent), each once; ``where`` prefixes the encoding.
        ``caseless`` accepts case-sensitive forms in any case (for DNS names, which lose it)."""
        if self._ac is None or not data:
            return []
        short = len(data) <= _CACHED_SIZE
        if short:
            known = self._cache.get((data, where, caseless))
            if known is not None:
                return list(known)
        hits: dict[tuple[str, Kind], Hit] = {}
        for decoding, view in self._views(data):
            for hit in self._scan_view(view, decoding, caseless):
                key = (hit.name, hit.kind)
                if key not in hits:
                    hits[key] = Hit(hit.name, hit.kind, hit.encoding, where)
        found = list(hits.values())
        if short:
            if len(self._cache) >= _CACHE_ENTRIES:
                self._cache.clear()
            self._cache[(data, where, caseless)] = found
            return list(found)
        return found

    def scan_text(self, text: str, where: str = "") -> list[Hit]:
        return self.scan(text.encode("utf-8", "surrogateescape"), where)

    def scan_name(self, host: str) -> list[Hit]:
        """Hits in a DNS name: lower-cased, and with its dots removed, since data may be split
        across labels (``6177.732d.6b65.79.evil.example``)."""
        name = host.lower().rstrip(".")
        hits = self.scan(name.encode("ascii", "replace"), "in the name", caseless=True)
        joined = name.replace(".", "")
        if not hits and joined != name:
            hits = self.scan(joined.encode("ascii", "replace"), "across the name's labels",
                             caseless=True)
        return hits

    def _scan_view(self, view: bytes, decoding: str, caseless: bool) -> list[Hit]:
        assert self._ac is not None
        if decoding.startswith("form-encoded") and self._spaced is not None:
            engine, numbers = self._spaced
            found = [(numbers[i], a, b) for i, a, b in engine.find(view)]
        else:
            found = self._ac.find(view)
        out: list[Hit] = []
        for index, start, end in found:
            for entry in self._entries[index]:
                if entry.detector is not None:
                    m = entry.detector.confirm.match(view, start)
                    if m is None:
                        continue
                    out.append(Hit(entry.name, entry.kind, decoding or "as is"))
                    continue
                assert entry.form is not None
                if (entry.form.exact is not None and not caseless
                        and view[start:end] != entry.form.exact):
                    continue
                form = entry.form.encoding
                out.append(Hit(entry.name, entry.kind, f"{form}, {decoding}" if decoding else form))
        return out


class StreamScanner:
    """Scans a stream chunk by chunk; releases only bytes proven not to start a secret.

    ``feed`` returns the bytes that may be sent now and the hits so far; ``finish`` the rest.
    Once a hit is returned the caller must stop sending: nothing of the hit has been released.
    """

    __slots__ = ("_pending", "hits", "scanner")

    def __init__(self, scanner: Scanner) -> None:
        self.scanner = scanner
        self._pending = b""
        self.hits: list[Hit] = []

    def feed(self, data: bytes, where: str = "in the body") -> tuple[bytes, list[Hit]]:
        if self.scanner.empty:
            return data, []
        window = self._pending + data if self._pending else data
        hits = self.scanner.scan(window, where)
        if hits:
            self.hits.extend(hits)
            self._pending = b""
            return b"", hits
        keep = self.scanner.hold_back
        if len(window) <= keep:
            self._pending = window
            return b"", []
        self._pending = window[-keep:]
        return window[:-keep], []

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest
