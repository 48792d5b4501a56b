"""The DNS stub: the sandbox's only resolver, answering only what the policy allows.

Inside the sandbox every packet to port 53 is redirected here (DESIGN.md, transparent capture), so
a name reaches the outside only if this stub resolves it. The stub has no upstream DNS of its own:
an allowed name is resolved by the proxy's resolver (the same lookup the proxy would make, with
the same pins), and a refused name goes nowhere at all. That is the whole defence against DNS
exfiltration for names no rule allows; for names a wildcard rule allows, a name holding a declared
secret is refused too, and every query is logged with :func:`~egresslock.dns.score.exfil_score`.

What is answered, in order:

1. Malformed messages: FORMERR when a header was read, else silence (:mod:`egresslock.dns.wire`).
2. Opcodes other than QUERY: NOTIMP. EDNS versions other than 0: BADVERS (RFC 6891 6.1.3).
   Classes other than IN: REFUSED.
3. Names that :func:`~egresslock.policy.normalize.normalize_host` refuses, and names the policy
   does not allow at layer ``dns`` ("some allow rule could use this name"): REFUSED.
4. Names holding a secret (and, if ``max_score`` is set, names scoring above it): REFUSED.
5. Types other than A and AAAA: NODATA. The stub never answers MX, TXT, SRV or CNAME: the
   proxy dials by name, and nothing else leaves the sandbox.
6. A and AAAA: the name is resolved, and only addresses of the asked family that pass the
   policy's address check (``network.block_private``) are answered and remembered in the
   :class:`~egresslock.dns.names.NameBook`. If some exist but none passes: REFUSED, which is how
   a rebinding answer (an allowed name resolving to 169.254.169.254) ends. A failed lookup:
   SERVFAIL, logged as an allow that could not be served, never confused with a deny.

In report mode (``report_only``) steps 4 and 6 answer what enforce mode would refuse and log it as
``report``, as :func:`~egresslock.policy.decide.decide` does for step 3.

The module is the only one in ``dns/`` that awaits. Every query runs in its own task, so one slow
lookup holds up nobody else; ``max_in_flight`` bounds the tasks of UDP and TCP together, and once
it is reached the stub stops reading (the kernel then drops UDP, TCP clients wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from egresslock.audit.record import AuditRecord
from egresslock.dns.names import NameBook
from egresslock.dns.score import Score, exfil_score
from egresslock.dns.wire import (
    CLASS_IN,
    OPCODE_QUERY,
    TCP_MAX_SIZE,
    TYPE_A,
    TYPE_AAAA,
    DnsFormatError,
    Query,
    Rcode,
    answer,
    nodata,
    parse_query,
    refuse,
    type_name,
)
from egresslock.errors import InputError
from egresslock.fdwait import wait_fd
from egresslock.policy.address import AddressVerdict
from egresslock.policy.decide import DEFAULT_RULE, Decision, Layer, Request, Verdict
from egresslock.policy.normalize import IPAddress, normalize_host

log = logging.getLogger("egresslock.dns")

# The rule id logged when the secrets list, not a rule, refused a name.
SECRETS_RULE = "secrets"
# A UDP datagram can be 65,507 octets; a larger read buffer is never needed.
_UDP_READ_SIZE = 65535
# A query is one question plus an OPT record: a few hundred octets. Anything near 64 KiB on TCP
# is not a query, and reading it would only cost memory.
_TCP_MAX_QUERY = 4096
_TCP_PIPELINE = 16


class DnsStub:
    """Answers DNS queries from the policy. Dependencies are passed in, so that ``cli/`` wires
    the real policy, resolver and audit log, and tests wire fakes.

    ``decide`` is the policy (``functools.partial(decide, compiled)``); ``resolve`` returns the
    addresses of a normalised name or raises with a message fit for the log; ``check_address``
    is the policy's address check (``compiled.addresses.check``); ``log`` receives one
    :class:`~egresslock.audit.record.AuditRecord` per query; ``names`` learns every answer.
    """

    def __init__(
        self,
        *,
        decide: Callable[[Request], Decision],
        resolve: Callable[[str], Awaitable[tuple[IPAddress, ...]]],
        check_address: Callable[[IPAddress], AddressVerdict],
        log: Callable[[AuditRecord], None],
        names: NameBook,
        secrets: Sequence[str] = (),
        name_check: Callable[[str, str], str | None] | None = None,
        find_secrets: Callable[[str], list[str]] | None = None,
        ttl: int = 30,
        report_only: bool = False,
        max_score: float | None = None,
        resolve_timeout: float = 10.0,
        max_in_flight: int = 256,
        tcp_idle_timeout: float = 10.0,
        max_tcp_connections: int = 128,
    ) -> None:
        if not 0 <= ttl <= 0x7FFFFFFF:
            raise ValueError(f"ttl must be 0 to 2147483647 seconds (got {ttl})")
        if max_in_flight < 1 or max_tcp_connections < 1:
            raise ValueError("max_in_flight and max_tcp_connections must be at least 1")
        self._decide = decide
        self._resolve = resolve
        self._check_address = check_address
        self._log = log
        self.names = names
        self._secrets = tuple(s for s in secrets if s)
        self._name_check = name_check
        self._find_secrets = find_secrets
        self.ttl = ttl
        self.report_only = report_only
        self.max_score = max_score
        self.resolve_timeout = resolve_timeout
        self.tcp_idle_timeout = tcp_idle_timeout
        self.max_tcp_connections = max_tcp_connections
        self._slots = asyncio.Semaphore(max_in_flight)
        self._tcp_clients: set[asyncio.Task[object]] = set()

    # --- one query ------------------------------------------------------------------------------

    async def handle(self, data: bytes, protocol: str = "udp") -> bytes | None:
        """The response to one message (None: send nothing). Logs one audit record."""
        try:
            query = parse_query(data)
        except DnsFormatError as exc:
            self._log(AuditRecord(layer="dns", verdict="deny", rule_id=DEFAULT_RULE,
                                  reason=f"malformed DNS message: {exc}", protocol=protocol,
                                  extra={"size": len(data), "replied": exc.replyable}))
            return refuse(data, Rcode.FORMERR) if exc.replyable else None
        return await _Exchange(self, query, protocol).run()

    async def _handle_safely(self, data: bytes, protocol: str) -> bytes | None:
        try:
            return await self.handle(data, protocol)
        except Exception:
            # A bug, or an audit log that cannot write: no reply (fail closed), and keep serving.
            log.exception("DNS query of %d octets over %s failed; dropped", len(data), protocol)
            return None

    # --- UDP ------------------------------------------------------------------------------------

    async def serve_udp(self, sock: socket.socket) -> None:
        """Serve queries on a bound, non-blocking UDP socket until cancelled."""
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                await self._slots.acquire()
                try:
                    data, peer = await _recvfrom(loop, sock)
                except OSError as exc:
                    self._slots.release()
                    if sock.fileno() < 0:
                        return
                    log.debug("UDP receive failed: %s", exc)
                    continue
                except BaseException:
                    self._slots.release()
                    raise
                task = asyncio.create_task(self._udp_one(sock, data, peer))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for task in tasks:
                task.cancel()

    async def _udp_one(self, sock: socket.socket, data: bytes, peer: tuple[Any, ...]) -> None:
        try:
            reply = await self._handle_safely(data, "udp")
            if reply is not None:
                # A datagram is sent whole or not at all; a full socket buffer drops it, as
                # a congested network would, and the client retries.
                sock.sendto(reply, peer)
        except OSError as exc:
            log.debug("UDP reply to %s failed: %s", peer, exc)
        finally:
            self._slots.release()

    # --- TCP (RFC 7766: two-octet length prefix, several queries per connection) ----------------

    async def serve_tcp(self, sock: socket.socket) -> None:
        """Serve queries on a listening TCP socket until cancelled."""
        server = await asyncio.start_server(self._tcp_client, sock=sock)
        try:
            async with server:
                await server.serve_forever()
        finally:
            for task in list(self._tcp_clients):
                task.cancel()

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        current = asyncio.current_task()
        if current is None or len(self._tcp_clients) >= self.max_tcp_connections:
            writer.close()
            return
        self._tcp_clients.add(current)
        pending: set[asyncio.Task[None]] = set()
        pipeline = asyncio.Semaphore(_TCP_PIPELINE)
        write_lock = asyncio.Lock()
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), self.tcp_idle_timeout)
                    (size,) = struct.unpack("!H", head)
                    if size > _TCP_MAX_QUERY:
                        log.debug("TCP message of %d octets is not a query; closing", size)
                        break
                    data = await asyncio.wait_for(reader.readexactly(size),
                                                  self.tcp_idle_timeout)
                except (TimeoutError, asyncio.IncompleteReadError, OSError):
                    break
                await pipeline.acquire()
                await self._slots.acquire()
                task = asyncio.create_task(self._tcp_one(writer, write_lock, data, pipeline))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                # Answer what was asked before closing; a lookup is bounded by resolve_timeout.
                await asyncio.wait(pending, timeout=self.resolve_timeout + 1)
        finally:
            for task in pending:
                task.cancel()
            self._tcp_clients.discard(current)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _tcp_one(self, writer: asyncio.StreamWriter, write_lock: asyncio.Lock,
                       data: bytes, pipeline: asyncio.Semaphore) -> None:
        try:
            reply = await self._handle_safely(data, "tcp")
            if reply is None or writer.is_closing():
                return
            async with write_lock:
                writer.write(struct.pack("!H", len(reply)) + reply)
                await asyncio.wait_for(writer.drain(), self.tcp_idle_timeout)
        except (OSError, TimeoutError) as exc:
            log.debug("TCP reply failed: %s", exc)
        finally:
            self._slots.release()
            pipeline.release()


async def _recvfrom(loop: asyncio.AbstractEventLoop, sock: socket.socket
                    ) -> tuple[bytes, tuple[Any, ...]]:
    """One datagram. uvloop has no ``sock_recvfrom``, so wait for readability directly."""
    while True:
        try:
            data, peer = sock.recvfrom(_UDP_READ_SIZE)
            return data, peer
        except (BlockingIOError, InterruptedError):
            await wait_fd(loop, sock.fileno(), writable=False)


class _Exchange:
    """One parsed query on its way to a response; holds what every log row of it repeats."""

    __slots__ = ("max_size", "protocol", "query", "score", "stub")

    def __init__(self, stub: DnsStub, query: Query, protocol: str) -> None:
        self.stub = stub
        self.query = query
        self.protocol = protocol
        self.max_size = TCP_MAX_SIZE if protocol == "tcp" else None
        self.score: Score = exfil_score(query.name, stub._secrets, stub._find_secrets)

    def _record(self, verdict: Verdict, rule_id: str, reason: str, rcode: Rcode, host: str,
                addresses: Sequence[IPAddress] = (),
                more: Mapping[str, object] | None = None) -> None:
        extra: dict[str, object] = {
            "qtype": type_name(self.query.qtype),
            "rcode": rcode.name,
            "score": self.score.value,
            "score_reasons": list(self.score.reasons),
            **(more or {}),
        }
        if addresses:
            extra["addresses"] = [str(a) for a in addresses]
        self.stub._log(AuditRecord(
            layer="dns", verdict=verdict.value, rule_id=rule_id, reason=reason, host=host,
            address=str(addresses[0]) if addresses else None, protocol=self.protocol,
            extra=extra))

    def _refuse(self, rcode: Rcode, rule_id: str, reason: str, host: str,
                verdict: Verdict = Verdict.DENY,
                more: Mapping[str, object] | None = None) -> bytes:
        self._record(verdict, rule_id, reason, rcode, host, more=more)
        return refuse(self.query, rcode, max_size=self.max_size)

    async def run(self) -> bytes:
        query, stub = self.query, self.stub
        if query.opcode != OPCODE_QUERY:
            return self._refuse(Rcode.NOTIMP, DEFAULT_RULE, f"opcode {query.opcode} not "
                                "implemented; the stub answers only standard queries", query.name)
        if query.edns_version not in (None, 0):
            return self._refuse(Rcode.BADVERS, DEFAULT_RULE, f"EDNS version "
                                f"{query.edns_version} not supported; only version 0", query.name)
        if query.qclass != CLASS_IN:
            return self._refuse(Rcode.REFUSED, DEFAULT_RULE, f"class {query.qclass} not "
                                "served; only IN", query.name)
        try:
            host = normalize_host(query.name)
        except InputError as exc:
            return self._refuse(Rcode.REFUSED, DEFAULT_RULE, f"name refused: {exc}", query.name)

        decision = stub._decide(Request(host=host, port=0, layer=Layer.DNS))
        if not decision.allowed:
            return self._refuse(Rcode.REFUSED, decision.rule_id, decision.reason, host)
        # What enforce mode would refuse; only report mode gets past a refusal to here.
        would_refuse = [decision.reason] if decision.verdict is Verdict.REPORT else []

        why, rule_id = None, SECRETS_RULE
        if self.score.secret:
            why = f"name {host} carries a secret: {'; '.join(self.score.reasons)}"
        elif stub.max_score is not None and self.score.value > stub.max_score:
            why, rule_id = (f"name {host} scores {self.score.value} for carrying data, over "
                            f"max_score {stub.max_score}"), DEFAULT_RULE
        if why is None and stub._name_check is not None:
            # The content policy: secrets and credentials in any encoding, placeholders, data
            # in the labels of a wildcard rule (DESIGN.md hard rule 6).
            why, rule_id = stub._name_check(host, decision.rule_id), decision.rule_id
        if why is not None:
            if not stub.report_only:
                return self._refuse(Rcode.REFUSED, rule_id, why, host)
            would_refuse.append(why)

        if query.qtype not in (TYPE_A, TYPE_AAAA):
            verdict, allowed_by = _allowed(decision, would_refuse)
            self._record(verdict, decision.rule_id, f"{allowed_by}; type "
                         f"{type_name(query.qtype)} is answered with no data", Rcode.NOERROR, host)
            return nodata(query, max_size=self.max_size)
        return await self._lookup(host, decision, would_refuse)

    async def _lookup(self, host: str, decision: Decision, would_refuse: list[str]) -> bytes:
        query, stub = self.query, self.stub
        verdict, allowed_by = _allowed(decision, would_refuse)
        try:
            resolved = await asyncio.wait_for(stub._resolve(host), stub.resolve_timeout)
        except TimeoutError:
            return self._refuse(Rcode.SERVFAIL, decision.rule_id, f"{allowed_by}, but resolving "
                                f"{host} timed out after {stub.resolve_timeout:g}s", host,
                                verdict=verdict)
        except Exception as exc:
            return self._refuse(Rcode.SERVFAIL, decision.rule_id, f"{allowed_by}, but resolving "
                                f"{host} failed: {exc}", host, verdict=verdict)

        family = 4 if query.qtype == TYPE_A else 6
        candidates = [a for a in resolved if a.version == family]
        if not candidates:
            self._record(verdict, decision.rule_id, f"{allowed_by}; {host} has no "
                         f"{type_name(query.qtype)} address", Rcode.NOERROR, host)
            return nodata(query, max_size=self.max_size)

        passed: list[IPAddress] = []
        blocked: list[str] = []
        for address in candidates:
            check = stub._check_address(address)
            if check.allowed:
                passed.append(address)
            else:
                blocked.append(check.reason)
        if blocked and stub.report_only:
            passed = candidates
            verdict, allowed_by = _allowed(decision, [*would_refuse, *blocked])
        elif not passed:
            return self._refuse(Rcode.REFUSED, DEFAULT_RULE, f"{'; '.join(blocked)} "
                                f"(name {host})", host, more={"blocked": blocked})

        stub.names.remember(host, passed, stub.ttl)
        self._record(verdict, decision.rule_id, allowed_by, Rcode.NOERROR, host, passed,
                     {"blocked": blocked} if blocked else None)
        return answer(query, passed, stub.ttl, max_size=self.max_size)


def _allowed(decision: Decision, would_refuse: Sequence[str]) -> tuple[Verdict, str]:
    """Verdict and reason of an answer: ALLOW with the rule's reason, or REPORT with what enforce
    mode would have refused."""
    if would_refuse:
        return Verdict.REPORT, "report mode, enforce would refuse: " + "; ".join(would_refuse)
    return Verdict.ALLOW, decision.reason
