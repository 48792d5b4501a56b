"""Shared helpers of the audit tests: real SQLite files in ``tmp_path``, real subprocesses."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from egresslock.audit import AuditLog, AuditRecord


def rec(**fields: object) -> AuditRecord:
    """A record with plausible defaults; any field can be overridden."""
    base: dict[str, object] = {"layer": "http", "verdict": "deny", "rule_id": "default",
                               "reason": "no rule matched", "method": "POST",
                               "host": "evil.test", "port": 443, "path": "/upload"}
    base.update(fields)
    return AuditRecord(**base)  # type: ignore[arg-type]


def write_rows(db: Path, n: int, **fields: object) -> str:
    """Append ``n`` rows (``extra={"seq": i}``) in one run; returns the run id."""
    with AuditLog(db) as log:
        for i in range(n):
            log.record(rec(**{"extra": {"seq": i}, **fields}))
    return log.run_id


def raw(db: Path) -> sqlite3.Connection:
    """A plain read-write connection, as an attacker (or a test) editing the file would use."""
    return sqlite3.connect(db, isolation_level=None)


def egresslock(*args: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m egresslock ARGS`` as a user would."""
    return subprocess.run([sys.executable, "-m", "egresslock", *args], capture_output=True,
                          text=True, timeout=timeout, check=False,
                          env={**os.environ, **(env or {})})


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not finished (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(") ", 1)[1][0] != "Z"


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has finished; whether it did within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
