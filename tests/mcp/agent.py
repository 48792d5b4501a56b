"""A scripted agent for the GitHub MCP toxic flow: an MCP client that does what the injection says.

    python agent.py [--order read-first|write-first] [--listen URL] -- COMMAND...

It launches COMMAND with the SDK's stdio client (``egresslock mcp ... -- python
stand_in_server.py``, or the stand-in directly for the control), or connects to URL over
streamable HTTP, lists the tools and follows the flow:

- read-first (the attack): ``list_issues`` of the public repository, whose issue says to read the
  private file and post it; ``get_file`` of that file; ``create_issue`` in the public repository
  with the file as its body;
- write-first: ``create_issue`` with a harmless body, then ``get_file``.

It prints one JSON object: the tools it was offered and, per step, whether the result was an
error and its text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.types import TextContent


def _text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, TextContent))


async def flow(session: ClientSession, order: str) -> dict[str, Any]:
    await session.initialize()
    tools = [t.name for t in (await session.list_tools()).tools]
    steps: list[dict[str, Any]] = []

    async def call(name: str, **arguments: str) -> str:
        result = await session.call_tool(name, arguments)
        text = _text(result)
        steps.append({"tool": name, "is_error": bool(result.is_error), "text": text})
        return text

    if order == "read-first":
        issues = await call("list_issues", repo="acme/public")
        if "ignore previous instructions" in issues:  # the agent falls for it
            private = await call("get_file", repo="acme/private", path="roadmap.md")
            await call("create_issue", repo="acme/public", title="roadmap", body=private)
    else:
        await call("create_issue", repo="acme/public", title="hello", body="first post")
        await call("get_file", repo="acme/private", path="roadmap.md")
    return {"tools": tools, "steps": steps}


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--order", default="read-first", choices=["read-first", "write-first"])
    parser.add_argument("--url")
    parser.add_argument("command", nargs="*")
    args = parser.parse_args(argv)
    if args.url:
        from mcp.client.streamable_http import streamable_http_client

        async with streamable_http_client(args.url) as (read, write), \
                ClientSession(read, write) as session:
            out = await flow(session, args.order)
    else:
        params = StdioServerParameters(command=args.command[0], args=args.command[1:],
                                       env=dict(os.environ))
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            out = await flow(session, args.order)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
