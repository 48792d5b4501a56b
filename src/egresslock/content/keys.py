"""The per-installation key of keyed hashes (``hash_query``, ``hash_json``).

A hash without a key can be reversed by guessing (an email address, a user id); an HMAC under a
key the receiver never holds cannot. The key lives next to the inspection CA's key, in a
directory of mode 0700 that ``egresslock run`` hides from the sandbox, and is made on first use.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

KEY_FILE = "transform.key"
_KEY_BYTES = 32


def load_or_create_key(directory: Path) -> bytes:
    """The key in ``directory`` (created with mode 0600, and the directory 0700, if missing)."""
    path = directory / KEY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        key = secrets.token_bytes(_KEY_BYTES)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            return load_or_create_key(directory)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key
    if len(data) != _KEY_BYTES:
        raise ValueError(f"{path} holds {len(data)} bytes, not a {_KEY_BYTES}-byte key; "
                         "remove it to make a new one (hashes made before will change)")
    return data
