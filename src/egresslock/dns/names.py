"""Which names the stub answered with which addresses, so an address can be named again later.

In transparent mode a connection arrives with only its original destination address. TLS usually
names the host (SNI) and HTTP does (Host), but a client may send neither, and then the only
honest source of a name is the answer this stub gave: the client can only have learnt that
address from us, since the sandbox has no other DNS. :meth:`NameBook.names_for` answers "which
names did we hand this address out for", and the proxy decides on those names.

Each (name, address) pair lives for the answer's TTL plus a grace period: clients cache past the
TTL (the JVM, browsers, and anything that connects a while after resolving), and a connection
opened a little late must still be nameable. Several names may share one address (a CDN); all of
them are returned, the most recently answered first, and the caller decides what a shared
address means.

The book is bounded: past ``max_entries`` pairs the least recently answered is forgotten, so a
client that resolves a million random names costs memory for only the last ``max_entries``. It
is not thread-safe; the stub and the proxy share it on one asyncio loop.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from egresslock.policy.normalize import IPAddress

DEFAULT_GRACE = 300.0
DEFAULT_MAX_ENTRIES = 65536


def _canonical(address: IPAddress) -> IPAddress:
    # A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d; the book stores them as IPv4.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class NameBook:
    """A bounded, expiring record of the stub's answers: name to addresses and back."""

    def __init__(self, *, grace: float = DEFAULT_GRACE, max_entries: int = DEFAULT_MAX_ENTRIES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1 (got {max_entries})")
        if grace < 0:
            raise ValueError(f"grace must be 0 or more seconds (got {grace})")
        self.grace = grace
        self.max_entries = max_entries
        self._clock = clock
        # (name, address) -> expiry, least recently remembered first.
        self._pairs: OrderedDict[tuple[str, IPAddress], float] = OrderedDict()
        self._by_address: dict[IPAddress, dict[str, None]] = {}
        self._by_name: dict[str, dict[IPAddress, None]] = {}

    def __len__(self) -> int:
        return len(self._pairs)

    def remember(self, name: str, addresses: Iterable[IPAddress], ttl: float) -> None:
        """Record that ``name`` was answered with ``addresses`` for ``ttl`` seconds."""
        now = self._clock()
        expiry = now + max(ttl, 0) + self.grace
        for raw in addresses:
            address = _canonical(raw)
            key = (name, address)
            self._pairs[key] = expiry
            self._pairs.move_to_end(key)
            # Re-inserted so that iteration order is most recent last, for names_for().
            names = self._by_address.setdefault(address, {})
            names.pop(name, None)
            names[name] = None
            self._by_name.setdefault(name, {})[address] = None
        self._sweep(now)

    def names_for(self, address: IPAddress) -> tuple[str, ...]:
        """Unexpired names answered with ``address``, most recently answered first."""
        address = _canonical(address)
        now = self._clock()
        names = self._by_address.get(address, {})
        live = [n for n in names if self._pairs.get((n, address), 0.0) > now]
        return tuple(reversed(live))

    def addresses_for(self, name: str) -> tuple[IPAddress, ...]:
        """Unexpired addresses ``name`` was answered with, in the order first remembered."""
        now = self._clock()
        return tuple(a for a in self._by_name.get(name, {})
                     if self._pairs.get((name, a), 0.0) > now)

    def _forget(self, key: tuple[str, IPAddress]) -> None:
        name, address = key
        del self._pairs[key]
        names = self._by_address[address]
        del names[name]
        if not names:
            del self._by_address[address]
        addresses = self._by_name[name]
        del addresses[address]
        if not addresses:
            del self._by_name[name]

    def _sweep(self, now: float) -> None:
        # Over the bound: forget the least recently remembered. Then drop expired pairs from the
        # old end; TTLs differ, so an expired pair may sit behind a live one for a while, which
        # costs memory but never correctness (lookups check expiry).
        while len(self._pairs) > self.max_entries:
            self._forget(next(iter(self._pairs)))
        while self._pairs:
            key, expiry = next(iter(self._pairs.items()))
            if expiry > now:
                break
            self._forget(key)
