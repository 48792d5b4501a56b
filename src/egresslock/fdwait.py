"""Waiting for a file descriptor on the running event loop, without a task or a thread.

The proxy's sockets, the DNS stub's datagram sockets and the pidfd of the sandboxed command are
all waited on the same way: register with the loop, await one future, unregister. uvloop has no
``sock_recvfrom`` and asyncio has no pidfd waiter, so this one helper serves all of them.
"""

from __future__ import annotations

import asyncio


async def wait_fd(loop: asyncio.AbstractEventLoop, fd: int, writable: bool,
                  timeout: float | None = None) -> None:
    """Wait until ``fd`` is readable (or writable); TimeoutError after ``timeout`` seconds
    (one timer handle, no ``asyncio.timeout`` block)."""
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    def expired() -> None:
        if not fut.done():
            fut.set_exception(TimeoutError())

    if writable:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    timer = loop.call_later(timeout, expired) if timeout is not None else None
    try:
        await fut
    finally:
        if timer is not None:
            timer.cancel()
        if writable:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)
