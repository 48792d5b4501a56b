"""The audit writer in a process of its own: what ``egresslock proxy`` logs through.

:class:`~egresslock.audit.writer.AuditLog` prepares, hashes and inserts rows on a thread of the
caller's process, about 15 µs of Python per row. In the proxy that thread and the event loop's
take turns at the interpreter's lock: over 2,001 new tunnels in a row, strace counted 3,752
futex calls, and an event that arrives while the writer holds the lock waits until the writer's
next pause. :class:`ProcessAuditLog` runs that same writer in a child process instead. The
caller's side works out each record's stored values (the columns as the database will hold
them) and marshals them, about 5 µs, onto a queue; a feeder thread passes the queue to the
child through a pipe once per ``flush_interval`` (or as soon as ``max_batch`` records wait),
one write for the lot. The child, ``python -m egresslock.audit.process``, hands them to an
``AuditLog`` of its own, which hashes and commits them at once (they come already gathered): the
same hashing, retries and bounds. The child need not rebuild the records, which was half of its
work per row.

Loss bound. The child reads its pipe to the end whatever happens to its parent, and ignores
SIGINT, SIGTERM and SIGHUP: it ends when its parent closes the pipe, by :meth:`close` or by
dying. So when the proxy is killed, SIGKILL included, what the pipe held is still committed
(while the database is locked or full, the child keeps trying for :data:`DRAIN_SECONDS`);
what is lost is what the feeder had not passed on, the records of the last ``flush_interval``
at most. If the child dies, the log says so, counts the records the child had not confirmed as
possibly lost, and goes on writing from the caller's process with an in-process ``AuditLog``.

Messages are frames: a 4-byte length, a kind byte, a ``marshal`` payload. Parent to child:
``r`` a record (its :func:`~egresslock.audit.record.stored_values`), ``f`` a
flush request (its number), ``c`` the log is closed (the end of the pipe without it means the
parent is gone, and the child keeps trying for longer). Child to parent: ``s`` the writer's
counters (written, transactions, waiting, dropped, last error), with the number of the flush
they answer or -1; ``e`` the same, last, with the rows ``close`` could not write. Both ends are
this package, run by the same interpreter, so ``marshal`` is a fit: fast, for plain values.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import marshal
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Any, NamedTuple

from egresslock.audit.record import AuditRecord, stored_values
from egresslock.audit.schema import open_for_writing
from egresslock.audit.writer import (
    AuditLog,
    AuditStats,
    ClosesOnExit,
    DropCount,
    RowsNotWritten,
    check_settings,
    new_run_id,
)
from egresslock.errors import AuditError

log = logging.getLogger("egresslock.audit")

_FRAME = struct.Struct("<I")
_F_SETPIPE_SZ = 1031
_PIPE_SIZE = 1 << 20  # room for a few thousand records while the child catches up
_RECORD, _FLUSH, _CLOSE, _STATS, _END = b"r", b"f", b"c", b"s", b"e"
# How long the child, its parent gone, keeps trying to commit what it holds.
DRAIN_SECONDS = 60.0


def _loads(payload: bytes) -> Any:
    # S302: marshal is unsafe for data an attacker made. These bytes come only from the other
    # end of a private pipe (O_CLOEXEC, held by this package's two processes), and no code
    # object is ever run.
    return marshal.loads(payload)  # noqa: S302


def _frame(kind: bytes, payload: bytes) -> bytes:
    return _FRAME.pack(len(payload) + 1) + kind + payload


def _frames(buf: bytearray) -> list[tuple[bytes, bytes]]:
    """Take the whole frames off the front of ``buf``."""
    out, at = [], 0
    while len(buf) - at >= _FRAME.size:
        (size,) = _FRAME.unpack_from(buf, at)
        end = at + _FRAME.size + size
        if len(buf) < end:
            break
        out.append((bytes(buf[at + 4 : at + 5]), bytes(buf[at + 5 : end])))
        at = end
    del buf[:at]
    return out


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Settings(NamedTuple):
    """The writer's settings, as :class:`~egresslock.audit.AuditLog` takes them."""

    flush_interval: float
    max_batch: int
    max_pending: int
    busy_timeout: float


class _Waiter:
    __slots__ = ("done", "ok")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ok = False


