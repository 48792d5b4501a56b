"""Reading a policy file: YAML with line numbers in, a validated :class:`Policy` out.

PyYAML's composer gives every node a start mark, so the file is built by hand from nodes while a
table from key path to line is kept; pydantic's error locations are then looked up in that table.
Duplicate YAML keys, which PyYAML would silently resolve to the last one, are errors: a reviewer
reading the first ``methods:`` must not be overruled by a second one further down.

Every problem is collected, not only the first, so one run of ``egresslock policy validate``
shows everything to fix.
"""

from __future__ import annotations

import hashlib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from egresslock.errors import PolicyError, PolicyProblem
from egresslock.memo import Memo
from egresslock.policy.model import Policy, Rule

Loc = tuple[str | int, ...]
# Ports on which a client's traffic is TLS that a proxy cannot read without inspection.
HTTPS_PORTS = frozenset({443, 8443})


_COLLECTION_TAGS = frozenset({"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"})


class _Document:
    """Plain data built from YAML nodes, with the line of every key and item."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.lines: dict[Loc, int] = {}
        self.problems: list[PolicyProblem] = []
        self._scalar = yaml.constructor.SafeConstructor()

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.CollectionNode) and node.tag not in _COLLECTION_TAGS:
            # Scalars go through the safe constructor, which refuses unknown tags; collections
            # are built here, so a tag on one ('!!set', '!!python/object/apply') is refused here.
            raise yaml.constructor.ConstructorError(
                None, None, f"the tag {node.tag!r} is not allowed; policy files are plain YAML",
                node.start_mark)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                key = self._scalar.construct_object(key_node, deep=True)
                key_loc = (*loc, str(key))
                line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    self.problems.append(PolicyProblem(
                        self.filename, line, format_loc(loc),
                        f"key {key!r} must be a string"))
                    continue
                if key in out:
                    self.problems.append(PolicyProblem(
                        self.filename, line, format_loc(key_loc),
                        f"key {key!r} appears twice in one mapping (first on line "
                        f"{self.lines[key_loc]}); remove one"))
                    continue
                self.lines[key_loc] = line
                out[key] = self.build(value_node, key_loc)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        return self._scalar.construct_object(node, deep=True)


def format_loc(loc: Loc) -> str:
    """``('rules', 0, 'host')`` → ``rules[0].host``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model class whose fields live at ``loc``, to list valid keys for an unknown one."""
    model: Any = Policy
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        if field is None:
            continue  # a union-member tag that pydantic puts into locations
        model = _unwrap_model(field.annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap_model(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _unwrap_model(arg)
            if isinstance(found, type) and issubclass(found, BaseModel):
                return found
        return None
    return annotation


def _clean_loc(loc: tuple[Any, ...], data: Any) -> Loc:
    """Drop pydantic's union-member tags, keeping only parts that exist in the data."""
    out: list[str | int] = []
    node = data
    for part in loc:
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if in_dict or in_list:
            out.append(part)
            node = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and "[" not in part and (
            part[:1].islower()
        ):
            out.append(part)  # a missing required key or an unknown one
            node = None
    return tuple(out)


_TYPE_HINTS = {
    "bool_type": "; write true or false (yes, no, on and off are not booleans here)",
    "int_type": "; write a plain decimal number, without quotes or leading zeros",
}


def _line(doc: _Document, loc: Loc) -> int | None:
    for end in range(len(loc), -1, -1):
        if loc[:end] in doc.lines:
            return doc.lines[loc[:end]]
    return None


def _problems_from(exc: ValidationError, doc: _Document, data: Any) -> list[PolicyProblem]:
    grouped: dict[Loc, list[str]] = {}
    for err in exc.errors():
        loc = _clean_loc(err["loc"], data)
        if err["type"] == "extra_forbidden":
            model = _model_at(loc[:-1])
            valid = ", ".join(model.model_fields) if model else "?"
            msg = f"unknown key {loc[-1]!r}; valid keys here: {valid}"
        elif err["type"] == "missing":
            msg = "is required"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] not in ("value_error",) and not isinstance(err["input"], dict | list):
                msg = f"{msg} (got {err['input']!r})"
            if isinstance(err["input"], str):
                msg += _TYPE_HINTS.get(err["type"], "")
        grouped.setdefault(loc, [])
        if msg not in grouped[loc]:
            grouped[loc].append(msg)
    return [
        PolicyProblem(doc.filename, _line(doc, loc), format_loc(loc), "; or ".join(msgs))
        for loc, msgs in grouped.items()
    ]


