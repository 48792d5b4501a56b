"""Transforms on allowed requests: strip headers, hash query values and JSON fields, redact.

An allowed destination still receives whatever the agent puts in the request. A transform
changes the request on its way out, so the destination gets what it needs and no more: an
analytics endpoint gets a keyed hash of a user id instead of the id (it can count and correlate,
not read), a search API gets no cookies, a logging endpoint gets ``[redacted]`` where a prompt
was. Hashes are HMAC-SHA256 under a key kept outside the sandbox (:mod:`egresslock.content.keys`),
so nobody who lacks the key can test a guess against a hash.

Every function returns the changed value and a list of sentences for the audit row ("stripped
header cookie", "hashed /user/email").
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote_plus, unquote_plus

from egresslock.errors import InputError

REDACTED = "[redacted]"
# Headers a transform never touches: the proxy writes them itself, or the message needs them.
_FRAMING = frozenset({"host", "content-length", "transfer-encoding", "connection", "upgrade",
                      "expect"})
_ALWAYS_STRIPPED = ("cookie", "authorization")


def hash_value(key: bytes, value: str) -> str:
    """A stable keyed hash of ``value``: ``hmac-`` and 32 hex digits (128 bits)."""
    digest = hmac.new(key, value.encode("utf-8", "surrogateescape"), hashlib.sha256)
    return "hmac-" + digest.hexdigest()[:32]


def filter_headers(headers: Sequence[tuple[bytes, bytes]], allow: Sequence[str] | None,
                   strip: Sequence[str] | None, keep: frozenset[str] = frozenset()
                   ) -> tuple[list[tuple[bytes, bytes]], list[str]]:
    """Apply ``headers: {allow}`` or ``{strip}``; ``keep`` names headers the proxy inserted."""
    allowed = frozenset(h.lower() for h in allow) if allow is not None else None
    stripped = frozenset(h.lower() for h in (strip or ())) | (
        frozenset(_ALWAYS_STRIPPED) - (allowed or frozenset()))
    out: list[tuple[bytes, bytes]] = []
    removed: list[str] = []
    for name, value in headers:
        low = name.decode("latin-1").lower()
        if low in _FRAMING or low in keep:
            out.append((name, value))
        elif (allowed is not None and low not in allowed) or low in stripped:
            if low not in removed:
                removed.append(low)
        else:
            out.append((name, value))
    return out, [f"stripped header {h}" for h in removed]


def hash_query(query: str, params: Sequence[str], key: bytes) -> tuple[str, list[str]]:
    """The query with the values of ``params`` replaced by their keyed hash."""
    wanted = frozenset(params)
    changed: list[str] = []
    parts = []
    for pair in query.split("&"):
        raw_name, eq, raw_value = pair.partition("=")
        name = unquote_plus(raw_name)
        if eq and name in wanted:
            parts.append(f"{raw_name}={quote_plus(hash_value(key, unquote_plus(raw_value)))}")
            if name not in changed:
                changed.append(name)
        else:
            parts.append(pair)
    return "&".join(parts), [f"hashed query parameter {n}" for n in changed]


def _split_pointer(pointer: str) -> list[str]:
    return [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]


def _apply(doc: Any, parts: list[str], fn: Callable[[Any], Any], path: str,
           changed: list[str]) -> Any:
    if not parts:
        changed.append(path or "/")
        return fn(doc)
    head, rest = parts[0], parts[1:]
    if isinstance(doc, dict):
        keys = list(doc) if head == "*" else [head] if head in doc else []
        for k in keys:
            doc[k] = _apply(doc[k], rest, fn, f"{path}/{k}", changed)
    elif isinstance(doc, list):
        if head == "*":
            indexes = range(len(doc))
        elif head.isdigit() and int(head) < len(doc):
            indexes = range(int(head), int(head) + 1)
        else:
            indexes = range(0)
        for i in indexes:
            doc[i] = _apply(doc[i], rest, fn, f"{path}/{i}", changed)
    return doc


def transform_json(body: bytes, hash_pointers: Sequence[str], redact_pointers: Sequence[str],
                   key: bytes) -> tuple[bytes, list[str]]:
    """The JSON body with fields hashed and redacted; raises InputError if it is not JSON.

    ``*`` in a pointer stands for every member or element. A pointer that matches nothing
    changes nothing. Hashed non-string values are hashed in their JSON spelling.
    """
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"body is not JSON ({exc}), so hash_json/redact_json cannot apply"
                         ) from exc
    changes: list[str] = []
    for pointer in hash_pointers:
        done: list[str] = []
        doc = _apply(doc, _split_pointer(pointer), lambda v: hash_value(
            key, v if isinstance(v, str) else json.dumps(v, sort_keys=True)), "", done)
        changes += [f"hashed {p}" for p in done]
    for pointer in redact_pointers:
        done = []
        doc = _apply(doc, _split_pointer(pointer), lambda v: REDACTED, "", done)
        changes += [f"redacted {p}" for p in done]
    if not changes:
        return body, []
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8"), changes
