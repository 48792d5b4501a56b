"""nftables for the sandbox: libnftables through ctypes, and the capture ruleset as text.

The rules are installed by the child between ``unshare`` and ``exec``, while it holds
CAP_NET_ADMIN in its own user namespace. An ``nft`` process would lose those capabilities
across ``execve`` (``capabilities(7)``), so the rules go through libnftables in-process, the
library the ``nft`` command itself is a thin front end to (``libnftables(3)``). Its netlink
socket belongs to the network namespace the process is in when the context is created
(``network_namespaces(7)``), so an :class:`Nft` must be made after ``unshare``.

The ruleset is generated as nft's own language rather than built as netlink expressions:
it is readable in a bug report, the tests install exactly the text a user can inspect with
``nft list ruleset``, and the kernel's verifier checks it all the same.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from types import TracebackType

from egresslock.errors import SandboxError

_LIBRARY = "libnftables.so.1"
TABLE = "egresslock"


@dataclass(frozen=True, slots=True)
class CaptureSpec:
    """What the capture ruleset sends where, inside the sandbox's network namespace.

    ``proxy_port``: the HTTP_PROXY listener (127.0.0.1 and ::1); it needs no rule, loopback
    is reachable as it is, but it is part of the spec so the caller makes one value for the
    whole network setup. ``transparent_port``: the listener that receives every other TCP
    connection when ``transparent`` is on (ignored when off). ``dns_port``: the DNS stub,
    which must listen on 127.0.0.1 and ::1 for UDP and TCP, since a query to any resolver
    of either family is redirected to it. ``nflog_group``: the NFLOG group dropped packets
    are reported to.
    """

    proxy_port: int
    transparent_port: int
    dns_port: int
    nflog_group: int
    transparent: bool

    def __post_init__(self) -> None:
        for name in ("proxy_port", "transparent_port", "dns_port"):
            value = getattr(self, name)
            if type(value) is not int or not 1 <= value <= 65535:
                raise SandboxError(f"CaptureSpec.{name} must be a TCP/UDP port 1-65535, "
                                   f"not {value!r}")
        if type(self.nflog_group) is not int or not 0 <= self.nflog_group <= 65535:
            raise SandboxError(f"CaptureSpec.nflog_group must be an NFLOG group 0-65535, "
                               f"not {self.nflog_group!r}")


def capture_ruleset(spec: CaptureSpec) -> str:
    """The nftables ruleset of the sandbox, as text for :meth:`Nft.run` (or ``nft -f``).

    Only the output hook is used. Every packet in the namespace is made by a process in it:
    the only interface is ``lo``, so nothing arrives from outside, and whatever comes in on
    ``lo`` already passed this output filter on its way out. An input or forward chain would
    have nothing left to decide (wiki.nftables.org, "Netfilter hooks": a locally generated
    packet meets OUTPUT then POSTROUTING; looped back through ``lo`` it meets PREROUTING and
    INPUT, after this filter already accepted it).

    The NAT chain runs first (priority -100, ``NF_IP_PRI_NAT_DST``) and rewrites destinations:
    DNS of any resolver to the stub; with ``transparent``, every other non-loopback TCP
    connection to the proxy. The filter chain then sees the rewritten destination, so it can
    accept loopback, which is all the redirected traffic and local servers of the agent, and
    drop the rest after logging it. Accepting all loopback lets nothing out: loopback packets
    stay in this namespace, and the namespace holds no other interface to route them to.
    Conntrack NAT applies to a connection's first packet only; later packets of a redirected
    flow are rewritten by conntrack before the filter sees them, so they are loopback too.
    """
    dns = spec.dns_port
    lines = [
        f"table inet {TABLE} {{",
        "\tchain capture {",
        "\t\ttype nat hook output priority -100; policy accept;",
        # DNS first, loopback resolvers too: the host's resolv.conf often names 127.0.0.53
        # (systemd-resolved), which does not exist in this namespace; the stub answers instead.
        f"\t\tmeta l4proto {{ tcp, udp }} th dport 53 redirect to :{dns}",
        "\t\tip daddr 127.0.0.0/8 accept",
        "\t\tip6 daddr ::1 accept",
    ]
    if spec.transparent:
        lines.append(f"\t\tmeta l4proto tcp redirect to :{spec.transparent_port}")
    lines += [
        "\t}",
        "\tchain egress {",
        "\t\ttype filter hook output priority 0; policy drop;",
        "\t\tip daddr 127.0.0.0/8 accept",
        "\t\tip6 daddr ::1 accept",
        # Anything left would leave the namespace if it had a way out: report it, then refuse.
        # TCP gets a reset, so a connect fails at once with ECONNREFUSED instead of hanging
        # through SYN retries (each of which would be another log row); the rest is dropped,
        # which a sender sees at once as EPERM.
        f"\t\tmeta l4proto tcp log group {spec.nflog_group} reject with tcp reset",
        f"\t\tlog group {spec.nflog_group} drop",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


@functools.cache
def library() -> ctypes.CDLL:
    """libnftables, loaded once per process. Loading it takes about 1 ms: a parent that forks
    sandbox children loads it first (``preload``), so each child only makes a context."""
    try:
        return ctypes.CDLL(_LIBRARY, use_errno=True)
    except OSError as exc:
        raise SandboxError(f"cannot load {_LIBRARY}: {exc}; install the nftables library "
                           f"(Debian/Ubuntu: libnftables1, Fedora: nftables)") from exc


class Nft:
    """One libnftables context, its output and error messages captured rather than printed.

    Make it inside the network namespace it is to configure, and close it (or use it as a
    context manager) when done.
    """

    def __init__(self) -> None:
        lib = library()
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_free.restype = None
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.restype = ctypes.c_int
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.restype = ctypes.c_int
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self._lib = lib
        self._ctx: int | None = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not self._ctx:
            raise SandboxError("nft_ctx_new() failed: libnftables could not make a context")
        # Without buffering, libnftables writes results and errors to our stdout/stderr,
        # which in the sandbox child belong to the agent.
        if lib.nft_ctx_buffer_output(self._ctx) or lib.nft_ctx_buffer_error(self._ctx):
            self.close()
            raise SandboxError("libnftables refused to buffer its output")

    def run(self, commands: str) -> str:
        """Run nft commands (the language of ``nft -f``); return what nft printed.

        Raises :class:`SandboxError` carrying nft's own error text, which names the line and
        marks the offending token, when the commands do not parse or the kernel refuses them
        (EPERM without CAP_NET_ADMIN, a missing nf_tables feature).
        """
        if self._ctx is None:
            raise SandboxError("this Nft context is closed")
        if "\0" in commands:
            raise SandboxError("nft commands must not contain a NUL byte")
        rc = self._lib.nft_run_cmd_from_buffer(self._ctx, commands.encode())
        output = self._read("nft_ctx_get_output_buffer")
        if rc != 0:
            error = self._read("nft_ctx_get_error_buffer").strip()
            raise SandboxError(f"nftables refused the sandbox rules: "
                               f"{error or f'nft_run_cmd_from_buffer returned {rc}'}")
        return output

    def _read(self, getter: str) -> str:
        raw: bytes | None = getattr(self._lib, getter)(self._ctx)
        return raw.decode(errors="replace") if raw else ""

    def close(self) -> None:
        """Free the context; idempotent."""
        if self._ctx is not None:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Nft:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