def _duplicate_names(data: dict[str, Any], doc: _Document) -> list[PolicyProblem]:
    """Rule ids, secret and credential names must be unique. Checked on the raw data, so that
    duplicates are reported even when other problems stop the schema."""
    problems: list[PolicyProblem] = []
    for section, key in (("rules", "id"), ("secrets", "name"), ("credentials", "name"),
                         ("actions", "name")):
        items = data.get(section)
        if not isinstance(items, list):
            continue
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            name = item.get(key) if isinstance(item, dict) else None
            if not isinstance(name, str):
                continue
            if name in seen:
                loc: Loc = (section, i, key)
                first = _line(doc, (section, seen[name], key))
                problems.append(PolicyProblem(
                    doc.filename, _line(doc, loc), format_loc(loc),
                    f"{key} {name!r} is already used by {section}[{seen[name]}] (line {first}); "
                    f"each {key} must be unique, since decisions and logs name it"))
            else:
                seen[name] = i
    return problems


def _inspect_problems(rule: Rule, index: int, doc: _Document) -> list[PolicyProblem]:
    allow_only = [k for k in ("query", "max_body_bytes", *rule.transform_keys(), "budget")
                  if k in rule.model_fields_set]
    if rule.action == "deny" and allow_only:
        key = allow_only[0]
        loc: Loc = ("rules", index, key)
        return [PolicyProblem(
            doc.filename, _line(doc, loc), format_loc(loc),
            f"rule {rule.id!r} is a deny rule; deny rules match by host, ports, methods and "
            f"paths, so {key} belongs on an allow rule")]
    if rule.inspect or not rule.constrains_requests:
        return []
    tls_ports = sorted(HTTPS_PORTS.intersection(rule.ports))
    if not tls_ports:
        return []
    key = rule.constrained_keys()[0]
    loc = ("rules", index, key)
    return [PolicyProblem(
        doc.filename, _line(doc, loc), format_loc(loc),
        f"rule {rule.id!r} constrains {', '.join(rule.constrained_keys())} on HTTPS port "
        f"{tls_ports[0]}, where the proxy sees only the host name; add 'inspect: true' to "
        "decrypt and enforce them, or limit 'ports' to plain-HTTP ports such as [80]")]


def _json_schema_problems(loc: Loc, schema: dict[str, Any], doc: _Document
                          ) -> list[PolicyProblem]:
    """A JSON Schema in the policy (MCP tool arguments, action parameters) must be one."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        return [PolicyProblem(doc.filename, _line(doc, loc), format_loc(loc),
                              f"not a valid JSON Schema (2020-12) at {where}: {exc.message}")]
    return []


def _level_problems(policy: Policy, at: Loc, reads: str | None, level: str | None,
                    doc: _Document) -> list[PolicyProblem]:
    """``reads`` and ``level`` must name one of the policy's ``levels``."""
    out = []
    for key, value in (("reads", reads), ("level", level)):
        if value is None:
            continue
        loc: Loc = (*at, key)
        if policy.levels is None:
            out.append(PolicyProblem(
                doc.filename, _line(doc, loc), format_loc(loc),
                f"{key} {value!r} names a level, and the policy declares none; add a "
                "top-level 'levels: [public, internal, confidential]' (lowest first)"))
        elif value not in policy.levels:
            out.append(PolicyProblem(
                doc.filename, _line(doc, loc), format_loc(loc),
                f"{key} {value!r} is not one of the policy's levels "
                f"({', '.join(policy.levels)})"))
    return out


# libyaml's parser when PyYAML was built with it: the same nodes, marks and safe tags, about 20
# times faster than the pure-Python one (a policy of 100,000 rules parses in seconds, not minutes).
_BASE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"


