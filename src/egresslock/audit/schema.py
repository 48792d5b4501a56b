"""The audit database on disk: where it lives, its schema, and how connections are opened.

One table, ``decisions``, one row per decision. ``PRAGMA user_version`` holds the schema version;
a database written by a newer egresslock is refused rather than misread. The database runs in WAL
mode with ``synchronous=NORMAL``: a commit is durable against a crash of the process (the WAL is
in the OS page cache and survives SIGKILL), and only a power loss or kernel crash can lose the
transactions committed since the last checkpoint (https://www.sqlite.org/wal.html, "Durability").
WAL also lets readers (``egresslock audit``) read while the proxy writes.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from egresslock.errors import AuditError

SCHEMA_VERSION = 1
TABLE = "decisions"

_DDL = (
    f"""CREATE TABLE {TABLE} (
        id        INTEGER PRIMARY KEY,
        time      REAL    NOT NULL,
        run_id    TEXT    NOT NULL,
        layer     TEXT    NOT NULL,
        verdict   TEXT    NOT NULL,
        rule_id   TEXT    NOT NULL,
        reason    TEXT    NOT NULL,
        method    TEXT,
        host      TEXT,
        port      INTEGER,
        path      TEXT,
        address   TEXT,
        bytes_out INTEGER NOT NULL DEFAULT 0,
        bytes_in  INTEGER NOT NULL DEFAULT 0,
        pid       INTEGER,
        uid       INTEGER,
        protocol  TEXT,
        extra     TEXT,
        prev_hash TEXT    NOT NULL,
        hash      TEXT    NOT NULL
    )""",
    f"CREATE INDEX {TABLE}_time ON {TABLE} (time)",
    f"CREATE INDEX {TABLE}_verdict ON {TABLE} (verdict)",
    f"CREATE INDEX {TABLE}_host ON {TABLE} (host)",
    f"CREATE INDEX {TABLE}_run_id ON {TABLE} (run_id)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

# Every column in table order, for SELECTs that build an AuditRow.
COLUMNS = (
    "id", "time", "run_id", "layer", "verdict", "rule_id", "reason", "method", "host", "port",
    "path", "address", "bytes_out", "bytes_in", "pid", "uid", "protocol", "extra",
    "prev_hash", "hash",
)


def default_db_path(env: Mapping[str, str] | None = None) -> Path:
    """``$EGRESSLOCK_AUDIT`` if set, else ``$XDG_STATE_HOME/egresslock/audit.db`` (the XDG base
    directory spec: a relative ``XDG_STATE_HOME`` is ignored), else
    ``~/.local/state/egresslock/audit.db``."""
    env = os.environ if env is None else env
    if env.get("EGRESSLOCK_AUDIT"):
        return Path(env["EGRESSLOCK_AUDIT"]).expanduser()
    state = env.get("XDG_STATE_HOME", "")
    base = Path(state) if state and Path(state).is_absolute() else Path.home() / ".local/state"
    return base / "egresslock" / "audit.db"


def open_for_writing(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """A connection for the writer thread, with the schema created or checked.

    ``isolation_level=None``: the writer issues ``BEGIN IMMEDIATE`` itself, so that the last
    hash is read under the write lock (two processes appending must not fork the chain).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None,
                               check_same_thread=False)
    except (OSError, sqlite3.Error) as exc:
        raise AuditError(f"cannot open the audit database {path}: {exc}") from exc
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise AuditError(f"the audit database {path} cannot use WAL mode (SQLite chose "
                             f"{mode!r}); put it on a local filesystem")
        conn.execute("PRAGMA synchronous=NORMAL")
        _ensure_schema(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise AuditError(f"cannot use the audit database {path}: {exc}") from exc
    except AuditError:
        conn.close()
        raise
    return conn


def _ensure_schema(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute("BEGIN IMMEDIATE")  # two processes creating one new file must not race
    try:
        _check_version(conn, path, creating=True)
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            for statement in _DDL:
                conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _check_version(conn: sqlite3.Connection, path: Path, *, creating: bool) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise AuditError(f"{path} has audit schema version {version}; this egresslock reads "
                         f"versions up to {SCHEMA_VERSION}: upgrade egresslock")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if version == 0 and tables and not creating:
        raise AuditError(f"{path} is an SQLite database but not an egresslock audit log "
                         f"(tables: {', '.join(sorted(tables))})")
    if version == 0 and tables - {TABLE} and creating:
        raise AuditError(f"{path} is an SQLite database of something else (tables: "
                         f"{', '.join(sorted(tables))}); choose another audit path")
    if version == 0 and not creating:
        raise AuditError(f"{path} is an empty database, not an egresslock audit log yet")


def open_for_reading(path: Path) -> sqlite3.Connection:
    """A read-only connection to an existing audit database; never creates a file."""
    if not path.exists():
        raise AuditError(f"no audit database at {path}; pass --db PATH or set EGRESSLOCK_AUDIT "
                         f"(it is created by the first run that records a decision)")
    if path.is_dir():
        raise AuditError(f"{path} is a directory; --db wants the audit database file")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                               isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise AuditError(f"cannot read the audit database {path}: {exc}") from exc
    try:
        _check_version(conn, path, creating=False)
    except sqlite3.Error as exc:
        conn.close()
        raise AuditError(f"cannot read the audit database {path}: {exc}") from exc
    except AuditError:
        conn.close()
        raise
    return conn
