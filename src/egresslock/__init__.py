"""egresslock: a no-exfiltration channel for AI agents.

An agent that holds private data and reads untrusted input can be talked into sending that data
out. egresslock leaves it no way to: the kernel denies all egress but one proxy, and the proxy
allows only what a readable policy names, logging every decision.
"""

__version__ = "0.1.0"
