"""What a call's arguments carry: secrets, and links that carry data. Pure.

The arguments of a tool call are a write to the MCP server, and through it to wherever the tool
writes: an issue on a public repository, a chat message, a page that renders markdown. The
proxy's content checks cannot see them (they travel over the server's stdin, not the network),
so the gateway applies the same two checks here, to every string in the arguments, keys
included, at any depth:

- secrets: the policy's ``secrets``, the built-in credential detectors and credential
  placeholders, in every encoding the scanner knows (the caller passes the scanner in);
- dynamic links: each ``http(s)://`` URL inside a string is judged as the proxy judges a request
  target (:func:`egresslock.content.links.dynamic_reason`): a nested URL in its path or query
  (the EchoLeak redirector pattern), or more encoded-looking data than ``max_data_bytes`` in its
  path, query, fragment and the host labels left of the registrable name
  (``c2VjcmV0.attacker.example``). A URL too malformed to judge (userinfo, backslashes, bad
  escapes) is refused as well: what cannot be parsed cannot be shown to carry nothing.

A link to any host is judged, not only to hosts the policy names: whoever renders the argument
(a browser showing the issue, a chat client unfurling a link) fetches it from outside the
sandbox, where the proxy's host rules no longer apply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from egresslock.content.links import LinkLimits, dynamic_reason
from egresslock.errors import InputError
from egresslock.policy.normalize import parse_ip_literal, parse_url

# A URL inside free text ends at whitespace, quotes, angle brackets and backticks; markdown's
# closing parenthesis and trailing sentence punctuation are trimmed below.
_URL = re.compile(r"(?i)\bhttps?://[^\s<>\"'`]+")
_TRAILING = ".,;:!?*_"
_MAX_DEPTH = 64

Findings = Callable[[str], Sequence[str]]


def strings(value: Any, pointer: str = "", depth: int = 0) -> Iterator[tuple[str, str]]:
    """Every string in a JSON value with its JSON Pointer (RFC 6901); object keys included,
    reported at the pointer of the member they name."""
    if depth > _MAX_DEPTH:
        raise InputError(f"arguments nest deeper than {_MAX_DEPTH} levels at {pointer or '/'}")
    if isinstance(value, str):
        yield pointer or "/", value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            child = f"{pointer}/{_escape(str(key))}"
            yield child + " (name)", str(key)
            yield from strings(item, child, depth + 1)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from strings(item, f"{pointer}/{i}", depth + 1)


def _escape(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def urls_in(text: str) -> list[str]:
    """The http(s) URLs written in ``text``, trailing punctuation trimmed."""
    out = []
    for match in _URL.finditer(text):
        url = match.group(0)
        while url and (url[-1] in _TRAILING or (url[-1] == ")" and url.count("(") < url.count(")"))
                       or (url[-1] == "]" and url.count("[") < url.count("]"))):
            url = url[:-1]
        out.append(url)
    return out


def link_reason(url: str, limits: LinkLimits) -> str | None:
    """Why ``url``, written in an argument, carries data or cannot be judged; None when clean."""
    target, hashmark, fragment = url.partition("#")
    try:
        parsed = parse_url(target)
    except InputError as exc:
        return f"holds a URL egresslock cannot judge ({exc})"
    labels: tuple[str, ...] = ()
    if parse_ip_literal(parsed.host) is None:
        # Labels left of the last two are free for whoever owns the name: data can ride there.
        labels = tuple(parsed.host.split(".")[:-2])
    reason = dynamic_reason(parsed.path, parsed.query, labels, limits)
    if reason is None and hashmark and fragment:
        reason = dynamic_reason(None, fragment, (), limits)
        if reason is not None:
            reason = f"fragment: {reason}"
    if reason is None:
        return None
    return f"holds a dynamic link {_show(url)}: {reason}"


def argument_refusal(arguments: Mapping[str, Any], secrets: Findings,
                     limits: LinkLimits) -> tuple[str, tuple[str, ...]] | None:
    """The first reason to refuse ``arguments`` and every finding behind it, or None.

    ``secrets(text)`` describes the secrets found in one string (the content scanner's hits)."""
    try:
        leaves = list(strings(arguments))
    except InputError as exc:
        return str(exc), ()
    for pointer, text in leaves:
        hits = tuple(secrets(text))
        if hits:
            return f"argument {pointer} holds {hits[0]}", hits
    for pointer, text in leaves:
        for url in urls_in(text):
            reason = link_reason(url, limits)
            if reason is not None:
                return f"argument {pointer} {reason}", (url,)
    return None


def _show(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")
