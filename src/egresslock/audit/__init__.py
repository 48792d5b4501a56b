"""The audit log: one SQLite database, one row per decision of every layer, hash-chained.

Every enforcement point (http, connect, tls, dns, drop, sanitize, courier, mcp; flow for the
session's mark) hands its decisions to :meth:`AuditLog.record`, allow and deny alike. The call only
enqueues; a writer thread commits batches to a database in WAL mode, and readers (``egresslock
audit``) query it while the proxy runs. Modules:

- :mod:`~egresslock.audit.record`  the row (``AuditRecord`` in, ``AuditRow`` stored), the chain hash
- :mod:`~egresslock.audit.schema`  the file: path, schema version, pragmas, connections
- :mod:`~egresslock.audit.writer`  ``AuditLog``: queue, batching, errors, the loss bound
- :mod:`~egresslock.audit.process`  ``ProcessAuditLog``: the same writer in a child process
- :mod:`~egresslock.audit.reader`  filters, listing, following
- :mod:`~egresslock.audit.verify`  walking the chain

Loss bound: a committed row survives SIGKILL of the process (only power loss can undo the last
transactions, ``synchronous=NORMAL``). SIGKILL loses only rows not yet committed: while the writer
keeps up, those recorded in the last ``flush_interval`` (default 0.05 s) plus one commit, at most
``max_batch`` (default 512) rows. :meth:`AuditLog.flush` waits until everything recorded before
it is committed. Details in :mod:`egresslock.audit.writer` and ``docs/audit.md``.

Example::

    with AuditLog(default_db_path()) as audit:
        audit.record(AuditRecord(layer="http", verdict="deny", rule_id="default",
                                 reason="no rule matched", method="POST", host="evil.test",
                                 port=443, path="/upload"))
"""

from __future__ import annotations

from egresslock.audit.reader import AuditQuery, AuditReader, open_reader, parse_since
from egresslock.audit.record import GENESIS_HASH, LAYERS, VERDICTS, AuditRecord, AuditRow
from egresslock.audit.schema import SCHEMA_VERSION, default_db_path
from egresslock.audit.verify import VerifyResult, verify
from egresslock.audit.writer import (
    AuditLog,
    AuditStats,
    RowsNotWritten,
    Sink,
    json_lines_sink,
    new_run_id,
)

__all__ = [
    "GENESIS_HASH",
    "LAYERS",
    "SCHEMA_VERSION",
    "VERDICTS",
    "AuditLog",
    "AuditQuery",
    "AuditReader",
    "AuditRecord",
    "AuditRow",
    "AuditStats",
    "RowsNotWritten",
    "Sink",
    "VerifyResult",
    "default_db_path",
    "json_lines_sink",
    "new_run_id",
    "open_reader",
    "parse_since",
    "verify",
]
