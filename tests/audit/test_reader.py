"""Reading the log: --since values, filters, newest-last limits, following."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from egresslock.audit import AuditLog, AuditQuery, open_reader, parse_since
from egresslock.errors import AuditError
from tests.audit.helpers import rec

NOW = 1_716_286_530.0  # 2024-05-21T10:15:30Z


@pytest.mark.parametrize(("text", "expected"), [
    ("90s", NOW - 90),
    ("10m", NOW - 600),
    ("2h", NOW - 7200),
    ("1d", NOW - 86400),
    ("1w", NOW - 7 * 86400),
    ("1.5h", NOW - 5400),
    (" 10M ", NOW - 600),
    ("2024-05-21", datetime(2024, 5, 21, tzinfo=UTC).timestamp()),
    ("2024-05-21T10:00:00Z", NOW - 930),
    ("2024-05-21T10:00:00", NOW - 930),  # no offset: UTC, like the log
    ("2024-05-21T12:00:00+02:00", NOW - 930),
])
def test_since_accepts_durations_and_iso_times(text: str, expected: float) -> None:
    assert parse_since(text, now=NOW) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["yesterday", "10", "m", "-5m", "10 minutes", "2024-13-01", ""])
def test_since_refuses_anything_else_and_says_what_is_valid(text: str) -> None:
    with pytest.raises(ValueError, match=r"neither a duration .* nor an ISO-8601 time"):
        parse_since(text, now=NOW)


@pytest.fixture
def sample(db: Path) -> Path:
    rows = [
        rec(host="api.github.com", verdict="allow", layer="connect", time=NOW - 3600),
        rec(host="github.com", verdict="deny", time=NOW - 1800),
        rec(host="evil-github.com", verdict="deny", time=NOW - 60),
        rec(host="a.b.github.com", verdict="report", layer="http", time=NOW - 30),
        rec(host=None, address="8.8.8.8", verdict="deny", layer="drop", protocol="udp",
            time=NOW - 10),
    ]
    with AuditLog(db, run_id="r1") as log:
        for r in rows[:3]:
            log.record(r)
    with AuditLog(db, run_id="r2") as log:
        for r in rows[3:]:
            log.record(r)
    return db


def hosts(db: Path, **query: object) -> list[str | None]:
    with open_reader(db) as reader:
        return [r.host for r in reader.rows(AuditQuery(**query))]  # type: ignore[arg-type]


def test_host_matches_exactly_or_as_a_subdomain_pattern(sample: Path) -> None:
    assert hosts(sample, host="github.com") == ["github.com"]
    assert hosts(sample, host="GitHub.com.") == ["github.com"]
    # '*.github.com' means subdomains: never the apex, never a look-alike suffix.
    assert hosts(sample, host="*.github.com") == ["api.github.com", "a.b.github.com"]
    assert hosts(sample, host="*.hub.com") == []


def test_filters_combine(sample: Path) -> None:
    assert hosts(sample, verdict="deny") == ["github.com", "evil-github.com", None]
    assert hosts(sample, verdict="deny", layer="drop") == [None]
    assert hosts(sample, run_id="r2") == ["a.b.github.com", None]
    assert hosts(sample, since=NOW - 100) == ["evil-github.com", "a.b.github.com", None]
    assert hosts(sample, run_id="nope") == []


def test_limit_keeps_the_newest_and_prints_them_oldest_first(sample: Path) -> None:
    assert hosts(sample, limit=2) == ["a.b.github.com", None]
    with open_reader(sample) as reader:
        assert reader.count(AuditQuery(limit=2)) == 5
        assert reader.count(AuditQuery(verdict="deny")) == 3


def test_follow_yields_existing_then_new_rows(db: Path) -> None:
    with AuditLog(db, flush_interval=0.001) as log:
        log.record(rec(path="/old"))
        log.flush()
        with open_reader(db) as reader:
            rows = reader.follow(AuditQuery(verdict="deny"), interval=0.01)
            assert next(rows).path == "/old"
            log.record(rec(path="/skipped", verdict="allow"))
            log.record(rec(path="/new"))
            log.flush()
            assert next(rows).path == "/new"


def test_follow_with_a_limit_starts_at_the_newest(db: Path) -> None:
    with AuditLog(db) as log:
        for i in range(5):
            log.record(rec(path=f"/{i}"))
    with open_reader(db) as reader:
        rows = reader.follow(AuditQuery(limit=2), interval=0.01)
        assert [next(rows).path, next(rows).path] == ["/3", "/4"]


def test_a_reader_never_creates_a_database(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(AuditError, match="no audit database at"):
        open_reader(missing)
    assert not missing.exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(AuditError, match="not an egresslock audit log"):
        open_reader(empty)
