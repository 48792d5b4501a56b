"""Fixtures for the courier's integration tests: the test world, with an optional probe.

``courier_world`` runs one scenario like ``tests/sandbox/conftest.py``'s ``world`` does, through
:mod:`tests.courier.probe_world`, so that root can look at the courier's worker while the agent
waits (see that module). The working directory is made outside the directories every sandbox
hides (/tmp, /run...), so that what hides it from the worker is the courier's own mount plan,
not the sandbox's defaults.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.sandbox.conftest import WorldRun, world_runner

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
    yield from world_runner("tests.courier.probe_world", make_visible_workdir)
