"""The few lines ``egresslock run`` prints when the command ends: what got out, what did not."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from egresslock.audit import AuditRecord

_TOP = 5


def _destination(record: AuditRecord) -> str:
    # Imported here: the policy package (pydantic) is loaded by then, and `egresslock --help`
    # must not pay for it.
    from egresslock.policy.normalize import join_authority

    if record.layer == "mcp":  # the MCP gateway's calls: no host, a method and a name
        return f"{record.method} {record.path}"
    host = record.host or record.address or "?"
    if record.port is None:
        return host
    return join_authority(host, record.port)


@dataclass
class RunSummary:
    """Counts every audit record of the run on its way to the log (``sink``)."""

    sink: Callable[[AuditRecord], None] | None = None
    allowed: int = 0
    denied: int = 0
    reported: int = 0
    denials: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    pending: list[AuditRecord] = field(default_factory=list)
    mark: str | None = None  # the session's mark, when the policy has levels and it rose
    mark_reason: str | None = None

    def count(self, record: AuditRecord) -> None:
        if record.layer == "flow":  # not a decision: the session's mark rose
            self.mark = str((record.extra or {}).get("mark"))
            self.mark_reason = record.reason
        elif record.verdict == "deny":
            self.denied += 1
            self.denials[(record.layer, _destination(record), record.reason)] += 1
        elif record.verdict == "report":
            self.reported += 1
        else:
            self.allowed += 1
        if self.sink is not None:
            if self.pending:
                for held in self.pending:
                    self.sink(held)
                self.pending.clear()
            self.sink(record)
        else:
            self.pending.append(record)  # before the log is open (the sandbox forks first)

    def as_dict(self, exit_code: int, audit_path: str, run_id: str) -> dict[str, Any]:
        return {
            "exit_code": exit_code, "allowed": self.allowed, "denied": self.denied,
            "reported": self.reported, "run_id": run_id, "audit": audit_path,
            "mark": self.mark,
            "top_denied": [
                {"layer": layer, "destination": dest, "reason": reason, "count": n}
                for (layer, dest, reason), n in self.denials.most_common(_TOP)
            ],
        }

    def render(self, exit_code: int, audit_path: str, run_id: str) -> str:
        lines = [f"egresslock: {self.allowed} allowed, {self.denied} denied"
                 + (f", {self.reported} reported" if self.reported else "")
                 + f"; command exited {exit_code}"]
        if self.mark_reason is not None:
            lines.append(f"  {self.mark_reason}")
        for (layer, dest, reason), n in self.denials.most_common(_TOP):
            lines.append(f"  denied {n}x {layer:<7} {dest}: {reason}")
        more = len(self.denials) - _TOP
        if more > 0:
            lines.append(f"  ... and {more} more destinations")
        lines.append(f"  more: egresslock audit --db {audit_path} --run {run_id}")
        return "\n".join(lines)
