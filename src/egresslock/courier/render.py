"""Parameters in, the one request they stand for out: validated, checked, percent-encoded.

Both sides run this: egresslock before it forwards a call (so a refusal is logged with its
reason), and the worker again before it sends (it trusts no input, not even its parent's). The
order of the checks is the argument:

1. the parameters are a JSON object that satisfies the action's schema (enums, patterns,
   lengths, no undeclared key);
2. no string holds a control character: none at all in a value that goes into the URL or a
   header, only tab and newline in declared free text that goes only into the JSON body;
3. the request is rendered: a path or query value is percent-encoded with nothing left as a
   delimiter (``/``, ``?``, ``#``, ``&``, ``=``, ``%`` all become escapes), so a value is one
   segment or one value whatever it holds; a path value that some server would read as a dot
   segment (``..``, ``..;x``) or that is empty is refused; a header value must be printable
   ASCII; the body is the template with each placeholder replaced by the JSON value.

Error messages name the parameter and the rule it broke, never the value itself: the audit log
should not become a copy of what an agent tried to smuggle out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from egresslock.courier.template import Template, slot_of
from egresslock.errors import InputError

# C0 and C1 controls, DEL, unpaired surrogates and the Unicode line separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_TEXT_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_HEADER_VALUE = re.compile(r"^[\x20-\x7e]*$")
_PATH_PARAMS = re.compile(r"[;,]")


class CallRefused(InputError):
    """A call whose parameters cannot be sent; ``reason`` names the parameter and the rule."""

    def __init__(self, reason: str, schema_valid: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.schema_valid = schema_valid


@dataclass(frozen=True, slots=True)
class Rendered:
    """The request a call stands for, as the worker sends it."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None

    @property
    def target(self) -> str:
        """Path and query (what the audit row shows)."""
        rest = self.url.split("://", 1)[1]
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        return rest[cut:] or "/"


