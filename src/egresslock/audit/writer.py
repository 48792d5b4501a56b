"""The audit writer: callers enqueue records, one thread commits them in batches.

:meth:`AuditLog.record` is called by the proxy once per request, on the event loop's thread, so it
does no disk I/O and no hashing: it puts the record on an in-memory queue and returns. One writer
thread per log takes records off the queue and commits them:

- it takes the first waiting record, then waits at most ``flush_interval`` seconds for more, or
  until it holds ``max_batch`` records, and commits them in one transaction;
- inside the transaction (``BEGIN IMMEDIATE``, which takes SQLite's write lock) it reads the last
  row's id and hash, so that several processes appending to one file extend one chain;
- after the commit, every row is handed to the sinks (:meth:`AuditLog.add_sink`).

Loss bound. A commit survives SIGKILL of the process (WAL with ``synchronous=NORMAL``: the WAL is
written before COMMIT returns; only a power loss or kernel crash can undo the transactions since
the last checkpoint). What SIGKILL loses is what was not yet committed. While the writer keeps up
(it sustains about 60,000 rows per second; a 512-row commit takes under 10 ms), a record is
committed at most ``flush_interval`` plus one commit after :meth:`~AuditLog.record` returns, so
SIGKILL loses at most the records of that last window: the batch being committed (at most
``max_batch`` rows) and those recorded during its commit. Defaults: 50 ms, 512 rows. When records
arrive faster than the disk takes them, or the database is locked or full, they wait in memory, up
to ``max_pending`` (then they are dropped and counted), and those are lost too.
:meth:`~AuditLog.flush` returns only when everything recorded before it is committed, for a
caller that must not lose a particular row.

Errors never reach :meth:`~AuditLog.record`: a failed transaction is rolled back, logged on the
``egresslock.audit`` logger, kept in :attr:`~AuditLog.last_error`, and retried with back-off.
:meth:`~AuditLog.flush` and :meth:`~AuditLog.close` raise :class:`AuditError` when rows they
waited for could not be written.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, SimpleQueue
from types import TracebackType
from typing import NamedTuple, Self, TextIO

from egresslock.audit.record import GENESIS_HASH, AuditRecord, AuditRow, row_hash, stored_values
from egresslock.audit.schema import COLUMNS, TABLE, open_for_writing
from egresslock.errors import AuditError

log = logging.getLogger("egresslock.audit")

Sink = Callable[[dict[str, object]], None]

# Rows go in as multi-row INSERTs of up to _ROWS_PER_INSERT rows: one statement step per chunk
# instead of one per row. The sqlite3 module releases the GIL around each step, and every release
# lets the event loop's thread take the GIL and makes the writer wait to get it back; per row,
# that hand-off cost the proxy more than the insert itself. 50 rows of 18 columns stay under
# SQLite's historical limit of 999 bound parameters per statement.
_ROWS_PER_INSERT = 50
_ROW_PARAMS = f"({', '.join('?' * len(COLUMNS))})"


def _insert_sql(rows: int) -> str:
    # S608: built from this package's constants; every value is a bound parameter.
    return (f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) "  # noqa: S608
            f"VALUES {', '.join([_ROW_PARAMS] * rows)}")


# Rows the writer prepares or hashes before it offers the GIL to the event loop's thread. A
# thread that wants the GIL waits for the holder to block, or for the switch interval (5 ms); a
# batch of a few hundred rows is several milliseconds of Python, during which the proxy would
# answer nobody. Yielding every 16 rows (about 100 µs) keeps that pause short.
_YIELD_EVERY = 16
_LAST = f"SELECT id, hash FROM {TABLE} ORDER BY id DESC LIMIT 1"  # noqa: S608
_MAX_BACKOFF = 2.0


def json_lines_sink(stream: TextIO) -> Sink:
    """A sink printing each committed row as one JSON line on ``stream`` (e.g. ``sys.stdout``,
    where a Kubernetes log collector picks it up)."""

    def sink(row: dict[str, object]) -> None:
        stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        stream.flush()

    return sink


def new_run_id() -> str:
    """A short id that sorts by start time: ``20240521T101530Z-3f9a1c``."""
    return f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


def check_settings(flush_interval: float, max_batch: int, max_pending: int) -> None:
    """Raise :class:`AuditError` naming the bad one when a writer's settings cannot work."""
    if flush_interval < 0 or max_batch < 1 or max_pending < 1:
        raise AuditError(f"flush_interval {flush_interval!r} must be >= 0, max_batch "
                         f"{max_batch!r} and max_pending {max_pending!r} must be >= 1")


