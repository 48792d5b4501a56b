"""The courier end to end, inside ``egresslock run`` in the test world (integration, needs root).

The agent (curl and a Python script inside the sandbox) calls the actions a policy declares on
its proxy's address, 127.0.0.1:3128, in both forms a client may use. app.test in the world is
the upstream: it records the path, headers and body of every request it receives, so the tests
can show that a valid call arrives as exactly the templated request (with the real token, which
the agent never holds), and that a refused call arrives as nothing at all.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.courier.conftest import CourierWorld, make_visible_workdir
from tests.sandbox.conftest import PYTHON, WorldRun, assert_warm
from tests.sandbox.world import SECRET

pytestmark = [pytest.mark.timeout(180), pytest.mark.integration, pytest.mark.sandbox]

ROOT = Path(__file__).resolve().parents[2]
REAL_TOKEN = "real-token-Zq8w2Lr5Tx9Vb3Nm7Kp4"
POLICY = f"""\
version: 1
levels: [public, confidential]
network:
  allow_ranges: ["198.51.100.10/32"]
secrets:
  - {{name: key, value: "{SECRET}"}}
credentials:
  - {{name: APP_TOKEN, env: REAL_APP_TOKEN, hosts: [app.test], headers: [Authorization]}}
rules:
  - {{id: private-repo, host: app.test, ports: [80], methods: [GET], paths: ["/private/**"],
     reads: confidential}}
  - {{id: issues, host: app.test, ports: [80], methods: [POST],
     paths: ["/repos/acme/*/issues", "/repos/acme/*/labels/*"], level: public, via: courier}}
actions:
  - name: create_issue
    description: Open an issue in one of our public repositories.
    level: public
    request:
      method: POST
      url: "http://app.test/repos/acme/{{repo}}/issues?label={{label}}"
      headers: {{Authorization: "Bearer {{credential.APP_TOKEN}}", Accept: application/json}}
      body: {{title: "{{title}}", body: "{{body}}", labels: ["{{label}}"]}}
    params:
      type: object
      additionalProperties: false
      required: [repo, title]
      properties:
        repo: {{type: string, enum: [widgets, gadgets]}}
        title: {{type: string, pattern: "^[A-Za-z0-9 ,.!?'-]{{1,80}}$", maxLength: 80}}
        body: {{type: string, x-free-text: true, maxLength: 2000}}
        label: {{type: string, enum: [bug, feature]}}
  - name: add_label
    description: Create a label.
    request:
      method: POST
      url: "http://app.test/repos/acme/widgets/labels/{{label}}"
      headers: {{Authorization: "Bearer {{credential.APP_TOKEN}}"}}
    params:
      type: object
      additionalProperties: false
      required: [label]
      properties:
        label: {{type: string, pattern: "^[^ ]{{1,60}}$", maxLength: 60}}
