"""Credential placeholders: the agent holds a stand-in, the proxy puts the real value on the wire.

An agent that holds an API token can be talked into sending it anywhere. Under ``credentials:``
it never holds it: its environment variable carries a random placeholder of the same length
(``EGLPH`` and random letters and digits), and the real value stays in the egresslock process.
The proxy replaces the placeholder by the real value only in the named headers of requests to the
named hosts, refuses a placeholder seen anywhere else (another host, another header, a URL, a
body, a DNS name), and puts the placeholder back wherever a response from those hosts echoes the
real value. The same length keeps Content-Length true when a response is rewritten.
"""

from __future__ import annotations

import base64
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from egresslock.content.sources import read_source
from egresslock.errors import InputError
from egresslock.policy.glob import HostPattern, parse_host_pattern
from egresslock.policy.model import Policy

PREFIX = "EGLPH"
MIN_LENGTH = 16
_ALPHABET = string.ascii_letters + string.digits


def make_placeholder(real: str) -> str:
    """A random placeholder as long (in bytes) as ``real``, recognisable by its prefix."""
    size = len(real.encode("utf-8"))
    if size < MIN_LENGTH:
        raise InputError(f"is {size} bytes long; a placeholder of the same length needs at "
                         f"least {MIN_LENGTH}")
    return PREFIX + "".join(secrets.choice(_ALPHABET) for _ in range(size - len(PREFIX)))


@dataclass(frozen=True, slots=True)
class Binding:
    """One credential, loaded: its placeholder and where the real value may go."""

    name: str
    real: bytes
    placeholder: bytes
    hosts: tuple[HostPattern, ...]
    headers: frozenset[str]  # lower-case

    def serves(self, host: str) -> bool:
        return any(h.matches(host) for h in self.hosts)

    def swap_header(self, name: str, value: bytes) -> bytes:
        """``value`` with the placeholder replaced, when ``name`` is one of the headers; Basic
        authentication (``user:placeholder`` in base64, as git and pip send a token) too."""
        if name.lower() not in self.headers:
            return value
        if value[:6].lower() == b"basic ":
            try:
                plain = base64.b64decode(value[6:].strip(), validate=True)
            except ValueError:
                return value
            if self.placeholder in plain:
                return value[:6] + base64.b64encode(plain.replace(self.placeholder, self.real))
            return value
        return value.replace(self.placeholder, self.real)

    def redact(self, data: bytes) -> bytes:
        return data.replace(self.real, self.placeholder)

    def where(self) -> str:
        return (f"header {', '.join(sorted(self.headers))} of requests to "
                f"{', '.join(h.text for h in self.hosts)}")


def load_bindings(policy: Policy, environ: Mapping[str, str]
                  ) -> tuple[list[Binding], list[str]]:
    """Bindings for the credentials whose real value exists here, and warnings for the rest."""
    out: list[Binding] = []
    warnings: list[str] = []
    for cred in policy.credentials:
        value, warning = read_source(cred, environ)
        if value is None:
            warnings.append(f"{warning}; {cred.name} is not set inside the sandbox")
            continue
        try:
            placeholder = make_placeholder(value)
        except InputError as exc:
            warnings.append(f"credential {cred.name} {exc}; it is not set inside the sandbox")
            continue
        out.append(Binding(cred.name, value.encode("utf-8"), placeholder.encode("ascii"),
                           tuple(parse_host_pattern(h) for h in cred.hosts),
                           frozenset(h.lower() for h in cred.headers)))
    return out, warnings


def sandbox_environment(bindings: Sequence[Binding], policy: Policy) -> tuple[dict[str, str],
                                                                              list[str]]:
    """(variables to set, variables to remove) in the sandboxed command's environment."""
    present = {b.name for b in bindings}
    remove = [c.env for c in policy.credentials if c.env is not None]
    remove += [c.name for c in policy.credentials if c.name not in present]
    return {b.name: b.placeholder.decode("ascii") for b in bindings}, remove


class Redactor:
    """Replaces real credential values by their placeholders in a stream of response bytes,
    across chunk boundaries: the last ``len(real) - 1`` bytes wait for the next piece."""

    __slots__ = ("_bindings", "_keep", "_pending")

    def __init__(self, bindings: Sequence[Binding]) -> None:
        self._bindings = tuple(bindings)
        self._keep = max(len(b.real) for b in bindings) - 1
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        window = self._pending + data
        for b in self._bindings:
            window = b.redact(window)
        if len(window) <= self._keep:
            self._pending = window
            return b""
        cut = len(window) - self._keep
        self._pending = window[cut:]
        return window[:cut]

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest
