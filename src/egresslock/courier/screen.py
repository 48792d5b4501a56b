"""egresslock's own look at a call's parameters: secrets in any encoding, and dynamic links.

These checks need what only egresslock holds (the declared secrets and the real credential
values), so they run in the parent, before the call reaches the worker, which never holds a
secret. The proxy scans the rendered request again on its way out (URL and headers always, the
body of plain HTTP and inspected HTTPS), so a value that slipped past here still meets the
proxy's checks; here the reason can name the parameter.

Dynamic links are judged over every value the agent chose at once, as the query string of one
URL: the data-carrying tokens of all parameters add up against ``max_data_bytes``, so splitting a
secret over several parameters does not pass either. Values an ``enum`` or ``const`` fixes are
the policy author's words, not the agent's, and are left out.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from egresslock.content.links import LinkLimits, dynamic_reason
from egresslock.courier.render import describe_path
from egresslock.courier.template import Template

if TYPE_CHECKING:
    from egresslock.content.scanner import Scanner


def _leaves(value: Any, schema: Mapping[str, Any], path: tuple[str | int, ...] = ()
            ) -> Iterator[tuple[str, str, Mapping[str, Any]]]:
    """Every string and number in ``value``, as text, with its path and schema."""
    if isinstance(value, str):
        yield describe_path(path), value, schema
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield describe_path(path), str(value), schema
    elif isinstance(value, dict):
        props = schema.get("properties", {})
        for k, v in value.items():
            yield from _leaves(v, props.get(k, {}) if isinstance(props, dict) else {},
                               (*path, k))
    elif isinstance(value, list):
        items = schema.get("items", {})
        for i, v in enumerate(value):
            yield from _leaves(v, items if isinstance(items, dict) else {}, (*path, i))


def screen(template: Template, params: Mapping[str, Any], scanner: Scanner,
           limits: LinkLimits) -> list[str]:
    """Why these parameters must not leave (one sentence each), or an empty list."""
    reasons: list[str] = []
    chosen: list[tuple[str, str]] = []
    for where, text, schema in _leaves(params, template.params):
        hits = scanner.scan_text(text, f"in parameter {where}")
        if hits:
            reasons.append(", ".join(h.describe() for h in hits[:3]))
        if "enum" not in schema and "const" not in schema:
            chosen.append((where, text))
    if chosen:
        query = "&".join(f"{quote(w, safe='')}={quote(t, safe='')}" for w, t in chosen)
        why = dynamic_reason(None, query, (), limits)
        if why is not None:
            reasons.append("dynamic link in the parameters: "
                           + why.replace("query parameter", "parameter"))
    return reasons
