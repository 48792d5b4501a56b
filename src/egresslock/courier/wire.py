"""The channel between egresslock and the courier's worker: one JSON object per line.

The channel is a Unix socketpair made before the worker's sandbox exists; the worker inherits
its end (``SandboxSpec.keep_fds``) and holds no other way to egresslock. Messages::

    egresslock -> worker   {"hello": 1, "actions": [...], "placeholders": {...}, "proxy": [..]}
    worker -> egresslock   {"ready": true, "pid": N, "filesystem": "..."}  (or {"error": ...})
    egresslock -> worker   {"id": N, "action": NAME, "params": {...}}
    worker -> egresslock   {"id": N, "ok": true, "status": 201, "headers": {...}, "body": ...}
                           {"id": N, "ok": false, "kind": "refused" | "denied" | "upstream",
                            "reason": "..."}

JSON text never holds a raw newline (``json.dumps`` escapes it), so a newline ends a message.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from egresslock.errors import InputError

MAX_LINE = 8 << 20  # a call's parameters (1 MiB at most) or a reply (body capped below this)


class WireError(InputError):
    """A message on the channel was not one JSON object per line within the size limit."""


def encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError as exc:
        raise WireError(f"courier channel: a message is not JSON ({exc})") from exc
    if not isinstance(message, dict):
        raise WireError("courier channel: a message is not a JSON object")
    return message


class Lines:
    """Splits a byte stream into messages; a line over ``limit`` bytes is an error."""

    __slots__ = ("_buf", "limit")

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buf += data
        out = []
        while (end := self._buf.find(b"\n")) >= 0:
            line = bytes(self._buf[:end])
            del self._buf[: end + 1]
            out.append(decode(line))
        if len(self._buf) > self.limit:
            raise WireError(f"courier channel: a message is over {self.limit} bytes")
        return out
