"""MCP over the sandboxed server's pipes: newline-delimited JSON-RPC, as the stdio transport.

The SDK's ``stdio_client`` starts the server itself; here the server was already started by
the sandbox (``SandboxSpec.stdio``), so the gateway holds two pipe ends and needs only the
framing. Each direction is one task on the event loop, with no thread: the read end is
non-blocking and waited on by the loop, like every other descriptor egresslock serves.

A line longer than :data:`MAX_LINE` without a newline ends the connection: a server that never
ends its message must not grow the gateway's memory without bound.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import AsyncIterator

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp import types
from mcp.shared.message import SessionMessage

MAX_LINE = 64 * 2**20
_CHUNK = 1 << 16

Streams = tuple[MemoryObjectReceiveStream[SessionMessage | Exception],
                MemoryObjectSendStream[SessionMessage]]


@contextlib.asynccontextmanager
async def pipe_streams(read_fd: int, write_fd: int) -> AsyncIterator[Streams]:
    """Message streams over ``read_fd`` (the server's stdout) and ``write_fd`` (its stdin).

    Both descriptors are closed on exit; closing ``write_fd`` is the server's signal to end
    (the stdio transport's shutdown, as the MCP specification describes it)."""
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    incoming_send, incoming = anyio.create_memory_object_stream[SessionMessage | Exception](16)
    outgoing, outgoing_receive = anyio.create_memory_object_stream[SessionMessage](16)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_read, read_fd, incoming_send)
            tasks.start_soon(_write, write_fd, outgoing_receive)
            try:
                yield incoming, outgoing
            finally:
                tasks.cancel_scope.cancel()
    finally:
        for fd in (read_fd, write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


async def _read(fd: int, sink: MemoryObjectSendStream[SessionMessage | Exception]) -> None:
    buffer = b""
    async with sink:
        while True:
            try:
                chunk = os.read(fd, _CHUNK)
            except BlockingIOError:
                await anyio.wait_readable(fd)
                continue
            except OSError:
                return
            if not chunk:
                return  # the server closed its stdout (or exited)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.strip():
                    await sink.send(parse_line(line))
            if len(buffer) > MAX_LINE:
                await sink.send(ValueError(f"the server sent a line of over {MAX_LINE} bytes "
                                           "without a newline; the connection is closed"))
                return


def parse_line(line: bytes) -> SessionMessage | Exception:
    """One JSON-RPC message, or the error that says why the line is not one."""
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_json(line, by_name=False))
    except Exception as exc:  # pydantic's ValidationError, or a decoding error
        return exc


async def _write(fd: int, source: MemoryObjectReceiveStream[SessionMessage]) -> None:
    async with source:
        async for item in source:
            data = (item.message.model_dump_json(by_alias=True, exclude_unset=True)
                    + "\n").encode()
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:
                    await anyio.wait_writable(fd)
                except OSError as exc:
                    if exc.errno in (errno.EPIPE, errno.EBADF):
                        return  # the server is gone; the reader sees EOF and ends the session
                    raise
