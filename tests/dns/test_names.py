"""``NameBook``: answers remembered for TTL plus grace, looked up both ways, bounded in size."""

from __future__ import annotations

import ipaddress

import pytest

from egresslock.dns.names import NameBook

A1 = ipaddress.IPv4Address("192.0.2.1")
A2 = ipaddress.IPv4Address("192.0.2.2")
V6 = ipaddress.IPv6Address("2001:db8::1")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def book(clock: Clock) -> NameBook:
    return NameBook(grace=10, clock=clock)


def test_names_and_addresses_both_ways(book: NameBook) -> None:
    book.remember("app.test", [A1, V6], ttl=30)
    assert book.names_for(A1) == ("app.test",)
    assert book.names_for(V6) == ("app.test",)
    assert book.addresses_for("app.test") == (A1, V6)
    assert book.names_for(A2) == ()
    assert book.addresses_for("other.test") == ()


def test_expires_after_ttl_plus_grace(book: NameBook, clock: Clock) -> None:
    book.remember("app.test", [A1], ttl=30)
    clock.now += 39.9
    assert book.names_for(A1) == ("app.test",)
    clock.now += 0.2
    assert book.names_for(A1) == ()
    assert book.addresses_for("app.test") == ()


def test_remembering_again_extends(book: NameBook, clock: Clock) -> None:
    book.remember("app.test", [A1], ttl=30)
    clock.now += 35
    book.remember("app.test", [A1], ttl=30)
    clock.now += 35
    assert book.names_for(A1) == ("app.test",)


def test_shared_address_lists_most_recent_name_first(book: NameBook, clock: Clock) -> None:
    book.remember("a.cdn.test", [A1], ttl=30)
    book.remember("b.cdn.test", [A1], ttl=30)
    assert book.names_for(A1) == ("b.cdn.test", "a.cdn.test")
    book.remember("a.cdn.test", [A1], ttl=30)
    assert book.names_for(A1) == ("a.cdn.test", "b.cdn.test")


def test_new_answer_keeps_old_address_until_it_expires(book: NameBook, clock: Clock) -> None:
    # A client may still hold the first answer; its connection must still be nameable.
    book.remember("app.test", [A1], ttl=5)
    book.remember("app.test", [A2], ttl=60)
    assert book.names_for(A1) == ("app.test",)
    assert book.addresses_for("app.test") == (A1, A2)
    clock.now += 20
    assert book.names_for(A1) == ()
    assert book.addresses_for("app.test") == (A2,)


def test_ipv4_mapped_address_finds_the_ipv4_entry(book: NameBook) -> None:
    book.remember("app.test", [A1], ttl=30)
    assert book.names_for(ipaddress.IPv6Address("::ffff:192.0.2.1")) == ("app.test",)


def test_bounded_oldest_forgotten(clock: Clock) -> None:
    book = NameBook(grace=0, max_entries=3, clock=clock)
    for i in range(5):
        book.remember(f"n{i}.test", [ipaddress.IPv4Address(f"192.0.2.{i}")], ttl=30)
    assert len(book) == 3
    assert book.addresses_for("n0.test") == ()
    assert book.addresses_for("n1.test") == ()
    assert book.addresses_for("n4.test") == (ipaddress.IPv4Address("192.0.2.4"),)


def test_expired_entries_are_swept(book: NameBook, clock: Clock) -> None:
    for i in range(100):
        book.remember(f"n{i}.test", [A1], ttl=1)
    clock.now += 100
    book.remember("fresh.test", [A2], ttl=1)
    assert len(book) == 1


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"max_entries": 0}, "max_entries"),
    ({"grace": -1}, "grace"),
])
def test_rejects_bad_limits(kwargs: dict[str, float], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        NameBook(**kwargs)  # type: ignore[arg-type]
