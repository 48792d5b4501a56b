"""An action's request template, parsed: which parts are fixed and where each placeholder sits.

A placeholder is ``{name}`` (a declared parameter) or ``{credential.NAME}`` (the placeholder of a
policy credential, which the proxy swaps for the real value on the wire). Placeholders may stand
only where a value cannot change the request's structure once it is encoded:

- a whole path segment (``/repos/{owner}/issues``), percent-encoded with nothing left as ``/``;
- a whole query value (``?state={state}``), percent-encoded likewise;
- the end of a header value after a fixed prefix (``Bearer {credential.TOKEN}``);
- a whole JSON string in the body (``{"title": "{title}"}``), replaced by the parameter's JSON
  value, so quoting is the JSON encoder's job, never a template's.

Never in the scheme, host or port, a query name, a header name or a JSON key. A part that holds a
placeholder anywhere else is an error, since "``/files/{name}.txt``" would let a value end a
segment early.

This module is shared by egresslock and the worker, so it imports nothing heavy at module level
(the worker starts inside its sandbox and should not pay for pydantic): the URL checks that need
:mod:`egresslock.policy.normalize` import it inside :func:`parse_template`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?\}")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)(/[^?#]*)?(?:\?([^#]*))?$")
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")
# Headers the courier (or http.client) writes itself: a template may not set them.
RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection",
                              "upgrade", "te", "trailer", "keep-alive", "proxy-authorization",
                              "proxy-connection", "expect"})


@dataclass(frozen=True, slots=True)
class Slot:
    """One placeholder: a parameter, or (``credential`` True) a credential's placeholder."""

    name: str
    credential: bool = False

    @property
    def text(self) -> str:
        return f"{{credential.{self.name}}}" if self.credential else f"{{{self.name}}}"


def slot_of(text: str) -> Slot | None:
    """The placeholder ``text`` is, when it is exactly one (``{x}``, ``{credential.X}``)."""
    m = PLACEHOLDER.fullmatch(text)
    if m is None:
        return None
    if m.group(2) is None:
        return Slot(m.group(1))
    return Slot(m.group(2), credential=True) if m.group(1) == "credential" else None


@dataclass(frozen=True, slots=True)
class Template:
    """A parsed action. Path segments, query values and body strings that are placeholders are
    kept as their ``{...}`` text (fixed parts can hold no brace, so the two never mix); header
    values are a fixed prefix and at most one placeholder at the end."""

    name: str
    method: str
    scheme: str
    authority: str  # host[:port] as it goes on the wire (normalised)
    host: str
    port: int
    path: tuple[str, ...]  # segments after the leading '/'
    query: tuple[tuple[str, str | None], ...] | None  # None: no '?' at all
    headers: tuple[tuple[str, str, Slot | None], ...]  # (name, fixed prefix, placeholder)
    body: Any  # the JSON template, or None for no body
    params: Mapping[str, Any]  # the JSON Schema of the parameters

    # -- where each parameter goes ----------------------------------------------------------

    def path_params(self) -> set[str]:
        return {s.name for s in map(slot_of, self.path) if s is not None}

    def query_params(self) -> set[str]:
        return {s.name for _, v in self.query or () if v is not None
                for s in [slot_of(v)] if s is not None}

    def header_slots(self) -> list[tuple[str, Slot]]:
        return [(n, s) for n, _, s in self.headers if s is not None]

    def body_params(self) -> set[str]:
        return {s.name for s in _body_slots(self.body)}

    def url_params(self) -> set[str]:
        return self.path_params() | self.query_params()

    def wire_params(self) -> set[str]:
        """Parameters that go into the URL or a header (no control character may reach them)."""
        return self.url_params() | {s.name for _, s in self.header_slots() if not s.credential}

    def credentials(self) -> set[str]:
        return {s.name for _, s in self.header_slots() if s.credential}

    def uses(self) -> set[str]:
        return self.wire_params() | self.body_params()

    # -- the worker receives templates as JSON ----------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "method": self.method, "scheme": self.scheme,
                "authority": self.authority, "host": self.host, "port": self.port,
                "path": list(self.path),
                "query": None if self.query is None else [list(p) for p in self.query],
                "headers": [[n, p, s.text if s else None] for n, p, s in self.headers],
                "body": self.body, "params": dict(self.params)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Template:
        return cls(str(data["name"]), str(data["method"]), str(data["scheme"]),
                   str(data["authority"]), str(data["host"]), int(data["port"]),
                   tuple(data["path"]),
                   None if data["query"] is None else tuple((str(k), v) for k, v in
                                                            data["query"]),
                   tuple((str(n), str(p), slot_of(s) if s else None)
                         for n, p, s in data["headers"]),
                   data["body"], dict(data["params"]))


def _body_slots(body: Any) -> Iterator[Slot]:
    if isinstance(body, str):
        slot = slot_of(body)
        if slot is not None:
            yield slot
    elif isinstance(body, list):
        for item in body:
            yield from _body_slots(item)
    elif isinstance(body, dict):
        for value in body.values():
            yield from _body_slots(value)


Problem = tuple[str, str]  # (key, message)


def parse_template(name: str, method: str, url: str, headers: Mapping[str, str], body: Any,
                   params: Mapping[str, Any]) -> tuple[Template | None, list[Problem]]:
    """Parse one action's request; the template, or None and every problem found (each a key
    such as ``request.url`` and a sentence naming the bad value and what would be valid)."""
    problems: list[Problem] = []
    parsed = _parse_url(url, problems)
    parsed_headers = _parse_headers(headers, problems)
    _check_body(body, "request.body", problems)
    if parsed is None or problems:
        return None, problems
    scheme, authority, host, port, path, query = parsed
    return Template(name, method, scheme, authority, host, port, path, query, parsed_headers,
                    body, params), []


