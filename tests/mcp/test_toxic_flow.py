"""The GitHub MCP toxic flow, end to end: the gateway refuses the write down, the repo gets nothing.

The incident: an agent with a GitHub MCP server read an issue in a public repository that told
it to read a private repository and publish what it found; it did, with tools that were each
allowed. Here, in the test world (tests/sandbox/world.py), with local stand-ins:

- ``stand_in_server.py``: ``list_issues`` returns the injection, ``get_file`` the private file,
  ``create_issue`` POSTs to http://app.test/public/issues (the world's upstream records it);
- ``agent.py``: an MCP client that launches its server over stdio and follows the injection.

The agent runs as the scenario's command without ``egresslock run`` around it (``bare``): it
launches ``egresslock mcp``, which runs the stand-in in the sandbox, so the stand-in's POST goes
through the sandbox's proxy and the world's upstream sees only what the policy let out.

These tests need root (the world configures its own namespaces); elsewhere they skip.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.sandbox.conftest import PYTHON, World, WorldRun, make_workdir
from tests.sandbox.world import EGRESSLOCK, ROOT, UPSTREAM

pytestmark = [pytest.mark.sandbox, pytest.mark.timeout(180)]

HERE = Path(__file__).resolve().parent
AGENT = [PYTHON, str(HERE / "agent.py")]
STAND_IN = [PYTHON, str(HERE / "stand_in_server.py")]
PRIVATE = "PRIVATE-ROADMAP"

NETWORK = f"""\
version: 1
network:
  allow_ranges: ["{UPSTREAM}/32"]
rules:
  - id: public-issues
    host: app.test
    ports: [80]
    methods: [POST]
    paths: ["/public/issues"]
"""
LABELS = """\
levels: [public, confidential]
mcp:
  tools:
    - {name: get_file, reads: confidential}
    - {name: create_issue, level: public}
    - {name: list_issues, reads: public}
"""
NO_LABELS = """\
mcp:
  default: allow
