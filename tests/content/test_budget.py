"""``Meter``: requests and bytes per run or per sliding window, on an injected clock."""

from __future__ import annotations

import pytest

from egresslock.content.budget import Meter
from egresslock.policy.model import Budget


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def meter(clock: Clock, **budget: object) -> Meter:
    return Meter(Budget.model_validate(budget), "rule api", clock=clock)


def test_requests_per_run_never_refill() -> None:
    clock = Clock()
    m = meter(clock, requests=3)
    assert [m.admit(10)[0] for _ in range(3)] == [None, None, None]
    clock.now += 10**6
    why, _ = m.admit(0)
    assert why == "rule api budget of 3 requests per run is spent"


def test_requests_per_window_slide() -> None:
    clock = Clock()
    m = meter(clock, requests=2, per="1m")
    assert m.admit(1)[0] is None
    clock.now += 30
    assert m.admit(1)[0] is None
    clock.now += 29.9
    assert m.admit(1)[0] == "rule api budget of 2 requests per 60s is spent"
    clock.now += 0.1  # the first request is now 60 s old: it slides out
    assert m.admit(1)[0] is None
    assert m.admit(1)[0] is not None  # the second is still in the window


def test_refused_requests_do_not_count() -> None:
    clock = Clock()
    m = meter(clock, requests=1, per="10s")
    assert m.admit(0)[0] is None
    for _ in range(5):
        assert m.admit(0)[0] is not None
    clock.now += 10
    assert m.admit(0)[0] is None


def test_bytes_per_window() -> None:
    clock = Clock()
    m = meter(clock, bytes_out=100, per="1m")
    assert m.admit(60)[0] is None
    why, _ = m.admit(41)
    assert why == ("rule api budget of 100 bytes out per 60s is spent (60 used, this request "
                   "needs 41)")
    assert m.admit(40)[0] is None  # exactly at the budget
    clock.now += 60
    assert m.admit(100)[0] is None


@pytest.mark.parametrize("size", ["1KB", "1KiB", 1024])
def test_bytes_out_takes_sizes(size: object) -> None:
    m = meter(Clock(), bytes_out=size)
    assert m.max_bytes in (1000, 1024)
    assert m.admit(m.max_bytes or 0)[0] is None
    assert m.admit(1)[0] is not None


def test_charge_cuts_a_body_at_the_budget() -> None:
    clock = Clock()
    m = meter(clock, bytes_out=1000, per="run")
    why, entry = m.admit(100)  # the head
    assert why is None
    assert m.charge(entry, 0) is None
    assert [m.charge(entry, 300) for _ in range(3)] == [None, None, None]
    assert m.charge(entry, 1) == ("rule api budget of 1000 bytes out per run is spent (body "
                                  "cut before the excess was sent)")
    assert m.admit(1)[0] is not None  # the body's bytes counted for later requests


def test_charged_body_slides_out_with_its_request() -> None:
    clock = Clock()
    m = meter(clock, bytes_out=1000, per="1m")
    _, entry = m.admit(0)
    assert m.charge(entry, 900) is None
    clock.now += 30
    assert m.admit(200)[0] is not None
    clock.now += 30
    assert m.admit(1000)[0] is None


def test_same_budget_compares_limits_not_use() -> None:
    a = meter(Clock(), requests=5, per="1h")
    b = meter(Clock(), requests=5, per="60m")
    a.admit(1)
    assert a.same_budget(b)
    assert not a.same_budget(meter(Clock(), requests=6, per="1h"))
