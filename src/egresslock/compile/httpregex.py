"""Path and host patterns as the anchored regular expressions of Cilium's L7 HTTP rules.

Cilium hands each ``path`` and ``host`` of a rule to Envoy as a regex header match on ``:path``
and ``:authority`` (validated with Go's RE2 when the policy is accepted). Two facts shape the
translation:

- ``:path`` is the request target as sent, *query included*, and it is matched whole. So a rule
  that allows queries gets an optional ``(\\?.*)?`` tail; ``query: deny`` gets none, and any
  query then fails the match.
- Envoy does not normalise the path for this match (``normalize_path`` is off unless an operator
  turns it on), while the upstream server will. egresslock's proxy refuses dot segments,
  encoded slashes and backslashes and ``..;`` before it matches a pattern (DESIGN.md, hard rule
  3); a regex cannot call a normaliser, so wildcards here match only characters that cannot
  build those: no ``%2E``, ``%2F``, ``%5C``, ``;`` or ``%3B``, no control escapes, and a
  wildcard segment is never ``.`` or ``..``. Literal parts of a pattern were validated at load.

The result is never wider than the proxy's decision and sometimes narrower (``/a;v=1`` is allowed
by the proxy, refused here): a refusal is a 403 from Cilium, never a leak. The expressions use
only groups, alternation, classes and bounded repetition, which RE2, POSIX ERE and Python's ``re``
read alike, so the tests check them with ``re``.
"""

from __future__ import annotations

from collections.abc import Iterable

from egresslock.policy.glob import HostPattern
from egresslock.policy.normalize import decode_segment

# One raw path character a wildcard may match: RFC 3986 pchar minus '%', '.' and ';'.
_RAW = "[-A-Za-z0-9_~!$&'()*+,=:@]"
# A percent-escape a wildcard may match: printable, and not '.', '/', ';', '\' or DEL (%2E, %2F,
# %3B, %5C, %7F); control bytes %00-%1F are refused by the proxy too.
_ESCAPE = ("%(2[0-9A-Da-d]|3[0-9AC-Fac-f]|[468-9A-Fa-f][0-9A-Fa-f]|5[0-9ABD-Fabd-f]"
           "|7[0-9A-Ea-e])")
_NON_DOT = f"({_RAW}|{_ESCAPE})"
_ANY = f"({_RAW}|{_ESCAPE}|\\.)"
# A whole segment that is not '.' or '..': up to two dots then a non-dot, or three dots, then
# anything.
_SEGMENT = f"(\\.{{0,2}}{_NON_DOT}|\\.{{3}}){_ANY}*"
_QUERY_TAIL = "(\\?.*)?"
_SPECIAL = frozenset(".^$*+?()[]{}|\\")


def escape(text: str) -> str:
    """Escape regex metacharacters with a backslash, the one escape RE2 and ERE share."""
    return "".join("\\" + c if c in _SPECIAL else c for c in text)


def path_regex(pattern: str, query_allowed: bool) -> str | None:
    """The anchored regex for one egresslock path pattern, or None when a wildcard segment is
    made only of dots and stars (``.*``, ``*.``), which could match a dot segment here."""
    segments = pattern[1:].split("/")
    parts: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            parts.append(f"(/{_SEGMENT})*" + ("/?" if last else ""))
            continue
        # Literal parts in the spelling the proxy normalises requests to ('%7e' is '~').
        pieces = [decode_segment(p, pattern) for p in segment.split("*")]
        if len(pieces) == 1:
            parts.append("/" + escape(pieces[0]))
            continue
        if all(set(p) <= {"."} for p in pieces):
            if any(pieces):
                return None
            # A last segment may be empty ('/*' matches '/'); an interior one never is.
            parts.append("/" + (f"({_SEGMENT})?" if last else _SEGMENT))
            continue
        parts.append("/" + f"{_ANY}*".join(escape(p) for p in pieces))
    return "^" + "".join(parts) + (_QUERY_TAIL if query_allowed else "") + "$"


def host_regex(host: HostPattern, ports: Iterable[int]) -> str:
    """The anchored regex for the Host header of requests to ``host`` on ``ports``.

    The header may carry the port or not (RFC 9110, 7.2); an IPv6 literal is in brackets. Names
    are matched in lower case, as the proxy normalises them; a client that sends upper case is
    refused rather than guessed at.
    """
    port_list = sorted(set(ports))
    alternatives = "|".join(str(p) for p in port_list)
    port = f"(:({alternatives}))?" if len(port_list) > 1 else f"(:{port_list[0]})?"
    if host.exact is not None:
        name = f"[{host.exact}]" if ":" in host.exact else host.exact
        return "^" + escape(name) + port + "$"
    assert host.suffix is not None
    return "^([a-z0-9_]([-a-z0-9_]*[a-z0-9_])?\\.)+" + escape(host.suffix) + port + "$"
