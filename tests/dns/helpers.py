"""A real compiled policy, a fake resolver, and a stub wired to them, for the DNS stub's tests."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from typing import Any

from egresslock.audit.record import AuditRecord
from egresslock.dns.names import NameBook
from egresslock.dns.stub import DnsStub
from egresslock.policy import compile_policy, decide, parse_policy
from egresslock.policy.normalize import IPAddress

POLICY = """
version: 1
mode: {mode}
network:
  block_private: true
  allow_ranges: ["127.0.0.0/8", "::1/128"]
rules:
  - id: app
    host: app.test
  - id: meta
    host: meta.test
  - id: wild
    host: "*.wild.test"
  - id: no-gist
    host: gist.wild.test
    action: deny
"""

SECRET = "AKIAIOSFODNN7EXAMPLE"
SLOW_SECONDS = 1.5

_IP = ipaddress.ip_address
ADDRESSES: dict[str, tuple[IPAddress, ...]] = {
    "app.test": (_IP("127.0.0.1"), _IP("::1")),
    # An allowed name whose DNS points at the cloud metadata service: DNS rebinding.
    "meta.test": (_IP("169.254.169.254"),),
    "mixed.wild.test": (_IP("169.254.169.254"), _IP("127.0.0.2"), _IP("fe80::1")),
    "v4only.wild.test": (_IP("127.0.0.3"),),
    "many.wild.test": tuple(_IP(f"127.0.1.{i}") for i in range(1, 61)),
}


class FakeResolver:
    """Fixed answers; ``slow.wild.test`` takes a while, unknown names fail."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def __call__(self, name: str) -> tuple[IPAddress, ...]:
        self.asked.append(name)
        if name == "slow.wild.test":
            await asyncio.sleep(SLOW_SECONDS)
            return (_IP("127.0.0.9"),)
        if name in ADDRESSES:
            return ADDRESSES[name]
        raise LookupError(f"cannot resolve {name}: no such name")


def make_stub(records: list[AuditRecord], resolver: FakeResolver, *, mode: str = "enforce",
              **kwargs: Any) -> DnsStub:
    policy = compile_policy(parse_policy(POLICY.format(mode=mode)))
    return DnsStub(
        decide=functools.partial(decide, policy),
        resolve=resolver,
        check_address=policy.addresses.check,
        log=records.append,
        names=NameBook(),
        secrets=[SECRET],
        report_only=policy.report_only,
        **kwargs,
    )
