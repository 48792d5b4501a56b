"""A buffered, non-blocking socket for the proxy's event loop.

The proxy owns its sockets directly rather than through asyncio streams: a tunnel must hand its
raw file descriptors to ``splice(2)`` together with exactly the bytes already read, which a
stream's hidden buffer makes awkward.

Timeouts are deadlines (absolute :meth:`loop.time` values) passed to the read that must meet
them, not ``asyncio.timeout`` blocks: a read that finds its bytes already waiting costs nothing
more than a comparison, and each connection keeps at most one timer handle, moved only when a
wait needs an earlier deadline than the one armed. On a keep-alive connection that handle is
armed once per idle timeout, not three times per request. A wait past its deadline raises
``TimeoutError``, as ``asyncio.timeout`` would have at the same point.

A socket that had to be waited on stays registered with the loop (registering and unregistering
cost about 5 µs and two ``epoll_ctl`` per wait, two waits per request). A readiness event that
finds nobody waiting unregisters it, since epoll is level-triggered and would report it again and
again. Whatever else is to use the socket (the splice relay, TLS, a lingering close) calls
:meth:`Conn.stop_reading` first.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import NamedTuple

from egresslock.fdwait import wait_fd
from egresslock.proxy.http1 import ProtocolError

RECV_SIZE = 1 << 16


class HeadTooLarge(ProtocolError):
    """The head did not end within the size limit."""


class Conn:
    """A connected non-blocking socket with a read buffer."""

    __slots__ = ("_reading", "_timer", "_timer_at", "_wait_deadline", "_waiter", "buf", "closed",
                 "handler", "linger", "loop", "opened", "sock")

    def __init__(self, sock: socket.socket) -> None:
        if sock.getblocking():  # asks the socket object, not the kernel: no system call
            sock.setblocking(False)
        self.sock = sock
        self.buf = bytearray()
        self.loop = asyncio.get_running_loop()
        self.opened = self.loop.time()  # when the connection was made (accepted, connected)
        self.closed = False
        # Set when a response refused a request whose rest the client may still be sending.
        self.linger = False
        # The one timer of this connection, the deadline it is armed for, and the wait it
        # may end: see the module docstring.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._wait_deadline: float | None = None
        self._reading = -1  # the fd registered with the loop for reading, or -1
        # Called (instead of waking a wait) when the socket is readable: set by the fast lane
        # and the tunnel lane while they wait on this socket from callbacks; the socket stays
        # registered between their waits.
        self.handler: Callable[[], None] | None = None

    async def fill(self, deadline: float | None = None) -> bool:
        """Read what is available into the buffer; False at end of stream.

        The socket is read first and only registered with the loop when it has nothing: most
        reads of a busy proxy find data waiting, and each registration costs two epoll_ctl.
        Raises TimeoutError when it has to wait past ``deadline`` (loop time).
        """
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                await self._wait_readable(deadline)
                continue
            if not data:
                return False
            self.buf += data
            return True

    async def _wait_readable(self, deadline: float | None) -> None:
        """Wait until the socket is readable; TimeoutError once ``deadline`` has passed."""
        loop = self.loop
        if deadline is not None:
            if loop.time() >= deadline:
                raise TimeoutError
            timer = self._timer
            if timer is None or self._timer_at > deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = loop.call_at(deadline, self._on_timer)
                self._timer_at = deadline
        self.start_reading()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiter, self._wait_deadline = fut, deadline
        try:
            await fut
        finally:
            self._waiter = self._wait_deadline = None

    async def readable(self, deadline: float | None = None) -> None:
        """Wait for bytes (or the end of the stream) without trying a read first: for a reply
        that cannot have arrived yet, the read that finds nothing is a syscall and an exception
        spent for nothing. TimeoutError once ``deadline`` has passed."""
        if not self.buf:
            await self._wait_readable(deadline)

    def _on_readable(self) -> None:
        waiter = self._waiter
        if waiter is None:
            if self.handler is not None:
                self.handler()
            else:
                self.stop_reading()  # else level-triggered epoll reports it at every turn
        elif not waiter.done():
            waiter.set_result(None)

    def start_reading(self) -> None:
        """Register the socket with the loop, for :attr:`handler` (a no-op when it is)."""
        if self._reading < 0:
            fd = self.sock.fileno()
            self.loop.add_reader(fd, self._on_readable)
            self._reading = fd

    def forget_reading(self) -> bool:
        """Give up the socket's registration with the loop without unregistering it, and say
        whether there was one: the caller registers its own callback for the fd at once, which
        replaces this one at no cost (removing and adding again costs system calls)."""
        fd, self._reading = self._reading, -1
        return fd >= 0

    def stop_reading(self) -> None:
        """Unregister the socket from the loop: before anything else waits on it or closes it."""
        fd, self._reading = self._reading, -1
        if fd >= 0:
            try:  # noqa: SIM105 - suppress() is three calls, on every connection's end
                self.loop.remove_reader(fd)
            except (RuntimeError, ValueError, OSError):  # the loop closed first
                pass

    def _on_timer(self) -> None:
        """The armed deadline came: end the wait it belongs to, or re-arm for a later one."""
        self._timer = None
        waiter, deadline = self._waiter, self._wait_deadline
        if waiter is None or deadline is None or waiter.done():
            return  # nobody waits: the next wait arms the timer again
        if deadline <= self._timer_at:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    async def read_head(self, limit: int, deadline: float | None = None) -> bytes | None:
        """Bytes through the first blank line, or None on a clean end before any byte.

        Raises HeadTooLarge past ``limit``, ProtocolError when the stream ends mid-head, and
        TimeoutError when the head is not complete by ``deadline`` (slowloris).
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
            if not await self.fill(deadline):
                if self.buf:
                    raise ProtocolError("connection closed in the middle of a head")
                return None

    async def read_some(self, limit: int, deadline: float | None = None) -> bytes:
        """Up to ``limit`` bytes: buffered ones first; b"" at end of stream. Raises
        TimeoutError when it has to wait past ``deadline``."""
        if not self.buf and not await self.fill(deadline):
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
            self.stop_reading()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            try:  # noqa: SIM105 - as above
                self.sock.close()
            except OSError:
                pass

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
        self.stop_reading()
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


