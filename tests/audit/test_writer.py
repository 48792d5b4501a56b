"""AuditLog: what goes in comes out, in batches, exactly once, and failures are surfaced."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from egresslock.audit import (
    SCHEMA_VERSION,
    AuditLog,
    AuditQuery,
    AuditRecord,
    json_lines_sink,
    new_run_id,
    open_reader,
    verify,
)
from egresslock.audit.record import stored_values
from egresslock.errors import AuditError
from tests.audit.helpers import raw, rec


def all_rows(db: Path) -> list[dict[str, object]]:
    with open_reader(db) as reader:
        return [r.as_dict() for r in reader.rows(AuditQuery())]


def wait_for(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return True
        time.sleep(0.01)
    return False


def test_every_field_round_trips(db: Path) -> None:
    full = AuditRecord(
        layer="connect", verdict="report", rule_id="github-read", reason="would deny: port 22",
        host="api.github.com", port=22, method="CONNECT", path=None, address="140.82.112.6",
        bytes_out=1234, bytes_in=56789, pid=4242, uid=1000, protocol="tcp",
        extra={"transform": "redact", "secret": "aws-key", "nested": {"n": [1, 2]}},
        time=1716286530.125)
    with AuditLog(db, run_id="run-1") as log:
        log.record(full)
    [row] = all_rows(db)
    assert row["id"] == 1
    assert row["run_id"] == "run-1"
    for name in ("layer", "verdict", "rule_id", "reason", "host", "port", "method", "path",
                 "address", "bytes_out", "bytes_in", "pid", "uid", "protocol", "time"):
        assert row[name] == getattr(full, name), name
    assert row["extra"] == {"transform": "redact", "secret": "aws-key", "nested": {"n": [1, 2]}}


def test_a_record_given_as_its_stored_values_is_the_same_row(tmp_path: Path) -> None:
    record = rec(extra={"b": 1, "a": [2, None]}, host="ü.test", port=443, time=5.25)
    with AuditLog(tmp_path / "fields.db", run_id="r") as log:
        log.record(record)
    with AuditLog(tmp_path / "values.db", run_id="r") as log:
        log.record_stored(stored_values(record, "r"))
    assert all_rows(tmp_path / "values.db") == all_rows(tmp_path / "fields.db")  # hashes too


def test_defaults_and_drop_rows(log: AuditLog, db: Path) -> None:
    before = time.time()
    log.record(AuditRecord(layer="drop", verdict="deny", rule_id="default",
                           reason="udp is not proxied", address="8.8.8.8", port=53,
                           protocol="udp"))
    log.flush()
    [row] = all_rows(db)
    assert before <= float(row["time"]) <= time.time()  # type: ignore[arg-type]
    assert (row["host"], row["method"], row["path"], row["extra"]) == (None, None, None, None)
    assert (row["bytes_out"], row["bytes_in"], row["protocol"]) == (0, 0, "udp")


def test_the_record_is_a_snapshot_of_extra(log: AuditLog, db: Path) -> None:
    details = {"secret": "aws-key"}
    log.record(rec(extra=details))
    details["secret"] = "changed after record()"
    log.flush()
    assert all_rows(db)[0]["extra"] == {"secret": "aws-key"}


@pytest.mark.parametrize(("field", "value"), [
    ("layer", "ftp"), ("layer", "HTTP"), ("verdict", "block"), ("verdict", None)])
def test_a_bad_layer_or_verdict_fails_at_the_call_site(field: str, value: object) -> None:
    with pytest.raises(AuditError, match="is not one of"):
        rec(**{field: value})


def test_policy_enums_are_accepted() -> None:
    from egresslock.policy.decide import Layer, Verdict

    r = AuditRecord(layer=Layer.HTTP, verdict=Verdict.DENY,  # type: ignore[arg-type]
                    rule_id="default", reason="x")
    assert (r.layer, r.verdict) == ("http", "deny")


def test_odd_values_are_stored_not_lost(log: AuditLog, db: Path) -> None:
    """Values a layer might hand over by mistake must not fail the batch or break the chain."""
    log.record(rec(path="/\udcff\x00é", port=True, bytes_out=2**70,
                   extra={"raw": b"\x00\xff", "path": Path("/x"), "set": {1}}))
    log.record(rec(extra={(1, 2): "tuple key"}))
    log.flush()
    first, second = all_rows(db)
    assert first["path"] == "/\\udcff\x00é"
    assert (first["port"], first["bytes_out"]) == (1, 0)
    assert first["extra"] == {"path": "/x", "raw": "b'\\x00\\xff'", "set": "{1}"}
    assert "unencodable_extra" in second["extra"]  # type: ignore[operator]
    assert log.last_error is None
    assert verify(db).ok


def test_run_ids_are_generated_short_and_sortable(tmp_path: Path) -> None:
    first = new_run_id()
    time.sleep(1.01)
    second = new_run_id()
    assert len(first) <= 24
    assert first < second
    with AuditLog(tmp_path / "a.db") as log:
        assert log.run_id
    assert AuditLog(tmp_path / "b.db", run_id="mine").run_id == "mine"


def test_schema_is_versioned_indexed_and_in_wal_mode(log: AuditLog, db: Path) -> None:
    conn = raw(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexed = {r[2] for name, in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")
               for r in conn.execute(f"PRAGMA index_info({name})")}
    assert {"time", "verdict", "host", "run_id"} <= indexed


def test_record_does_not_touch_the_disk_before_the_interval(db: Path) -> None:
    with AuditLog(db, flush_interval=0.5) as log:
        log.record(rec())
        assert all_rows(db) == []  # still in memory: the batch waits for more records
        assert wait_for(lambda: len(all_rows(db)) == 1)  # committed without flush()


def test_batches_hold_at_most_max_batch_rows(db: Path) -> None:
    with AuditLog(db, flush_interval=10, max_batch=100) as log:
        for i in range(1000):
            log.record(rec(extra={"seq": i}))
        # max_batch, not the 10 s interval, ends each transaction.
        assert wait_for(lambda: log.stats.written == 1000, timeout=5)
        assert log.stats.transactions == 10


def test_a_flush_behind_full_batches_does_not_wait_for_the_interval(db: Path) -> None:
    # 25 records and a flush: two full batches of 10, then a partial one with the flush
    # behind it. The flush's wake-up may come while the first batch is collected; it must
    # still end the wait of the third.
    with AuditLog(db, flush_interval=60, max_batch=10) as log:
        for _ in range(20):
            for _ in range(25):
                log.record(rec())
            started = time.monotonic()
            log.flush()
            assert time.monotonic() - started < 10


def test_a_burst_is_one_transaction(db: Path) -> None:
    with AuditLog(db, flush_interval=0.3, max_batch=512) as log:
        for _ in range(50):
            log.record(rec())
        log.flush()
        assert log.stats.transactions == 1


def test_concurrent_record_is_exactly_once(db: Path) -> None:
    threads, per_thread = 16, 500
    with AuditLog(db, flush_interval=0.005, max_batch=64) as log:
        start = threading.Barrier(threads)

        def worker(t: int) -> None:
            start.wait()
            for i in range(per_thread):
                log.record(rec(extra={"t": t, "i": i}))

        pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
    seen = [(r["extra"]["t"], r["extra"]["i"]) for r in all_rows(db)]  # type: ignore[index]
    assert len(seen) == threads * per_thread
    assert set(seen) == {(t, i) for t in range(threads) for i in range(per_thread)}
    assert verify(db).ok


def test_sinks_get_every_committed_row(db: Path) -> None:
    got: list[dict[str, object]] = []
    with AuditLog(db) as log:
        log.add_sink(got.append)
        log.add_sink(lambda row: 1 / 0)  # type: ignore[arg-type]
        for i in range(3):
            log.record(rec(extra={"seq": i}))
    assert [g["extra"] for g in got] == [{"seq": 0}, {"seq": 1}, {"seq": 2}]
    assert got == all_rows(db)
    json.dumps(got)  # what a JSON-lines sink would print


def test_json_lines_sink(db: Path) -> None:
    out = io.StringIO()
    with AuditLog(db) as log:
        log.add_sink(json_lines_sink(out))
        log.record(rec(host="bücher.test"))
    [line] = out.getvalue().splitlines()
    assert json.loads(line) == all_rows(db)[0]
    assert "bücher" in line


def test_close_is_idempotent_and_later_records_are_ignored(db: Path) -> None:
    log = AuditLog(db)
    log.record(rec())
    log.close()
    log.close()
    log.record(rec())  # must not raise: the proxy may still be draining
    log.flush()
    assert len(all_rows(db)) == 1


def test_a_locked_database_is_surfaced_not_raised(db: Path) -> None:
    log = AuditLog(db, busy_timeout=0.1)
    blocker = raw(db)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    log.record(rec(extra={"seq": 0}))  # must not raise
    with pytest.raises(AuditError, match="locked"):
        log.flush()
    assert log.last_error is not None
    assert "cannot write" in str(log.last_error)
    assert log.stats.pending == 1
    log.record(rec(extra={"seq": 1}))
    blocker.execute("ROLLBACK")
    log.flush()  # the writer retries and catches up
    log.close()
    assert [r["extra"] for r in all_rows(db)] == [{"seq": 0}, {"seq": 1}]
    assert verify(db).ok


def test_close_raises_when_rows_cannot_be_written(db: Path) -> None:
    log = AuditLog(db, busy_timeout=0.1)
    blocker = raw(db)
    blocker.execute("BEGIN IMMEDIATE")
    log.record(rec())
    log.record(rec())
    with pytest.raises(AuditError, match="2 audit rows were not written"):
        log.close()
    blocker.execute("ROLLBACK")


def test_rows_beyond_max_pending_are_dropped_and_counted(db: Path) -> None:
    log = AuditLog(db, busy_timeout=0.05, max_pending=10, flush_interval=0)
    blocker = raw(db)
    blocker.execute("BEGIN IMMEDIATE")
    for _ in range(50):
        log.record(rec())
    assert wait_for(lambda: log.stats.dropped > 0)
    blocker.execute("ROLLBACK")
    with pytest.raises(AuditError, match="not written"):
        log.close()
    written = len(all_rows(db))
    assert written + log.stats.dropped == 50
    assert written <= 20  # at most max_pending queued plus max_pending waiting in the writer


def test_open_errors_name_the_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(AuditError, match="cannot open the audit database"):
        AuditLog(tmp_path / "file" / "audit.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(AuditError, match=str(garbage)):
        AuditLog(garbage)
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(AuditError, match="tables: users"):
        AuditLog(other)
    with pytest.raises(AuditError, match="max_batch"):
        AuditLog(tmp_path / "x.db", max_batch=0)


def test_a_newer_schema_is_refused(db: Path) -> None:
    AuditLog(db).close()
    raw(db).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(AuditError, match="upgrade egresslock"):
        AuditLog(db)
    with pytest.raises(AuditError, match="upgrade egresslock"):
        open_reader(db)
