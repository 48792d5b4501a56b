"""Fixtures of the audit tests: a database path in ``tmp_path`` and an open log on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from egresslock.audit import AuditLog


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "audit.db"


@pytest.fixture
def log(db: Path) -> Iterator[AuditLog]:
    with AuditLog(db, flush_interval=0.01) as audit:
        yield audit
