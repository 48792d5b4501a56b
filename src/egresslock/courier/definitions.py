"""Checks an action definition against the policy, before any call is made.

``egresslock courier check`` prints every problem, and ``egresslock run`` refuses to start with
one, since a call through a half-checked action would be a call through an unchecked one. Each
problem names the action, the key, the bad value and what would be valid.

The parameter schema (``params``) must be a valid JSON Schema 2020-12 and must bound what the
agent can put into it:

- the top level is ``type: object`` with ``additionalProperties: false`` (required, not added:
  a reader of the policy should see that nothing else is accepted). An action that leaves
  ``params`` out takes no parameters at all;
- every string, at any depth, has ``enum`` or ``const``, or a ``pattern`` anchored with ``^`` and
  ``$`` together with ``maxLength``, or declares ``x-free-text: true`` with ``maxLength``;
- every nested object closes itself with ``additionalProperties: false``, every array has
  ``items`` and ``maxItems``;
- keywords that would let a value escape those bounds (``anyOf``, ``oneOf``, ``allOf``, ``not``,
  ``if``, ``$ref``, ``patternProperties``, ``prefixItems``...) are refused.

The request template (see :mod:`egresslock.courier.template`) may use only declared parameters;
a parameter in the path must be required; ``{credential.NAME}`` must name a policy credential
whose ``hosts`` match the URL's host and whose ``headers`` name that header. Finally the proxy
must let the request through: a rule must allow its host and port (and, when the proxy can see
inside, its method, path and query), and a credential sent to an https host needs a rule with
``inspect: true``, since the proxy can put the real value only into a request it decrypts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from egresslock.courier.template import Template, parse_template

if TYPE_CHECKING:
    from egresslock.policy.compiled import CompiledPolicy
    from egresslock.policy.model import Action, Policy

_REFUSED_KEYWORDS = ("anyOf", "oneOf", "allOf", "not", "if", "then", "else", "$ref",
                     "$dynamicRef", "patternProperties", "dependentSchemas", "prefixItems",
                     "contains", "unevaluatedProperties", "unevaluatedItems", "propertyNames")
_SCALARS = frozenset({"string", "integer", "number", "boolean"})
NO_PARAMS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(frozen=True, slots=True)
class ActionProblem:
    """One thing wrong with an action: which action, which key, and a sentence."""

    action: str
    key: str
    message: str

    def __str__(self) -> str:
        return f"action {self.action}: {self.key}: {self.message}"


def action_params(action: Action) -> dict[str, Any]:
    """The action's parameter schema; an action that leaves ``params`` out takes none."""
    return action.params if "params" in action.model_fields_set else dict(NO_PARAMS)


def check_schema(params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Problems of a parameter schema as (key, message)."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(params)
    except SchemaError as exc:
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.absolute_path)
        return [(f"params{where}", f"not a valid JSON Schema (2020-12): {exc.message}")]
    problems: list[tuple[str, str]] = []
    if params.get("type") != "object":
        problems.append(("params.type", f"must be 'object' (got {params.get('type')!r}): the "
                                        "parameters are one JSON object"))
    _check_node(params, "params", problems)
    return problems


def _types(node: Mapping[str, Any]) -> set[str]:
    kind = node.get("type")
    if isinstance(kind, str):
        return {kind}
    return {str(k) for k in kind} if isinstance(kind, list) else set()


