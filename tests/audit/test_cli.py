"""``egresslock audit`` and ``egresslock audit verify``, run as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from egresslock.audit import LAYERS, VERDICTS, AuditLog, verify
from egresslock.cli.audit_cmd import LAYER_CHOICES, VERDICT_CHOICES
from tests.audit.helpers import egresslock, raw, rec, write_rows

pytestmark = pytest.mark.integration


@pytest.fixture
def sample(db: Path) -> Path:
    now = time.time()
    with AuditLog(db, run_id="run-a") as log:
        log.record(rec(verdict="allow", layer="connect", method="CONNECT", host="api.github.com",
                       path=None, rule_id="github-read", reason="allowed by rule github-read",
                       time=now - 7200))
        log.record(rec(time=now - 60))
    with AuditLog(db, run_id="run-b") as log:
        log.record(rec(verdict="report", host="uploads.github.com", rule_id="github-read",
                       reason="would deny: method POST not allowed", time=now - 30))
        log.record(rec(layer="drop", verdict="deny", method=None, host=None, path=None,
                       address="8.8.8.8", port=53, protocol="udp", reason="udp is not proxied",
                       time=now - 5))
    return db


def test_the_cli_offers_exactly_the_layers_and_verdicts_the_log_accepts() -> None:
    assert set(LAYER_CHOICES) == LAYERS
    assert set(VERDICT_CHOICES) == VERDICTS


def test_lists_one_aligned_line_per_row_newest_last(sample: Path) -> None:
    r = egresslock("audit", "--db", str(sample))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 4
    assert "ALLOW" in lines[0]
    assert "CONNECT api.github.com:443" in lines[0]
    assert "github-read" in lines[0]
    assert "allowed by rule github-read" in lines[0]
    assert "DENY" in lines[1]
    assert "POST evil.test:443 /upload" in lines[1]
    assert "UDP 8.8.8.8:53" in lines[3]
    assert lines[0].index("github-read") == lines[3].index("default")  # aligned columns
    assert lines[0][:4].isdigit()
    assert lines[0][23] == "Z"


def test_json_lines(sample: Path) -> None:
    r = egresslock("audit", "--db", str(sample), "--json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["id"] for row in rows] == [1, 2, 3, 4]
    assert rows[3]["protocol"] == "udp"
    assert rows[3]["address"] == "8.8.8.8"
    assert {"time", "run_id", "layer", "verdict", "rule_id", "reason", "method", "host", "port",
            "path", "bytes_out", "bytes_in", "pid", "uid", "extra", "hash", "prev_hash"} <= set(
        rows[0])


@pytest.mark.parametrize(("args", "ids"), [
    (["--verdict", "deny"], [2, 4]),
    (["--verdict", "report"], [3]),
    (["--layer", "drop"], [4]),
    (["--host", "api.github.com"], [1]),
    (["--host", "*.github.com"], [1, 3]),
    (["--run", "run-b"], [3, 4]),
    (["--since", "10m"], [2, 3, 4]),
    (["--since", "45s"], [3, 4]),
    (["--since", "2000-01-01T00:00:00Z"], [1, 2, 3, 4]),
    (["--since", "1h", "--verdict", "deny"], [2, 4]),
    (["--limit", "2"], [3, 4]),
    (["--limit", "0"], [1, 2, 3, 4]),
])
def test_filters(sample: Path, args: list[str], ids: list[int]) -> None:
    r = egresslock("audit", "--db", str(sample), "--json", *args)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == ids


def test_says_when_rows_are_left_out_or_none_match(sample: Path) -> None:
    r = egresslock("audit", "--db", str(sample), "--limit", "1")
    assert "the newest 1 of 4 matching rows; --limit 0 shows all" in r.stderr
    r = egresslock("audit", "--db", str(sample), "--host", "nowhere.test")
    assert (r.returncode, r.stdout) == (0, "")
    assert "no matching rows" in r.stderr


def test_default_path_follows_the_environment(tmp_path: Path) -> None:
    state = tmp_path / "xdg"
    write_rows(state / "egresslock" / "audit.db", 2)
    r = egresslock("audit", env={"EGRESSLOCK_AUDIT": "", "XDG_STATE_HOME": str(state)})
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2
    explicit = tmp_path / "explicit.db"
    write_rows(explicit, 3)
    r = egresslock("audit", env={"EGRESSLOCK_AUDIT": str(explicit),
                                 "XDG_STATE_HOME": str(state)})
    assert len(r.stdout.splitlines()) == 3


@pytest.mark.parametrize(("args", "says"), [
    (["--since", "yesterday"], ["'yesterday'", "10m", "ISO-8601"]),
    (["--layer", "smtp"], ["'smtp'", "http", "drop"]),
    (["--verdict", "block"], ["'block'", "allow"]),
    (["--host", "*"], ["'*'", "*.example.com"]),
    (["--host", "api.*.com"], ["'api.*.com'"]),
    (["--limit", "-1"], ["-1"]),
])
def test_usage_errors_name_the_value_and_what_is_valid(sample: Path, args: list[str],
                                                       says: list[str]) -> None:
    r = egresslock("audit", "--db", str(sample), *args)
    assert r.returncode == 2
    for word in says:
        assert word in r.stderr


def test_a_missing_database_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    for args in (["audit"], ["audit", "verify"]):
        r = egresslock(*args, "--db", str(missing))
        assert r.returncode == 2
        assert str(missing) in r.stderr
        assert "EGRESSLOCK_AUDIT" in r.stderr
    assert not missing.exists()


def test_verify_intact_prints_rows_and_head(sample: Path) -> None:
    r = egresslock("audit", "verify", "--db", str(sample))
    assert r.returncode == 0, r.stderr
    assert "intact" in r.stdout
    assert "rows:   4" in r.stdout
    assert f"head:   {verify(sample).head}" in r.stdout
    # --db given to the group works too
    assert egresslock("audit", "--db", str(sample), "verify").returncode == 0


def test_verify_json(sample: Path) -> None:
    r = egresslock("audit", "verify", "--db", str(sample), "--json")
    assert r.returncode == 0
    result = json.loads(r.stdout)
    assert (result["ok"], result["rows"], result["first_bad_id"]) == (True, 4, None)
    assert result["head"] == verify(sample).head


def test_verify_reports_the_first_broken_row_and_exits_1(sample: Path) -> None:
    raw(sample).execute("UPDATE decisions SET verdict = 'allow' WHERE id = 3")
    r = egresslock("audit", "verify", "--db", str(sample))
    assert r.returncode == 1
    assert "BROKEN" in r.stdout
    assert "first bad row: 3" in r.stdout
    assert "row 3 was altered" in r.stdout
    r = egresslock("audit", "verify", "--db", str(sample), "--json")
    assert (r.returncode, json.loads(r.stdout)["first_bad_id"]) == (1, 3)


def test_verify_expect_head_detects_truncation(sample: Path) -> None:
    head = verify(sample).head
    assert egresslock("audit", "verify", "--db", str(sample),
                      "--expect-head", head).returncode == 0
    raw(sample).execute("DELETE FROM decisions WHERE id = 4")
    assert egresslock("audit", "verify", "--db", str(sample)).returncode == 0
    r = egresslock("audit", "verify", "--db", str(sample), "--expect-head", head)
    assert r.returncode == 1
    assert "removed from the end" in r.stdout
    r = egresslock("audit", "verify", "--db", str(sample), "--expect-head", "abc123")
    assert r.returncode == 2
    assert "64 hex digits" in r.stderr


def _lines(stream: object) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_follow_prints_new_rows_until_stopped(sample: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "egresslock", "audit", "--db", str(sample), "--follow",
         "--json", "--verdict", "deny", "--interval", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = _lines(proc.stdout)
        assert [json.loads(lines.get(timeout=20))["id"] for _ in range(2)] == [2, 4]
        with AuditLog(sample, run_id="run-c") as log:
            log.record(rec(verdict="allow", path="/not-shown"))
            log.record(rec(path="/new"))
        new = json.loads(lines.get(timeout=20))
        assert (new["path"], new["run_id"]) == ("/new", "run-c")
        assert lines.empty()
        assert proc.poll() is None  # still following
    finally:
        proc.terminate()
        proc.wait(timeout=10)
