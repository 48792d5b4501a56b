"""The DNS message format (RFC 1035 section 4), sans-IO: bytes in, a :class:`Query` out, bytes back.

The stub reads only queries and writes only responses, so this codec is deliberately narrow. It
parses one message into a :class:`Query` or raises :class:`DnsFormatError`, and nothing else,
whatever the bytes (the h11 rule: input parses or raises the one protocol error). It does not
build a general message tree; the builders write the few responses the stub sends.

Choices forced by the stub's job:

* Names are read label by label with compression pointers that must point backwards and at most
  :data:`_MAX_POINTERS` times (RFC 1035 4.1.4 says a pointer refers to a *prior* occurrence, so a
  forward or self pointer is malformed, and a loop is impossible). A label over 63 octets or a
  name over 255 octets on the wire (RFC 1035 2.3.4) is malformed.
* A label may hold any octet on the wire. The name string uses the presentation format of
  RFC 4343: ``.`` and ``\\`` inside a label are escaped, other octets outside letters, digits,
  ``-`` and ``_`` become ``\\DDD``. So the label ``"api.github"`` never reads as two labels, and
  :func:`egresslock.policy.normalize.normalize_host` refuses any escaped name (it refuses ``\\``).
  Only ASCII letters are lower-cased, as RFC 4343 defines DNS case-insensitivity.
* The question is echoed exactly as received, case included: resolvers that randomise case
  (draft-vixie-dnsext-dns0x20) drop answers whose question differs.
* Responses never compress anything but answer owner names (a pointer to the question at offset
  12), and carry an OPT record exactly when the query did (RFC 6891 6.1.1).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from egresslock.errors import InputError
from egresslock.policy.normalize import IPAddress

HEADER_SIZE = 12
CLASS_IN = 1
TYPE_A = 1
TYPE_AAAA = 28
TYPE_OPT = 41
OPCODE_QUERY = 0
# Without EDNS a UDP response may not exceed 512 octets (RFC 1035 4.2.1).
CLASSIC_UDP_SIZE = 512
# What the stub advertises in its own OPT record: the DNS Flag Day 2020 value, small enough to
# avoid IP fragmentation on any path.
STUB_UDP_SIZE = 1232
TCP_MAX_SIZE = 65535

_QR, _AA, _TC, _RD, _RA, _CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0010
_MAX_NAME = 255
_MAX_LABEL = 63
# A query's question has one name; a few pointers are plenty, more is an attack on the parser.
_MAX_POINTERS = 16
_PLAIN_OCTETS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_")


class Rcode(enum.IntEnum):
    """Response codes the stub sends (RFC 1035 4.1.1; BADVERS from RFC 6891)."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    BADVERS = 16


_TYPE_NAMES = {1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
               33: "SRV", 35: "NAPTR", 41: "OPT", 64: "SVCB", 65: "HTTPS", 255: "ANY"}


def type_name(qtype: int) -> str:
    """``1`` -> ``"A"``; unknown types in RFC 3597 form, ``"TYPE65280"``."""
    return _TYPE_NAMES.get(qtype, f"TYPE{qtype}")


class DnsFormatError(InputError):
    """A DNS message that cannot be read as one well-formed query.

    ``replyable`` is True when the header was read and the sender may be told FORMERR; it is False
    when there is no header, or when the message is itself a response (answering a response
    invites two servers to bounce errors at each other forever).
    """

    def __init__(self, message: str, *, replyable: bool) -> None:
        super().__init__(message)
        self.replyable = replyable


@dataclass(frozen=True, slots=True)
class Query:
    """One question, as the stub needs it.

    ``name`` is lower-case presentation format without the trailing dot (``""`` for the root).
    ``question`` is the question section as received, re-encoded without compression, for the
    echo. ``udp_size`` is the largest UDP response the client accepts: 512, or its EDNS payload
    size if larger. ``edns_version`` is None when the query had no OPT record.
    """

    id: int
    flags: int
    name: str
    qtype: int
    qclass: int
    question: bytes
    udp_size: int = CLASSIC_UDP_SIZE
    edns_version: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.id <= 0xFFFF or not 0 <= self.flags <= 0xFFFF:
            raise ValueError(f"id {self.id} and flags {self.flags} must fit in 16 bits")

    @property
    def opcode(self) -> int:
        """0 for a standard query; the stub answers anything else with NOTIMP."""
        return (self.flags >> 11) & 0xF

    @property
    def rd(self) -> bool:
        """Recursion desired: copied into every response (RFC 1035 4.1.1)."""
        return bool(self.flags & _RD)


