"""SIGKILL under load: the database opens, verifies, and holds every row reported flushed.

Integration test: a real child process, a real kill, a real file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from egresslock.audit import AuditLog, AuditQuery, open_reader, verify
from tests.audit.helpers import rec, write_rows

# Two threads record steadily: one numbered stream whose progress the child reports after each
# flush(), and a noise stream so that batches mix and the writer stays busy.
VICTIM = textwrap.dedent("""
    import sys, threading, time
    from egresslock.audit import AuditLog, AuditRecord
    log = AuditLog(sys.argv[1], run_id="victim", flush_interval=0.05)

    def noise():
        n = 0
        while True:
            log.record(AuditRecord(layer="dns", verdict="deny", rule_id="default",
                                   reason="noise", host=f"n{n}.test"))
            n += 1
            if n % 10 == 0:
                time.sleep(0.001)

    threading.Thread(target=noise, daemon=True).start()
    i = 0
    while True:
        log.record(AuditRecord(layer="http", verdict="allow", rule_id="r", reason="ok",
                               extra={"seq": i}))
        i += 1
        if i % 150 == 0:
            log.flush()
            print(i, flush=True)  # rows 0 .. i-1 are committed
        if i % 10 == 0:
            time.sleep(0.001)
""")


@pytest.mark.integration
@pytest.mark.parametrize("delay", [0.0, 0.023, 0.137])
def test_sigkill_loses_nothing_that_was_flushed(db: Path, delay: float) -> None:
    write_rows(db, 5)  # an earlier run: the chain must continue through the crash
    child = subprocess.Popen([sys.executable, "-c", VICTIM, str(db)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout is not None
    reported = 0
    try:
        for line in child.stdout:
            reported = int(line)
            if reported >= 900:
                break
        time.sleep(delay)  # land the kill somewhere inside a batch
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    for line in child.stdout:  # reports printed before the kill landed
        reported = int(line)
    assert reported >= 900

    result = verify(db)
    assert result.ok, result.reason
    with open_reader(db) as reader:
        seqs = [r.as_dict()["extra"]["seq"]  # type: ignore[index]
                for r in reader.rows(AuditQuery(run_id="victim", layer="http"))]
    # One producer thread, committed in order: a prefix of the stream, each row once,
    # and at least everything the child saw flushed.
    assert seqs == list(range(len(seqs)))
    assert len(seqs) >= reported

    # The next run appends to the same chain as if nothing happened.
    with AuditLog(db) as log:
        log.record(rec())
    assert verify(db).ok



@pytest.mark.integration
def test_a_process_that_forgets_close_still_commits_at_exit(db: Path) -> None:
    script = textwrap.dedent("""
        import sys
        from egresslock.audit import AuditLog, AuditRecord
        log = AuditLog(sys.argv[1], flush_interval=60)
        for i in range(10):
            log.record(AuditRecord(layer="mcp", verdict="deny", rule_id="r", reason="x"))
    """)
    subprocess.run([sys.executable, "-c", script, str(db)], check=True, timeout=60)
    result = verify(db)
    assert (result.ok, result.rows) == (True, 10)