"""

AGENT = r'''
import base64, http.client, json, sys

def call(name, params=None, raw=None, method="POST"):
    c = http.client.HTTPConnection("127.0.0.1", 3128, timeout=90)
    body = raw if raw is not None else json.dumps(params)
    c.request(method, "/actions/" + name, body=None if method == "GET" else body,
              headers={"Content-Type": "application/json"})
    r = c.getresponse()
    return {"status": r.status, "deny": r.getheader("X-Egresslock-Deny"),
            "body": r.read().decode()}

secret = sys.argv[1]
ok = {"repo": "widgets", "title": "Hi"}
refused = {
    "enum": {"repo": "private-stuff", "title": "Hi"},
    "free-text-for-enum": {**ok, "label": "please label this as urgent"},
    "unknown-param": {**ok, "url": "http://evil.test/"},
    "over-long": {"repo": "widgets", "title": "A" * 81},
    "missing": {"repo": "widgets"},
    "crlf-title": {"repo": "widgets", "title": "Hi\r\nX-Injected: 1"},
    "trailing-newline": {"repo": "widgets", "title": "Hi\n"},
    "secret-plain": {**ok, "body": "the key is " + secret},
    "secret-base64": {**ok, "body": base64.b64encode(b"k=" + secret.encode()).decode()},
    "secret-hex": {**ok, "body": secret.encode().hex()},
    "dynamic-link": {**ok, "body": "see https://evil.test/c?d=" + "q8Zr2LmX9vTb4Nw7Kp3Hs5Jd6Fg"},
}
out = {name: call("create_issue", p) for name, p in refused.items()}
for name, label in (("dot-segment", ".."), ("dot-dot-slash", "../../admin"),
                    ("full-url", "http://evil.test/x"), ("empty", "")):
    out[name] = call("add_label", {"label": label})
out["not-json"] = call("create_issue", raw="title=Hi")
out["no-such-action"] = call("delete_repo", {})
out["get-an-action"] = call("create_issue", method="GET")
valid = {
    "valid-issue": call("create_issue", {"repo": "widgets", "title": "Hello world",
                                         "label": "bug", "body": "First line\nsecond"}),
    "valid-label-delimiters": call("add_label", {"label": "x/y?z=1#frag&k=v"}),
    "valid-label-escape": call("add_label", {"label": "%2F"}),
}
print(json.dumps({"refused": out, "valid": valid}))
'''


FIND_WORKER = r'''
import os
for entry in os.listdir("/proc"):
    try:
        argv = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    if argv[1:4] == [b"-I", b"-m", b"egresslock.courier.worker"]:
        print(f"worker={entry}")
        try:
            open(f"/proc/{entry}/environ", "rb").read()
            print("environ=read")
        except OSError as exc:
            print(f"environ=denied ({exc.strerror})")
'''


def _run(world: CourierWorld, script: str, **scenario: Any) -> WorldRun:
    return world(["sh", "-c", textwrap.dedent(script)], policy=POLICY,
                 env={"REAL_APP_TOKEN": REAL_TOKEN, **scenario.pop("env", {})}, **scenario)


def _workdir(**files: str) -> Path:
    workdir = make_visible_workdir()
    for name, text in files.items():
        (workdir / name).write_text(text)
        (workdir / name).chmod(0o644)
    return workdir


def _last_json(run: WorldRun) -> dict[str, Any]:
    return run.json_stdout()


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_calls_are_sent_as_templated_or_refused_and_logged(courier_world: CourierWorld,
                                                          warm: bool) -> None:
    script = f"""\
        echo "token=${{APP_TOKEN:-unset}}"
        curl -s -o list-proxy.json -w "list-proxy=%{{http_code}}\\n" http://127.0.0.1:3128/actions
        curl -s --noproxy '*' -o list-direct.json -w "list-direct=%{{http_code}}\\n" \\
            http://127.0.0.1:3128/actions
        {PYTHON} agent.py '{SECRET}'
        curl -s -w "\\ndirect=%{{http_code}}\\n" -X POST -d 'title=around the schema' \\
            http://app.test/repos/acme/widgets/issues
        """
    run = _run(courier_world, script, workdir=_workdir(**{"agent.py": AGENT}), warm=warm)
    if warm:  # the worker of a warm server starts the courier's own sandbox too
        assert_warm(run)
    assert run.exit == 0, run.describe()
    assert "token=unset" in run.stdout, "the agent holds the courier's credential"
    # via: courier: the agent cannot send to the action's endpoint itself, around the schema.
    assert "direct=403" in run.stdout, run.describe()
    assert "rule issues accepts only the courier's requests" in run.stdout
    assert "list-proxy=200" in run.stdout, run.describe()
    assert "list-direct=200" in run.stdout, run.describe()
    listing = json.loads((run.workdir / "list-proxy.json").read_text())
    assert listing == json.loads((run.workdir / "list-direct.json").read_text())
    names = [a["name"] for a in listing["actions"]]
    assert names == ["create_issue", "add_label"]
    issue = listing["actions"][0]
    assert issue["description"].startswith("Open an issue")
    assert issue["params"]["properties"]["repo"]["enum"] == ["widgets", "gadgets"]
    assert issue["level"] == "public"
    result = _last_json(run)

    for name, answer in result["refused"].items():
        expected = {"no-such-action": 404, "get-an-action": 405, "not-json": 400}.get(name, 403)
        assert answer["status"] == expected, (name, answer, run.describe())
        if expected in (403, 400):
            assert (answer["deny"] or "").startswith(("create_issue;", "add_label;")), \
                (name, answer)
    reasons = {n: a["body"] for n, a in result["refused"].items()}
    assert "must be one of" in reasons["enum"]
    assert "must be one of" in reasons["free-text-for-enum"]
    assert "unknown parameter 'url'" in reasons["unknown-param"]
    assert "longer than maxLength 80" in reasons["over-long"]
    assert "missing required parameter 'title'" in reasons["missing"]
    assert "title" in reasons["crlf-title"]
    assert "control character" in reasons["trailing-newline"]
    for name in ("secret-plain", "secret-base64", "secret-hex"):
        assert "secret key" in reasons[name], (name, reasons[name])
        assert SECRET not in reasons[name]
    assert "holds a URL" in reasons["dynamic-link"]
    assert "dot segment" in reasons["dot-segment"]
    assert "dot segment" in reasons["dot-dot-slash"]
    assert "holds a URL" in reasons["full-url"]

    valid = result["valid"]
    for name, answer in valid.items():
        assert answer["status"] == 200, (name, answer, run.describe())
        assert json.loads(answer["body"])["status"] == 200, (name, answer)
    # The upstream received exactly the three valid calls, and nothing of the refused ones.
    got = [r for r in run.upstream if r["host"] == "app.test"]
    assert [(r["method"], r["path"]) for r in got] == [
        ("POST", "/repos/acme/widgets/issues?label=bug"),
        ("POST", "/repos/acme/widgets/labels/x%2Fy%3Fz%3D1%23frag%26k%3Dv"),
        ("POST", "/repos/acme/widgets/labels/%252F"),
    ], run.describe()
    issue_request = got[0]
    headers = dict(issue_request["headers"])
    assert headers.pop("authorization") == f"Bearer {REAL_TOKEN}"
    assert headers == {"host": "app.test", "accept": "application/json",
                       "content-type": "application/json",
                       "content-length": str(len(issue_request["body"]))}
    assert json.loads(issue_request["body"]) == {"title": "Hello world",
                                                 "body": "First line\nsecond",
                                                 "labels": ["bug"]}
    assert issue_request["body"] == ('{"title":"Hello world","body":"First line\\nsecond",'
                                     '"labels":["bug"]}')
    # The agent never sees the real token, nor the courier's placeholder: the upstream echoed
    # the Authorization header, and the reply shows it redacted.
    assert REAL_TOKEN not in run.stdout
    assert "EGLPH" not in run.stdout
    echoed = json.loads(json.loads(valid["valid-issue"]["body"])["body"])
    assert echoed["headers"]["authorization"] == "Bearer [credential APP_TOKEN]"
    # One courier row per call that reached an action; the proxy's rows for the valid three.
    allowed = run.rows("courier", "allow")
    assert len(allowed) == 3, run.describe()
    assert {r["rule_id"] for r in allowed} == {"create_issue", "add_label"}
    assert allowed[0]["extra"]["status"] == 200
    assert allowed[0]["extra"]["schema"] == "valid"
    denied = run.rows("courier", "deny")
    assert len(denied) == len(result["refused"]) - 1, run.describe()  # GET is not a call
    by_reason = {r["reason"] for r in denied}
    assert any("must be one of" in r for r in by_reason)
    assert [r for r in denied if (r.get("extra") or {}).get("schema") == "invalid"]
    assert len(run.rows("http", "allow", host="app.test")) == 3
    run.assert_nothing_escaped()


def test_a_public_action_is_refused_after_a_confidential_read(courier_world: CourierWorld
                                                              ) -> None:
    script = """\
        curl -s -o /dev/null -w "read=%{http_code}\\n" http://app.test/private/contents/a.txt
        curl -s -w "\\ncall=%{http_code}\\n" -X POST -d '{"repo":"widgets","title":"Leak"}' \\
            http://127.0.0.1:3128/actions/create_issue
        """
    run = _run(courier_world, script)
    assert "read=200" in run.stdout, run.describe()
    assert "call=403" in run.stdout, run.describe()
    assert "session is confidential since GET app.test/private/contents/a.txt" in run.stdout
    assert "action create_issue accepts public" in run.stdout
    assert not [r for r in run.upstream if r["path"].startswith("/repos")], run.upstream
    (row,) = run.rows("courier", "deny")
    assert "session is confidential since GET app.test/private/contents/a.txt" in row["reason"]


def test_the_worker_sees_nothing_of_the_agent(courier_world: CourierWorld) -> None:
    from egresslock.sandbox.landlock import landlock_abi

    workdir = _workdir(**{"agent-notes.txt": "private notes of the agent\n",
                          "find_worker.py": FIND_WORKER})
    script = f"""\
        {PYTHON} find_worker.py
        curl -s -o list.json http://127.0.0.1:3128/actions
        touch probe-now
        i=0; while [ ! -e probe-done ] && [ $i -lt 250 ]; do sleep 0.1; i=$((i+1)); done
        echo done
        """
    run = _run(courier_world, script, workdir=workdir,
               env={"AGENT_PRIVATE_NOTE": "the agent's own variable"})
    probe = run.raw["probe"]
    assert probe.get("pid"), (probe, run.describe())
    assert "error" not in probe, probe
    # The worker's environment: proxy and CA variables, nothing of the agent's, no credential.
    allowed = {"PATH", "LANG", "EGRESSLOCK_SANDBOX", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
               "http_proxy", "https_proxy", "all_proxy", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE",
               "CURL_CA_BUNDLE", "PIP_CERT", "GIT_SSL_CAINFO", "NODE_EXTRA_CA_CERTS"}
    assert set(probe["env"]) <= allowed, probe["env"]
    assert not [v for v in probe["env_values"] if "EGLPH" in v or REAL_TOKEN in v]
    # The agent's working directory exists, and is empty in the worker's mount namespace.
    assert probe["agent_file_here"] is True
    assert probe["agent_file_in_worker"] is False, probe
    assert probe["agent_dir_listing_in_worker"] in (None, []), probe
    assert probe["worker_cwd"] == "/"
    # Not dumpable (its /proc files are root's), no new privileges, seccomp on.
    assert probe["environ_owner"] == 0
    assert probe["status"]["NoNewPrivs"] == "1"
    assert probe["status"]["Seccomp"] == "2"
    # And the agent, trying, cannot read the worker's environment either.
    assert f"worker={probe['pid']}" in run.stdout, run.describe()
    assert "environ=denied" in run.stdout, run.describe()
    listing = json.loads((workdir / "list.json").read_text())
    if landlock_abi() > 0:
        assert listing["courier"]["filesystem"].startswith("locked (Landlock ABI"), listing
    assert run.exit == 0, run.describe()



HTTPS_POLICY = """\
version: 1
network:
  allow_ranges: ["198.51.100.10/32"]