def _check_node(node: Mapping[str, Any], key: str, problems: list[tuple[str, str]]) -> None:
    refused = [k for k in _REFUSED_KEYWORDS if k in node]
    if refused:
        problems.append((f"{key}.{refused[0]}", f"{refused[0]} is not supported in an action's "
                         "parameters: the courier must see every value's bounds directly "
                         "(use enum, const, pattern with maxLength, or x-free-text)"))
        return
    types = _types(node)
    fixed = "enum" in node or "const" in node
    if not types and not fixed:
        problems.append((key, "needs a 'type' (string, integer, number, boolean, array, "
                              "object) or an enum/const"))
        return
    if "string" in types and not fixed:
        _check_string(node, key, problems)
    if "object" in types:
        if node.get("additionalProperties") is not False:
            problems.append((f"{key}.additionalProperties",
                             f"must be false (got {node.get('additionalProperties')!r}): "
                             "an object accepts only the properties it declares"))
        props = node.get("properties", {})
        for name, sub in props.items():
            if isinstance(sub, dict):
                _check_node(sub, f"{key}.properties.{name}", problems)
            else:
                problems.append((f"{key}.properties.{name}", f"must be a schema object (got "
                                 f"{sub!r})"))
        missing = [r for r in node.get("required", []) if r not in props]
        if missing:
            problems.append((f"{key}.required", f"names {missing[0]!r}, which is not a "
                             "declared property"))
    if "array" in types:
        items = node.get("items")
        if not isinstance(items, dict):
            problems.append((f"{key}.items", "an array needs 'items' (the schema of each "
                                             "element)"))
        else:
            _check_node(items, f"{key}.items", problems)
        if "maxItems" not in node:
            problems.append((f"{key}.maxItems", "an array needs maxItems"))


def _check_string(node: Mapping[str, Any], key: str, problems: list[tuple[str, str]]) -> None:
    free = node.get("x-free-text")
    if "x-free-text" in node and free is not True:
        problems.append((f"{key}.x-free-text", f"must be true when present (got {free!r})"))
    pattern = node.get("pattern")
    if "maxLength" not in node:
        what = "free text" if free is True else "a pattern" if pattern is not None else \
            "a string"
        problems.append((f"{key}.maxLength", f"{what} needs maxLength"))
    if pattern is None and free is not True:
        problems.append((key, "a string needs enum, const, a pattern (with maxLength), or "
                              "'x-free-text: true' (with maxLength) to say it is free text"))
        return
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            problems.append((f"{key}.pattern", f"{pattern!r} is not a regular expression: "
                                               f"{exc}"))
            return
        if not (pattern.startswith("^") and pattern.endswith("$")):
            problems.append((f"{key}.pattern", f"{pattern!r} must be anchored with ^ and $: "
                             "JSON Schema patterns match anywhere in the value otherwise"))


def _sample(schema: Mapping[str, Any]) -> Any:
    """A value that stands for a parameter when the request is decided in advance."""
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    types = _types(schema)
    if "integer" in types or "number" in types:
        return schema.get("minimum", 1)
    if "boolean" in types:
        return True
    return "x"


def check_action(action: Action, policy: Policy, compiled: CompiledPolicy
                 ) -> tuple[Template | None, list[ActionProblem], list[str]]:
    """The parsed template, its problems, and warnings (not errors) for one action."""
    params = action_params(action)
    req = action.request
    problems = [ActionProblem(action.name, k, m) for k, m in check_schema(params)]
    template, parsed = parse_template(action.name, req.method, req.url, req.headers, req.body,
                                      params)
    problems += [ActionProblem(action.name, k, m) for k, m in parsed]
    if template is None or problems:
        return None, problems, []
    found = _usage_problems(template, params) + _credential_problems(template, policy)
    problems += [ActionProblem(action.name, k, m) for k, m in found]
    if problems:
        return None, problems, []
    rule_problems, warnings = _rule_problems(template, params, compiled)
    problems += [ActionProblem(action.name, k, m) for k, m in rule_problems]
    return (None if problems else template), problems, warnings


def _usage_problems(template: Template, params: Mapping[str, Any]) -> list[tuple[str, str]]:
    props: Mapping[str, Any] = params.get("properties", {})
    required = set(params.get("required", []))
    out = []
    for name in sorted(template.uses() - set(props)):
        out.append(("request", f"placeholder {{{name}}} is not a declared parameter (declared: "
                               f"{', '.join(sorted(props)) or 'none'})"))
    for name in sorted(template.wire_params() & set(props)):
        if not _types(props[name]) <= _SCALARS:
            out.append((f"params.properties.{name}.type", "a parameter in the URL or a header "
                        "must be a string, integer, number or boolean"))
    for name in sorted(template.path_params() - required):
        out.append(("params.required", f"{name!r} stands for a path segment and must be "
                                       "required"))
    if isinstance(template.body, str) and template.body_params() - required:
        out.append(("params.required", f"{template.body!r} is the whole body and must be "
                                       "required"))
    return out


