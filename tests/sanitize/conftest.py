"""Shared fixtures of the sanitizer tests: one policy, written out, and its compiled form.

The policy allows images from one CDN path and a wildcard image host, links to two
documentation sites, and images through a Teams-like proxy host (so that EchoLeak's shape, an
allowed proxy carrying the attacker's URL, is tested against an allowed host). It declares one
secret by value; the credential detectors are on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from egresslock.policy import Policy, parse_policy
from egresslock.sanitize import SanitizePolicy

SECRET = "sk-live-4f9a2c7e1b8d3f60a5c2"
POLICY_TEXT = f"""\
version: 1
secrets:
  - {{name: demo-token, value: "{SECRET}"}}
output:
  images:
    - {{host: cdn.acme-corp.example, paths: ["/img/**"]}}
    - {{host: "*.usercontent.acme-corp.example"}}
    - {{host: eu-prod.asyncgw.teams.example, paths: ["/urlp/**"]}}
    - {{host: "*.googleusercontent.example"}}
  links:
    - {{host: docs.acme-corp.example}}
    - {{host: github.com, paths: ["/acme/**"]}}
"""


@pytest.fixture(scope="session")
def policy() -> Policy:
    return parse_policy(POLICY_TEXT, "sanitize-test.yaml")


@pytest.fixture(scope="session")
def compiled(policy: Policy) -> SanitizePolicy:
    return SanitizePolicy.from_policy(policy, environ={})


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY_TEXT, encoding="utf-8")
    return path