def start_connect(address: str, port: int) -> Connecting:
    """Begin connecting to an already checked address, without waiting.

    A plain non-blocking connect: the address is numeric and already checked, so nothing may
    resolve it again (the loop's sock_connect would pass it through getaddrinfo). A nearby
    server (loopback, a sidecar) has often answered before ``connect`` returns: one poll without
    waiting tells, and spares a turn of the loop and a registration.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((address, port))
        if err == errno.EINPROGRESS and _writable_now(sock):
            # "Writable" means the attempt ended, not that it worked: refused, unreachable.
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    except BaseException:
        sock.close()
        raise
    if err not in (0, errno.EINPROGRESS):
        sock.close()
    return Connecting(sock, err)


class Connecting(NamedTuple):
    """A connection attempt: ``error`` is 0 when connected, EINPROGRESS while it goes on, and
    the failure's errno otherwise (the socket is closed then)."""

    sock: socket.socket
    error: int


async def finish_connect(attempt: Connecting, timeout: float) -> Conn:
    """The connection of an attempt, once it is made. Raises OSError or TimeoutError."""
    sock, err = attempt
    if err == errno.EINPROGRESS:
        try:
            await wait_fd(asyncio.get_running_loop(), sock.fileno(), writable=True,
                          timeout=timeout)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except BaseException:
            sock.close()
            raise
        if err:
            sock.close()
    if err:
        raise OSError(err, os.strerror(err))
    return Conn(sock)


def _writable_now(sock: socket.socket) -> bool:
    poll = select.poll()
    poll.register(sock, select.POLLOUT)
    return bool(poll.poll(0))
