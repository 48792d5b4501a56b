"""egresslock.memo: nothing is remembered until a process turns remembering on."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from egresslock.memo import Memo


@pytest.fixture
def remembering() -> Iterator[None]:
    before = Memo.enabled
    Memo.remember()
    yield
    Memo.enabled = before


def test_off_by_default_every_get_makes_anew() -> None:
    assert not Memo.enabled  # a one-shot command never remembers
    memo: Memo[str, list[int]] = Memo()
    first, second = memo.get("k", list), memo.get("k", list)
    assert first is not second
    assert "k" not in memo


def test_on_a_key_is_made_once_and_the_oldest_goes_first(remembering: None) -> None:
    memo: Memo[int, object] = Memo(size=2)
    made: list[int] = []

    def make(key: int) -> object:
        made.append(key)
        return object()

    a = memo.get(1, lambda: make(1))
    assert memo.get(1, lambda: make(1)) is a
    memo.get(2, lambda: make(2))
    memo.get(3, lambda: make(3))  # full: 1 goes
    assert made == [1, 2, 3]
    assert 1 not in memo
    assert 2 in memo
    assert 3 in memo
    memo.get(1, lambda: make(1))
    assert made == [1, 2, 3, 1]
