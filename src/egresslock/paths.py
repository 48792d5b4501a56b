"""Where egresslock keeps its own files. Light on purpose: ``egresslock run`` asks where the CA
directory is (to hide it from the sandbox) without loading the cryptography package."""

from __future__ import annotations

import os
from pathlib import Path


def default_ca_dir() -> Path:
    """``$EGRESSLOCK_CA_DIR``, else ``$XDG_DATA_HOME/egresslock/ca`` (``~/.local/share/...``):
    the CA's key and certificate, and the key of keyed hashes (``transform.key``)."""
    env = os.environ.get("EGRESSLOCK_CA_DIR")
    if env:
        return Path(env)
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "egresslock" / "ca"
