"""``egresslock courier check``, and what ``egresslock run`` plans for the courier before it
forks."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from egresslock.cli.courier_session import hidden_from_worker, plan_courier
from egresslock.cli.main import cli
from egresslock.cli.session import Session, SessionOptions

ROOT = Path(__file__).resolve().parents[2]
EGRESSLOCK = str(ROOT / ".venv" / "bin" / "egresslock")

GOOD = """\
version: 1
credentials:
  - {name: APP_TOKEN, env: REAL_APP_TOKEN, hosts: [app.test], headers: [Authorization]}
  - {name: OTHER_TOKEN, env: REAL_OTHER_TOKEN, hosts: [other.test], headers: [Authorization]}
rules:
  - {id: app, host: app.test, ports: [80], methods: [POST], paths: ["/issues"]}
actions:
  - name: create_issue
    request:
      method: POST
      url: http://app.test/issues
      headers: {Authorization: "Bearer {credential.APP_TOKEN}"}
      body: {title: "{title}"}
    params:
      type: object
      additionalProperties: false
      required: [title]
      properties:
        title: {type: string, x-free-text: true, maxLength: 80}
"""

BAD = GOOD.replace("x-free-text: true, maxLength: 80", "maxLength: 80")


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, text in (("good", GOOD), ("bad", BAD), ("broken", "version: 2\n")):
        out[name] = tmp_path / f"{name}.yaml"
        out[name].write_text(text)
    return out


def test_check_exit_codes(files: dict[str, Path]) -> None:
    runner = CliRunner()
    ok = runner.invoke(cli, ["courier", "check", "-p", str(files["good"])])
    assert ok.exit_code == 0, ok.output
    assert "1 action(s) valid" in ok.output
    bad = runner.invoke(cli, ["courier", "check", "-p", str(files["bad"])])
    assert bad.exit_code == 1
    assert ("action create_issue: params.properties.title: a string needs enum, const, a "
            "pattern") in bad.output
    broken = runner.invoke(cli, ["courier", "check", "-p", str(files["broken"])])
    assert broken.exit_code == 2
    assert "version" in broken.output


def test_check_json(files: dict[str, Path]) -> None:
    out = CliRunner().invoke(cli, ["courier", "check", "-p", str(files["bad"]), "--json"])
    assert out.exit_code == 1
    result = json.loads(out.output)
    assert result["valid"] is False
    assert result["problems"][0]["action"] == "create_issue"
    assert result["problems"][0]["key"] == "params.properties.title"


def test_run_refuses_to_start_with_a_bad_action(files: dict[str, Path]) -> None:
    done = subprocess.run([EGRESSLOCK, "run", "-p", str(files["bad"]), "--", "true"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    assert "actions[create_issue].params.properties.title" in done.stderr


def test_the_agent_loses_the_couriers_credentials(files: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REAL_APP_TOKEN", "real-token-Zq8w2Lr5Tx9Vb3Nm7Kp4")
    monkeypatch.setenv("REAL_OTHER_TOKEN", "real-token-other-0123456789")
    session = Session(SessionOptions(files["good"], ca_dir=tmp_path / "ca", quiet=True))
    spec = session.spec(["true"], os.getuid(), os.getgid())
    assert spec.env["APP_TOKEN"].startswith("EGLPH")
    courier = plan_courier(session, os.getuid(), os.getgid())
    assert courier is not None
    agent = courier.agent_spec(spec)
    assert "APP_TOKEN" not in agent.env  # the courier's alone
    assert agent.env["OTHER_TOKEN"] == spec.env["OTHER_TOKEN"]  # no action names it
    assert "REAL_APP_TOKEN" not in agent.env


def test_no_actions_no_courier(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules: []\n")
    session = Session(SessionOptions(policy, ca_dir=tmp_path / "ca", quiet=True))
    assert plan_courier(session, os.getuid(), os.getgid()) is None


def test_the_worker_keeps_its_interpreter_but_not_the_agents_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for d in ("projects/secret", ".ssh", ".venv/lib/python3/site-packages", ".venv/bin",
              ".cache"):
        (home / d).mkdir(parents=True)
    (home / "link").symlink_to("/usr")
    cwd = tmp_path / "work"
    cwd.mkdir()
    needed = [str(home / ".venv/lib/python3/site-packages"), str(home / ".venv/bin")]
    hidden = hidden_from_worker([str(cwd), str(home)], needed)
    assert str(cwd) in hidden
    assert {str(home / d) for d in ("projects", ".ssh", ".cache")} <= set(hidden)
    assert str(home / ".venv") not in hidden
    assert str(home / ".venv/lib") not in hidden
    assert str(home / "link") not in hidden  # a link could name anything: never followed
    assert not any(n.startswith(h + "/") or n == h for n in needed for h in hidden)
