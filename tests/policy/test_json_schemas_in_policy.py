"""JSON Schemas inside a policy (MCP tool arguments, action parameters) are checked at load, so
`policy validate` finds a broken one, with its line, before a gateway or courier starts."""

from __future__ import annotations

import pytest

from egresslock.errors import PolicyError
from egresslock.policy import parse_policy

POLICY = """\
version: 1
actions:
  - name: a
    request: {method: POST, url: "http://x.example.com/"}
    params: {type: objekt}
mcp:
  tools:
    - name: create_issue
      arguments: {type: object, properties: {title: {maxLength: -1}}}
    - name: fine
      arguments: {type: object, properties: {n: {type: integer}}}
"""


def test_each_broken_schema_is_named_with_its_line() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(POLICY, "p.yaml")
    problems = sorted(str(p) for p in info.value.problems)
    assert problems == [
        "p.yaml:5: actions[0].params: not a valid JSON Schema (2020-12) at type: 'objekt' is "
        "not valid under any of the given schemas",
        "p.yaml:9: mcp.tools[0].arguments: not a valid JSON Schema (2020-12) at "
        "properties/title/maxLength: -1 is less than the minimum of 0",
    ]


def test_valid_schemas_pass() -> None:
    text = POLICY.replace("objekt", "object").replace("maxLength: -1", "maxLength: 80")
    assert len(parse_policy(text).mcp.tools) == 2