class StoredValues(NamedTuple):
    """A record as :func:`~egresslock.audit.record.stored_values` made it, for this run."""

    values: tuple[object, ...]


class RowsNotWritten(AuditError):
    """Raised by ``close()``: ``count`` rows could not be written."""

    def __init__(self, count: int, path: Path, why: object) -> None:
        super().__init__(f"{count} audit rows were not written to {path}: {why}")
        self.count = count


class DropCount:
    """Records refused before they reached a writer (a full queue, a closed log): counted, the
    first one logged, and each leaving the error for ``last_error``."""

    __slots__ = ("_lock", "count")

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def add(self, why: str) -> AuditError:
        with self._lock:
            self.count += 1
            first = self.count == 1
        if first:
            log.error("audit record dropped: %s (further drops are counted, not logged)", why)
        return AuditError(f"audit rows dropped ({why}); see the egresslock.audit log")


class ClosesOnExit:
    """``with log:`` closes the log at the end of the block."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class AuditStats:
    """Counters of one :class:`AuditLog`: rows committed, transactions, rows waiting, dropped."""

    written: int
    transactions: int
    pending: int
    dropped: int


class _Flush:
    """A marker in the queue: set when every record queued before it has been handled."""

    __slots__ = ("done", "ok", "stop")

    def __init__(self, *, stop: bool = False) -> None:
        self.done = threading.Event()
        self.ok = True
        self.stop = stop


class _Writer:
    """The queue, the connection and the thread. It holds no reference to its AuditLog, so that
    ``weakref.finalize`` can stop it when the log is dropped or the interpreter exits."""

    def __init__(self, conn: sqlite3.Connection, path: Path, run_id: str,
                 flush_interval: float, max_batch: int, max_pending: int) -> None:
        self.conn, self.path, self.run_id = conn, path, run_id
        self.flush_interval, self.max_batch = flush_interval, max_batch
        self.max_pending = max_pending
        # Records, or their stored values already worked out (StoredValues): see record_stored.
        self.queue: SimpleQueue[AuditRecord | StoredValues | _Flush] = SimpleQueue()
        self.sinks: tuple[Sink, ...] = ()
        self.pending: list[tuple[object, ...]] = []  # prepared rows not yet committed
        self._inserts: dict[int, str] = {}  # multi-row INSERT statements by row count
        self.last_error: AuditError | None = None
        self.written = self.transactions = self.lost = 0
        self.drops = DropCount()
        # Set when a batch should be cut before its interval ends: a full batch, or a flush.
        self.wake = threading.Event()
        self._failing, self._failure = False, ""
        self.thread = threading.Thread(target=self._run, name=f"egresslock-audit-{run_id}",
                                       daemon=True)
        self.thread.start()

    @property
    def dropped(self) -> int:
        return self.drops.count

    def drop(self, why: str) -> None:
        self.last_error = self.drops.add(why)

    def wait(self, marker: _Flush) -> bool:
        self.queue.put(marker)
        self.wake.set()
        while not marker.done.wait(1.0):
            if not self.thread.is_alive():
                return False
        return marker.ok

    def stop(self) -> int:
        """Commit what is queued, stop the thread, close the connection; rows not written."""
        if self.thread.is_alive():
            self.wait(_Flush(stop=True))
            self.thread.join()
        return self.lost + self.dropped

    # -- the writer thread -------------------------------------------------------------------

    def _run(self) -> None:
        backoff, retry_at = 0.0, 0.0
        while True:
            marker: _Flush | None = None
            try:
                wait = max(0.0, retry_at - time.monotonic()) if self.pending else None
                records, marker = self._collect(wait)
                for i, rec in enumerate(records, 1):
                    self._prepare(rec)
                    if not i % _YIELD_EVERY:
                        time.sleep(0)  # let the event loop's thread have the GIL: see _YIELD_EVERY
                # After a failure, new records do not hasten the retry; a flush() or close() does.
                if self.pending and (marker is not None or time.monotonic() >= retry_at):
                    if self._commit():
                        backoff = 0.0
                    else:
                        backoff = min(max(backoff * 2, 0.05), _MAX_BACKOFF)
                        retry_at = time.monotonic() + backoff
                if marker is not None:
                    marker.ok = not self.pending
            except Exception as exc:  # a bug here must not kill the thread that owns the queue
                log.exception("audit writer error")
                self.last_error = AuditError(f"audit writer error: {exc!r}")
                if marker is not None:
                    marker.ok = False
                time.sleep(0.05)
            if marker is not None:
                if marker.stop:
                    self._finish(marker)
                    return
                marker.done.set()

    def _collect(self, timeout: float | None
                 ) -> tuple[list[AuditRecord | StoredValues], _Flush | None]:
        try:
            first = self.queue.get(timeout=timeout)
        except Empty:
            return [], None
        if isinstance(first, _Flush):
            return [], first
        batch = [first]
        # Let the batch fill for one interval without waking per record (a wake-up per record
        # costs the event loop the GIL once per request), unless it fills up or a flush comes.
        if self.queue.qsize() + 1 < self.max_batch:
            self.wake.wait(self.flush_interval)
        self.wake.clear()
        while len(batch) < self.max_batch:
            try:
                item = self.queue.get_nowait()
            except Empty:
                break
            if isinstance(item, _Flush):
                return batch, item
            batch.append(item)
        else:
            # Full, with more behind it: the next batch does not wait either. (Its wake-up may
            # have come already and been cleared above: a flush queued behind a full batch
            # would otherwise wait a whole interval.)
            if not self.queue.empty():
                self.wake.set()
        return batch, None

    def _prepare(self, rec: AuditRecord | StoredValues) -> None:
        if len(self.pending) >= self.max_pending:
            self.drop(f"{self.max_pending} rows already wait for the database")
            return
        self.pending.append(rec.values if isinstance(rec, StoredValues)
                            else stored_values(rec, self.run_id))

    def _commit(self) -> bool:
        while self.pending:
            chunk = self.pending[: self.max_batch]
            try:
                rows = self._insert(chunk)
            except sqlite3.Error as exc:
                self._failed(exc, len(self.pending))
                return False
            del self.pending[: len(chunk)]
            self.written += len(rows)
            self.transactions += 1
            self._emit(rows)
        if self._failing:
            self._failing = False
            log.warning("audit writes to %s recovered", self.path)
        return True

    def _insert(self, chunk: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            last = conn.execute(_LAST).fetchone()
            row_id, prev = (int(last[0]), str(last[1])) if last else (0, GENESIS_HASH)
            rows = []
            for values in chunk:
                row_id += 1
                hashed = (row_id, *values)
                digest = row_hash(prev, hashed)
                rows.append((*hashed, prev, digest))
                prev = digest
                if not row_id % _YIELD_EVERY:
                    time.sleep(0)
            for start in range(0, len(rows), _ROWS_PER_INSERT):
                part = rows[start : start + _ROWS_PER_INSERT]
                sql = self._inserts.get(len(part))
                if sql is None:
                    sql = self._inserts[len(part)] = _insert_sql(len(part))
                conn.execute(sql, [value for row in part for value in row])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.debug("rollback failed", exc_info=True)
            raise
        return rows

    def _failed(self, exc: sqlite3.Error, waiting: int) -> None:
        err = AuditError(f"cannot write to the audit database {self.path}: {exc} "
                         f"({waiting} rows waiting; retrying)")
        # Log when writes start failing and when the cause changes, not once per retry.
        if not self._failing or str(exc) != self._failure:
            log.error("%s", err)
        self.last_error, self._failing, self._failure = err, True, str(exc)

    def _emit(self, rows: list[tuple[object, ...]]) -> None:
        sinks = self.sinks
        if not sinks:
            return
        for values in rows:
            item = AuditRow(*values).as_dict()  # type: ignore[arg-type]
            for sink in sinks:
                try:
                    sink(item)
                except Exception:
                    log.exception("audit sink %r failed", sink)

    def _finish(self, marker: _Flush) -> None:
        # Records put after the stop marker (a record() racing close()) are still written.
        while True:
            try:
                item = self.queue.get_nowait()
            except Empty:
                break
            if not isinstance(item, _Flush):
                self._prepare(item)
            else:
                item.done.set()
        if self.pending:
            self._commit()
        self.lost = len(self.pending)
        marker.ok = not self.pending and not self.dropped
        try:
            self.conn.close()
        except sqlite3.Error:
            log.debug("close failed", exc_info=True)
        marker.done.set()


def _stop_at_exit(writer: _Writer) -> None:
    lost = writer.stop()
    if lost:
        log.error("%d audit rows were not written to %s: %s", lost, writer.path,
                  writer.last_error)


class AuditLog(ClosesOnExit):
    """The audit log of one run: :meth:`record` decisions, they reach ``path`` in batches.

    ``run_id`` names this run in every row (generated when not given). ``flush_interval`` and
    ``max_batch`` bound how long and how many records wait for one commit; ``max_pending`` bounds
    the memory held while the database cannot be written; ``busy_timeout`` is how long a commit
    waits for another process's write lock. Opening creates the file, its directory and the schema
    and raises :class:`AuditError` when that fails; after that, only :meth:`flush` and
    :meth:`close` raise. Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | Path, run_id: str | None = None, *,
                 flush_interval: float = 0.05, max_batch: int = 512,
                 max_pending: int = 100_000, busy_timeout: float = 5.0) -> None:
        check_settings(flush_interval, max_batch, max_pending)
        self.path = Path(path)
        self.run_id = run_id or new_run_id()
        self._max_pending = max_pending
        conn = open_for_writing(self.path, busy_timeout)
        self._writer = _Writer(conn, self.path, self.run_id, flush_interval, max_batch,
                               max_pending)
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop_at_exit, self._writer)

    @property
    def last_error(self) -> AuditError | None:
        """The most recent write failure (kept after recovery; the log says when it recovered)."""
        return self._writer.last_error

    @property
    def stats(self) -> AuditStats:
        """Counters for metrics and health checks."""
        w = self._writer
        return AuditStats(w.written, w.transactions, w.queue.qsize() + len(w.pending), w.dropped)

    def record(self, rec: AuditRecord) -> None:
        """Queue ``rec`` for the writer thread. Thread-safe, no I/O, never raises."""
        self._enqueue(rec)

    def _enqueue(self, rec: AuditRecord | StoredValues) -> None:
        writer = self._writer
        if self._closed:
            writer.drop("record() after close()")
        elif writer.queue.qsize() >= self._max_pending:
            writer.drop(f"more than {self._max_pending} records queued")
        else:
            writer.queue.put(rec)
            if writer.queue.qsize() >= writer.max_batch:
                writer.wake.set()

    def record_stored(self, values: tuple[object, ...]) -> None:
        """Queue a record given as its stored values, as ``stored_values(record, run_id)`` made
        them with this log's run id: for the writer process, whose parent works them out so
        that it need not rebuild the record. Thread-safe, no I/O, never raises."""
        self._enqueue(StoredValues(values))

    def add_sink(self, fn: Sink) -> None:
        """Also hand every committed row to ``fn`` (on the writer thread, after the commit), as the
        dict ``egresslock audit --json`` prints; e.g. JSON lines on stdout for a log collector.
        A sink that raises is logged and kept."""
        self._writer.sinks = (*self._writer.sinks, fn)

    def flush(self) -> None:
        """Block until every record queued before this call is committed.

        Raises :class:`AuditError` when they could not be written (the writer keeps retrying).
        """
        if self._closed:
            return
        if not self._writer.wait(_Flush()):
            raise self._writer.last_error or AuditError(
                f"audit rows could not be written to {self.path}")

    def close(self) -> None:
        """Commit what is queued and stop the writer. Idempotent.

        Raises :class:`RowsNotWritten` (an :class:`AuditError`) naming how many rows were not
        written, and why.
        """
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        lost = self._writer.stop()
        if lost:
            raise RowsNotWritten(lost, self.path, self._writer.last_error)
