"""``egresslock run``: the command's environment, its identity and the end-of-run summary."""

from __future__ import annotations

import os

import click
import pytest

from egresslock.audit import AuditRecord
from egresslock.cli.options import command_identity as _identity
from egresslock.cli.run_summary import RunSummary
from egresslock.cli.session import command_environment


def test_environment_points_every_proxy_variable_at_the_sandbox_proxy() -> None:
    env = command_environment({"NO_PROXY": "*", "no_proxy": "evil.test", "HOME": "/h",
                               "SSH_AUTH_SOCK": "/run/agent", "http_proxy": "http://x:1"},
                              "http://127.0.0.1:3128", None)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        assert env[name] == "http://127.0.0.1:3128"
    assert "NO_PROXY" not in env
    assert "no_proxy" not in env
    assert "SSH_AUTH_SOCK" not in env
    assert env["HOME"] == "/h"
    assert "SSL_CERT_FILE" not in env


def test_environment_trusts_the_inspection_ca_when_there_is_one() -> None:
    env = command_environment({}, "http://127.0.0.1:3128", "/run/egresslock/ca.pem")
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == "/run/egresslock/bundle.pem"
    assert env["NODE_EXTRA_CA_CERTS"] == "/run/egresslock/ca.pem"


@pytest.mark.skipif(os.geteuid() != 0, reason="root chooses the command's user")
def test_root_never_runs_the_command_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SUDO_UID", raising=False)
    assert _identity(None) == (65534, 65534)
    monkeypatch.setenv("SUDO_UID", "1234")
    monkeypatch.setenv("SUDO_GID", "1235")
    assert _identity(None) == (1234, 1235)
    assert _identity("4321") == (4321, 4321)
    with pytest.raises(click.BadParameter, match="may not run as root"):
        _identity("root")
    with pytest.raises(click.BadParameter, match="no user called"):
        _identity("no-such-user-here")


def test_summary_counts_and_names_top_denials() -> None:
    seen: list[AuditRecord] = []
    s = RunSummary()
    early = AuditRecord(layer="http", verdict="allow", rule_id="r", reason="ok", host="a.test",
                        port=80)
    s.count(early)
    s.sink = seen.append
    for _ in range(3):
        s.count(AuditRecord(layer="connect", verdict="deny", rule_id="default",
                            reason="no rule allows host evil.test", host="evil.test", port=443))
    s.count(AuditRecord(layer="drop", verdict="deny", rule_id="default", reason="udp dropped",
                        address="203.0.113.5", port=9999, protocol="udp"))
    assert len(seen) == 5  # the early record was held until the log opened
    text = s.render(3, "/x/audit.db", "run1")
    assert "1 allowed, 4 denied; command exited 3" in text
    assert "denied 3x connect evil.test:443: no rule allows host evil.test" in text
    assert "egresslock audit --db /x/audit.db --run run1" in text
    d = s.as_dict(3, "/x/audit.db", "run1")
    assert d["top_denied"][0] == {"layer": "connect", "destination": "evil.test:443",
                                  "reason": "no rule allows host evil.test", "count": 3}
