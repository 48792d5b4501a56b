"""Which URLs rendered output may keep: the policy's ``output`` section as one decision.

A URL in an answer is not a request the agent makes: the user's chat client makes it, with no
proxy in the way, as soon as the answer renders (an image) or when the user clicks (a link).
So the question is not "may the agent reach this host" but "may this URL appear at all", and
the answer is stricter than the proxy's:

- only ``https:`` on its default port, and only hosts and paths that ``output.images`` (for
  anything fetched without a click) or ``output.links`` (for anything clicked) names;
- the URL must parse strictly (:func:`egresslock.policy.parse_url`): a URL two parsers could read
  differently is removed, never guessed at;
- even on an allowed host, no declared secret or credential-shaped value in any encoding, and
  no dynamic link (data-carrying path, query, fragment or wildcard labels, or a nested URL):
  EchoLeak sent its data through an *allowed* Microsoft Teams proxy URL.

:class:`SanitizePolicy` is compiled once from a :class:`~egresslock.policy.Policy` and is
immutable apart from a bounded memo of decisions (a URL's decision never changes).
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from urllib.parse import unquote

from egresslock.content.detectors import enabled
from egresslock.content.links import LinkLimits, dynamic_reason, judge_token
from egresslock.content.scanner import Hit, Kind, Needle, Scanner
from egresslock.content.sources import read_source, secret_needles
from egresslock.errors import InputError
from egresslock.policy.glob import HostPattern, PathPattern, parse_host_pattern, parse_path_pattern
from egresslock.policy.model import OutputTarget, Policy
from egresslock.policy.normalize import normalize_query, parse_url

Use = Literal["image", "link"]

# A scheme URL or www. name in plain text, wherever it stands: what the loosest linkifier of a
# chat client might make clickable (GFM's own needs a space or '(' before it).
LOOSE_URL = re.compile(r"(?:https?|ftp)://[^\s<>\"']+|(?<![\w.@/-])www\.[^\s<>\"']+",
                       re.IGNORECASE)

# Which policy list governs each use; also the rule id of a removal in the audit log.
RULE_OF: dict[Use, str] = {"image": "output.images", "link": "output.links"}
_MEMO_LIMIT = 4096


@dataclass(frozen=True, slots=True)
class Target:
    """One ``output`` entry, compiled: a host pattern and optional path patterns."""

    host: HostPattern
    paths: tuple[PathPattern, ...] | None

    @classmethod
    def compile(cls, target: OutputTarget) -> Target:
        paths = None if target.paths is None else tuple(parse_path_pattern(p)
                                                        for p in target.paths)
        return cls(parse_host_pattern(target.host), paths)

    def labels(self, host: str) -> tuple[str, ...]:
        """The labels a ``*.`` pattern matched: where a wildcard host can carry data."""
        if self.host.suffix is None:
            return ()
        return tuple(host[: -len(self.host.suffix) - 1].split("."))


@dataclass(frozen=True, slots=True)
class UrlDecision:
    """Whether a URL may stay, and if not why. ``secret`` is set when the URL carries a secret
    or credential: then even its path must not be logged."""

    allowed: bool
    reason: str
    host: str | None = None
    path: str | None = None
    port: int | None = None
    secret: bool = False


class SanitizePolicy:
    """The ``output`` section, secrets and dynamic-link limits of a policy, ready to judge URLs."""

    __slots__ = ("_memo", "images", "limits", "links", "report_only", "scanner", "warnings")

    def __init__(self, images: tuple[Target, ...], links: tuple[Target, ...], scanner: Scanner,
                 limits: LinkLimits, *, report_only: bool = False,
                 warnings: tuple[str, ...] = ()) -> None:
        self.images = images
        self.links = links
        self.scanner = scanner
        self.limits = limits
        self.report_only = report_only
        self.warnings = warnings
        self._memo: dict[tuple[str, Use], UrlDecision] = {}

    @classmethod
    def from_policy(cls, policy: Policy,
                    environ: Mapping[str, str] | None = None) -> SanitizePolicy:
        """Compile ``policy``. Secrets named by ``env`` are read from ``environ`` (default:
        ``os.environ``) now, once; a source that gives nothing becomes a warning."""
        env = os.environ if environ is None else environ
        needles, warnings = secret_needles(policy, env)
        # A real credential value is a secret too: the agent never sees it, so an answer that
        # holds one got it from somewhere it should not have.
        for cred in policy.credentials:
            value, _ = read_source(cred, env)
            if value:
                needles.append(Needle(cred.name, value.encode("utf-8"), Kind.CREDENTIAL))
        scanner = Scanner(needles, enabled(policy.content.detectors.model_dump()))
        dyn = policy.content.dynamic_links
        return cls(tuple(Target.compile(t) for t in policy.output.images),
                   tuple(Target.compile(t) for t in policy.output.links),
                   scanner, LinkLimits(dyn.max_data_bytes, dyn.min_token_len),
                   report_only=policy.mode == "report", warnings=warnings)

    def judge(self, url: str, use: Use) -> UrlDecision:
        """May ``url`` (as the renderer will use it) stay in the output as an image or a link?"""
        key = (url, use)
        found = self._memo.get(key)
        if found is None:
            found = self._judge(url, use)
            if len(self._memo) >= _MEMO_LIMIT:
                self._memo.clear()
            self._memo[key] = found
        return found

    def scan(self, text: str) -> str | None:
        """The first secret or credential found in ``text`` (described, never its value)."""
        hits = self.scanner.scan_text(text)
        return hits[0].describe() if hits else None

    def _judge(self, url: str, use: Use) -> UrlDecision:
        # Reasons never quote the URL: they go to the audit log, and the URL may hold the data.
        what = "image" if use == "image" else "link"
        scheme, colon, _ = url.partition(":")
        if not colon or not scheme or not scheme.isascii() or "/" in scheme:
            return UrlDecision(False, f"{what} URL is relative or has no scheme; only absolute "
                               "https: URLs are kept")
        if scheme.lower() != "https":
            host, path, port = _where(url) if scheme.lower() == "http" else (None, None, None)
            return UrlDecision(False, f"{what} URL has scheme {scheme.lower()[:20]}:; only "
                               "https: URLs are kept", host, path, port,
                               self.scan(url) is not None)
        base, hash_mark, fragment = url.partition("#")
        secret = self.scan(url)
        try:
            parsed = parse_url(base)
            if hash_mark:
                normalize_query(fragment, url)
        except InputError as exc:
            if secret is not None:
                return UrlDecision(False, f"{what} URL carries {secret}", secret=True)
            return UrlDecision(False, f"{what} URL is ambiguous: {_without(str(exc), url)}")
        host, path, port = parsed.host, parsed.path, parsed.port
        secret = secret or _first(self.scanner.scan_name(host))
        if secret is not None:
            return UrlDecision(False, f"{what} URL carries {secret}", host, path, port, True)
        if _invisible(url):
            return UrlDecision(False, f"{what} URL holds invisible Unicode characters (tags, "
                               "zero-width or format characters), a way to smuggle data past "
                               "a reader", host, path, port)
        if port != 443:
            return UrlDecision(False, f"{what} URL uses port {port}; only the default "
                               "https port 443 is kept", host, path, port)
        targets = self.images if use == "image" else self.links
        target = _match(targets, host, path)
        if target is None:
            return UrlDecision(False, _not_listed(targets, host, path, RULE_OF[use]),
                               host, path, port)
        raw_path, raw_query = _raw_parts(base)
        if hash_mark:
            raw_query = fragment if raw_query is None else f"{raw_query}&{fragment}"
        dynamic = dynamic_reason(raw_path, raw_query, target.labels(host), self.limits)
        if dynamic is not None:
            return UrlDecision(False, f"dynamic {what}: {dynamic}", host, path, port)
        return UrlDecision(True, f"allowed by {RULE_OF[use]} ({target.host.text})", host, path,
                           port)

    def judge_text(self, found: str) -> UrlDecision:
        """A URL found in plain text by :data:`LOOSE_URL` (one no markdown parser linked, but
        a looser linkifier might): a bare ``www.`` name is a mention, else judged as a link."""
        if found[:4].lower() == "www.":
            host, sep, _ = found.partition("/")
            if not sep and "?" not in host and "#" not in host and self.mention(host.lower()):
                return UrlDecision(True, "a host name mentioned in text")
            found = "http://" + found
        return self.judge(found, "link")

    def mention(self, host: str) -> bool:
        """True when a bare host name (``python.org``, ``setup.py``) carries no data.

        Renderers that link bare names would make it clickable, but a click sends nothing
        the reader cannot see: no path, no query, and no label that looks encoded or holds a
        secret. With any of those it is judged as a link instead.
        """
        if _first(self.scanner.scan_name(host)) is not None:
            return False
        return not any(judge_token(label, self.limits.min_token_len) is not None
                       for label in host.split("."))


def _invisible(url: str) -> bool:
    """Format characters (Unicode category Cf: the tag block, zero-width spaces and joiners,
    bidi controls) in the URL or its percent-decoding. Rehberger's "ASCII smuggling" (2024)
    hid data in tag characters, which render as nothing."""
    decoded = unquote(url, errors="replace")
    return any(ord(c) > 0x7F and unicodedata.category(c) == "Cf" for c in url + decoded)


def _where(url: str) -> tuple[str | None, str | None, int | None]:
    """Host, path and port of an http URL, for the report; Nones when it does not parse."""
    try:
        parsed = parse_url(url.partition("#")[0])
    except InputError:
        return None, None, None
    return parsed.host, parsed.path, parsed.port


def _without(message: str, url: str) -> str:
    """A parser's message with the URL it quotes cut out, kept short."""
    for quoted in (repr(url), repr(url.partition("#")[0])):
        message = message.replace(quoted, "the URL")
    return message if len(message) <= 160 else message[:157] + "..."


