"""The gateway: an MCP server facing the agent, an MCP client session facing the real server.

On the official SDK: the agent talks to a low-level ``mcp.server.lowlevel.Server`` (stdio, or
streamable HTTP), whose handlers relay to one ``mcp.ClientSession`` over the sandboxed server's
pipes. The gateway first initializes the real server, then offers the agent the same identity
(name, version, instructions) and the capabilities it can relay:

=========================================  ==================================================
relayed and governed                       tools/call, resources/read, prompts/get: decided by
                                           :mod:`egresslock.mcp.decide`, one ``mcp`` audit
                                           row each; results of ``reads`` entries raise the mark
relayed, filtered                          tools/list, resources/list, resources/templates/list,
                                           prompts/list: entries the policy denies are left out
relayed as is                              ping; list-changed notifications; progress of calls
not offered                                completion, logging/setLevel, resource subscriptions,
                                           and, towards the server, sampling, elicitation and
                                           roots: each is a channel between the agent's side
                                           and the server that no tool entry governs
=========================================  ==================================================

A refused tool call is a tool result with ``isError: true`` whose text names the entry and the
reason: the model reads it and can change course, where a protocol error would look like a
broken server. A refused resource read or prompt is a JSON-RPC error with the same text (their
results have no error flag).

The mark rises when a result comes back, before the agent sees it: a call made while a read is
still running is decided against the mark as it is, which is sound, since the agent cannot yet
hold what it has not received.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mcp import types
from mcp.client.session import ClientSession, IncomingMessage
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.shared.exceptions import MCPError

from egresslock import __version__
from egresslock.audit import AuditRecord
from egresslock.flow.mark import SessionMark
from egresslock.mcp.decide import Call, CallDecision, ToolTable, arguments_size
from egresslock.mcp.pipes import Streams

DENIED = types.INVALID_REQUEST  # the JSON-RPC error code of a refused read or prompt


@dataclass(frozen=True)
class Hooks:
    """What the gateway asks of the session it runs in; ``cli/mcp_cmd.py`` wires them."""

    table: Callable[[], ToolTable]            # the current policy's mcp section
    secrets: Callable[[str], Sequence[str]]   # described secret hits in one string
    mark: Callable[[], SessionMark | None]    # the run's mark (None: the policy has no levels)
    log: Callable[[AuditRecord], None]
    pid: int | None = None                    # the sandboxed server's
    say: Callable[[str], None] | None = None  # one line on stderr (None: quiet)


class Gateway:
    """The relay between the agent-facing server and the real server's client session.

    ``async with gateway.connect(streams):`` initializes the real server; then
    :meth:`server` builds what the agent talks to."""

    def __init__(self, hooks: Hooks) -> None:
        self.hooks = hooks
        self.sessions: weakref.WeakSet[ServerSession] = weakref.WeakSet()
        self._upstream: ClientSession | None = None
        self._init: types.InitializeResult | None = None

    @contextlib.asynccontextmanager
    async def connect(self, streams: Streams) -> AsyncIterator[types.InitializeResult]:
        read, write = streams
        info = types.Implementation(name="egresslock", version=__version__)
        async with ClientSession(read, write, message_handler=self.on_message,
                                 logging_callback=self.on_log, client_info=info) as session:
            self._init = await session.initialize()
            self._upstream = session
            try:
                yield self._init
            finally:
                self._upstream = None

    @property
    def upstream(self) -> ClientSession:
        if self._upstream is None:
            raise RuntimeError("the gateway is not connected to its server")
        return self._upstream

    @property
    def init(self) -> types.InitializeResult:
        if self._init is None:
            raise RuntimeError("the gateway is not connected to its server")
        return self._init

    @property
    def initialized(self) -> bool:
        return self._init is not None

    @property
    def name(self) -> str:
        return self.init.server_info.name or "server"

    # --- the agent-facing server ------------------------------------------------------------

    def server(self) -> Server[Any]:
        """The server the agent talks to: the real server's identity, and the capabilities
        the gateway relays of those the real server has."""
        caps = self.init.capabilities
        handlers: dict[str, Any] = {}
        if caps.tools is not None:
            handlers.update(on_list_tools=self.list_tools, on_call_tool=self.call_tool)
        if caps.resources is not None:
            handlers.update(on_list_resources=self.list_resources,
                            on_list_resource_templates=self.list_resource_templates,
                            on_read_resource=self.read_resource)
        if caps.prompts is not None:
            handlers.update(on_list_prompts=self.list_prompts, on_get_prompt=self.get_prompt)
        info = self.init.server_info
        server = _RelayServer(info.name, version=info.version, title=info.title,
                              instructions=self.init.instructions, **handlers)
        server.changes = NotificationOptions(
            prompts_changed=bool(caps.prompts and caps.prompts.list_changed),
            resources_changed=bool(caps.resources and caps.resources.list_changed),
            tools_changed=bool(caps.tools and caps.tools.list_changed))
        server.middleware.insert(0, self._remember)
        return server

    async def _remember(self, ctx: ServerRequestContext[Any, Any],
                        call_next: CallNext) -> HandlerResult:
        self.sessions.add(ctx.session)  # where the server's list-changed notifications go
        return await call_next(ctx)

    async def list_tools(self, ctx: ServerRequestContext[Any, Any],
                         params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        result = await self.upstream.list_tools(params=_page(params))
        table = self.hooks.table()
        return types.ListToolsResult(
            tools=[t for t in result.tools if table.listed(Call("tool", t.name))],
            next_cursor=result.next_cursor)

    async def list_resources(self, ctx: ServerRequestContext[Any, Any],
                             params: types.PaginatedRequestParams | None,
                             ) -> types.ListResourcesResult:
        result = await self.upstream.list_resources(params=_page(params))
        table = self.hooks.table()
        return types.ListResourcesResult(
            resources=[r for r in result.resources
                       if table.listed(Call("resource", str(r.uri)))],
            next_cursor=result.next_cursor)

    async def list_resource_templates(self, ctx: ServerRequestContext[Any, Any],
                                      params: types.PaginatedRequestParams | None,
                                      ) -> types.ListResourceTemplatesResult:
        result = await self.upstream.list_resource_templates(params=_page(params))
        table = self.hooks.table()
        return types.ListResourceTemplatesResult(
            resource_templates=[t for t in result.resource_templates
                                if table.listed(Call("resource", t.uri_template))],
            next_cursor=result.next_cursor)

    async def list_prompts(self, ctx: ServerRequestContext[Any, Any],
                           params: types.PaginatedRequestParams | None,
                           ) -> types.ListPromptsResult:
        result = await self.upstream.list_prompts(params=_page(params))
        table = self.hooks.table()
        return types.ListPromptsResult(
            prompts=[p for p in result.prompts if table.listed(Call("prompt", p.name))],
            next_cursor=result.next_cursor)

    async def call_tool(self, ctx: ServerRequestContext[Any, Any],
                        params: types.CallToolRequestParams) -> types.CallToolResult:
        call = Call("tool", params.name, dict(params.arguments or {}))
        decision = self.decide(call)
        if not decision.forwarded:
            self._log(call, decision)
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=decision.message(call))],
                is_error=True)
        async with self._relay(call, decision) as answer:
            result = await self.upstream.call_tool(
                params.name, params.arguments, progress_callback=_progress(ctx))
            answer.took(result, tool_error=bool(result.is_error))
        return result

    async def read_resource(self, ctx: ServerRequestContext[Any, Any],
                            params: types.ReadResourceRequestParams,
                            ) -> types.ReadResourceResult:
        uri = str(params.uri)
        call = Call("resource", uri, {"uri": uri})
        decision = self.decide(call)
        if not decision.forwarded:
            self._log(call, decision)
            raise MCPError(DENIED, decision.message(call))
        async with self._relay(call, decision) as answer:
            result = await self.upstream.read_resource(uri)
            answer.took(result)
        return result

    async def get_prompt(self, ctx: ServerRequestContext[Any, Any],
                         params: types.GetPromptRequestParams) -> types.GetPromptResult:
        call = Call("prompt", params.name, dict(params.arguments or {}))
        decision = self.decide(call)
        if not decision.forwarded:
            self._log(call, decision)
            raise MCPError(DENIED, decision.message(call))
        async with self._relay(call, decision) as answer:
            result = await self.upstream.get_prompt(params.name, params.arguments)
            answer.took(result)
        return result

    # --- decisions, the mark and the log ----------------------------------------------------

    def decide(self, call: Call) -> CallDecision:
        return self.hooks.table().decide(call, mark=self.hooks.mark(),
                                         secrets=self.hooks.secrets,
                                         server=f"MCP server {self.name}")

    @contextlib.asynccontextmanager
    async def _relay(self, call: Call, decision: CallDecision) -> AsyncIterator[_Answer]:
        """Around one forwarded call: whatever comes back raises the mark, then the call's row
        is written. A failure counts as an answer too (the server's error, a result the SDK
        refused): its message reaches the agent and may quote what the server sent. Only a
        cancelled call, which returns nothing, leaves the mark as it was."""
        answer = _Answer()
        try:
            yield answer
        except MCPError as exc:
            answer.error = exc.message
            raise
        except Exception as exc:
            answer.error = f"{type(exc).__name__}: {exc}"[:300]
            raise
        finally:
            self._log(call, decision, answer)
            if answer.answered:
                self._read(call, decision)

    def _read(self, call: Call, decision: CallDecision) -> None:
        mark = self.hooks.mark()
        if decision.reads is None or mark is None:
            return
        step = mark.raise_to(decision.reads, call.label, decision.rule_id)
        if step is not None:
            self.hooks.log(AuditRecord(
                layer="flow", verdict="allow", rule_id=decision.rule_id,
                reason=f"session mark raised from {step.previous or mark.levels[0]} to "
                       f"{step.level} by {call.label}",
                pid=self.hooks.pid,
                extra={"mark": step.level, "previous": step.previous, "source": call.label}))

    def _log(self, call: Call, decision: CallDecision, answer: _Answer | None = None) -> None:
        method = {"tool": "tools/call", "resource": "resources/read",
                  "prompt": "prompts/get"}[call.kind]
        details: dict[str, object] = {"kind": call.kind, "name": call.name,
                                      "server": self.name}
        if decision.findings:
            details["findings"] = list(decision.findings)
        if answer is not None:
            if answer.error is not None:
                details["error"] = answer.error
            elif answer.tool_error:
                details["tool_error"] = True
            elif not answer.answered:
                details["unanswered"] = True
        self.hooks.log(AuditRecord(
            layer="mcp", verdict=decision.verdict, rule_id=decision.rule_id,
            reason=decision.reason if decision.verdict != "allow" else
            f"{call.label}: {decision.reason}",
            method=method, path=call.name, protocol="mcp", pid=self.hooks.pid,
            bytes_out=arguments_size(call.arguments),
            bytes_in=answer.size if answer is not None else 0, extra=details))

    # --- the server's notifications ---------------------------------------------------------

    async def on_message(self, message: IncomingMessage) -> None:
        """Relay list-changed notifications to every agent session; report transport faults."""
        if isinstance(message, Exception):
            self._say(f"the MCP server sent something that is not MCP: {message}")
            return
        relay = {types.ToolListChangedNotification: ServerSession.send_tool_list_changed,
                 types.ResourceListChangedNotification: ServerSession.send_resource_list_changed,
                 types.PromptListChangedNotification: ServerSession.send_prompt_list_changed}
        send = relay.get(type(message))
        if send is None:
            return
        for session in list(self.sessions):
            with contextlib.suppress(Exception):  # an agent that has gone away
                await send(session)

    async def on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        # The server's log goes to egresslock's stderr, where the server's own stderr goes: it
        # is not relayed to the agent, whose model could otherwise read data no entry governs.
        where = f" {params.logger}" if params.logger else ""
        self._say(f"server log{where} [{params.level}]: {str(params.data)[:500]}")

    def _say(self, line: str) -> None:
        if self.hooks.say is not None:
            self.hooks.say(line)


@dataclass
class _Answer:
    """What came back for one forwarded call."""

    size: int = 0  # bytes of the result as JSON
    tool_error: bool = False
    error: str | None = None  # the server's error, or why the SDK refused its result
    received: bool = False

    def took(self, result: types.Result, tool_error: bool = False) -> None:
        self.size = len(result.model_dump_json(by_alias=True, exclude_none=True))
        self.tool_error = tool_error
        self.received = True

    @property
    def answered(self) -> bool:
        return self.received or self.error is not None


class _RelayServer(Server[Any]):
    """A low-level server that announces the real server's list-changed notifications, over
    stdio and streamable HTTP alike (the HTTP session manager asks for the options itself)."""

    changes = NotificationOptions()

    def create_initialization_options(
            self, notification_options: NotificationOptions | None = None,
            experimental_capabilities: dict[str, dict[str, Any]] | None = None,
            extensions: dict[str, dict[str, Any]] | None = None) -> InitializationOptions:
        return super().create_initialization_options(
            notification_options or self.changes, experimental_capabilities, extensions)


def _page(params: types.PaginatedRequestParams | None) -> types.PaginatedRequestParams | None:
    # Only the cursor goes on: the agent's _meta is not the server's business.
    if params is None or params.cursor is None:
        return None
    return types.PaginatedRequestParams(cursor=params.cursor)


def _progress(ctx: ServerRequestContext[Any, Any]) -> Any:
    """Relay the server's progress on a call to the agent, under the agent's token."""
    token = (ctx.meta or {}).get("progress_token")
    if token is None:
        return None
    session = ctx.session

    async def progress(value: float, total: float | None, message: str | None) -> None:
        with contextlib.suppress(Exception):
            await session.send_progress_notification(
                token, value, total, message,
                related_request_id=str(ctx.request_id) if ctx.request_id is not None else None)

    return progress