"""


def _gateway(workdir: Path, policy: str, *args: str) -> list[str]:
    (workdir / "policy.yaml").write_text(policy)
    (workdir / "policy.yaml").chmod(0o644)
    return [EGRESSLOCK, "mcp", "-p", str(workdir / "policy.yaml"),
            "--audit", str(workdir / ".audit" / "audit.db"), "--json", "--share", str(ROOT),
            "--resolve", f"app.test:{UPSTREAM}", *args, "--", *STAND_IN]


def _agent(world: World, server: list[str], order: str = "read-first",
           **scenario: Any) -> tuple[WorldRun, dict[str, Any]]:
    workdir = scenario.pop("workdir", None) or make_workdir()
    run = world([*AGENT, "--order", order, "--", *server], bare=True, workdir=workdir,
                timeout=90, **scenario)
    assert run.exit == 0, run.describe()
    return run, run.json_stdout()


def _issues(run: WorldRun) -> list[dict[str, Any]]:
    return [r for r in run.upstream if r["method"] == "POST" and r["path"] == "/public/issues"]


def _step(out: dict[str, Any], tool: str) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [s for s in out["steps"] if s["tool"] == tool]
    (step,) = steps
    return step


def test_without_egresslock_the_private_file_reaches_the_public_repo(world: World) -> None:
    run, out = _agent(world, STAND_IN,
                      env={"EGL_PUBLIC_REPO": f"http://{UPSTREAM}/public/issues"})
    assert [s["tool"] for s in out["steps"]] == ["list_issues", "get_file", "create_issue"]
    assert not _step(out, "create_issue")["is_error"], out
    (issue,) = _issues(run)
    assert PRIVATE in json.loads(issue["body"])["body"]


def test_through_the_gateway_without_labels_the_leak_still_happens(world: World) -> None:
    workdir = make_workdir()
    run, out = _agent(world, _gateway(workdir, NETWORK + NO_LABELS), workdir=workdir)
    assert not _step(out, "create_issue")["is_error"], out
    (issue,) = _issues(run)
    assert PRIVATE in issue["body"]
    assert issue["host"] == "app.test"  # it went through the sandbox's proxy
    assert run.rows("http", "allow", rule_id="public-issues"), run.describe()


def test_through_the_gateway_the_write_down_is_refused_and_names_the_read(
        world: World) -> None:
    workdir = make_workdir()
    run, out = _agent(world, _gateway(workdir, NETWORK + LABELS), workdir=workdir)
    assert out["tools"] == ["list_issues", "get_file", "create_issue"]  # fetch: default deny
    assert PRIVATE in _step(out, "get_file")["text"]
    refused = _step(out, "create_issue")
    assert refused["is_error"]
    assert refused["text"].startswith(
        "egresslock: denied: tool create_issue: session is confidential since tool get_file "
        "at ")
    assert "tool create_issue accepts public" in refused["text"]
    assert _issues(run) == [], run.upstream
    assert not [r for r in run.upstream if PRIVATE in r["body"]]
    calls = [(r["verdict"], r["rule_id"], r["path"]) for r in run.rows("mcp")]
    assert calls == [("allow", "list_issues", "list_issues"), ("allow", "get_file", "get_file"),
                     ("deny", "create_issue", "create_issue")], run.describe()
    (raised,) = run.rows("flow")
    assert raised["rule_id"] == "get_file"
    assert raised["reason"] == "session mark raised from public to confidential by tool get_file"
    assert run.summary is not None
    assert run.summary["mark"] == "confidential"
    assert run.summary["denied"] == 1


def test_through_the_gateway_a_write_before_the_read_succeeds(world: World) -> None:
    workdir = make_workdir()
    run, out = _agent(world, _gateway(workdir, NETWORK + LABELS), "write-first",
                      workdir=workdir)
    assert not _step(out, "create_issue")["is_error"], out
    assert PRIVATE in _step(out, "get_file")["text"]
    (issue,) = _issues(run)
    assert json.loads(issue["body"])["body"] == "first post"
    assert [r["verdict"] for r in run.rows("mcp")] == ["allow", "allow"]
    assert len(run.rows("flow")) == 1


def test_the_servers_own_network_obeys_the_policy(world: World) -> None:
    """The gateway allows create_issue, but the proxy has no rule for its destination."""
    workdir = make_workdir()
    policy = NETWORK.replace('paths: ["/public/issues"]', 'paths: ["/elsewhere"]') + NO_LABELS
    run, out = _agent(world, _gateway(workdir, policy), "write-first", workdir=workdir)
    failed = _step(out, "create_issue")
    assert failed["is_error"], out
    assert _issues(run) == []
    assert run.rows("http", "deny"), run.describe()


def test_listen_serves_the_agent_over_streamable_http(world: World) -> None:
    workdir = make_workdir()
    gateway = _gateway(workdir, NETWORK + LABELS, "--listen", "127.0.0.1:0")
    script = textwrap.dedent(f"""\
        import json, re, subprocess, sys, time
        proc = subprocess.Popen({gateway!r}, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                text=True)
        url = None
        for line in proc.stderr:
            sys.stderr.write(line)
            found = re.search(r"listening on (http://\\S+)", line)
            if found:
                url = found.group(1)
                break
        done = subprocess.run({AGENT!r} + ["--order", "write-first", "--url", url],
                              capture_output=True, text=True, timeout=60)
        sys.stderr.write(done.stderr)
        print(done.stdout.strip(), flush=True)
        proc.terminate()
        sys.stderr.write(proc.communicate(timeout=20)[1])
        sys.exit(done.returncode or (0 if proc.returncode == 128 + 15 else 3))
        """)
    run, out = _agent_script(world, script, workdir)
    assert out["tools"] == ["list_issues", "get_file", "create_issue"], run.describe()
    assert not _step(out, "create_issue")["is_error"], out
    assert len(_issues(run)) == 1
    assert [r["verdict"] for r in run.rows("mcp")] == ["allow", "allow"]


def _agent_script(world: World, script: str, workdir: Path) -> tuple[WorldRun, dict[str, Any]]:
    run = world([PYTHON, "-c", script], bare=True, workdir=workdir, timeout=90)
    assert run.exit == 0, run.describe()
    return run, run.json_stdout()


def test_a_read_through_the_proxy_raises_the_mark_the_gateway_checks(world: World) -> None:
    """One mark per run: the server's own GET of a ``reads: confidential`` rule, seen by the
    proxy, refuses the next public write at the gateway."""
    workdir = make_workdir()
    policy = NETWORK + textwrap.dedent("""\
          - id: private-repo
            host: app.test
            ports: [80]
            methods: [GET]
            paths: ["/private/**"]
            reads: confidential
        levels: [public, confidential]
        mcp:
          tools:
            - {name: fetch}
            - {name: create_issue, level: public}
        """)
    script = textwrap.dedent(f"""\
        import asyncio, json, os
        from mcp import ClientSession, StdioServerParameters, stdio_client

        async def main():
            params = StdioServerParameters(command={_gateway(workdir, policy)[0]!r},
                                           args={_gateway(workdir, policy)[1:]!r},
                                           env=dict(os.environ))
            async with stdio_client(params) as (r, w), ClientSession(r, w) as s:
                await s.initialize()
                read = await s.call_tool("fetch", {{"url": "http://app.test/private/a.txt"}})
                write = await s.call_tool("create_issue", {{"repo": "acme/public",
                                                           "title": "t", "body": "b"}})
                print(json.dumps({{"steps": [
                    {{"tool": "fetch", "is_error": bool(read.is_error),
                      "text": read.content[0].text}},
                    {{"tool": "create_issue", "is_error": bool(write.is_error),
                      "text": write.content[0].text}}]}}), flush=True)

        asyncio.run(main())
        """)
    run, out = _agent_script(world, script, workdir)
    assert not _step(out, "fetch")["is_error"], out
    refused = _step(out, "create_issue")
    assert refused["is_error"], out
    assert ("session is confidential since GET app.test/private/a.txt at "
            in refused["text"]), refused
    assert _issues(run) == []
    (raised,) = run.rows("flow")
    assert raised["rule_id"] == "private-repo"
    assert [(r["verdict"], r["rule_id"]) for r in run.rows("mcp")] == [
        ("allow", "fetch"), ("deny", "create_issue")]
