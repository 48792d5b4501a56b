"""Shared test helpers.

Tests that need root, namespaces or kernel features call :func:`require_sandbox`. On a machine
without them they skip with the reason; CI sets ``EGRESSLOCK_REQUIRE_SANDBOX=1``, which turns the
skip into a failure, so a CI run can never pass by skipping the tests that matter most.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_sandbox(available: bool, reason: str) -> None:
    """Skip (or, under EGRESSLOCK_REQUIRE_SANDBOX=1, fail) when a sandbox feature is missing."""
    if available:
        return
    if os.environ.get("EGRESSLOCK_REQUIRE_SANDBOX") == "1":
        pytest.fail(f"EGRESSLOCK_REQUIRE_SANDBOX=1 but {reason}")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """The path of a command-line tool the test drives; skip/fail as above when it is missing."""
    path = shutil.which(name)
    require_sandbox(path is not None, f"{name} is not installed (scripts/install.sh installs it)")
    assert path is not None
    return path
