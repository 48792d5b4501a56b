"""The hash chain: intact logs verify; every kind of tampering is caught at the right row.

Each attack edits the file with sqlite3 directly, as someone with write access to it would.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from egresslock.audit import GENESIS_HASH, AuditLog, AuditQuery, open_reader, verify
from egresslock.audit.record import row_hash
from tests.audit.helpers import raw, rec, write_rows

COLUMNS_BUT_ID = ("time, run_id, layer, verdict, rule_id, reason, method, host, port, path, "
                  "address, bytes_out, bytes_in, pid, uid, protocol, extra, prev_hash, hash")


def test_an_empty_log_verifies(db: Path) -> None:
    AuditLog(db).close()
    result = verify(db)
    assert (result.ok, result.rows, result.head, result.first_bad_id) == (
        True, 0, GENESIS_HASH, None)


def test_an_intact_log_verifies_and_reports_its_head(db: Path) -> None:
    write_rows(db, 10)
    result = verify(db)
    assert result.ok
    assert (result.rows, result.head_id, result.first_bad_id) == (10, 10, None)
    with open_reader(db) as reader:
        assert result.head == reader.rows(AuditQuery(limit=1))[0].hash


def test_the_chain_continues_across_runs(db: Path) -> None:
    first = write_rows(db, 3)
    second = write_rows(db, 3)
    assert first != second
    assert verify(db).rows == 6
    assert verify(db).ok
    with open_reader(db) as reader:
        rows = reader.rows(AuditQuery())
    assert rows[3].prev_hash == rows[2].hash
    assert [r.run_id for r in rows] == [first] * 3 + [second] * 3


def test_attack_edit_a_field_is_caught_at_that_row(db: Path) -> None:
    write_rows(db, 10)
    raw(db).execute("UPDATE decisions SET verdict = 'allow' WHERE id = 4")
    result = verify(db)
    assert not result.ok
    assert result.first_bad_id == 4
    assert "altered" in result.reason
    assert result.rows == 10


@pytest.mark.parametrize(("column", "value"), [
    ("time", 7.5), ("run_id", "other-run"), ("layer", "dns"), ("reason", "looked fine"),
    ("host", "other.test"), ("port", 8443), ("path", None), ("bytes_out", 7),
    ("extra", "{}"), ("prev_hash", GENESIS_HASH)])
def test_attack_edit_any_column_is_caught(db: Path, column: str, value: object) -> None:
    write_rows(db, 5)
    raw(db).execute(f"UPDATE decisions SET {column} = ? WHERE id = 3", (value,))  # noqa: S608
    assert verify(db).first_bad_id == 3


def test_attack_edit_and_rehash_is_caught_at_the_next_row(db: Path) -> None:
    write_rows(db, 6)
    conn = raw(db)
    conn.execute("UPDATE decisions SET verdict = 'allow' WHERE id = 2")
    with open_reader(db) as reader:
        row = reader.rows(AuditQuery(after_id=1, until_id=2))[0]
    conn.execute("UPDATE decisions SET hash = ? WHERE id = 2",
                 (row_hash(row.prev_hash, row.values()),))
    result = verify(db)
    assert result.first_bad_id == 3
    assert "does not link to row 2" in result.reason


def test_attack_delete_a_row_is_caught_at_the_gap(db: Path) -> None:
    write_rows(db, 10)
    raw(db).execute("DELETE FROM decisions WHERE id = 5")
    result = verify(db)
    assert result.first_bad_id == 6
    assert "5..5 were deleted" in result.reason
    assert result.rows == 9


def test_attack_delete_the_first_row(db: Path) -> None:
    write_rows(db, 3)
    raw(db).execute("DELETE FROM decisions WHERE id = 1")
    assert verify(db).first_bad_id == 2


def test_attack_delete_and_renumber_is_caught(db: Path) -> None:
    write_rows(db, 10)
    conn = raw(db)
    conn.execute("DELETE FROM decisions WHERE id = 5")
    conn.execute("UPDATE decisions SET id = id - 1 WHERE id > 5")
    result = verify(db)
    assert result.first_bad_id == 5
    assert not result.ok


def test_attack_insert_a_forged_row_in_the_middle(db: Path) -> None:
    """The forger knows the scheme: the forged row itself hashes right, its successor can't."""
    write_rows(db, 6)
    conn = raw(db)
    conn.execute("UPDATE decisions SET id = -id WHERE id > 3")  # shift rows 4..6 up by one
    conn.execute("UPDATE decisions SET id = -id + 1 WHERE id < 0")
    with open_reader(db) as reader:
        template = reader.rows(AuditQuery(after_id=2, until_id=3))[0]
    values = (4, *template.values()[1:])
    forged = row_hash(template.hash, values)
    conn.execute(f"INSERT INTO decisions (id, {COLUMNS_BUT_ID}) VALUES "  # noqa: S608
                 f"({', '.join('?' * 20)})", (*values, template.hash, forged))
    result = verify(db)
    assert result.first_bad_id == 5
    assert result.rows == 7


