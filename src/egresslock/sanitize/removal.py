"""What the sanitizer removed: one value per removed URL or element, for reports and the audit log.

A removal names the element (``image``, ``link``, ``autolink``, ``bare URL``, ``html <img>``...),
the policy list that decided (``output.images``, ``output.links``, or ``html`` for elements and
attributes that are never kept), the reason in words, and the host and path of the URL when it
has one. ``url`` is the URL as written: it may hold the very data it tried to carry, so it is
for the caller's eyes; the audit log and reports never show it, nor the path of a URL
that held a secret (:attr:`Removal.logged_path`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from egresslock.sanitize.urls import UrlDecision


@dataclass(frozen=True, slots=True)
class Removal:
    """One removed URL or element."""

    element: str
    rule: str
    reason: str
    url: str | None = None
    host: str | None = None
    path: str | None = None
    secret: bool = False
    port: int | None = None

    @classmethod
    def of_url(cls, element: str, rule: str, url: str, decision: UrlDecision) -> Removal:
        return cls(element, rule, decision.reason, url, decision.host, decision.path,
                   decision.secret, decision.port)

    @property
    def logged_path(self) -> str | None:
        """The path for logs and reports: none once a secret was seen in the URL (the audit
        log is handed to people who must not receive the secret); never the query."""
        return None if self.secret else self.path

    def describe(self) -> str:
        """One line for a person: what was removed, where it pointed, and why."""
        where = f" to {self.host}{self.logged_path or ''}" if self.host else ""
        return f"removed {self.element}{where}: {self.reason}"

    def as_dict(self) -> dict[str, object]:
        return {"element": self.element, "rule": self.rule, "reason": self.reason,
                "host": self.host, "path": self.logged_path,
                "secret": self.secret}


OnRemoval = Callable[[Removal], None]
