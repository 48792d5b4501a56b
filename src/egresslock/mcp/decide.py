"""The MCP gateway's per-tool policy: which calls pass, and why. Pure: no I/O.

A call is what the agent asks of the server that sends the server something and returns data:
a tool call, a resource read or a prompt. Each is matched by a name against ``mcp.tools``:

====================  ==========================  =========================================
request               matched as                  arguments checked
====================  ==========================  =========================================
``tools/call``        the tool's name             the call's ``arguments``
``resources/read``    ``resource:`` + the URI     ``{"uri": URI}``
``prompts/get``       ``prompt:`` + the name      the prompt's ``arguments``
====================  ==========================  =========================================

Tool names never hold ``:`` (the MCP specification's names are letters, digits, ``_``, ``-``
and ``.``), so the three kinds cannot be confused; a pattern ``*`` matches all of them.

The first entry whose pattern matches decides (``*`` stands for any run of characters; the match
is case-sensitive, as MCP names are). No entry: ``mcp.default``. Then, in this order, so that a
refusal names the most fundamental reason:

1. ``action: deny`` refuses.
2. ``level``: when the session's mark is above it, the call is a write down and is refused with
   the read that raised the mark (:meth:`egresslock.flow.mark.SessionMark.refusal`).
3. ``arguments``: a JSON Schema (2020-12, formats checked) the arguments must satisfy.
4. ``scan`` (on unless ``false``, and on for calls the default allows): no string in the
   arguments may hold a secret or a data-carrying link (:mod:`egresslock.mcp.arguments`).

An allowed call's decision carries the entry's ``reads``: the gateway raises the mark to it
once the result has come back, before the agent sees it. In ``mode: report`` a refusal is
logged with the verdict ``report`` and the call goes through.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from egresslock.content.links import LinkLimits
from egresslock.errors import PolicyError, PolicyProblem
from egresslock.flow.mark import SessionMark
from egresslock.mcp.arguments import Findings, argument_refusal
from egresslock.policy.model import McpTool, Policy

Kind = Literal["tool", "resource", "prompt"]
_KEY_MESSAGES = frozenset({"required", "additionalProperties", "dependentRequired"})
_PREFIX: dict[Kind, str] = {"tool": "", "resource": "resource:", "prompt": "prompt:"}


@dataclass(frozen=True, slots=True)
class Call:
    """One request that writes to the server: its kind, name (a URI for resources), arguments."""

    kind: Kind
    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)

    @property
    def matched_as(self) -> str:
        """The name ``mcp.tools`` patterns are matched against."""
        return _PREFIX[self.kind] + self.name

    @property
    def label(self) -> str:
        """How a reason or the mark's history names it: ``tool get_file``."""
        return f"{self.kind} {self.name}"


@dataclass(frozen=True, slots=True)
class CallDecision:
    """A verdict, the entry that decided (its pattern, or ``default``) and a sentence why."""

    verdict: Literal["allow", "deny", "report"]
    rule_id: str
    reason: str
    reads: str | None = None  # the level the result raises the mark to
    findings: tuple[str, ...] = ()

    @property
    def forwarded(self) -> bool:
        return self.verdict != "deny"

    def message(self, call: Call) -> str:
        """What the agent reads in place of a result."""
        return f"egresslock: denied: {call.label}: {self.reason}"


@dataclass(frozen=True, slots=True)
class _Entry:
    index: int
    tool: McpTool
    pattern: re.Pattern[str]
    validator: Any  # jsonschema.protocols.Validator; jsonschema is imported when a schema exists


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """``*`` is any run of characters (including none); everything else is literal."""
    return re.compile("".join(".*" if part == "*" else re.escape(part)
                              for part in re.split(r"(\*)", pattern)), re.DOTALL)


