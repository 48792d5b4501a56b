"""The MCP gateway: an agent's MCP servers behind the policy, each run inside the sandbox.

``egresslock mcp -p POLICY -- SERVER...`` speaks MCP to the agent (stdio, or streamable HTTP with
``--listen``) and relays to one real server that runs in an ``egresslock run`` sandbox, so the
server's own network access obeys the same policy. Between the two, every tool call, resource
read and prompt is decided by the policy's ``mcp`` section:

- :mod:`egresslock.mcp.decide` -- pure: match a call to the first ``mcp.tools`` entry, check its
  action, the session's mark against the entry's ``level``, its ``arguments`` schema, and scan
  the arguments for secrets and data-carrying links (:mod:`egresslock.mcp.arguments`);
- :mod:`egresslock.mcp.pipes` -- the MCP transport over the sandboxed server's stdin and stdout;
- :mod:`egresslock.mcp.gateway` -- the one module that awaits: an MCP server facing the agent and
  an MCP client session facing the real server, on the official ``mcp`` SDK.

Only ``cli/mcp_cmd.py`` wires it to a session (policy, proxy, audit log, mark).
"""