def _credential_problems(template: Template, policy: Policy) -> list[tuple[str, str]]:
    from egresslock.policy.glob import parse_host_pattern

    creds = {c.name: c for c in policy.credentials}
    out = []
    for header, slot in template.header_slots():
        if not slot.credential:
            continue
        key = f"request.headers.{header}"
        cred = creds.get(slot.name)
        if cred is None:
            out.append((key, f"credential {slot.name!r} is not declared under credentials "
                             f"(declared: {', '.join(sorted(creds)) or 'none'})"))
            continue
        if not any(parse_host_pattern(h).matches(template.host) for h in cred.hosts):
            out.append((key, f"credential {slot.name} serves hosts {', '.join(cred.hosts)}, "
                             f"not {template.host}: the proxy would not put its real value "
                             "into this request; add the host to the credential's hosts"))
        if header.lower() not in {h.lower() for h in cred.headers}:
            out.append((key, f"credential {slot.name} is replaced only in headers "
                             f"{', '.join(cred.headers)}, not {header}"))
    return out


def _rule_problems(template: Template, params: Mapping[str, Any], compiled: CompiledPolicy
                   ) -> tuple[list[tuple[str, str]], list[str]]:
    """Would the proxy let the request through? Decided on the request rendered with sample
    values (each enum's first value, else 'x'), exactly as ``egresslock check`` decides."""
    from egresslock.courier.render import render
    from egresslock.errors import InputError
    from egresslock.policy.decide import Layer
    from egresslock.policy.probe import probe

    props: Mapping[str, Any] = params.get("properties", {})
    sample = {n: _sample(props.get(n, {})) for n in template.uses()}
    placeholders = dict.fromkeys(template.credentials(), "EGLPH" + "x" * 27)
    rendered = render(template, sample, placeholders)
    names = tuple(n.lower() for n, _ in rendered.headers)
    try:
        result = probe(compiled, rendered.url, template.method, names,
                       len(rendered.body or b""), origin="courier")
    except InputError as exc:
        return [("request.url", f"the proxy would refuse {rendered.url}: {exc}")], []
    decision = result.decision
    if not decision.allowed:
        return [("request.url", f"no rule lets the request through: {template.method} "
                                f"{rendered.url} is denied ({decision.reason}); allow it "
                                f"with a rule ('egresslock check -X {template.method} URL' "
                                "explains a decision)")], []
    warnings = []
    if result.layer is Layer.CONNECT:
        creds = sorted(template.credentials())
        if creds:
            return [("request.headers", f"credential {creds[0]} goes to https host "
                                        f"{template.host}, and rule {decision.rule_id} does "
                                        "not inspect it: the proxy can put the real value "
                                        "only into a request it decrypts; add 'inspect: "
                                        "true' to that rule")], []
        warnings.append(f"action {template.name}: rule {decision.rule_id} does not inspect "
                        f"{template.host}: the proxy sees only the host of this request")
    rule = compiled.by_id.get(decision.rule_id)
    if rule is not None and not rule.courier_only:
        warnings.append(f"action {template.name}: rule {rule.id} lets the agent send to "
                        f"{template.host} directly, around the action's schema; add 'via: "
                        "courier' to that rule so that only the courier may use it")
    return [], warnings


def compile_actions(policy: Policy, compiled: CompiledPolicy
                    ) -> tuple[dict[str, Template], list[ActionProblem], list[str]]:
    """Every action checked: the templates of the valid ones, every problem, every warning."""
    templates: dict[str, Template] = {}
    problems: list[ActionProblem] = []
    warnings: list[str] = []
    for action in policy.actions:
        template, found, warned = check_action(action, policy, compiled)
        problems += found
        warnings += warned
        if template is not None:
            templates[action.name] = template
    return templates, problems, warnings
