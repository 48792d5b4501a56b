"""The audit writer in a process of its own (``egresslock.audit.process``).

Real child processes, real pipes, real SQLite files, real kills: the rows must be those the
in-process writer would store, byte for byte, and a killed proxy must lose nothing it had passed
to its writer.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from egresslock.audit import AuditLog, AuditQuery, AuditRecord, open_reader, verify
from egresslock.audit.process import ProcessAuditLog
from egresslock.errors import AuditError
from tests.audit.helpers import rec, running, wait_gone

pytestmark = pytest.mark.integration


class Colour(enum.Enum):
    RED = "red"


class Odd:
    def __str__(self) -> str:
        return "odd object"


def varied() -> list[AuditRecord]:
    """Records with every kind of value a layer may hand over, marshal-friendly or not."""
    return [
        rec(),
        rec(layer="connect", verdict="allow", method="CONNECT", host="app.test", port=443,
            address="127.0.0.1", bytes_out=2**40, bytes_in=7, protocol="tcp",
            extra={"sni": "app.test", "ended": "closed"}),
        rec(extra={"colour": Colour.RED, "object": Odd(), 3: "int key", "list": [1, 2.5]}),
        rec(host="bad\udcffsurrogate", path="/ü/ñ", reason="non-ASCII: ✓"),
        rec(port=2**70, pid=os.getpid(), uid=0, time=1.5),
        rec(extra={"nested": {"b": 1, "a": [None, True]}}),
        AuditRecord(layer="dns", verdict="report", rule_id="r", reason="x", host=None),
    ]


def stored(db: Path) -> list[tuple[object, ...]]:
    with open_reader(db) as reader:
        return [tuple(row.as_dict().values()) for row in reader.rows(AuditQuery())]


def test_rows_are_those_the_in_process_writer_stores(tmp_path: Path) -> None:
    records = varied()
    with AuditLog(tmp_path / "thread.db", run_id="same") as log:
        for r in records:
            log.record(r)
    with ProcessAuditLog(tmp_path / "process.db", run_id="same") as plog:
        for r in records:
            plog.record(r)
        plog.flush()
        assert plog.stats.written == len(records)
    # Same run id, same ids: the hashes match too, so every stored byte is the same.
    assert stored(tmp_path / "process.db") == stored(tmp_path / "thread.db")
    assert verify(tmp_path / "process.db").ok


def test_flush_waits_for_the_commit_and_close_for_everything(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    plog = ProcessAuditLog(db, flush_interval=60)  # nothing moves before a flush or close
    for i in range(1000):
        plog.record(rec(extra={"seq": i}))
    plog.flush()
    assert verify(db).rows == 1000
    assert plog.stats.written == 1000
    for i in range(1000, 1500):
        plog.record(rec(extra={"seq": i}))
    plog.close()
    plog.close()  # idempotent
    result = verify(db)
    assert (result.ok, result.rows) == (True, 1500)


def test_a_bad_path_fails_at_once_and_names_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(AuditError, match=str(blocker)):
        ProcessAuditLog(blocker / "audit.db")


def test_a_record_after_close_is_counted_as_dropped(tmp_path: Path) -> None:
    plog = ProcessAuditLog(tmp_path / "a.db")
    plog.close()
    plog.record(rec())
    assert plog.stats.dropped == 1
    assert "after close" in str(plog.last_error)


VICTIM = textwrap.dedent("""
    import sys, time
    from egresslock.audit import AuditRecord
    from egresslock.audit.process import ProcessAuditLog
    log = ProcessAuditLog(sys.argv[1], run_id="victim", busy_timeout=0.1)
    log.record(AuditRecord(layer="http", verdict="allow", rule_id="r", reason="first"))
    log.flush()  # the writer is up, with the database open
    print(log._child.pid, flush=True)
    sys.stdin.readline()  # the test holds the database's lock now
    for i in range(3000):
        log.record(AuditRecord(layer="http", verdict="allow", rule_id="r", reason="ok",
                               extra={"seq": i}))
    time.sleep(0.5)  # ten intervals: the feeder has passed everything on
    print("fed", flush=True)
    time.sleep(60)
""")


def test_a_killed_caller_loses_nothing_it_had_passed_on(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    victim = subprocess.Popen([sys.executable, "-c", VICTIM, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert victim.stdin is not None
    assert victim.stdout is not None
    writer_pid = int(victim.stdout.readline())
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # the writer can commit nothing while the test holds this
    victim.stdin.write("go\n")
    victim.stdin.flush()
    try:
        assert victim.stdout.readline() == "fed\n"
        # The signals a terminal or a supervisor sends do not stop the writer (once it has
        # started: a new session keeps the terminal's and a process group's away before)...
        deadline = time.monotonic() + 10
        while not _ignores(writer_pid, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(writer_pid, sig)
    finally:
        victim.kill()
        victim.wait(10)
    time.sleep(1.5)  # several tries of the writer, each giving up after busy_timeout
    assert running(writer_pid)  # the caller is gone; its rows wait in the writer
    lock.execute("ROLLBACK")
    lock.close()
    # ...the end of its pipe does, once everything it read is committed.
    assert wait_gone(writer_pid, 30)
    result = verify(db)
    assert (result.ok, result.rows) == (True, 3001)
    with open_reader(db) as reader:
        seqs = [r.as_dict()["extra"]["seq"]  # type: ignore[index]
                for r in reader.rows(AuditQuery(run_id="victim")) if r.reason == "ok"]
    assert seqs == list(range(3000))


def _ignores(pid: int, *signals: signal.Signals) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return all(mask & (1 << (sig - 1)) for sig in signals)


def test_a_writer_that_dies_is_replaced_by_writing_in_process(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "a.db"
    plog = ProcessAuditLog(db)
    for i in range(100):
        plog.record(rec(extra={"seq": i}))
    plog.flush()
    child = plog._child
    assert child is not None  # the writer process started
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)
    with caplog.at_level(logging.ERROR, logger="egresslock.audit"):
        deadline = time.monotonic() + 10
        while plog.last_error is None and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(100, 200):
            plog.record(rec(extra={"seq": i}))
        plog.flush()
    assert "audit writer process stopped" in str(plog.last_error)
    assert "writing from this process" in caplog.text
    plog.close()  # the 100 flushed rows were confirmed: nothing counts as lost
    result = verify(db)
    assert (result.ok, result.rows) == (True, 200)


def test_close_with_the_database_locked_reports_the_rows_it_could_not_write(
        tmp_path: Path) -> None:
    # A caller that closes waits for one try, as with AuditLog.close, not for the minute a
    # writer whose caller died keeps trying.
    db = tmp_path / "a.db"
    plog = ProcessAuditLog(db, busy_timeout=0.2)
    plog.record(rec())
    plog.flush()
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        for _ in range(5):
            plog.record(rec())
        started = time.monotonic()
        with pytest.raises(AuditError, match="5 audit rows were not written"):
            plog.close()
        assert time.monotonic() - started < 20
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert verify(db).rows == 1


def test_a_writer_that_cannot_start_leaves_the_writing_to_the_caller(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    db = tmp_path / "a.db"
    with ProcessAuditLog(db) as plog:
        assert "could not start" in str(plog.last_error)
        plog.record(rec())
        plog.flush()
        assert plog.stats.written == 1
    assert verify(db).rows == 1
