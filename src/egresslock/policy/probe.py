"""What the proxy would decide for one URL, step by step, without sending anything.

``egresslock check`` uses this so that its answer is the proxy's answer: an https URL is decided
first as a tunnel (host and port only); when the tunnel's rule inspects, the request inside it is
decided as the proxy would decide it after decrypting.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from egresslock.policy.compiled import CompiledPolicy
from egresslock.policy.decide import Decision, Layer, Request, decide
from egresslock.policy.normalize import (
    URL,
    IPAddress,
    normalize_host,
    parse_ip_literal,
    parse_url,
)


@dataclass(frozen=True, slots=True)
class Probe:
    """The decision for a URL, the layer that made it, and notes on what was not seen.

    ``inspect`` says whether the proxy would decrypt the request: true when the tunnel's rule
    inspects, however the request inside is then decided; false for plain HTTP and for a tunnel
    relayed unread. ``decision.inspect`` cannot say it: the request inside an inspected tunnel
    is decided at layer http, where there is no tunnel left to inspect.
    """

    url: URL
    decision: Decision
    layer: Layer
    notes: list[str] = field(default_factory=list)
    inspect: bool = False


def probe(
    policy: CompiledPolicy,
    raw_url: str,
    method: str = "GET",
    header_names: tuple[str, ...] = (),
    body_size: int | None = None,
    resolve: Mapping[str, Sequence[str]] | None = None,
    origin: str = "agent",
) -> Probe:
    """Decide ``raw_url`` as the proxy would. Raises InputError for a URL the proxy refuses."""
    url = parse_url(raw_url)
    pinned = {normalize_host(h): v for h, v in (resolve or {}).items()}
    addresses: tuple[IPAddress, ...] = tuple(
        ipaddress.ip_address(a) for a in pinned.get(url.host, ())
    )
    notes: list[str] = []
    if not addresses and parse_ip_literal(url.host) is None:
        notes.append("no address checked: pass --resolve HOST:ADDR to check what it resolves to")
    full = Request(url.host, url.port, url.scheme, method, url.path, url.query, header_names,
                   body_size, addresses, Layer.HTTP, origin=origin)
    if url.scheme == "http":
        return Probe(url, decide(policy, full), Layer.HTTP, notes)
    tunnel = decide(policy, Request(url.host, url.port, "https", addresses=addresses,
                                    layer=Layer.CONNECT, origin=origin))
    if not tunnel.allowed or not tunnel.inspect:
        if tunnel.allowed:
            notes.append("tunnel is not inspected: method, path, query and body are not seen")
        return Probe(url, tunnel, Layer.CONNECT, notes)
    return Probe(url, decide(policy, full), Layer.HTTP, notes, inspect=True)

