"""The gateway's side facing the agent: stdio, or streamable HTTP with ``--listen``.

stdio. The agent's MCP channel is egresslock's own stdin and stdout, so nothing else may write
to fd 1 while the gateway serves: as the SDK's ``stdio_server`` does, the channel moves to
private descriptors, and fd 0 and fd 1 are pointed at /dev/null and stderr, where a stray print
(of egresslock or a library) lands harmlessly. Unlike the SDK's transport, no thread blocks in a
read of stdin (:mod:`egresslock.mcp.pipes` waits on the event loop), so the gateway ends when
the server does, without waiting for the agent to close its end. The descriptors' blocking mode
is restored on exit, since a terminal's is shared with the shell.

Streamable HTTP. The SDK's Starlette app served by uvicorn on a socket bound before the sandbox
started (so a port in use is reported before anything runs). The gateway has no authentication
of its own: bind it to loopback (the SDK then also refuses requests whose Host or Origin is not
a loopback name: DNS rebinding). Every agent session shares the one server and the run's mark.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from typing import Any

from mcp.server.lowlevel import Server

from egresslock.mcp.pipes import pipe_streams

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


@contextlib.contextmanager
def _private_stdio() -> Iterator[tuple[int, int]]:
    """The MCP channel on private descriptors; fd 0 from /dev/null, fd 1 to stderr."""
    read_fd = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
    write_fd = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
    modes = (os.get_blocking(read_fd), os.get_blocking(write_fd))
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, 0)
        os.dup2(2, 1)
    finally:
        os.close(null)
    try:
        yield read_fd, write_fd
    finally:
        for fd, blocking in zip((read_fd, write_fd), modes, strict=True):
            with contextlib.suppress(OSError):
                os.set_blocking(fd, blocking)
        for fd, target in ((read_fd, 0), (write_fd, 1)):
            with contextlib.suppress(OSError):
                os.dup2(fd, target)
            os.close(fd)


async def serve_stdio(server: Server[Any]) -> None:
    """Serve one agent on stdin/stdout until it closes its end."""
    with _private_stdio() as (read_fd, write_fd):
        # pipe_streams closes what it is given: hand it copies, the originals are restored.
        async with pipe_streams(os.dup(read_fd), os.dup(write_fd)) as (read, write):
            await server.run(read, write, server.create_initialization_options())


def bind(host: str, port: int) -> socket.socket:
    """The listening socket of ``--listen`` (``port`` 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/mcp"


async def serve_http(server: Server[Any], sock: socket.socket) -> None:
    """Serve agents over streamable HTTP on ``sock`` at ``/mcp`` until cancelled."""
    import uvicorn

    host = sock.getsockname()[0]
    app = server.streamable_http_app(host=host)
    config = uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False)
    await _Uvicorn(config).serve(sockets=[sock])


class _Uvicorn:
    """uvicorn's server without its signal handlers: egresslock's own end the gateway."""

    def __init__(self, config: Any) -> None:
        import uvicorn

        class Quiet(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        self._server = Quiet(config)

    async def serve(self, sockets: list[socket.socket]) -> None:
        try:
            await self._server.serve(sockets=sockets)
        finally:
            self._server.should_exit = True