class ProcessAuditLog(ClosesOnExit):
    """An audit log written by a child process; see the module docstring.

    Offers what a long-running, busy caller needs of :class:`~egresslock.audit.AuditLog`, with
    the same arguments and meanings: :meth:`record`, :meth:`flush`, :meth:`close`,
    :attr:`stats`, :attr:`last_error`, :attr:`run_id`. Opening checks the database (creating it
    and its schema) in the caller, so that a bad path fails here, with :class:`AuditError`.
    """

    def __init__(self, path: str | Path, run_id: str | None = None, *,
                 flush_interval: float = 0.05, max_batch: int = 512,
                 max_pending: int = 100_000, busy_timeout: float = 5.0) -> None:
        check_settings(flush_interval, max_batch, max_pending)
        self.path = Path(path)
        self.run_id = run_id or new_run_id()
        self._settings = _Settings(flush_interval, max_batch, max_pending, busy_timeout)
        open_for_writing(self.path, busy_timeout).close()
        self._queue: deque[bytes] = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # the fallback switch, the waiters, the counters
        self._feeding = threading.Lock()  # one passes the queue on at a time, in order
        self._waiters: dict[int, _Waiter] = {}
        self._numbers = itertools.count(1)
        self._stats = AuditStats(0, 0, 0, 0)
        self._last_error: AuditError | None = None
        self._sent = 0  # records passed to the child
        self._drops = DropCount()  # records this side refused (queue full, after close)
        self._lost = 0  # rows close() reported unwritten, or the child left unconfirmed
        self._fallback: AuditLog | None = None
        self._closing = self._closed = False
        child_in, self._to_child = os.pipe2(os.O_CLOEXEC)
        self._from_child, child_out = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):  # a smaller pipe only means more, shorter writes
            fcntl.fcntl(self._to_child, _F_SETPIPE_SZ, _PIPE_SIZE)
        self._child: subprocess.Popen[bytes] | None
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "egresslock.audit.process", str(child_in),
                 str(child_out), str(self.path), self.run_id,
                 *(repr(value) for value in self._settings)],
                pass_fds=(child_in, child_out), stdin=subprocess.DEVNULL,
                start_new_session=True)
        except OSError as exc:  # no interpreter to run, no process to spare: write from here
            self._child = None
            self._child_died(f"it could not start: {exc}")
        finally:
            os.close(child_in)
            os.close(child_out)
        self._feeder = threading.Thread(target=self._feed, daemon=True,
                                        name=f"egresslock-audit-feed-{self.run_id}")
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"egresslock-audit-read-{self.run_id}")
        self._feeder.start()
        self._reader.start()
        self._finalizer = weakref.finalize(self, _close_quietly, weakref.ref(self))

    # -- the caller's side ------------------------------------------------------------------

    @property
    def last_error(self) -> AuditError | None:
        """The most recent failure: the child's, this side's, or the fallback's."""
        fallback = self._fallback
        if fallback is not None and fallback.last_error is not None:
            return fallback.last_error
        return self._last_error

    @property
    def stats(self) -> AuditStats:
        """The counters as the child last reported them, plus what waits on this side."""
        s, fallback = self._stats, self._fallback
        if fallback is not None:
            f = fallback.stats
            s = AuditStats(s.written + f.written, s.transactions + f.transactions,
                           f.pending, s.dropped + f.dropped)
        return AuditStats(s.written, s.transactions, s.pending + len(self._queue),
                          s.dropped + self._drops.count)

    def record(self, rec: AuditRecord) -> None:
        """Queue ``rec`` for the writer process. Thread-safe, no I/O, never raises."""
        fallback = self._fallback
        if fallback is not None:
            fallback.record(rec)
        elif self._closing:
            self._drop("record() after close()")
        elif len(self._queue) >= self._settings.max_pending:
            self._drop(f"more than {self._settings.max_pending} records queued")
        else:
            values: Any = stored_values(rec, self.run_id)  # str, int, float or None: marshallable
            payload = marshal.dumps(values)
            self._queue.append(_frame(_RECORD, payload))
            if len(self._queue) >= self._settings.max_batch:
                self._wake.set()

    def flush(self) -> None:
        """Block until every record queued before this call is committed.

        Raises :class:`AuditError` when they could not be written."""
        if self._closed:
            return
        number = next(self._numbers)
        waiter = _Waiter()
        with self._lock:
            fallback = self._fallback
            if fallback is None:
                self._waiters[number] = waiter
                self._queue.append(_frame(_FLUSH, marshal.dumps(number)))
        if fallback is not None:
            self._pass_on()
            fallback.flush()
            return
        self._wake.set()
        waiter.done.wait()
        if self._fallback is not None and not waiter.ok:  # the child died meanwhile
            self._pass_on()
            self._fallback.flush()
            if self._lost:
                raise self.last_error or AuditError(f"audit rows may be lost in {self.path}")
            return
        if not waiter.ok:
            raise self.last_error or AuditError(
                f"audit rows could not be written to {self.path}")

    def close(self) -> None:
        """Pass on what is queued, let the child commit it and stop. Idempotent.

        Raises :class:`~egresslock.audit.writer.RowsNotWritten` naming how many rows were not
        written, and why."""
        if self._closed:
            return
        self._closing = True
        self._finalizer.detach()
        self._wake.set()
        self._feeder.join()
        self._reader.join()
        child = self._child
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=30)
            if child.poll() is None:
                log.error("the audit writer process did not stop; killing it")
                child.kill()
                child.wait()
        self._closed = True
        if self._fallback is not None:
            try:
                self._fallback.close()
            except RowsNotWritten as exc:
                self._last_error = exc
                self._lost += exc.count
        unwritten = self._lost + self._drops.count
        if unwritten:
            raise RowsNotWritten(unwritten, self.path, self.last_error)

    def _drop(self, why: str) -> None:
        self._last_error = self._drops.add(why)

    # -- the feeder and the reader -----------------------------------------------------------

    def _feed(self) -> None:
        """Pass the queue on once per interval, or when a batch or a flush waits; at close,
        pass the rest and close the pipe, which tells the child to finish."""
        while True:
            closing = self._closing
            if not closing:
                self._wake.wait(self._settings.flush_interval)
                self._wake.clear()
            self._pass_on()
            if closing and not self._queue:
                break
        if self._fallback is None:  # a close, not a death: one last try, as AuditLog.close
            with contextlib.suppress(OSError):
                _write_all(self._to_child, _frame(_CLOSE, b""))
        os.close(self._to_child)

    def _pass_on(self) -> None:
        """Everything queued, in order: to the child, or to the fallback once it is gone."""
        queue = self._queue
        with self._feeding:
            frames = []
            while queue:
                frames.append(queue.popleft())
            if self._fallback is None and frames:
                try:
                    _write_all(self._to_child, b"".join(frames))
                    self._sent += sum(frame[4:5] == _RECORD for frame in frames)
                    return
                except OSError as exc:
                    self._child_died(f"cannot write to it: {exc}")
            self._to_fallback(frames)

    def _to_fallback(self, frames: list[bytes]) -> None:
        fallback = self._fallback
        if fallback is None:  # the fallback could not open: these are lost
            for _ in frames:
                self._drop("the audit writer process stopped")
            return
        for frame in frames:
            if frame[4:5] == _RECORD:
                fallback.record_stored(_loads(frame[5:]))

    def _read(self) -> None:
        buf = bytearray()
        ended = False
        while True:
            try:
                data = os.read(self._from_child, 1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            for kind, payload in _frames(buf):
                ended = self._report(kind, payload) or ended
        os.close(self._from_child)
        if not ended and self._child is not None:
            code = self._child.wait()
            self._child_died(f"it exited with status {code}")

    def _report(self, kind: bytes, payload: bytes) -> bool:
        number, ok, written, transactions, pending, dropped, error, lost = _loads(payload)
        self._stats = AuditStats(written, transactions, pending, dropped)
        if error is not None:
            self._last_error = AuditError(error)
        if kind == _END:
            self._lost += lost
            return True
        if number >= 0:
            with self._lock:
                waiter = self._waiters.pop(number, None)
            if waiter is not None:
                waiter.ok = ok
                waiter.done.set()
        return False

    def _child_died(self, why: str) -> None:
        """Go on with an in-process writer; the feeder hands it the queue from now on."""
        with self._lock:
            if self._fallback is not None:
                return
            unconfirmed = max(0, self._sent - self._stats.written - self._stats.dropped)
            self._lost += unconfirmed
            self._last_error = AuditError(
                f"the audit writer process stopped ({why}); up to {unconfirmed} rows it had "
                f"not confirmed may be lost; writing from this process from now on")
            log.error("%s", self._last_error)
            try:
                st = self._settings
                self._fallback = AuditLog(self.path, self.run_id,
                                          flush_interval=st.flush_interval,
                                          max_batch=st.max_batch, max_pending=st.max_pending,
                                          busy_timeout=st.busy_timeout)
            except AuditError as exc:
                log.error("%s", exc)
                self._last_error = exc
            waiters, self._waiters = self._waiters, {}
        self._wake.set()  # the feeder moves what waits to the fallback
        for waiter in waiters.values():
            waiter.done.set()  # not ok: flush() goes on with the fallback


def _close_quietly(ref: weakref.ref[ProcessAuditLog]) -> None:
    audit = ref()
    if audit is not None:
        try:
            audit.close()
        except AuditError as exc:
            log.error("%s", exc)


# -- the child ----------------------------------------------------------------------------------

class _Child:
    """The writer process: an ``AuditLog`` fed from fd ``fd_in``, its news sent on ``fd_out``."""

    def __init__(self, fd_in: int, fd_out: int, audit: AuditLog, flush_interval: float) -> None:
        self.fd_in, self.fd_out, self.audit = fd_in, fd_out, audit
        self.flush_interval = flush_interval
        self.out_lock = threading.Lock()
        self.done = threading.Event()

    def report(self, kind: bytes, number: int, ok: bool, lost: int = 0) -> None:
        s, error = self.audit.stats, self.audit.last_error
        payload = marshal.dumps((number, ok, s.written, s.transactions, s.pending, s.dropped,
                                 None if error is None else str(error), lost))
        with self.out_lock, contextlib.suppress(OSError):  # a parent that is gone reads nothing
            _write_all(self.fd_out, _frame(kind, payload))

    def keep_reporting(self) -> None:
        """The counters, whenever they change, for the parent's ``stats``."""
        last = None
        while not self.done.wait(max(self.flush_interval, 0.05)):
            if self.audit.stats != last:
                last = self.audit.stats
                self.report(_STATS, -1, True)

    def serve(self) -> bool:
        """Record what arrives, answer flushes, until the input ends: True when the parent
        closed the log, False when it went away without."""
        buf = bytearray()
        while True:
            try:
                data = os.read(self.fd_in, 1 << 20)
            except InterruptedError:
                continue
            if not data:
                return False
            buf += data
            for kind, payload in _frames(buf):
                if kind == _CLOSE:
                    return True
                if kind == _RECORD:
                    try:
                        self.audit.record_stored(_loads(payload))
                    except (TypeError, ValueError, EOFError) as exc:
                        log.error("a record could not be decoded: %s", exc)
                elif kind == _FLUSH:
                    try:
                        self.audit.flush()
                        ok = True
                    except AuditError:
                        ok = False
                    self.report(_STATS, _loads(payload), ok)

    def finish(self, closed: bool) -> None:
        """Commit what is held and close. A parent that closed the log waits for one try, as
        ``AuditLog.close`` makes; one that is gone waits for nothing: while the database is
        locked or full, keep trying for a while before giving rows up."""
        self.done.set()
        deadline = time.monotonic() + DRAIN_SECONDS
        while not closed:
            try:
                self.audit.flush()
                break
            except AuditError:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        try:
            self.audit.close()
            lost = 0
        except RowsNotWritten as exc:
            log.error("%s", exc)
            lost = exc.count
        self.report(_END, -1, not lost, lost)


def child_main(argv: list[str]) -> int:
    """``python -m egresslock.audit.process IN OUT PATH RUN_ID FLUSH_INTERVAL MAX_BATCH
    MAX_PENDING BUSY_TIMEOUT``: write what arrives on fd IN until it ends."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # it ends when its parent closes the pipe
    fd_in, fd_out, path, run_id = int(argv[0]), int(argv[1]), argv[2], argv[3]
    flush_interval, max_batch = float(argv[4]), int(argv[5])
    max_pending, busy_timeout = int(argv[6]), float(argv[7])
    # What arrives was gathered over one interval by the feeder: commit it at once, so that a
    # row is on disk as soon after record() as with the in-process writer.
    audit = AuditLog(path, run_id, flush_interval=0, max_batch=max_batch,
                     max_pending=max_pending, busy_timeout=busy_timeout)
    child = _Child(fd_in, fd_out, audit, flush_interval)
    threading.Thread(target=child.keep_reporting, daemon=True).start()
    child.finish(closed=child.serve())
    return 0


if __name__ == "__main__":
    logging.basicConfig(format="egresslock audit writer process: %(message)s")
    sys.exit(child_main(sys.argv[1:]))
