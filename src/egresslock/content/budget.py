"""Budgets: how many requests and request bytes a rule, or a whole run, may send.

Every check a single request passes can be passed by many small requests: 32 bytes a URL, a
thousand URLs a minute, is a channel. A budget caps the channel's capacity: ``requests`` and
``bytes_out`` per sliding window (``per: 1m``) or for the whole run (``per: run``). Once spent,
requests are denied with the budget as the reason until the window slides.

Meters keep one entry per request in the window, so their memory is bounded by the budget itself
(a window holds at most ``requests`` entries before denials start).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from egresslock.policy.model import Budget, parse_period


class Meter:
    """One budget's use: a sliding window of (time, bytes) per admitted request."""

    __slots__ = ("_bytes", "_clock", "_log", "label", "max_bytes", "max_requests", "window")

    def __init__(self, budget: Budget, label: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = label
        self.max_requests = budget.requests
        self.max_bytes = budget.bytes_out
        self.window = parse_period(budget.per)
        self._clock = clock
        self._log: deque[list[float]] = deque()
        self._bytes = 0

    def same_budget(self, other: Meter) -> bool:
        return (self.max_requests, self.max_bytes, self.window) == (
            other.max_requests, other.max_bytes, other.window)

    def _slide(self, now: float) -> None:
        if self.window is None:
            return
        while self._log and self._log[0][0] <= now - self.window:
            self._bytes -= int(self._log.popleft()[1])

    def _per(self) -> str:
        if self.window is None:
            return "per run"
        return f"per {int(self.window)}s"

    def admit(self, size: int) -> tuple[str | None, list[float]]:
        """Count one request of ``size`` bytes so far. Returns the reason it is over budget (or
        None) and the request's entry, which :meth:`charge` adds its body to."""
        now = self._clock()
        self._slide(now)
        entry = [now, 0.0]
        if self.max_requests is not None and len(self._log) >= self.max_requests:
            return (f"{self.label} budget of {self.max_requests} requests {self._per()} is "
                    "spent"), entry
        if self.max_bytes is not None and self._bytes + size > self.max_bytes:
            return (f"{self.label} budget of {self.max_bytes} bytes out {self._per()} is spent "
                    f"({self._bytes} used, this request needs {size})"), entry
        entry[1] = float(size)
        self._log.append(entry)
        self._bytes += size
        return None, entry

    def charge(self, entry: list[float], size: int) -> str | None:
        """Add ``size`` more bytes (a body as it streams) to an admitted request's entry."""
        if not size:
            return None
        self._slide(self._clock())
        if self.max_bytes is not None and self._bytes + size > self.max_bytes:
            return (f"{self.label} budget of {self.max_bytes} bytes out {self._per()} is spent "
                    "(body cut before the excess was sent)")
        entry[1] += size
        if self.window is None or entry[0] > self._clock() - self.window:
            self._bytes += size  # an entry that already slid out no longer counts
        return None
