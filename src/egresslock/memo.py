"""Remembered results, for a process that starts many runs (the warm server).

A one-shot ``egresslock run`` parses its policy, compiles it and builds its scanner once, so it
remembers nothing. The warm server forks a worker per run from one long-lived process; there,
parsing the same unchanged file again, or compiling the same secrets into the same Hyperscan
database, is most of what a run would pay. :meth:`Memo.remember` turns remembering on for every
memo of the process; until then each :meth:`Memo.get` makes its value anew.

Only values that are immutable, or that no one changes in the remembering process, belong here:
the warm server only builds them, and each worker changes its own copy.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import ClassVar, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Memo(Generic[K, V]):
    """At most ``size`` values by key; the oldest goes first."""

    enabled: ClassVar[bool] = False

    __slots__ = ("_entries", "size")

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._entries: dict[K, V] = {}

    def get(self, key: K, make: Callable[[], V]) -> V:
        """The value remembered for ``key``, or ``make()`` (remembered when remembering is on)."""
        if not Memo.enabled:
            return make()
        found = self._entries.get(key)
        if found is None:
            found = make()
            if len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = found
        return found

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    @staticmethod
    def remember() -> None:
        """From now on, every memo of this process keeps what it makes."""
        Memo.enabled = True