def _parse_url(url: str, problems: list[Problem]) -> tuple[str, str, str, int, tuple[str, ...],
                                                           tuple[tuple[str, str | None], ...]
                                                           | None] | None:
    from egresslock.errors import InputError
    from egresslock.policy.normalize import parse_url

    key = "request.url"
    if "#" in url:
        problems.append((key, f"URL {url!r} has a fragment ('#'); requests never carry one"))
        return None
    m = _URL.match(url)
    if m is None:
        problems.append((key, f"URL {url!r} must be an absolute http:// or https:// URL, like "
                              "https://api.example.com/repos/{repo}/issues"))
        return None
    scheme, authority, raw_path, raw_query = m.group(1), m.group(2), m.group(3) or "/", m.group(4)
    if "{" in authority or "}" in authority:
        problems.append((key, f"the host and port of {url!r} must be fixed; a placeholder may "
                              "stand only for a whole path segment or query value"))
        return None
    segments = raw_path[1:].split("/")
    for segment in segments:
        _check_part(segment, f"path segment {segment!r}", "a whole path segment, like "
                    "/repos/{owner}/issues", key, problems)
    pairs: list[tuple[str, str | None]] = []
    if raw_query is not None:
        for pair in raw_query.split("&"):
            qname, eq, value = pair.partition("=")
            if "{" in qname or "}" in qname:
                problems.append((key, f"query name {qname!r} must be fixed; a placeholder may "
                                      "stand only for a whole value, like ?state={state}"))
                continue
            if eq:
                _check_part(value, f"query value {value!r}", "a whole query value, like "
                            "?state={state}", key, problems)
            pairs.append((qname, value if eq else None))
    # The fixed parts must be a URL the proxy accepts as written: fill each placeholder with a
    # harmless value and parse it as the proxy would.
    sample = PLACEHOLDER.sub("x", url)
    try:
        parsed = parse_url(sample)
    except InputError as exc:
        problems.append((key, f"URL {url!r} is refused: {exc}"))
        return None
    if parsed.scheme != scheme.lower():
        problems.append((key, f"scheme must be written in lower case: {parsed.scheme}://"))
    written = PLACEHOLDER.sub("x", raw_path)
    if parsed.path != written:
        problems.append((key, f"path {raw_path!r} must be written in its normal form "
                              f"({PLACEHOLDER.sub('x', parsed.path)!r} with placeholders as x)"))
    return (parsed.scheme, parsed.authority, parsed.host, parsed.port, tuple(segments),
            tuple(pairs) if raw_query is not None else None)


def _check_part(text: str, what: str, valid: str, key: str, problems: list[Problem]) -> None:
    if "{" not in text and "}" not in text:
        return
    slot = slot_of(text)
    if slot is None:
        problems.append((key, f"{what} holds a placeholder inside other text; a placeholder "
                              f"must be {valid}"))
    elif slot.credential:
        problems.append((key, f"{what}: credentials may appear only in headers (the proxy "
                              "replaces a placeholder nowhere else)"))


def _parse_headers(headers: Mapping[str, str], problems: list[Problem]
                   ) -> tuple[tuple[str, str, Slot | None], ...]:
    out = []
    for name, value in headers.items():
        key = f"request.headers.{name}"
        if name.lower() in RESERVED_HEADERS:
            problems.append((key, f"header {name} is written by the courier itself; remove it "
                                  "(templates may set e.g. Accept, Authorization, Content-Type)"))
            continue
        m = PLACEHOLDER.search(value)
        prefix, slot = value, None
        if m is not None:
            prefix, slot = value[: m.start()], slot_of(m.group(0))
            if m.end() != len(value) or "{" in prefix or "}" in prefix or slot is None:
                problems.append((key, f"value {value!r}: a placeholder may stand only at the "
                                      "end of a header value after fixed text, like "
                                      "'Bearer {credential.TOKEN}'"))
                continue
        elif "{" in value or "}" in value:
            problems.append((key, f"value {value!r} holds a brace that is not a placeholder "
                                  "({name} or {credential.NAME})"))
            continue
        if not _PRINTABLE.match(prefix):
            problems.append((key, f"value {value!r} must be printable ASCII"))
            continue
        out.append((name, prefix, slot))
    return tuple(out)


def _check_body(body: Any, key: str, problems: list[Problem]) -> None:
    if isinstance(body, str):
        slot = slot_of(body)
        if slot is not None and slot.credential:
            problems.append((key, f"{body!r}: credentials may appear only in headers (the "
                                  "proxy replaces a placeholder nowhere else)"))
        elif slot is None and PLACEHOLDER.search(body):
            problems.append((key, f"string {body!r} holds a placeholder inside other text; a "
                                  "placeholder must be a whole JSON string, like "
                                  "{\"title\": \"{title}\"}"))
    elif isinstance(body, list):
        for i, item in enumerate(body):
            _check_body(item, f"{key}[{i}]", problems)
    elif isinstance(body, dict):
        for k, v in body.items():
            if PLACEHOLDER.search(str(k)):
                problems.append((f"{key}.{k}", f"key {k!r}: JSON keys must be fixed; a "
                                               "placeholder may stand only for a value"))
            _check_body(v, f"{key}.{k}", problems)
    elif body is not None and not isinstance(body, bool | int | float):
        problems.append((key, f"{body!r} is not a JSON value"))
