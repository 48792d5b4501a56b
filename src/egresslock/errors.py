"""The one exception tree of egresslock.

::

    EgresslockError
    ├── PolicyError          a policy file that cannot be trusted (carries file, line, key)
    ├── InputError           a host, address, URL or path refused as malformed or ambiguous
    ├── AuditError           the audit database cannot be opened, written or verified
    ├── ProxyError           the proxy cannot start (bad listen address, port in use)
    └── SandboxError         the kernel lacks what the sandbox needs; nothing runs unprotected

Every message names the offending value and what would be valid, so a user can fix the input
without reading the source. Third-party errors are translated at the boundary with
``raise ... from exc``.
"""

from __future__ import annotations

from dataclasses import dataclass


class EgresslockError(Exception):
    """Base of every error egresslock raises on purpose."""


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """One thing wrong with a policy file, located as precisely as the parser allows."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class PolicyError(EgresslockError):
    """A policy file was refused. ``problems`` lists every problem found, not only the first."""

    def __init__(self, problems: list[PolicyProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class InputError(EgresslockError):
    """A host, address, URL or path was refused; the message says what and why."""


class AuditError(EgresslockError):
    """The audit log cannot be opened, written or verified."""


class ProxyError(EgresslockError):
    """The proxy cannot start or serve."""


class SandboxError(EgresslockError):
    """The sandbox cannot be built on this machine; the message says what is missing."""