def test_attack_insert_before_the_first_row(db: Path) -> None:
    write_rows(db, 3)
    conn = raw(db)
    conn.execute(f"INSERT INTO decisions (id, {COLUMNS_BUT_ID}) "  # noqa: S608
                 f"SELECT 0, {COLUMNS_BUT_ID} FROM decisions WHERE id = 1")
    result = verify(db)
    assert result.first_bad_id == 0
    assert "inserted" in result.reason


def test_attack_append_an_unchained_row(db: Path) -> None:
    write_rows(db, 3)
    raw(db).execute(f"INSERT INTO decisions (id, {COLUMNS_BUT_ID}) "  # noqa: S608
                    f"SELECT 4, {COLUMNS_BUT_ID} FROM decisions WHERE id = 2")
    assert verify(db).first_bad_id == 4


def test_attack_reorder_two_rows(db: Path) -> None:
    write_rows(db, 8)
    conn = raw(db)
    conn.execute("UPDATE decisions SET id = 100 WHERE id = 3")
    conn.execute("UPDATE decisions SET id = 3 WHERE id = 6")
    conn.execute("UPDATE decisions SET id = 6 WHERE id = 100")
    result = verify(db)
    assert result.first_bad_id == 3
    assert result.rows == 8


def test_attack_truncate_the_tail_needs_the_recorded_head(db: Path) -> None:
    write_rows(db, 10)
    head = verify(db).head
    raw(db).execute("DELETE FROM decisions WHERE id > 7")
    assert verify(db).ok  # a shorter chain is still a chain...
    result = verify(db, expect_head=head)
    assert not result.ok  # ...but the head recorded elsewhere is gone
    assert "removed from the end" in result.reason
    assert result.rows == 7


def test_expected_head_may_be_followed_by_new_rows(db: Path) -> None:
    write_rows(db, 4)
    head = verify(db).head
    write_rows(db, 3)
    result = verify(db, expect_head=head.upper())
    assert result.ok
    assert result.expected_head_id == 4
    assert "3 rows were added since" in result.reason
    assert verify(db, expect_head=GENESIS_HASH).ok


def test_two_logs_in_one_process_share_one_chain(db: Path) -> None:
    a = AuditLog(db, run_id="a", flush_interval=0.001, max_batch=3)
    b = AuditLog(db, run_id="b", flush_interval=0.001, max_batch=3)
    for i in range(200):
        (a if i % 2 else b).record(rec(extra={"seq": i}))
    a.close()
    b.close()
    result = verify(db)
    assert (result.ok, result.rows) == (True, 200)


CHILD = textwrap.dedent("""
    import sys
    from egresslock.audit import AuditLog, AuditRecord
    db, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with AuditLog(db, run_id=name, flush_interval=0.001, max_batch=7) as log:
        print("ready", flush=True)
        sys.stdin.readline()
        for i in range(n):
            log.record(AuditRecord(layer="http", verdict="allow", rule_id="r",
                                   reason="ok", extra={"seq": i}))
            if i % 50 == 0:
                log.flush()
""")


def test_two_processes_appending_at_once_keep_one_chain(db: Path) -> None:
    AuditLog(db).close()
    n = 600
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(db), name, str(n)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for name in ("p1", "p2")]
    for child in children:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
    for child in children:  # start both together
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    for child in children:
        assert child.wait(timeout=60) == 0
    result = verify(db)
    assert (result.ok, result.rows) == (True, 2 * n), result.reason
    with open_reader(db) as reader:
        rows = reader.rows(AuditQuery())
    runs = [r.run_id for r in rows]
    assert runs.count("p1") == runs.count("p2") == n
    assert any(a != b for a, b in itertools.pairwise(runs))  # they did interleave
