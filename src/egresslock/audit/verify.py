"""Walk the hash chain of an audit database and say where, if anywhere, it breaks.

The walk checks three things of each row, in id order: that ids run 1, 2, 3... without a gap or
an intruder (a deleted row leaves a gap; a row inserted with a free id breaks the sequence), that
its ``prev_hash`` is the previous row's ``hash`` (rows moved or removed), and that its ``hash``
matches its content (a row edited in place). The first row failing any of them is reported; a
row edited and re-hashed by someone who knows the scheme is reported at the row after it, whose
link no longer matches.

What the chain alone cannot show is a tail cut off: the remaining rows still form a valid chain.
Hence the head hash in every result, and ``expect_head``: a head recorded earlier (in a ticket, a
CI artefact, another machine) must still be the hash of some row, or rows were removed from the
end or the log was rewritten.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from egresslock.audit.record import GENESIS_HASH, AuditRow, row_hash
from egresslock.audit.schema import COLUMNS, TABLE, open_for_reading


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of :func:`verify`.

    ``ok`` is true when every row links and matches its hash and, if a head was expected, that
    head is in the chain. ``rows`` and ``head`` (the last row's hash, or the genesis hash of an
    empty log) describe the database as read, whether intact or not. ``first_bad_id`` is the
    first row that fails (``None`` when the chain itself is intact), ``reason`` says why in words.
    ``expected_head_id`` is the id of the row whose hash was the expected head, when found.
    """

    ok: bool
    rows: int
    head: str
    head_id: int
    first_bad_id: int | None
    reason: str
    expected_head_id: int | None = None

    def as_dict(self) -> dict[str, object]:
        """The result as ``egresslock audit verify --json`` prints it."""
        return asdict(self)


def _check_row(row: AuditRow, expected_id: int, prev_hash: str) -> str | None:
    if row.id != expected_id:
        if row.id > expected_id:
            after = f"follows row {expected_id - 1}" if expected_id > 1 else "is the first row"
            return f"row {row.id} {after}: row(s) {expected_id}..{row.id - 1} were deleted"
        return f"row id {row.id} is out of sequence (expected {expected_id}): a row was inserted"
    if row.prev_hash != prev_hash:
        before = f"row {row.id - 1}" if row.id > 1 else "the start of the chain"
        return (f"row {row.id} does not link to {before} (prev_hash {row.prev_hash[:16]}... "
                f"expected {prev_hash[:16]}...): rows were inserted, deleted or reordered, or "
                f"row {row.id - 1} was re-hashed after an edit")
    if row_hash(prev_hash, row.values()) != row.hash:
        return f"row {row.id} was altered: its content no longer matches its hash"
    return None


def verify(path: str | Path, *, expect_head: str | None = None) -> VerifyResult:
    """Walk the chain of the audit database at ``path``; raises :class:`AuditError` only when
    the file cannot be read as an audit database at all."""
    conn = open_for_reading(Path(path))
    try:
        # One SELECT reads one snapshot (WAL): rows committed meanwhile by a writer are not seen,
        # so a live log verifies consistently.
        cursor = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM {TABLE} ORDER BY id")  # noqa: S608
        rows, head, head_id = 0, GENESIS_HASH, 0
        first_bad: int | None = None
        reason = ""
        expected = expect_head.strip().lower() if expect_head is not None else None
        expected_at: int | None = 0 if expected == GENESIS_HASH else None
        for values in cursor:
            row = AuditRow(*values)
            if first_bad is None:
                problem = _check_row(row, head_id + 1, head)
                if problem is not None:
                    first_bad, reason = row.id, problem
            if expected is not None and expected_at is None and row.hash == expected:
                expected_at = row.id
            rows, head, head_id = rows + 1, row.hash, row.id
    finally:
        conn.close()
    ok = first_bad is None
    if ok:
        reason = f"intact: {rows} rows"
    if expected is not None:
        if expected_at is None:
            ok = False
            missing = (f"expected head {expected} is not the hash of any row: rows were removed "
                       f"from the end, or the log was rewritten")
            reason = missing if first_bad is None else f"{reason}; {missing}"
        elif first_bad is None:
            reason += (f"; expected head is row {expected_at}, {head_id - expected_at} rows "
                       f"were added since")
    return VerifyResult(ok, rows, head, head_id, first_bad, reason, expected_at)