class ToolTable:
    """The compiled ``mcp`` section of one policy. Immutable once built."""

    __slots__ = ("default", "entries", "limits", "report_only")

    def __init__(self, policy: Policy, filename: str = "<policy>") -> None:
        self.default = policy.mcp.default
        self.report_only = policy.mode == "report"
        links = policy.content.dynamic_links
        self.limits = LinkLimits(links.max_data_bytes, links.min_token_len)
        entries = []
        problems = []
        for i, tool in enumerate(policy.mcp.tools):
            validator = None
            if tool.arguments is not None:
                try:
                    validator = _validator(tool.arguments)
                except ValueError as exc:
                    problems.append(PolicyProblem(filename, None, f"mcp.tools.{i}.arguments",
                                                  str(exc)))
            entries.append(_Entry(i, tool, compile_pattern(tool.name), validator))
        if problems:
            raise PolicyError(problems)
        self.entries: tuple[_Entry, ...] = tuple(entries)

    def match(self, call: Call) -> McpTool | None:
        entry = self._match(call.matched_as)
        return entry.tool if entry is not None else None

    def _match(self, name: str) -> _Entry | None:
        for entry in self.entries:
            if entry.pattern.fullmatch(name):
                return entry
        return None

    def listed(self, call: Call) -> bool:
        """Whether a listing shows it: its entry (or the default) allows it. Labels, schemas
        and scans are checked per call, so a tool refused now may be allowed in another run."""
        entry = self._match(call.matched_as)
        if entry is None:
            return self.default == "allow"
        return entry.tool.action == "allow"

    def decide(self, call: Call, *, mark: SessionMark | None, secrets: Findings,
               server: str = "the MCP server") -> CallDecision:
        """The decision for ``call``, given the session's mark and a secret finder."""
        entry = self._match(call.matched_as)
        if entry is None:
            if self.default == "deny":
                return self._refuse("default", f"no mcp.tools entry matches "
                                    f"{call.matched_as!r} and mcp.default is deny")
            refusal = argument_refusal(call.arguments, secrets, self.limits)
            if refusal is not None:
                return self._refuse("default", refusal[0], refusal[1])
            return CallDecision("allow", "default", "no mcp.tools entry matches; mcp.default "
                                "is allow")
        tool = entry.tool
        rule = tool.name
        if tool.action == "deny":
            return self._refuse(rule, f"{call.kind}s matching {rule!r} are denied "
                                f"(mcp.tools[{entry.index}])")
        if tool.level is not None and mark is not None:
            why = mark.refusal(tool.level, server, call.label)
            if why is not None:
                return self._refuse(rule, why)
        if entry.validator is not None:
            error = _schema_error(entry.validator, call.arguments)
            if error is not None:
                return self._refuse(rule, f"arguments do not match the schema of "
                                    f"mcp.tools[{entry.index}] ({rule!r}): {error}")
        if tool.scan:
            refusal = argument_refusal(call.arguments, secrets, self.limits)
            if refusal is not None:
                return self._refuse(rule, refusal[0], refusal[1])
        return CallDecision("allow", rule, f"allowed by mcp.tools[{entry.index}] ({rule!r})",
                            reads=tool.reads)

    def _refuse(self, rule_id: str, reason: str,
                findings: Sequence[str] = ()) -> CallDecision:
        verdict: Literal["deny", "report"] = "report" if self.report_only else "deny"
        return CallDecision(verdict, rule_id, reason, findings=tuple(findings))


def _validator(schema: dict[str, Any]) -> Any:
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        raise ValueError(f"not a valid JSON Schema (2020-12) at {where}: {exc.message}") from exc
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _schema_error(validator: Any, arguments: Mapping[str, Any]) -> str | None:
    from jsonschema.exceptions import best_match

    error = best_match(validator.iter_errors(dict(arguments)))
    if error is None:
        return None
    where = "".join(f"/{p}" for p in error.absolute_path) or "/"
    # jsonschema's messages quote the offending value, which may be the very data the check
    # keeps in: name the keyword and its bound instead (key names only for the two that
    # speak of keys).
    if error.validator in _KEY_MESSAGES:
        return f"at {where}: {error.message}"
    bound = json.dumps(error.validator_value, default=str)
    if len(bound) > 120:
        bound = bound[:117] + "..."
    return f"at {where}: fails {error.validator} {bound}"


def arguments_size(arguments: Mapping[str, Any]) -> int:
    """Bytes of the arguments as JSON: the audit row's bytes_out."""
    return len(json.dumps(arguments, ensure_ascii=False, default=str).encode())