def _read_name(data: bytes, offset: int) -> tuple[list[bytes], int]:
    """The labels of the name at ``offset``, and the offset just after it in the message."""
    labels: list[bytes] = []
    wire_length = 1  # the root label
    pos = offset
    end: int | None = None
    pointers = 0
    while True:
        if pos >= len(data):
            raise DnsFormatError(f"name at offset {offset} runs past the end of the message",
                                 replyable=True)
        length = data[pos]
        if length >= 0xC0:
            if pos + 1 >= len(data):
                raise DnsFormatError(f"compression pointer at offset {pos} is cut off",
                                     replyable=True)
            target = ((length & 0x3F) << 8) | data[pos + 1]
            pointers += 1
            if target >= pos or target < HEADER_SIZE or pointers > _MAX_POINTERS:
                raise DnsFormatError(
                    f"compression pointer at offset {pos} to {target} is invalid: pointers must "
                    f"point back into the message body, at most {_MAX_POINTERS} per name",
                    replyable=True)
            if end is None:
                end = pos + 2
            pos = target
            continue
        if length > _MAX_LABEL:
            raise DnsFormatError(f"label length {length} at offset {pos} is over {_MAX_LABEL} "
                                 "(or an extended label type, which no query needs)",
                                 replyable=True)
        if length == 0:
            return labels, end if end is not None else pos + 1
        if pos + 1 + length > len(data):
            raise DnsFormatError(f"label at offset {pos} runs past the end of the message",
                                 replyable=True)
        wire_length += 1 + length
        if wire_length > _MAX_NAME:
            raise DnsFormatError(f"name at offset {offset} is over {_MAX_NAME} octets",
                                 replyable=True)
        labels.append(data[pos + 1 : pos + 1 + length])
        pos += 1 + length


def _presentation(label: bytes) -> str:
    out: list[str] = []
    for octet in label:
        if 0x41 <= octet <= 0x5A:
            out.append(chr(octet + 0x20))
        elif octet in _PLAIN_OCTETS:
            out.append(chr(octet))
        elif octet in (0x2E, 0x5C):
            out.append("\\" + chr(octet))
        else:
            out.append(f"\\{octet:03d}")
    return "".join(out)


def _encode_name(labels: Sequence[bytes]) -> bytes:
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


def _need(data: bytes, pos: int, size: int, what: str) -> None:
    if pos + size > len(data):
        raise DnsFormatError(f"{what} at offset {pos} is cut off", replyable=True)


def parse_query(data: bytes) -> Query:
    """Read one query message. Raises :class:`DnsFormatError` and nothing else."""
    if len(data) < HEADER_SIZE:
        raise DnsFormatError(f"message of {len(data)} octets is shorter than the 12-octet header",
                             replyable=False)
    ident, flags, qdcount, ancount, nscount, arcount = struct.unpack_from("!6H", data)
    if flags & _QR:
        raise DnsFormatError("message is a response (QR set), not a query", replyable=False)
    if qdcount != 1:
        raise DnsFormatError(f"query has {qdcount} questions; exactly 1 is allowed (RFC 9619)",
                             replyable=True)
    opcode = (flags >> 11) & 0xF
    if opcode == OPCODE_QUERY and (ancount or nscount):
        raise DnsFormatError(f"query carries {ancount} answer and {nscount} authority records; "
                             "a query has none", replyable=True)
    labels, pos = _read_name(data, HEADER_SIZE)
    _need(data, pos, 4, "question type and class")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    pos += 4
    question = _encode_name(labels) + data[pos - 4 : pos]
    udp_size = CLASSIC_UDP_SIZE
    edns_version: int | None = None
    if opcode == OPCODE_QUERY:
        for _ in range(arcount):
            owner, pos = _read_name(data, pos)
            _need(data, pos, 10, "resource record header")
            rtype, rclass, rttl, rdlength = struct.unpack_from("!HHIH", data, pos)
            pos += 10
            _need(data, pos, rdlength, "resource record data")
            pos += rdlength
            if rtype != TYPE_OPT:
                continue  # TSIG and the like: nothing the stub could check, nothing it needs
            if owner or edns_version is not None:
                raise DnsFormatError("OPT record must be unique and owned by the root "
                                     "(RFC 6891 6.1.1)", replyable=True)
            edns_version = (rttl >> 16) & 0xFF
            udp_size = max(CLASSIC_UDP_SIZE, rclass)
        if pos != len(data):
            raise DnsFormatError(f"{len(data) - pos} octets follow the last record",
                                 replyable=True)
    name = ".".join(_presentation(label) for label in labels)
    return Query(ident, flags, name, qtype, qclass, question, udp_size, edns_version)


