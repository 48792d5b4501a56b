"""A buffered, non-blocking socket for the proxy's event loop.

The proxy owns its sockets directly rather than through asyncio streams: a tunnel must hand its
raw file descriptors to ``splice(2)`` together with exactly the bytes already read, which a
stream's hidden buffer makes awkward. Timeouts use ``asyncio.timeout`` (a timer handle, not a task
per read), since every request pays for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct

from egresslock.fdwait import wait_fd
from egresslock.proxy.http1 import ProtocolError

RECV_SIZE = 1 << 16


class HeadTooLarge(ProtocolError):
    """The head did not end within the size limit."""


class Conn:
    """A connected non-blocking socket with a read buffer."""

    __slots__ = ("buf", "closed", "linger", "loop", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.buf = bytearray()
        self.loop = asyncio.get_running_loop()
        self.closed = False
        # Set when a response refused a request whose rest the client may still be sending.
        self.linger = False

    async def fill(self) -> bool:
        """Read what is available into the buffer; False at end of stream.

        The socket is read first and only registered with the loop when it has nothing: most
        reads of a busy proxy find data waiting, and each registration costs two epoll_ctl.
        """
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                await wait_fd(self.loop, self.sock.fileno(), writable=False)
                continue
            if not data:
                return False
            self.buf += data
            return True

    async def read_head(self, limit: int) -> bytes | None:
        """Bytes through the first blank line, or None on a clean end before any byte.

        Raises HeadTooLarge past ``limit`` and ProtocolError when the stream ends mid-head.
        The caller bounds the time with ``asyncio.timeout`` (slowloris).
        """
        start = 0
        while True:
            end = self.buf.find(b"\r\n\r\n", start)
            if end + 4 > limit:
                raise HeadTooLarge(f"request head over {limit} bytes")
            if end >= 0:
                head = bytes(self.buf[: end + 4])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > limit:
                raise HeadTooLarge(f"request head over {limit} bytes")
            start = max(0, len(self.buf) - 3)
            if not await self.fill():
                if self.buf:
                    raise ProtocolError("connection closed in the middle of a head")
                return None

    async def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes: buffered ones first; b"" at end of stream."""
        if not self.buf and not await self.fill():
            return b""
        return self.take(limit)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                await wait_fd(self.loop, self.sock.fileno(), writable=True)
                continue
            view = view[sent:]

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` buffered bytes, without waiting."""
        data = bytes(self.buf[:limit])
        del self.buf[:limit]
        return data

    def take_buffer(self) -> bytes:
        data = bytes(self.buf)
        self.buf.clear()
        return data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.close()

    def _end_session(self) -> None:
        """Say goodbye at the layer above TCP; TLS sends its close_notify here."""

    async def close_lingering(self, seconds: float = 2.0, limit: int = 1 << 20) -> None:
        """Close after refusing a request the client may still be sending.

        Closing a socket with unread bytes makes the kernel answer with a reset, and a reset can
        destroy the refusal in the client's receive buffer before the client reads it: the user
        sees "connection reset" instead of the reason. So stop writing, then read and discard
        what still arrives, for at most ``seconds`` and ``limit`` bytes, then close.
        """
        if self.closed:
            return
        self._end_session()
        drained = 0
        try:
            self.sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(seconds):
                while drained < limit:
                    try:
                        data = self.sock.recv(RECV_SIZE)
                    except (BlockingIOError, InterruptedError):
                        await wait_fd(self.loop, self.sock.fileno(), writable=False)
                        continue
                    if not data:
                        break
                    drained += len(data)
        except (TimeoutError, OSError):
            pass
        finally:
            self.close()

    async def finish(self) -> None:
        """Close: lingering when :attr:`linger` says a refusal may be in flight."""
        if self.linger:
            await self.close_lingering()
        else:
            self.close()

    def abort(self) -> None:
        """Close with a TCP reset, so the peer learns at once that the connection was refused."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()


async def open_conn(address: str, port: int, timeout: float) -> Conn:
    """Connect to an already checked address. Raises OSError or TimeoutError.

    A plain non-blocking connect: the address is numeric and already checked, so nothing may
    resolve it again (the loop's sock_connect would pass it through getaddrinfo).
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((address, port))
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        if err:
            async with asyncio.timeout(timeout):
                await wait_fd(asyncio.get_running_loop(), sock.fileno(), writable=True)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return Conn(sock)
