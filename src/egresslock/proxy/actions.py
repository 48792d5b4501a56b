"""The courier's endpoint on the proxy's own address: ``GET /actions``, ``POST /actions/NAME``.

Inside ``egresslock run`` the agent reaches the proxy at 127.0.0.1:3128. When the policy declares
actions, requests for ``/actions`` on that address are not forwarded anywhere: they go to an
:data:`ActionHandler` (the courier, wired in ``cli/``), in either form a client may send them:

- origin-form, to the proxy's port directly: ``POST /actions/create_issue`` (``curl --noproxy``);
- absolute-form through the proxy variables: ``POST http://127.0.0.1:3128/actions/create_issue``
  (also ``localhost`` and ``[::1]``), recognised only when the port is the one the connection
  came in on, so the proxy never mistakes a request for another local port for its own.

This module only frames requests and replies: the body is read (at most :data:`MAX_CALL_BYTES`),
handed over, and the reply written. What a call means, and its audit row, is the handler's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from egresslock.audit import AuditRecord
from egresslock.proxy.http1 import (
    ChunkedDecoder,
    ProtocolError,
    RequestHead,
    request_framing,
    serialize_headers,
    simple_response,
)

if TYPE_CHECKING:
    # Only types: cli/ imports this module to answer the endpoint, and `egresslock --help`
    # must not load the policy package (pydantic) for it.
    from egresslock.proxy.conn import Conn
    from egresslock.proxy.context import ProxyContext

MAX_CALL_BYTES = 1 << 20
_SELF = re.compile(r"^http://(127\.0\.0\.1|localhost|\[::1\]):([0-9]{1,5})(/[^?#]*)?(\?.*)?$",
                   re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ActionCall:
    """One request to the endpoint: its method, the action named (None for the list), body."""

    method: str
    name: str | None
    body: bytes


@dataclass(frozen=True, slots=True)
class ActionReply:
    """What the endpoint answers: a status, a JSON body, and extra headers."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


ActionHandler = Callable[[ActionCall], Awaitable[ActionReply]]


class _TooLarge(ProtocolError):
    """A call's body over :data:`MAX_CALL_BYTES`."""

_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 413: "Content Too Large", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


def action_path(head: RequestHead, local_port: int) -> str | None:
    """The path of a request meant for the actions endpoint, or None for any other request."""
    target = head.target
    if not target.startswith("/"):
        m = _SELF.match(target)
        if m is None or int(m.group(2)) != local_port:
            return None
        target = m.group(3) or "/"
    path = target.split("?", 1)[0]
    return path if path == "/actions" or path.startswith("/actions/") else None


async def serve_action(ctx: ProxyContext, handler: ActionHandler, head: RequestHead,
                       client: Conn, path: str) -> bool:
    """Answer one endpoint request; True when the connection may carry another."""
    try:
        body = await _read_body(ctx, head, client)
    except (ProtocolError, TimeoutError) as exc:
        reason = f"actions endpoint: {exc or 'timed out reading the body'}"
        ctx.log(AuditRecord(layer="courier", verdict="deny", rule_id="default", reason=reason,
                            method=head.method, path=path[:2048]))
        status = 413 if isinstance(exc, _TooLarge) else 400
        client.linger = True
        await client.send(simple_response(status, _REASONS[status], f"egresslock: {reason}",
                                          close=True))
        return False
    name = path[len("/actions/"):] if path.startswith("/actions/") else None
    reply = await handler(ActionCall(head.method, name, body))
    headers = [(b"Content-Type", b"application/json"),
               (b"Content-Length", str(len(reply.body)).encode()), *reply.headers]
    if not head.keep_alive:
        headers.append((b"Connection", b"close"))
    await client.send(b"HTTP/1.1 %d %s\r\n%s\r\n%s" % (
        reply.status, _REASONS.get(reply.status, "Unknown").encode(),
        serialize_headers(headers), reply.body))
    return head.keep_alive


async def _read_body(ctx: ProxyContext, head: RequestHead, client: Conn) -> bytes:
    framing = request_framing(head)
    if framing.kind == "length":
        if framing.length > MAX_CALL_BYTES:
            raise _TooLarge(f"a call's body is over {MAX_CALL_BYTES} bytes")
        data = bytearray()
        while len(data) < framing.length:
            async with asyncio.timeout(ctx.limits.body_timeout):
                chunk = await client.read_some(framing.length - len(data))
            if not chunk:
                raise ProtocolError("the client closed the connection inside the body")
            data += chunk
        return bytes(data)
    if framing.kind != "chunked":
        return b""
    decoder = ChunkedDecoder()
    out = bytearray()
    while not decoder.done:
        async with asyncio.timeout(ctx.limits.body_timeout):
            chunk = await client.read_some(1 << 16)
        if not chunk:
            raise ProtocolError("the client closed the connection inside a chunked body")
        for piece in decoder.feed(chunk):
            out += piece
        if len(out) > MAX_CALL_BYTES:
            raise _TooLarge(f"a call's body is over {MAX_CALL_BYTES} bytes")
    client.buf[:0] = decoder.leftover()
    return bytes(out)