class _Yaml12Loader(_BASE_LOADER):  # type: ignore[misc]
    """YAML 1.2 core-schema booleans and integers instead of PyYAML's YAML 1.1 ones.

    Under YAML 1.1 ``yes``/``no``/``on``/``off`` are booleans and ``0443`` is the octal number
    291: ``ports: [0443]`` would silently open port 291. Here only true/false are booleans and
    only plain decimal numbers are integers; anything else stays a string, which the strict
    schema then refuses with the value in the message.
    """


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL_TAG, _INT_TAG)]
    for first, resolvers in _BASE_LOADER.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(
    _INT_TAG, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))
_LOADER: Any = _Yaml12Loader


def _yaml_error(exc: yaml.YAMLError, filename: str) -> PolicyError:
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc)
    return PolicyError([PolicyProblem(filename, line, "", f"not valid YAML: {problem}")])


def parse_policy(text: str, filename: str = "<policy>") -> Policy:
    """Parse and validate policy text. Pure: no file, network or environment is touched."""
    doc = _Document(filename)
    try:
        nodes = list(yaml.compose_all(text, Loader=_LOADER))
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, filename) from exc
    if len(nodes) != 1 or nodes[0] is None:
        what = "is empty" if not nodes or nodes[0] is None else f"holds {len(nodes)} documents"
        raise PolicyError([PolicyProblem(
            filename, None, "", f"{what}; a policy file is one YAML mapping that begins "
            "with 'version: 1' (run 'egresslock policy init' for a starter)")])
    try:
        data = doc.build(nodes[0], ())
    except yaml.YAMLError as exc:  # a tag no safe constructor knows: '!foo', '<<' merge keys
        raise _yaml_error(exc, filename) from exc
    if not isinstance(data, dict):
        raise PolicyError([PolicyProblem(filename, 1, "", "must be a YAML mapping of keys "
                                         "(version, mode, network, rules, ...)")])
    problems = doc.problems + _duplicate_names(data, doc)
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(problems + _problems_from(exc, doc, data)) from exc
    for i, rule in enumerate(policy.rules):
        problems.extend(_inspect_problems(rule, i, doc))
        problems.extend(_level_problems(policy, ("rules", i), rule.reads, rule.level, doc))
    for i, action in enumerate(policy.actions):
        problems.extend(_level_problems(policy, ("actions", i), action.reads, action.level, doc))
    for i, tool in enumerate(policy.mcp.tools):
        problems.extend(_level_problems(policy, ("mcp", "tools", i), tool.reads, tool.level,
                                        doc))
        if tool.arguments is not None:
            problems.extend(_json_schema_problems(("mcp", "tools", i, "arguments"),
                                                  tool.arguments, doc))
    for i, action in enumerate(policy.actions):
        problems.extend(_json_schema_problems(("actions", i, "params"), action.params, doc))
    if problems:
        raise PolicyError(problems)
    return policy


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; errors name the file and line."""
    p = Path(path)
    try:
        data = p.read_bytes()
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([PolicyProblem(str(p), None, "", f"cannot be read: {exc}")]) from exc
    return _POLICIES.get(_policy_key(p, data), lambda: parse_policy(text, str(p)))


# Parsed policies by file name and content: a policy is immutable, and an edited file has other
# bytes. Kept only where remembering is on (the warm server; see egresslock.memo).
_POLICIES: Memo[tuple[str, bytes], Policy] = Memo()


def _policy_key(path: Path, data: bytes) -> tuple[str, bytes]:
    return str(path), hashlib.sha256(data).digest()


def is_remembered(path: str | Path) -> bool:
    """Whether ``load_policy(path)`` would answer from memory (the file is unchanged)."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return False
    return _policy_key(Path(path), data) in _POLICIES


def strict_warnings(policy: Policy) -> list[str]:
    """What ``policy validate --strict`` warns about: limits a rule leaves unstated."""
    out: list[str] = []
    for rule in policy.rules:
        if rule.action == "deny":
            continue
        missing = [k for k in ("methods", "paths", "max_body_bytes") if getattr(rule, k) is None]
        if rule.query == "allow":
            missing.append("query")
        if missing:
            out.append(f"rule {rule.id!r} states no {', '.join(missing)}: any value is allowed")
    if policy.mode == "report":
        out.append("mode is 'report': nothing is denied, denials are only logged")
    if not policy.network.block_private:
        out.append("network.block_private is false: private and metadata addresses are reachable")
    return out