def describe_path(path: Iterator[Any] | list[Any] | tuple[Any, ...]) -> str:
    """``['labels', 0]`` -> ``labels[0]``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(the parameters)"


def validate_params(template: Template, params: object) -> dict[str, Any]:
    """The parameters, when they satisfy the schema; raises :class:`CallRefused` naming the
    first few violations (by parameter and rule, never by value)."""
    from jsonschema import Draft202012Validator

    if not isinstance(params, dict):
        raise CallRefused(f"parameters must be a JSON object, not {type(params).__name__}",
                          schema_valid=False)
    errors = sorted(Draft202012Validator(template.params).iter_errors(params),
                    key=lambda e: (describe_path(e.absolute_path), str(e.validator)))
    if errors:
        shown = "; ".join(_explain(e) for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise CallRefused(f"parameters refused by the schema of action {template.name}: "
                          f"{shown}{more}", schema_valid=False)
    return params


def _explain(error: Any) -> str:
    where = f"parameter {describe_path(error.absolute_path)}"
    rule, value = str(error.validator), error.validator_value
    if rule == "additionalProperties":
        extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
        names = [repr(n) for n in extra if _IDENTIFIER.match(n)]
        what = f"unknown parameter {', '.join(names)}" if names else "an unknown parameter"
        declared = ", ".join(sorted(error.schema.get("properties", {}))) or "none"
        inside = f" in {describe_path(error.absolute_path)}" if error.absolute_path else ""
        return f"{what}{inside} (declared: {declared})"
    if rule == "required":
        missing = [n for n in value if n not in error.instance]
        return f"missing required parameter {', '.join(map(repr, missing))}"
    if rule == "enum":
        return f"{where} must be one of {', '.join(json.dumps(v) for v in value)}"
    if rule == "const":
        return f"{where} must be {json.dumps(value)}"
    if rule == "pattern":
        return f"{where} does not match the pattern {value}"
    if rule in ("maxLength", "maxItems", "maxProperties"):
        return f"{where} is longer than {rule} {value}"
    if rule in ("minLength", "minItems"):
        return f"{where} is shorter than {rule} {value}"
    if rule == "type":
        return f"{where} must be of type {value}"
    return f"{where} fails {rule} {json.dumps(value)}"


def strings(value: Any, schema: Mapping[str, Any], path: tuple[str | int, ...] = ()
            ) -> Iterator[tuple[tuple[str | int, ...], str, Mapping[str, Any]]]:
    """Every string in ``value`` with its path and the schema that governs it (for object
    members: their property schema; for array items: ``items``)."""
    if isinstance(value, str):
        yield path, value, schema
    elif isinstance(value, dict):
        props = schema.get("properties", {}) if isinstance(schema, dict) else {}
        for k, v in value.items():
            yield from strings(v, props.get(k, {}), (*path, k))
    elif isinstance(value, list):
        items = schema.get("items", {}) if isinstance(schema, dict) else {}
        for i, v in enumerate(value):
            yield from strings(v, items if isinstance(items, dict) else {}, (*path, i))


def check_characters(template: Template, params: Mapping[str, Any]) -> None:
    """Refuse control characters: any in a URL or header value, all but tab and newline in
    declared free text that goes only into the JSON body."""
    wire = template.wire_params()
    for path, text, schema in strings(params, template.params):
        body_text = path[0] not in wire and schema.get("x-free-text") is True
        if (_TEXT_CONTROL if body_text else _CONTROL).search(text):
            allowed = " (free text in the body may hold tab and newline only)" if body_text \
                else ""
            raise CallRefused(f"parameter {describe_path(path)} holds a control character "
                              f"(CR, LF, NUL, ...){allowed}")


def _scalar(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return json.dumps(value)
    raise CallRefused(f"parameter {name} must be a string, number or boolean to go into the "
                      "URL or a header")


def _segment(name: str, value: Any) -> str:
    text = _scalar(name, value)
    # A server that splits on '/' before decoding, or drops ';' path parameters, reads these
    # as dot segments (Orange Tsai, "Breaking Parser Logic", 2018): refuse, do not encode.
    pieces = [_PATH_PARAMS.split(p, maxsplit=1)[0] for p in text.split("/")]
    if text == "" or any(p in (".", "..") for p in pieces):
        raise CallRefused(f"parameter {name} cannot be a path segment: it is empty or would "
                          "be read as a dot segment ('.', '..')")
    if "\\" in text:
        raise CallRefused(f"parameter {name} cannot be a path segment: it holds a backslash, "
                          "which some servers read as '/'")
    return quote(text, safe="")


def render(template: Template, params: Mapping[str, Any],
           placeholders: Mapping[str, str]) -> Rendered:
    """The request for ``params`` (already validated). ``placeholders`` are the credential
    placeholders the worker holds, by credential name."""
    segments = []
    for part in template.path:
        slot = slot_of(part)
        segments.append(part if slot is None else _segment(slot.name, params.get(slot.name)))
    url = f"{template.scheme}://{template.authority}/" + "/".join(segments)
    if template.query is not None:
        pairs = []
        for qname, value in template.query:
            slot = slot_of(value) if value is not None else None
            if value is None:
                pairs.append(qname)
            elif slot is None:
                pairs.append(f"{qname}={value}")
            elif slot.name in params:
                pairs.append(f"{qname}={quote(_scalar(slot.name, params[slot.name]), safe='')}")
        if pairs or not template.query:
            url += "?" + "&".join(pairs)
    headers: list[tuple[str, str]] = []
    for name, prefix, slot in template.headers:
        if slot is None:
            headers.append((name, prefix))
        elif slot.credential:
            if slot.name not in placeholders:
                raise CallRefused(f"credential {slot.name} is not available to the courier "
                                  "(its real value was not found when the run started)")
            headers.append((name, prefix + placeholders[slot.name]))
        elif slot.name in params:
            value = _scalar(slot.name, params[slot.name])
            if not _HEADER_VALUE.match(value):
                raise CallRefused(f"parameter {slot.name} goes into header {name} and must be "
                                  "printable ASCII")
            headers.append((name, prefix + value))
    body = None
    filled = _fill(template.body, params)
    if template.body is not None and filled is not _ABSENT:
        body = json.dumps(filled, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if not any(n.lower() == "content-type" for n, _ in headers):
            headers.append(("Content-Type", "application/json"))
    return Rendered(template.method, url, tuple(headers), body)


_ABSENT = object()


def _fill(body: Any, params: Mapping[str, Any]) -> Any:
    """The body template with each placeholder replaced by its JSON value; a member or item
    whose optional parameter was not given is left out."""
    if isinstance(body, str):
        slot = slot_of(body)
        if slot is None:
            return body
        return params.get(slot.name, _ABSENT)
    if isinstance(body, list):
        return [v for v in (_fill(item, params) for item in body) if v is not _ABSENT]
    if isinstance(body, dict):
        return {k: v for k, v in ((k, _fill(item, params)) for k, item in body.items())
                if v is not _ABSENT}
    return body


def prepare_call(template: Template, params: object,
                 placeholders: Mapping[str, str]) -> Rendered:
    """Validate, check characters, render: what the worker does with each call."""
    checked = validate_params(template, params)
    check_characters(template, checked)
    return render(template, checked, placeholders)