def _first(hits: list[Hit]) -> str | None:
    return hits[0].describe() if hits else None


def _match(targets: tuple[Target, ...], host: str, path: str) -> Target | None:
    for target in targets:
        if target.host.matches(host) and (
                target.paths is None or any(p.matches(path) for p in target.paths)):
            return target
    return None


def _not_listed(targets: tuple[Target, ...], host: str, path: str, rule: str) -> str:
    hosts = [t for t in targets if t.host.matches(host)]
    if not hosts:
        return f"host {host} is not in {rule}"
    allowed = ", ".join(p.text for t in hosts for p in (t.paths or ()))
    return f"path {_show(path)} on {host} is not in {rule} (allows {allowed})"


def _raw_parts(url: str) -> tuple[str, str | None]:
    """The path and query of an absolute URL exactly as written (percent-encoded)."""
    rest = url.split("//", 1)[1]
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    target = rest[cut:]
    path, qmark, query = target.partition("?")
    return path or "/", query if qmark else None


def _show(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def compiled(policy: Policy | SanitizePolicy) -> SanitizePolicy:
    """``policy`` ready to judge URLs; a :class:`Policy` is compiled once and remembered (by
    identity, for the last few policies), so a chat server can pass the same policy per answer.
    Secrets named by ``env`` are read at that first compile."""
    if isinstance(policy, SanitizePolicy):
        return policy
    return _compile_once(_ByIdentity(policy))


@dataclass(frozen=True, slots=True, eq=False)
class _ByIdentity:
    """A policy as a cache key: pydantic models with lists cannot be hashed, and two equal
    policies loaded at different times may name secrets whose sources changed."""

    policy: Policy

    def __hash__(self) -> int:
        return id(self.policy)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.policy is self.policy


@functools.lru_cache(maxsize=8)
def _compile_once(key: _ByIdentity) -> SanitizePolicy:
    return SanitizePolicy.from_policy(key.policy)
