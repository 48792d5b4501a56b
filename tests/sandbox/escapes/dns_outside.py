"""DNS straight to an outside resolver (UDP and TCP), for a name no rule allows and for one
that is allowed: both must be answered by the sandbox's stub, never by the resolver."""
import functools

from _common import RESOLVER, attempt, dns_query, report

for tcp in (False, True):
    proto = "tcp" if tcp else "udp"
    attempt(f"denied-{proto}", functools.partial(dns_query, "exfil.evil.test", RESOLVER, tcp=tcp))
    attempt(f"allowed-{proto}", functools.partial(dns_query, "app.test", RESOLVER, tcp=tcp))
attempt("txt-udp", lambda: dns_query("exfil.evil.test", RESOLVER, qtype=16))
report()
