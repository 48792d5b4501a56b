"""What one audit row holds, and how a row is hashed into the chain.

An :class:`AuditRecord` is what a layer hands to :meth:`AuditLog.record`: a frozen value,
validated in its constructor so that a wrong layer or verdict fails at the call site and not
silently in the writer thread. An :class:`AuditRow` is a record as stored: it has gained an id,
the run id and its place in the hash chain.

The chain. Row ``n`` stores ``prev_hash`` (the ``hash`` of row ``n - 1``, or :data:`GENESIS_HASH`
for the first row) and ``hash = SHA-256(prev_hash || "\\n" || canonical(row))``, where
``canonical`` is the compact JSON array of the columns in :data:`HASHED_COLUMNS` order, ASCII-only,
floats in Python's shortest round-trip form, and ``extra`` as its stored JSON text. The id is part
of the hash, so moving a row changes its hash; ``prev_hash`` links it to its predecessor, so
deleting, inserting or reordering rows breaks the link at the first row that moved. The chain is
unkeyed: whoever can write the file can rewrite it from some row onwards, which is why ``egresslock
audit verify`` prints the head hash, for a user to record elsewhere and check with
``--expect-head``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from egresslock.errors import AuditError

LAYERS = frozenset({"http", "connect", "tls", "dns", "drop", "sanitize", "courier", "mcp",
                    "flow"})
VERDICTS = frozenset({"allow", "deny", "report"})

GENESIS_HASH = "0" * 64

# The stored columns a row's hash covers, in the order they are encoded. Changing this order or
# the encoding is a new schema version: old chains would no longer verify.
HASHED_COLUMNS = (
    "id", "time", "run_id", "layer", "verdict", "rule_id", "reason", "method", "host", "port",
    "path", "address", "bytes_out", "bytes_in", "pid", "uid", "protocol", "extra",
)


def _name_of(value: object, what: str, valid: frozenset[str]) -> str:
    # Tolerate the policy's enums (Layer.HTTP, Verdict.DENY) without importing the policy package.
    name = value.value if isinstance(value, enum.Enum) else value
    if not isinstance(name, str) or name not in valid:
        raise AuditError(f"{what} {value!r} is not one of {', '.join(sorted(valid))}")
    return name


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One decision of one layer, as the layer knows it.

    ``verdict`` is ``allow``, ``deny`` or ``report``; ``layer`` one of :data:`LAYERS`. Fields a
    layer does not know stay ``None`` (or 0 for byte counts). ``protocol`` names the transport of
    ``drop`` rows (``udp``, ``icmp``...). ``extra`` carries layer-specific details (which transform
    was applied, which secret matched); it is copied here and stored as JSON, values that JSON
    cannot hold becoming their ``str()``. ``time`` is seconds since the epoch, UTC.
    """

    layer: str
    verdict: str
    rule_id: str
    reason: str
    host: str | None = None
    port: int | None = None
    method: str | None = None
    path: str | None = None
    address: str | None = None
    bytes_out: int = 0
    bytes_in: int = 0
    pid: int | None = None
    uid: int | None = None
    protocol: str | None = None
    extra: Mapping[str, object] | None = None
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", _name_of(self.layer, "layer", LAYERS))
        object.__setattr__(self, "verdict", _name_of(self.verdict, "verdict", VERDICTS))
        if self.extra is not None:
            # A snapshot: the caller may reuse its dict after record() returns.
            object.__setattr__(self, "extra", MappingProxyType(dict(self.extra)))


@dataclass(frozen=True, slots=True)
class AuditRow:
    """A committed row: an :class:`AuditRecord` plus its id, run id and chain hashes."""

    id: int
    time: float
    run_id: str
    layer: str
    verdict: str
    rule_id: str
    reason: str
    method: str | None
    host: str | None
    port: int | None
    path: str | None
    address: str | None
    bytes_out: int
    bytes_in: int
    pid: int | None
    uid: int | None
    protocol: str | None
    extra: str | None  # the stored JSON text, exactly as hashed
    prev_hash: str
    hash: str

    def values(self) -> tuple[object, ...]:
        """The hashed columns, in :data:`HASHED_COLUMNS` order."""
        return tuple(getattr(self, name) for name in HASHED_COLUMNS)

    def as_dict(self) -> dict[str, object]:
        """The row as ``egresslock audit --json`` prints it and sinks receive it."""
        out: dict[str, object] = {name: getattr(self, name) for name in HASHED_COLUMNS}
        out["extra"] = json.loads(self.extra) if self.extra is not None else None
        out["prev_hash"] = self.prev_hash
        out["hash"] = self.hash
        return out


# The encoders json.dumps would build on each call with these arguments, built once: the writer
# hashes every row, and making the encoder was a third of the cost. The output is the same.
_CANONICAL = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
_EXTRA = json.JSONEncoder(ensure_ascii=True, sort_keys=True, separators=(",", ":"), default=str)


def row_hash(prev_hash: str, values: tuple[object, ...]) -> str:
    """The chain hash of a row whose hashed columns are ``values`` (see the module docstring)."""
    canonical = _CANONICAL.encode(values)
    return hashlib.sha256(f"{prev_hash}\n{canonical}".encode("ascii")).hexdigest()


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = value if type(value) is str else str(value)
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (bytes decoded with surrogateescape) cannot be stored as SQLite text;
        # keep them visible as escapes rather than losing the row.
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _integer(value: object) -> int | None:
    if value is None:
        return None
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    # SQLite integers are signed 64-bit; a larger value would fail the whole batch.
    return number if -(2**63) <= number < 2**63 else None


def _extra_json(extra: Mapping[str, object] | None) -> str | None:
    if extra is None:
        return None
    try:
        return _EXTRA.encode(dict(extra))
    except (TypeError, ValueError) as exc:
        # Keys JSON cannot sort or hold: keep what can be kept, never lose the row.
        return json.dumps({"unencodable_extra": repr(extra), "error": str(exc)},
                          ensure_ascii=True, sort_keys=True, separators=(",", ":"))


def stored_values(rec: AuditRecord, run_id: str) -> tuple[object, ...]:
    """The hashed columns of ``rec`` except ``id`` (unknown until insertion), in
    :data:`HASHED_COLUMNS` order and as they will read back from SQLite, so that the hash computed
    before insertion equals the one a verifier recomputes from the stored row. Runs on the writer
    thread; never raises for any field value the constructor accepted."""
    try:
        when = float(rec.time)
    except (TypeError, ValueError):
        when = time.time()
    return (
        when, run_id, rec.layer, rec.verdict, _text(rec.rule_id) or "", _text(rec.reason) or "",
        _text(rec.method), _text(rec.host), _integer(rec.port), _text(rec.path),
        _text(rec.address), _integer(rec.bytes_out) or 0, _integer(rec.bytes_in) or 0,
        _integer(rec.pid), _integer(rec.uid), _text(rec.protocol), _extra_json(rec.extra),
    )
