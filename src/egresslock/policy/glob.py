"""Host and path patterns: validated when the policy loads, compiled once, matched many times.

Host patterns are an exact name (or IP literal) or ``*.`` followed by a name of at least two
labels; the star stands for one or more whole labels, never part of one and never the apex, so
``*.example.com`` matches ``a.example.com`` and ``more.a.example.com`` but not ``example.com``.
Anything else with a star (``*``, ``*.com``, ``a.*.com``, ``*x.com``) is refused at load: a
pattern a reader cannot predict is a pattern an attacker can.

Path patterns work on the normalised path (:func:`egresslock.policy.normalize.normalize_path`):
``*`` matches within one segment, ``**`` (a whole segment) matches any number of segments, and a
trailing ``/**`` also matches the directory itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from egresslock.errors import InputError
from egresslock.policy.normalize import (
    decode_segment,
    hides_dot_segment,
    normalize_host,
    parse_ip_literal,
)


@dataclass(frozen=True, slots=True)
class HostPattern:
    """A validated host pattern. ``suffix`` is set for wildcards: the name after ``*.``."""

    text: str
    exact: str | None
    suffix: str | None

    def matches(self, host: str) -> bool:
        """Match an already normalised host."""
        if self.exact is not None:
            return host == self.exact
        assert self.suffix is not None
        return host.endswith("." + self.suffix)


def parse_host_pattern(raw: str) -> HostPattern:
    """Validate and normalise a host pattern, or raise InputError saying what would be valid."""
    if "*" not in raw:
        return HostPattern(raw, normalize_host(raw), None)
    if raw == "*":
        raise InputError(
            "'*' would allow every host; name the hosts, or '*.example.com' for subdomains"
        )
    if not raw.startswith("*.") or "*" in raw[2:]:
        raise InputError(
            f"{raw!r} puts '*' somewhere other than a whole first label; "
            "a wildcard is written '*.example.com' and stands for any subdomains"
        )
    suffix = normalize_host(raw[2:])
    if parse_ip_literal(suffix) is not None:
        raise InputError(f"{raw!r} puts a wildcard on an IP address; name the address itself")
    if "." not in suffix:
        raise InputError(
            f"{raw!r} would allow every name under the top-level domain {suffix!r}; "
            f"name a domain of at least two labels, like '*.example.{suffix}'"
        )
    return HostPattern(raw, None, suffix)


@dataclass(frozen=True, slots=True)
class PathPattern:
    """A validated path pattern and the anchored regex it compiles to."""

    text: str
    regex: re.Pattern[str]

    def matches(self, path: str) -> bool:
        """Match an already normalised path."""
        return self.regex.fullmatch(path) is not None


def parse_path_pattern(raw: str) -> PathPattern:
    """Validate a path pattern and compile it, or raise InputError saying what would be valid."""
    if not raw.startswith("/"):
        raise InputError(f"path pattern {raw!r} must begin with '/', like '/repos/acme/**'")
    segments = raw[1:].split("/")
    parts: list[str] = []
    for index, segment in enumerate(segments):
        if "**" in segment and segment != "**":
            raise InputError(
                f"path pattern {raw!r}: '**' must be a whole segment, like '/a/**/b'; "
                "use '*' within a segment"
            )
        if segment == "**":
            if index == len(segments) - 1:
                parts.append("(?:/.*)?")
            else:
                parts.append("(?:/[^/]*)*?")
            continue
        pieces = segment.split("*")
        try:
            # Decode the literal pieces exactly as request segments are, so '%7e' and '~' agree.
            # Each piece is decoded on its own: '.*' is a valid pattern although '.' alone is not.
            literal = [decode_segment(p, raw) for p in pieces]
        except InputError as exc:
            raise InputError(f"path pattern {raw!r}: {exc}") from exc
        if ("*" not in segment and hides_dot_segment(literal[0])) or (
            segment == "" and index != len(segments) - 1
        ):
            raise InputError(f"path pattern {raw!r} has a dot or empty segment; requests with "
                             "those are always refused, so the pattern could never match")
        parts.append("/" + "[^/]*".join(re.escape(p) for p in literal))
    return PathPattern(raw, re.compile("".join(parts)))