# --- builders ----------------------------------------------------------------------------------


def _flags(request_flags: int, rcode: int, truncated: bool) -> int:
    # Echo opcode, RD and CD (RFC 1035 4.1.1, RFC 6840 5.9); never AA (the stub is no authority)
    # nor RA (it recurses nowhere: it answers from the policy and the proxy's resolver).
    flags = _QR | (request_flags & (0x7800 | _RD | _CD)) | (rcode & 0xF)
    return flags | _TC if truncated else flags


def _opt(rcode: int) -> bytes:
    # Extended rcode's upper 8 bits in the TTL's top octet, version 0, no DO bit, no options.
    return b"\x00" + struct.pack("!HHIH", TYPE_OPT, STUB_UDP_SIZE, (rcode >> 4) << 24, 0)


def _response(query: Query, rcode: int, records: Sequence[bytes], max_size: int | None) -> bytes:
    limit = query.udp_size if max_size is None else max_size
    opt = _opt(rcode) if query.edns_version is not None else b""
    for truncated in (False, True):
        kept = () if truncated else records
        header = struct.pack("!6H", query.id, _flags(query.flags, rcode, truncated), 1,
                             len(kept), 0, 1 if opt else 0)
        message = header + query.question + b"".join(kept) + opt
        # RFC 2181 9: a response that does not fit drops whole RRsets and sets TC; the client
        # then asks again over TCP.
        if len(message) <= limit or truncated:
            return message
    raise AssertionError("unreachable")  # pragma: no cover


def answer(query: Query, addresses: Sequence[IPAddress], ttl: int, *,
           max_size: int | None = None) -> bytes:
    """A NOERROR response holding the addresses of the query's family: A records for a query of
    type A, AAAA for AAAA, none for any other type. ``max_size`` defaults to the query's UDP size;
    pass :data:`TCP_MAX_SIZE` over TCP."""
    ttl = min(max(ttl, 0), 0x7FFFFFFF)
    version = {TYPE_A: 4, TYPE_AAAA: 6}.get(query.qtype)
    records = [
        # 0xC00C: the owner name is the question name, at offset 12.
        struct.pack("!HHHIH", 0xC00C, query.qtype, CLASS_IN, ttl, len(a.packed)) + a.packed
        for a in addresses if a.version == version
    ]
    return _response(query, Rcode.NOERROR, records, max_size)


def nodata(query: Query, *, max_size: int | None = None) -> bytes:
    """NOERROR with no answers: the name exists, but not with this type (RFC 2308 2.2)."""
    return _response(query, Rcode.NOERROR, (), max_size)


def refuse(query: Query | bytes, rcode: Rcode, *, max_size: int | None = None) -> bytes:
    """An error response. Given raw bytes (a query that failed to parse), the response copies the
    id, opcode and RD from its header and carries no question; raises :class:`DnsFormatError`
    when there is no 12-octet header to copy."""
    if rcode == Rcode.NOERROR:
        raise ValueError("refuse() needs an error rcode; use nodata() or answer() for NOERROR")
    if isinstance(query, Query):
        return _response(query, rcode, (), max_size)
    if len(query) < HEADER_SIZE:
        raise DnsFormatError(f"message of {len(query)} octets has no header to answer",
                             replyable=False)
    ident, flags = struct.unpack_from("!2H", query)
    return struct.pack("!6H", ident, _flags(flags, rcode & 0xF, False), 0, 0, 0, 0)
