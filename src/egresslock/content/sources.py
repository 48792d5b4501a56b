"""Where secret and credential values come from: the policy's ``value``, ``env`` or ``file``.

This is the one place that reads them. A source that does not exist here (an unset variable, a
missing file) gives no value and a warning: a value that is not here cannot leak from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from egresslock.content.encodings import MIN_PLAIN
from egresslock.content.scanner import Kind, Needle
from egresslock.policy.model import Credential, Policy, Secret

# Shorter values would match ordinary text; they are still looked for in plain text only.
MIN_SECRET_LEN = 8


@dataclass(frozen=True, slots=True)
class Loaded:
    """Values read from their sources, and one warning per source that gave nothing."""

    values: dict[str, str]
    warnings: tuple[str, ...]


def read_source(item: Secret | Credential, environ: Mapping[str, str]) -> tuple[str | None,
                                                                              str | None]:
    """(value, warning): exactly one of them is None."""
    what = "secret" if isinstance(item, Secret) else "credential"
    if item.value is not None:
        return item.value, None
    if item.env is not None:
        value = environ.get(item.env)
        if not value:
            return None, f"{what} {item.name}: environment variable {item.env} is not set"
        return value, None
    assert item.file is not None
    try:
        text = Path(item.file).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return None, f"{what} {item.name}: cannot read {item.file}: {reason}"
    if not text:
        return None, f"{what} {item.name}: {item.file} is empty"
    return text, None


def load_secrets(policy: Policy, environ: Mapping[str, str]) -> Loaded:
    values: dict[str, str] = {}
    warnings: list[str] = []
    for secret in policy.secrets:
        value, warning = read_source(secret, environ)
        if value is None:
            warnings.append(warning or "")
            continue
        size = len(value.encode())
        if size < MIN_PLAIN:
            warnings.append(f"secret {secret.name} is {size} bytes; values under {MIN_PLAIN} "
                            "bytes would match ordinary text, so it is not looked for")
            continue
        if size < MIN_SECRET_LEN:
            warnings.append(f"secret {secret.name} is {size} bytes; values under "
                            f"{MIN_SECRET_LEN} bytes are matched in plain text only")
        values[secret.name] = value
    return Loaded(values, tuple(warnings))


def secret_needles(policy: Policy, environ: Mapping[str, str]) -> tuple[list[Needle],
                                                                        tuple[str, ...]]:
    """The policy's secrets as scanner needles, and the warnings of sources that gave nothing."""
    loaded = load_secrets(policy, environ)
    return ([Needle(name, value.encode("utf-8"), Kind.SECRET)
             for name, value in loaded.values.items()], loaded.warnings)
