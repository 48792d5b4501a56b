"""``egresslock mcp`` as a command: usage errors before anything runs, and its exit codes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from egresslock.cli.mcp_cmd import _Outcome
from tests.conftest import require_sandbox
from tests.sandbox.world import EGRESSLOCK

POLICY = "version: 1\nmcp:\n  tools:\n    - {name: a}\n"


def _mcp(tmp_path: Path, policy: str, *args: str, stdin: str = "",
         ) -> subprocess.CompletedProcess[str]:
    (tmp_path / "p.yaml").write_text(policy)
    return subprocess.run([EGRESSLOCK, "mcp", "-p", str(tmp_path / "p.yaml"), "--audit",
                           str(tmp_path / "audit.db"), *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


def test_an_invalid_arguments_schema_stops_the_command_before_it_runs(tmp_path: Path) -> None:
    done = _mcp(tmp_path, POLICY.replace("{name: a}", "{name: a, arguments: {type: 12}}"),
                "--", "touch", str(tmp_path / "ran"))
    assert done.returncode == 2
    assert "mcp.tools[0].arguments: not a valid JSON Schema (2020-12)" in done.stderr
    assert not (tmp_path / "ran").exists()


def test_a_bad_listen_address_is_a_usage_error(tmp_path: Path) -> None:
    done = _mcp(tmp_path, POLICY, "--listen", "nowhere", "--", "true")
    assert done.returncode == 2
    assert "must be HOST:PORT" in done.stderr


@pytest.mark.parametrize(("sentence", "outcome", "code"), [
    ("the agent closed its end", _Outcome(agent_ended=True, server=0, initialized=True), 0),
    ("the agent closed its end and the server had to be ended",
     _Outcome(agent_ended=True, initialized=True), 0),
    ("the server exited on its own with an error", _Outcome(server=3, initialized=True), 3),
    ("the server exited 0 on its own", _Outcome(server=0, initialized=True), 0),
    ("the server exited 0 before it was initialized",
     _Outcome(agent_ended=True, failed=True, server=0), 1),
    ("the server failed with its own code", _Outcome(agent_ended=True, failed=True, server=4), 4),
    ("a signal ended the session", _Outcome(signal=15, server=0, initialized=True), 143),
])
def test_exit_codes(sentence: str, outcome: _Outcome, code: int) -> None:
    assert outcome.code() == code, sentence


@pytest.mark.sandbox
@pytest.mark.parametrize(("server", "code"), [("exit 3", 3), ("exit 0", 1)])
def test_a_server_that_never_initializes_ends_the_session(tmp_path: Path, server: str,
                                                          code: int) -> None:
    require_sandbox(os.geteuid() == 0, "the sandbox tests run as root")
    tmp_path.chmod(0o777)
    done = _mcp(tmp_path, POLICY, "-q", "--", "sh", "-c", server)
    assert done.returncode == code, done.stderr
    assert (f"egresslock: the MCP server exited with code {server.split()[1]} before it "
            "answered initialize" in done.stderr
            or "egresslock: the MCP gateway stopped: Connection closed" in done.stderr), done
