"""Built-in detectors of well-known credential shapes.

A declared secret is a fixed string; a detector finds credentials nobody declared (an AWS key the
agent found in a dotfile, a token in a log it read). Each detector is a set of literal anchors,
found by the same Aho-Corasick pass as the secrets, and one regular expression that confirms a
match starting at the anchor. The regular expression runs only where an anchor was found, never
over the whole body, so a megabyte without ``AKIA`` or ``ghp_`` costs no regex work at all.

The shapes follow the issuers' published formats: AWS access key ids (four-letter prefix and 16
upper-case alphanumerics), GitHub's prefixed tokens, Slack's ``xox?-`` tokens and webhook URLs,
PEM private-key armour, JWTs (two base64url JSON objects and a signature), database URLs that
carry a password, and Azure connection strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Detector:
    """``anchors`` (lower-case literals) start a candidate; ``confirm`` must match there."""

    name: str
    group: str  # the policy's content.detectors key that switches it
    anchors: tuple[bytes, ...]
    confirm: re.Pattern[bytes]


def _d(name: str, group: str, anchors: tuple[str, ...], confirm: str,
       flags: int = 0) -> Detector:
    return Detector(name, group, tuple(a.lower().encode() for a in anchors),
                    re.compile(confirm.encode(), flags))


_DB_SCHEMES = ("postgres", "postgresql", "mysql", "mariadb", "mongodb", "mongodb+srv", "redis",
               "rediss", "amqp", "amqps", "mssql", "sqlserver")

DETECTORS: tuple[Detector, ...] = (
    _d("aws-access-key-id", "aws", ("AKIA", "ASIA", "ABIA", "ACCA"),
       r"(?:AKIA|ASIA|ABIA|ACCA)[A-Z2-7]{16}(?![A-Za-z0-9])"),
    _d("aws-secret-access-key", "aws", ("aws_secret_access_key",),
       r"aws_secret_access_key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+])",
       re.IGNORECASE),
    _d("github-token", "github", ("ghp_", "gho_", "ghu_", "ghs_", "ghr_"),
       r"gh[pousr]_[A-Za-z0-9]{36}(?![A-Za-z0-9])"),
    _d("github-fine-grained-token", "github", ("github_pat_",),
       r"github_pat_[A-Za-z0-9_]{82}(?![A-Za-z0-9_])"),
    _d("slack-token", "slack", ("xoxb-", "xoxp-", "xoxa-", "xoxr-", "xoxs-", "xoxe-"),
       r"xox[bpares]-[A-Za-z0-9-]{10,}"),
    _d("slack-webhook", "slack", ("hooks.slack.com/services/",),
       r"hooks\.slack\.com/services/T[A-Za-z0-9]+/B[A-Za-z0-9]+/[A-Za-z0-9]{16,}"),
    _d("private-key", "private_key", ("-----BEGIN ",),
       r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----"),
    _d("jwt", "jwt", ("eyJ",),
       r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}"),
    _d("database-url", "connection_string", tuple(f"{s}://" for s in _DB_SCHEMES),
       r"[a-z+]+://[^\s:/@\"'<>]+:[^\s@/\"'<>]{3,}@", re.IGNORECASE),
    _d("azure-connection-string", "connection_string",
       ("AccountKey=", "SharedAccessKey="),
       r"(?:AccountKey|SharedAccessKey)=[A-Za-z0-9+/]{20,}={0,2}", re.IGNORECASE),
)


def enabled(switches: dict[str, bool]) -> tuple[Detector, ...]:
    """The detectors whose group is switched on (a group missing from ``switches`` is on)."""
    return tuple(d for d in DETECTORS if switches.get(d.group, True))
