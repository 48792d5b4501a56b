"""Fixtures for the courier's integration tests: the test world, with an optional probe.

``courier_world`` runs one scenario like ``tests/sandbox/conftest.py``'s ``world`` does, through
:mod:`tests.courier.probe_world`, so that root can look at the courier's worker while the agent
waits (see that module). The working directory is made outside the directories every sandbox
hides (/tmp, /run...), so that what hides it from the worker is the courier's own mount plan,
not the sandbox's defaults.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.conftest import require_sandbox, require_tool
from tests.sandbox.conftest import WorldRun, _world_available

ROOT = Path(__file__).resolve().parents[2]


class CourierWorld(Protocol):
    def __call__(self, command: list[str], **scenario: Any) -> WorldRun: ...


def make_visible_workdir() -> Path:
    """A working directory for the agent (uid 65534) outside every hidden directory."""
    base = Path("/srv") if Path("/srv").is_dir() else Path("/opt")
    path = Path(tempfile.mkdtemp(prefix="egresslock-courier-", dir=base))
    path.chmod(0o777)
    return path


@pytest.fixture
def courier_world() -> Iterator[CourierWorld]:
    ok, reason = _world_available()
    require_sandbox(ok, reason)
    require_tool("unshare")
    made: list[Path] = []

    def run(command: list[str], **scenario: Any) -> WorldRun:
        workdir = scenario.pop("workdir", None) or make_visible_workdir()
        made.append(workdir)
        scenario_file = workdir / ".scenario.json"
        extra = os.environ.get("EGRESSLOCK_WORLD_ARGS", "").split()
        scenario["args"] = [*extra, *scenario.get("args", [])]
        scenario_file.write_text(json.dumps({**scenario, "command": command,
                                             "workdir": str(workdir)}))
        timeout = float(scenario.get("timeout", 30)) + 30
        done = subprocess.run(
            ["unshare", "--net", "--mount", "--", sys.executable, "-m",
             "tests.courier.probe_world", str(scenario_file)],
            cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0 or not done.stdout.strip():
            raise AssertionError(f"the test world failed ({done.returncode}):\n{done.stderr}")
        raw = json.loads(done.stdout.strip().splitlines()[-1])
        return WorldRun(exit=raw["exit"], stdout=raw["stdout"], stderr=raw["stderr"],
                        summary=raw["summary"], audit=raw["audit"], attacker=raw["attacker"],
                        upstream=raw["upstream"], workdir=workdir, raw=raw)

    yield run
    for path in made:
        shutil.rmtree(path, ignore_errors=True)
