"""``egresslock check`` runs the proxy's content checks too: its answer stays the proxy's."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.cli.test_policy_cli import egresslock

CANARY = "canary-7f3a9c2e41d8b6"
POLICY = f"""\
version: 1
secrets: [{{name: canary, value: "{CANARY}"}}]
rules:
  - {{id: api, host: api.example.com, ports: [80], hash_query: [user],
     headers: {{strip: [X-Debug]}}}}
  - {{id: json, host: json.example.com, ports: [80], redact_json: [/prompt]}}
  - {{id: tls, host: tls.example.com}}
  - {{id: wild, host: "*.cdn.example.com"}}
"""


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


def _check(policy: Path, *args: str) -> tuple[int, dict[str, Any]]:
    r = egresslock("check", "-p", str(policy), "--json", *args)
    return r.returncode, json.loads(r.stdout)


def test_transforms_are_reported_as_changes(policy: Path) -> None:
    code, out = _check(policy, "-H", "X-Debug: 1", "http://api.example.com/x?user=bob")
    assert code == 0
    assert out["verdict"] == "allow"
    assert "would change: stripped header x-debug" in out["notes"]
    assert "would change: hashed query parameter user" in out["notes"]


def test_a_dynamic_link_is_denied(policy: Path) -> None:
    payload = "c2stbGl2ZS0xMjM0NTY3OGFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHl6"  # 42 bytes, base64
    code, out = _check(policy, f"http://api.example.com/log?d={payload}")
    assert code == 1
    assert "dynamic link refused by rule api" in str(out["reason"])


@pytest.mark.parametrize("where", ["url", "header", "body"])
def test_a_secret_is_denied_wherever_it_is(policy: Path, tmp_path: Path, where: str) -> None:
    encoded = base64.b64encode(b"x" + CANARY.encode()).decode()
    args = ["http://api.example.com/x"]
    if where == "url":
        args = [f"http://api.example.com/x?v={encoded}"]
    elif where == "header":
        args = ["-H", f"X-Note: {encoded}", *args]
    else:
        body = tmp_path / "body"
        body.write_text(json.dumps({"note": encoded}))
        args = ["-X", "POST", "--body-file", str(body), *args]
    code, out = _check(policy, *args)
    assert code == 1
    place = {"url": "URL", "header": "request headers", "body": "body"}[where]
    assert out["reason"] == f"secret canary in the {place} (base64)"
    assert CANARY not in json.dumps(out)


def test_a_json_body_is_checked_and_transformed(policy: Path, tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"prompt": "hello", "n": 1}))
    code, out = _check(policy, "-X", "POST", "--body-file", str(body),
                       "http://json.example.com/x")
    assert code == 0
    assert "would change: redacted /prompt" in out["notes"]


def test_a_tunnel_name_is_checked(policy: Path) -> None:
    hexed = CANARY.encode().hex()
    code, out = _check(policy, f"https://{hexed[:20]}.{hexed[20:]}.cdn.example.com/")
    assert code == 1
    assert out["layer"] == "connect"
    assert "holds secret canary" in str(out["reason"])
