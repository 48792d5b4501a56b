"""Reading the audit log: filters, newest-last listing, following a live log.

Readers open the database read-only; under WAL they never block the writer and each query sees
one committed snapshot. Rows are ordered by id, which is commit order across every process that
appends to the file (``time`` is each layer's clock and may step backwards).
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from egresslock.audit.record import AuditRow
from egresslock.audit.schema import COLUMNS, TABLE, open_for_reading
from egresslock.errors import AuditError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float | None:
    """Seconds in a duration (``90s``, ``10m``, ``2h``, ``1d``, ``1w``), or None if ``text`` is
    not one."""
    match = _DURATION.match(text)
    return float(match.group(1)) * _UNITS[match.group(2).lower()] if match else None


def parse_since(text: str, now: float | None = None) -> float:
    """A ``--since`` value as a unix time: a duration back from ``now`` (``90s``, ``10m``, ``2h``,
    ``1d``, ``1w``) or an ISO-8601 date or time (``2024-05-21``, ``2024-05-21T10:00:00+02:00``);
    an ISO time without an offset is UTC, like the log. Raises ``ValueError`` naming the value
    and what would be valid."""
    amount = parse_duration(text)
    if amount is not None:
        return (time.time() if now is None else now) - amount
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration (a number and s, m, h, d or w: 10m, "
                         f"2h, 1d) nor an ISO-8601 time (2024-05-21, 2024-05-21T10:00:00Z)"
                         ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """Which rows to read. ``host`` is an exact host or ``*.example.com`` (subdomains only, as in
    a policy); ``since`` a unix time; only ids in (``after_id``, ``until_id``] are read;
    ``limit`` keeps the newest that many rows (``None``: all)."""

    verdict: str | None = None
    host: str | None = None
    layer: str | None = None
    run_id: str | None = None
    since: float | None = None
    after_id: int = 0
    until_id: int | None = None
    limit: int | None = None

    def where(self) -> tuple[str, list[object]]:
        """The SQL condition and its parameters."""
        conds: list[str] = ["id > ?"]
        params: list[object] = [self.after_id]
        if self.until_id is not None:
            conds.append("id <= ?")
            params.append(self.until_id)
        for column, value in (("verdict", self.verdict), ("layer", self.layer),
                              ("run_id", self.run_id)):
            if value is not None:
                conds.append(f"{column} = ?")
                params.append(value)
        if self.since is not None:
            conds.append("time >= ?")
            params.append(self.since)
        if self.host is not None:
            host = self.host.strip().lower().rstrip(".")
            if host.startswith("*."):
                suffix = host[1:]  # ".example.com": a strict subdomain, never the apex
                conds.append("(length(host) > ? AND substr(host, -?) = ?)")
                params += [len(suffix), len(suffix), suffix]
            else:
                conds.append("host = ?")
                params.append(host)
        return " AND ".join(conds), params


class AuditReader:
    """A read-only view of one audit database. Use :func:`open_reader`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = open_for_reading(path)

    def rows(self, query: AuditQuery) -> list[AuditRow]:
        """The rows matching ``query``, oldest first (the newest ``limit`` if one is set)."""
        return list(self.iter_rows(query))

    def iter_rows(self, query: AuditQuery) -> Iterator[AuditRow]:
        """As :meth:`rows`, streamed: a whole log need not fit in memory."""
        where, params = query.where()
        # S608: table and columns are constants of this package; every value is a bound parameter.
        sql = f"SELECT {', '.join(COLUMNS)} FROM {TABLE} WHERE {where} ORDER BY id"  # noqa: S608
        if query.limit is not None:
            sql = (f"SELECT * FROM (SELECT {', '.join(COLUMNS)} FROM {TABLE} "  # noqa: S608
                   f"WHERE {where} ORDER BY id DESC LIMIT ?) ORDER BY id")
            params = [*params, query.limit]
        try:
            for r in self._conn.execute(sql, params):
                yield AuditRow(*r)
        except sqlite3.Error as exc:
            raise AuditError(f"cannot read the audit database {self.path}: {exc}") from exc

    def count(self, query: AuditQuery) -> int:
        """How many rows match ``query``, ignoring its limit."""
        where, params = query.where()
        result = self._execute(f"SELECT count(*) FROM {TABLE} WHERE {where}",  # noqa: S608
                               params)
        return int(result[0][0])

    def follow(self, query: AuditQuery, interval: float = 0.5) -> Iterator[AuditRow]:
        """Rows matching ``query``, then every matching row committed later, polling every
        ``interval`` seconds; never ends on its own."""
        # Each poll reads the rows in (top, new_top], new_top read first: ids are given out under
        # the write lock and become visible in order, so no row is skipped or read twice, and a
        # poll never rescans rows older than the previous one.
        top = self._max_id()
        batch = replace(query, until_id=top)
        while True:
            yield from self.rows(batch)
            time.sleep(interval)
            new_top = self._max_id()
            batch = replace(query, after_id=max(top, query.after_id), until_id=new_top,
                            limit=None)
            top = new_top

    def _max_id(self) -> int:
        sql = f"SELECT coalesce(max(id), 0) FROM {TABLE}"  # noqa: S608
        return int(self._execute(sql, [])[0][0])

    def _execute(self, sql: str, params: list[object]) -> list[Any]:
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise AuditError(f"cannot read the audit database {self.path}: {exc}") from exc

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> AuditReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def open_reader(path: str | Path) -> AuditReader:
    """Open the audit database at ``path`` read-only; :class:`AuditError` says why it cannot be
    (missing, not an audit log, written by a newer egresslock)."""
    return AuditReader(Path(path))
