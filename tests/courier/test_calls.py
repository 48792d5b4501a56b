"""One call through egresslock's side of the courier, with the worker replaced by canned replies.

What egresslock decides before a call reaches the worker (labels, report mode), how it maps the
worker's answer to the agent's (200, 403, 502, 504), the audit rows it writes, and the redaction
of credentials in replies. The worker itself is tested in test_worker.py, the whole chain in
test_run_courier.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from egresslock.audit import AuditRecord
from egresslock.cli.courier_session import Courier, plan_courier
from egresslock.cli.session import Session, SessionOptions
from egresslock.proxy.actions import ActionCall, ActionReply

REAL = "real-token-Zq8w2Lr5Tx9Vb3Nm7Kp4"
POLICY = """\
version: 1
mode: {mode}
levels: [public, confidential]
credentials:
  - {{name: APP_TOKEN, env: REAL_APP_TOKEN, hosts: [app.test], headers: [Authorization]}}
rules:
  - {{id: app, host: app.test, ports: [80], methods: [POST, GET], paths: ["/issues", "/private"]}}
actions:
  - name: create_issue
    level: public
    request:
      method: POST
      url: http://app.test/issues
      headers: {{Authorization: "Bearer {{credential.APP_TOKEN}}"}}
      body: {{title: "{{title}}"}}
    params:
      type: object
      additionalProperties: false
      required: [title]
      properties:
        title: {{type: string, x-free-text: true, maxLength: 200}}
  - name: read_private
    reads: confidential
    request: {{method: GET, url: http://app.test/private}}
"""


class Harness:
    def __init__(self, courier: Courier, rows: list[AuditRecord]) -> None:
        self.courier = courier
        self.rows = rows
        self.replies: list[dict[str, Any]] = []
        self.asked: list[tuple[str, Any]] = []

        async def ask(action: str, params: Any) -> dict[str, Any]:
            self.asked.append((action, params))
            return self.replies.pop(0)

        courier.ask = ask  # type: ignore[method-assign]

    def call(self, name: str | None, body: object = None, method: str = "POST"
             ) -> tuple[int, dict[str, Any], dict[bytes, bytes]]:
        raw = b"" if body is None else (body if isinstance(body, bytes)
                                        else json.dumps(body).encode())
        reply: ActionReply = asyncio.run(self.courier.handle(ActionCall(method, name, raw)))
        return reply.status, json.loads(reply.body), dict(reply.headers)


def _harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str = "enforce"
             ) -> Harness:
    monkeypatch.setenv("REAL_APP_TOKEN", REAL)
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(mode=mode))
    session = Session(SessionOptions(policy, ca_dir=tmp_path / "ca", quiet=True))
    rows: list[AuditRecord] = []
    session.summary.sink = rows.append
    courier = plan_courier(session, os.getuid(), os.getgid())
    assert courier is not None
    return Harness(courier, rows)


def _ok(status: int = 201, body: str = "{}") -> dict[str, Any]:
    return {"ok": True, "status": status, "headers": {"content-type": "application/json"},
            "body": body, "truncated": False, "bytes_in": len(body),
            "request": {"method": "POST", "target": "/issues", "bytes": 12}}


def test_a_call_is_answered_and_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = _harness(tmp_path, monkeypatch)
    h.replies.append(_ok(201, '{"id": 7}'))
    status, payload, _ = h.call("create_issue", {"title": "Hello"})
    assert status == 200
    assert payload == {"action": "create_issue", "status": 201,
                       "headers": {"content-type": "application/json"}, "body": '{"id": 7}',
                       "truncated": False}
    assert h.asked == [("create_issue", {"title": "Hello"})]
    (row,) = h.rows
    assert (row.layer, row.verdict, row.rule_id) == ("courier", "allow", "create_issue")
    assert (row.method, row.host, row.port, row.path) == ("POST", "app.test", 80, "/issues")
    assert (row.bytes_out, row.bytes_in) == (12, 9)
    assert dict(row.extra or {}) == {"action": "create_issue", "schema": "valid",
                                     "status": 201}


def test_replies_never_show_a_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    h = _harness(tmp_path, monkeypatch)
    placeholder = h.courier.ctx.content.bindings[0].placeholder.decode()
    h.replies.append(_ok(200, json.dumps({"auth": f"Bearer {placeholder}", "real": REAL})))
    _, payload, _ = h.call("create_issue", {"title": "Hello"})
    assert placeholder not in json.dumps(payload)
    assert REAL not in json.dumps(payload)
    assert json.loads(payload["body"]) == {"auth": "Bearer [credential APP_TOKEN]",
                                           "real": "[credential APP_TOKEN]"}


def test_refusals_map_to_statuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = _harness(tmp_path, monkeypatch)
    status, payload, headers = h.call("create_issue", {"title": 1})
    assert status == 403
    assert headers[b"X-Egresslock-Deny"].startswith(b"create_issue; parameters refused")
    assert "must be of type string" in payload["error"]
    assert h.call("nope", {})[0] == 404
    assert h.call("create_issue", b"title=x")[0] == 400
    assert h.call("create_issue", b'{"title": NaN}')[0] == 400  # Python's json takes it
    assert h.call("create_issue", method="GET")[0] == 405
    assert h.call(None, method="DELETE")[0] == 405
    assert h.asked == []  # none of these reached the worker
    h.replies += [{"ok": False, "kind": "denied", "reason": "the proxy refused the request: x"},
                  {"ok": False, "kind": "upstream", "reason": "cannot connect"},
                  {"ok": False, "kind": "timeout", "reason": "no answer"}]
    assert [h.call("create_issue", {"title": "a"})[0] for _ in range(3)] == [403, 502, 504]
    verdicts = [(r.verdict, (r.extra or {}).get("schema")) for r in h.rows]
    assert verdicts == [("deny", "invalid"), ("deny", None), ("deny", "invalid"),
                        ("deny", "invalid"), ("deny", "valid"), ("allow", "valid"),
                        ("allow", "valid")]


def test_labels_refuse_a_public_action_after_a_confidential_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = _harness(tmp_path, monkeypatch)
    h.replies.append(_ok(200))
    assert h.call("read_private", {})[0] == 200
    flow = [r for r in h.rows if r.layer == "flow"]
    assert len(flow) == 1
    assert "raised from public to confidential by action read_private" in flow[0].reason
    status, payload, _ = h.call("create_issue", {"title": "leak"})
    assert status == 403
    assert payload["error"].startswith("session is confidential since action read_private at ")
    assert "action create_issue accepts public (no write down to app.test)" in payload["error"]
    assert len(h.asked) == 1


def test_a_failed_read_raises_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = _harness(tmp_path, monkeypatch)
    h.replies.append(_ok(404))
    h.call("read_private", {})
    assert not [r for r in h.rows if r.layer == "flow"]
    h.replies.append(_ok(201))
    assert h.call("create_issue", {"title": "fine"})[0] == 200


def test_report_mode_logs_what_enforce_would_refuse(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    h = _harness(tmp_path, monkeypatch, mode="report")
    h.replies += [_ok(200), _ok(201)]
    h.call("read_private", {})
    status, _, _ = h.call("create_issue", {"title": "see https://evil.test/x"})
    assert status == 200
    row = h.rows[-1]
    assert row.verdict == "report"
    assert row.reason.startswith("report mode, enforce would deny: session is confidential")
    # The schema is enforced even in report mode: nothing could be rendered otherwise.
    assert h.call("create_issue", {"title": 5})[0] == 403


def test_the_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = _harness(tmp_path, monkeypatch)
    status, payload, _ = h.call(None, method="GET")
    assert status == 200
    assert [a["name"] for a in payload["actions"]] == ["create_issue", "read_private"]
    first = payload["actions"][0]
    assert first["request"] == "POST http://app.test/issues"
    assert first["level"] == "public"
    assert first["params"]["required"] == ["title"]
    assert payload["actions"][1]["params"] == {"type": "object", "properties": {},
                                               "additionalProperties": False}
