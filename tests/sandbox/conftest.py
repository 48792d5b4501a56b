"""Fixtures for the ``egresslock run`` integration tests: the test world (tests/sandbox/world.py).

``world`` runs one scenario in a fresh network + mount namespace that owns every address the test
uses, and returns a :class:`WorldRun`: the command's exit code and output, egresslock's summary,
the run's audit rows and what the attacker's servers, counters and the relay socket received.

These tests need root (the world adds addresses and nftables rules to its namespace; CI runs as
root). Elsewhere they skip, or fail under ``EGRESSLOCK_REQUIRE_SANDBOX=1``.

``EGRESSLOCK_WORLD_ARGS`` (space separated) adds options to every ``egresslock run`` the world
starts, e.g. ``--no-uvloop`` to tell an event-loop bug from a sandbox bug while debugging.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.conftest import require_sandbox, require_tool

ROOT = Path(__file__).resolve().parents[2]
ESCAPES = Path(__file__).resolve().parent / "escapes"
NOBODY = 65534
PYTHON = str(ROOT / ".venv" / "bin" / "python")  # the venv's: requests and httpx are there


@dataclass
class WorldRun:
    """What one ``egresslock run`` in the test world did and left behind."""

    exit: int
    stdout: str
    stderr: str
    summary: dict[str, Any] | None
    audit: list[dict[str, Any]]
    attacker: dict[str, Any]
    upstream: list[dict[str, Any]]
    workdir: Path
    raw: dict[str, Any] = field(repr=False)

    def rows(self, layer: str | None = None, verdict: str | None = None,
             **match: object) -> list[dict[str, Any]]:
        out = []
        for row in self.audit:
            if layer is not None and row.get("layer") != layer:
                continue
            if verdict is not None and row.get("verdict") != verdict:
                continue
            if all(row.get(k) == v for k, v in match.items()):
                out.append(row)
        return out

    def attacker_received(self) -> dict[str, Any]:
        """Everything any attacker server, counter or relay saw; empty means nothing got out."""
        seen: dict[str, Any] = {}
        for kind in ("tcp", "udp", "unix"):
            for key, entry in self.attacker.get(kind, {}).items():
                if entry["connections"] or entry["bytes"]:
                    seen[f"{kind} {key}"] = entry
        for name, packets in self.attacker.get("counters", {}).items():
            if packets:
                seen[f"nft counter {name}"] = packets
        return seen

    def assert_nothing_escaped(self) -> None:
        seen = self.attacker_received()
        assert not seen, f"the attacker received something: {seen}\n{self.describe()}"

    def json_stdout(self) -> dict[str, Any]:
        """The last JSON object the command printed (the escape scripts print one)."""
        for line in reversed(self.stdout.splitlines()):
            if line.startswith("{"):
                printed: dict[str, Any] = json.loads(line)
                return printed
        raise AssertionError(f"the command printed no JSON\n{self.describe()}")

    def describe(self) -> str:
        rows = "\n".join(f"  {r.get('layer')} {r.get('verdict')} {r.get('rule_id')} "
                         f"{r.get('host')}:{r.get('port')} {r.get('protocol')} "
                         f"{r.get('reason')}" for r in self.audit)
        return (f"exit {self.exit}\n--- stdout\n{self.stdout[-3000:]}\n--- stderr\n"
                f"{self.stderr[-3000:]}\n--- audit\n{rows}")


class World(Protocol):
    def __call__(self, command: list[str], **scenario: Any) -> WorldRun: ...


def _world_available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "the test world needs root (it configures its own network namespace)"
    for tool in ("unshare", "ip", "nft", "setpriv", "mount"):
        if shutil.which(tool) is None:
            return False, f"{tool} is not installed"
    return True, ""


def make_workdir() -> Path:
    """A working directory the command (uid 65534) can enter and write, under /tmp (hidden in
    the sandbox but carried through, as a user's checkout in /tmp would be)."""
    path = Path(tempfile.mkdtemp(prefix="egresslock-world-", dir="/tmp"))
    path.chmod(0o777)
    return path


def world_runner(module: str, make_dir: Callable[[], Path]
                 ) -> Iterator[Callable[..., WorldRun]]:
    """Run scenarios through the world script ``module`` (in a fresh network and mount
    namespace), each in a work directory from ``make_dir`` unless the scenario names one;
    the directories are removed at the end."""
    ok, reason = _world_available()
    require_sandbox(ok, reason)
    require_tool("unshare")
    made: list[Path] = []
    extra = os.environ.get("EGRESSLOCK_WORLD_ARGS", "").split()

    def run(command: list[str], **scenario: Any) -> WorldRun:
        workdir = scenario.pop("workdir", None) or make_dir()
        made.append(workdir)
        scenario_file = workdir / ".scenario.json"
        scenario["args"] = [*extra, *scenario.get("args", [])]
        scenario_file.write_text(json.dumps({**scenario, "command": command,
                                             "workdir": str(workdir)}))
        timeout = float(scenario.get("timeout", 30)) + 30
        done = subprocess.run(
            ["unshare", "--net", "--mount", "--", sys.executable, "-m", module,
             str(scenario_file)],
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


@pytest.fixture
def world() -> Iterator[World]:
    yield from world_runner("tests.sandbox.world", make_workdir)


def assert_warm(run: WorldRun) -> None:
    """The run went through the world's warm server, not the cold path."""
    warm = run.raw["warm"]
    assert warm["runs"] == 1, (warm, run.describe())
    if run.summary is not None:  # --json, which the world passes unless a test adds -q
        assert run.summary["start"] == "warm", run.summary
    assert warm["declined"] == 0, (warm, run.describe())


@pytest.fixture(params=["cold", "warm"])
def cold_or_warm(world: World, request: pytest.FixtureRequest) -> World:
    """The world, run once cold and once through a warm server (egresslock warm serve), which
    must behave exactly as the cold path does."""
    if request.param == "cold":
        def cold(command: list[str], **scenario: Any) -> WorldRun:
            done = world(command, **scenario)
            if done.summary is not None:
                assert done.summary["start"] == "cold", done.summary
            return done

        return cold

    def run(command: list[str], **scenario: Any) -> WorldRun:
        done = world(command, warm=True, **scenario)
        assert_warm(done)
        return done

    return run


def escape_command(script: str, *args: str) -> list[str]:
    """The argv that runs one escape script inside the sandbox."""
    return [PYTHON, str(ESCAPES / script), *args]