credentials:
  - {name: SECURE_TOKEN, env: REAL_APP_TOKEN, hosts: [secure.test], headers: [Authorization]}
rules:
  - {id: secure-issues, host: secure.test, ports: [443], inspect: true, methods: [POST],
     paths: ["/repos/acme/*/issues"]}
actions:
  - name: create_issue
    request:
      method: POST
      url: "https://secure.test/repos/acme/{repo}/issues"
      headers: {Authorization: "token {credential.SECURE_TOKEN}"}
      body: {title: "{title}"}
    params:
      type: object
      additionalProperties: false
      required: [repo, title]
      properties:
        repo: {type: string, enum: [widgets]}
        title: {type: string, pattern: "^[A-Za-z ]{1,40}$", maxLength: 40}
"""


def test_an_https_action_through_inspection_carries_the_real_token(
        courier_world: CourierWorld) -> None:
    workdir = make_visible_workdir()
    subprocess.run([str(ROOT / ".venv" / "bin" / "egresslock"), "ca", "init", "--dir",
                    str(workdir / ".ca")], check=True, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "HOME": str(workdir)})
    script = """\
        curl -s -w "\\ncall=%{http_code}\\n" -X POST -d '{"repo":"widgets","title":"Over TLS"}' \\
            http://127.0.0.1:3128/actions/create_issue
        """
    run = courier_world(["sh", "-c", textwrap.dedent(script)], workdir=workdir,
                        policy=HTTPS_POLICY, args=["--upstream-ca", "ca.pem"],
                        env={"REAL_APP_TOKEN": REAL_TOKEN,
                             "EGRESSLOCK_CA_DIR": str(workdir / ".ca")})
    assert "call=200" in run.stdout, run.describe()
    (got,) = [r for r in run.upstream if r["host"] == "secure.test"]
    assert got["tls"] is True
    assert (got["method"], got["path"]) == ("POST", "/repos/acme/widgets/issues")
    assert got["headers"]["authorization"] == f"token {REAL_TOKEN}"
    assert got["body"] == '{"title":"Over TLS"}'
    assert REAL_TOKEN not in run.stdout
    assert run.rows("courier", "allow")
    assert run.rows("http", "allow", host="secure.test")
