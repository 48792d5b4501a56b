"""Relaying an allowed tunnel's bytes, with the kernel doing the copying where it can.

On Linux a direction that carries volume moves socket → pipe → socket with ``splice(2)``, so
payload bytes never enter Python: measured on this project's machines at about a third of the
CPU per GiB of a Python-level copy loop. A pipe costs four system calls to set up and two to
close, which a tunnel that carries a request and its answer never earns back, so each direction
starts by copying through a buffer and takes a pipe once it has moved :data:`SPLICE_AFTER`
bytes. Elsewhere (or when ``splice`` is refused) the copy does the whole job. Either way the
relay counts bytes for the audit log and ends the tunnel when both directions are closed or
when it has been idle for ``idle_timeout`` seconds.

Each direction is a small state machine driven by the loop's readiness callbacks, not a task:
a tunnel is opened for a few hundred microseconds of work, and two tasks, their futures and an
``asyncio.wait`` were a fifth of that. A direction waits on its source while it can read, and on
its destination only while the destination is full; its source stays registered while it waits,
and is unregistered while it cannot write (epoll is level-triggered and would report the source
again and again). The idle timer is one handle, re-armed when it fires early rather than moved
at every transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_SPLICE = hasattr(os, "splice")
_CHUNK = 1 << 18
# What one recv of the copy takes: under glibc's mmap threshold (128 KiB), so that reading a few
# bytes does not map and unmap a quarter of a megabyte.
_COPY_CHUNK = 1 << 16
# Bytes a direction copies before it moves to splice (see the module docstring).
SPLICE_AFTER = 1 << 17
_SPLICE_FLAGS = (getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
                 if _SPLICE else 0)
_F_SETPIPE_SZ = 1031
# Transfers one readiness callback makes before it lets the loop serve others (16 x 256 KiB).
_ROUNDS = 16


@dataclass(slots=True)
class RelayStats:
    """Bytes moved each way, and the last time any moved (monotonic seconds)."""

    bytes_up: int = 0
    bytes_down: int = 0
    last_active: float = field(default_factory=time.monotonic)


class _Pump:
    """One direction, ``src`` to ``dst``: through a pipe with splice, or through a buffer."""

    __slots__ = ("_buffer", "_copied", "_in_pipe", "_pipe", "_reading", "_use_splice",
                 "_writing", "dst", "dst_sock", "ended", "error", "loop", "relay", "src",
                 "src_sock", "upstream")

    def __init__(self, relay: Relay, src: socket.socket, dst: socket.socket, upstream: bool,
                 use_splice: bool, first: bytes = b"") -> None:
        self.relay, self.loop = relay, relay.loop
        self.src_sock, self.dst_sock = src, dst
        self.src, self.dst = src.fileno(), dst.fileno()
        self.upstream = upstream
        self.ended = False
        self.error: OSError | None = None
        self._reading = self._writing = False
        self._in_pipe = 0
        self._buffer = first  # bytes read from src before the relay began, sent first
        self._pipe: tuple[int, int] | None = None
        self._use_splice = use_splice
        self._copied = 0

    def _take_pipe(self) -> None:
        """From now on move by splice: this direction has shown it carries volume."""
        self._use_splice = False
        self._pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            import fcntl

            fcntl.fcntl(self._pipe[1], _F_SETPIPE_SZ, _CHUNK)

    def move(self) -> None:
        """Move what can be moved now, then wait for the side that holds things up."""
        if self.ended or self.relay.finished:
            return
        try:
            blocked = self._splice(self._pipe) if self._pipe is not None else self._copy()
        except OSError as exc:
            self._end(exc)
            return
        except Exception as exc:  # a bug: the tunnel ends, and its owner is told why
            self.relay.fail(exc)
            return
        if self._use_splice and self._copied >= SPLICE_AFTER and not self._buffer:
            try:
                self._take_pipe()
            except OSError:  # out of file descriptors: go on copying
                self._use_splice = False
        if blocked == "eof":
            self._end(None)
        elif blocked == "read":
            self._watch(read=True)
        else:
            self._watch(read=False)

    def _splice(self, pipe: tuple[int, int]) -> str:
        rfd, wfd = pipe
        moved = 0
        try:
            for _ in range(_ROUNDS):
                if self._in_pipe == 0:
                    try:
                        n = os.splice(self.src, wfd, _CHUNK, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        return "read"
                    if n == 0:
                        return "eof"
                    self._in_pipe = n
                try:
                    m = os.splice(rfd, self.dst, self._in_pipe, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    return "write"
                self._in_pipe -= m
                moved += m
            # Another tunnel's turn; the source, still registered, calls again if it has more.
            # The pipe may still hold bytes: wait for the destination then, not the source.
            return "read" if self._in_pipe == 0 else "write"
        finally:
            if moved:
                self.relay.count(self.upstream, moved)

    def _copy(self) -> str:
        moved = 0
        try:
            for _ in range(_ROUNDS):
                drained = False
                if not self._buffer:
                    try:
                        self._buffer = self.src_sock.recv(_COPY_CHUNK)
                    except (BlockingIOError, InterruptedError):
                        return "read"
                    if not self._buffer:
                        return "eof"
                    drained = len(self._buffer) < _COPY_CHUNK
                try:
                    m = self.dst_sock.send(self._buffer)
                except (BlockingIOError, InterruptedError):
                    return "write"
                self._buffer = self._buffer[m:]
                moved += m
                if drained and not self._buffer:
                    # The source held no more than this: wait for it rather than ask again, a
                    # system call and an exception spent on "nothing yet" (epoll is level-
                    # triggered: bytes that came meanwhile are reported at once).
                    return "read"
            return "write" if self._buffer else "read"
        finally:
            if moved:
                self._copied += moved
                self.relay.count(self.upstream, moved)

    def _watch(self, read: bool) -> None:
        if read and not self._reading:
            self._unwatch_write()
            self.loop.add_reader(self.src, self.move)
            self._reading = True
        elif not read and not self._writing:
            self._unwatch_read()
            self.loop.add_writer(self.dst, self.move)
            self._writing = True

    def _unwatch_read(self) -> None:
        if self._reading:
            self._reading = False
            self.loop.remove_reader(self.src)

    def _unwatch_write(self) -> None:
        if self._writing:
            self._writing = False
            self.loop.remove_writer(self.dst)

    def _end(self, error: OSError | None) -> None:
        self.stop()
        self.ended, self.error = True, error
        try:  # noqa: SIM105 - suppress() is three calls, on every tunnel's end
            self.dst_sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self.relay.ended(self)

    def stop(self) -> None:
        """Unregister from the loop and release the pipe. Idempotent."""
        try:
            self._unwatch_read()
            self._unwatch_write()
        except (RuntimeError, ValueError, OSError):  # the loop closed first
            pass
        if self._pipe is not None:
            for fd in self._pipe:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._pipe = None


class Relay:
    """Both directions of one tunnel and the idle timer; calls ``on_end`` once, when it ends."""

    __slots__ = ("finished", "idle_timeout", "loop", "on_end", "pumps", "stats", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, stats: RelayStats, idle_timeout: float,
                 on_end: Callable[[str, Exception | None], None]) -> None:
        self.loop, self.stats, self.idle_timeout = loop, stats, idle_timeout
        self.on_end = on_end
        self.finished = False
        self.pumps: list[_Pump] = []
        self.timer = loop.call_later(idle_timeout, self._on_timer)

    def count(self, upstream: bool, moved: int) -> None:
        if upstream:
            self.stats.bytes_up += moved
        else:
            self.stats.bytes_down += moved
        self.stats.last_active = time.monotonic()

    def ended(self, pump: _Pump) -> None:
        if pump.error is not None:
            # One side failed: the tunnel is over. Named with the error once both sides ended.
            others_ended = all(p.ended for p in self.pumps)
            self._finish(f"reset: {pump.error}" if others_ended else "reset")
        elif all(p.ended for p in self.pumps):
            self._finish("closed")

    def _on_timer(self) -> None:
        remaining = self.idle_timeout - (time.monotonic() - self.stats.last_active)
        if remaining <= 0:
            self._finish(f"idle for {self.idle_timeout:g}s")
        else:
            self.timer = self.loop.call_later(remaining, self._on_timer)

    def fail(self, exc: Exception) -> None:
        self._finish("failed", exc)

    def _finish(self, how: str, exc: Exception | None = None) -> None:
        if not self.finished:
            self.close()
            on_end, self.on_end = self.on_end, _ended_already
            on_end(how, exc)

    def close(self) -> None:
        """Stop both directions and the timer (the sockets stay open). Idempotent."""
        self.finished = True
        self.timer.cancel()
        for pump in self.pumps:
            pump.stop()
        # No cycles (relay and pumps, relay and its owner) outlive a tunnel: reference counting
        # frees it at once, and the cyclic collector, which pauses the loop, runs less often.
        self.pumps = []


def _ended_already(how: str, exc: Exception | None) -> None:
    pass


def start_relay(client: socket.socket, upstream: socket.socket, stats: RelayStats,
                idle_timeout: float, on_end: Callable[[str, Exception | None], None],
                use_splice: bool = True, first: bytes = b"",
                registered: tuple[bool, bool] = (False, False)) -> Relay:
    """Relay between two non-blocking sockets from the loop's callbacks; ``on_end(how, error)``
    is called once when both directions have ended or the tunnel idled out (``error`` is a bug
    met on the way, else None). ``first`` are the client's bytes read before, sent upstream
    first. ``registered``: whether the client's and the upstream's sockets are registered with
    the loop for reading; the relay takes such a registration over, which costs no system call
    (removing one and adding another costs eight with uvloop). Call ``close()`` on the result
    to stop it early."""
    loop = asyncio.get_running_loop()
    state = Relay(loop, stats, idle_timeout, on_end)
    splice = use_splice and _SPLICE
    pumps = state.pumps = [_Pump(state, client, upstream, True, splice, first),
                           _Pump(state, upstream, client, False, splice)]
    for pump, taken in zip(pumps, registered, strict=True):
        if taken:
            loop.add_reader(pump.src, pump.move)  # replaces the callback
            pump._reading = True
    for pump, taken in zip(pumps, registered, strict=True):
        if pump._buffer or not taken:  # a registered source is reported when it has bytes
            pump.move()
    return state


async def relay(client: socket.socket, upstream: socket.socket, stats: RelayStats,
                idle_timeout: float, use_splice: bool = True, first: bytes = b"",
                registered: tuple[bool, bool] = (False, False)) -> str:
    """Relay until both directions end or the tunnel idles out. Returns how it ended."""
    for sock in (client, upstream):
        if sock.getblocking():  # asks the socket object, not the kernel: no system call
            sock.setblocking(False)
    done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def on_end(how: str, exc: Exception | None) -> None:
        if not done.done():
            if exc is not None:
                done.set_exception(exc)
            else:
                done.set_result(how)

    state = start_relay(client, upstream, stats, idle_timeout, on_end, use_splice, first,
                        registered)
    try:
        return await done
    finally:
        state.close()
