"""The session's high-water mark: what the agent has seen, and where it may therefore write.

Bell-LaPadula's "no write down" for an agent's tools. The policy orders its data levels, lowest
first (``levels: [public, internal, confidential]``). A source that returns data declares
``reads: LEVEL``; a destination declares ``level: LEVEL``, the highest level it may receive. The
run keeps one mark, which only rises: a response from a ``reads: confidential`` source raises it
to confidential, and from then on every request to a destination whose ``level`` is below the
mark is refused, with a reason that names the read that raised it. The proxy, the DNS stub, the
courier and the MCP gateway of one run share one :class:`SessionMark`.

A mark never falls within a run: nothing can prove the agent forgot what it read. Starting a new
run starts a new mark (``egresslock run --level`` sets where it starts, for agents that are handed
private data up front).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Raise:
    """One rise of the mark: to what, by which read, under which rule or tool, and when."""

    level: str
    previous: str | None
    source: str  # "GET api.github.com/repos/acme/private/contents/a.txt", "tool get_file"
    rule_id: str
    at: float

    def when(self) -> str:
        return time.strftime("%H:%M:%S", time.localtime(self.at))


class SessionMark:
    """The run's mark. Thread-safe: the proxy's loop and the MCP gateway may share it."""

    def __init__(self, levels: Sequence[str], start: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.levels = tuple(levels)
        if start is not None and start not in self.levels:
            raise ValueError(f"level {start!r} is not one of the policy's levels "
                             f"({', '.join(self.levels)})")
        self._clock = clock
        self._lock = threading.Lock()
        self.history: list[Raise] = []
        self.level: str | None = None
        if start is not None and self.rank(start) > 0:
            self.level = start
            self.history.append(Raise(start, None, "the run's start (--level)", "run", clock()))

    def rank(self, level: str | None) -> int:
        """Position of ``level`` in the order; the lowest for None. A level the current policy
        no longer lists (after a reload) ranks above all: unknown data is treated as highest."""
        if level is None:
            return 0
        try:
            return self.levels.index(level)
        except ValueError:
            return len(self.levels)

    def update_levels(self, levels: Sequence[str]) -> None:
        with self._lock:
            self.levels = tuple(levels)

    def raise_to(self, level: str, source: str, rule_id: str) -> Raise | None:
        """Raise the mark to ``level`` if that is higher; the :class:`Raise`, or None."""
        with self._lock:
            if self.rank(level) <= self.rank(self.level):
                return None
            step = Raise(level, self.level, source, rule_id, self._clock())
            self.level = level
            self.history.append(step)
            return step

    def refusal(self, level: str, destination: str, rule_id: str) -> str | None:
        """Why a write to ``destination`` (accepting ``level``) must be refused, or None."""
        with self._lock:
            if self.rank(self.level) <= self.rank(level):
                return None
            last = self.history[-1]
            return (f"session is {self.level} since {last.source} at {last.when()}; "
                    f"{rule_id} accepts {level} (no write down to {destination})")

    def describe(self) -> dict[str, object]:
        with self._lock:
            return {"level": self.level or (self.levels[0] if self.levels else None),
                    "history": [{"level": r.level, "from": r.previous, "source": r.source,
                                 "rule_id": r.rule_id, "at": r.at} for r in self.history]}
