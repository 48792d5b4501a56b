"""No write down through the proxy: once the agent read confidential data, public writes fail.

In the test world, app.test stands in for a code host: ``/private/...`` is a private repository
(``reads: confidential``) and ``/public/...`` a public one (``level: public``). curl inside
``egresslock run`` reads, then writes: the write is refused with a reason that names the read,
and the upstream never receives it. The other order (write, then read) succeeds, and
``--level confidential`` starts a run as if the read had happened.
"""

from __future__ import annotations

import textwrap

import pytest

from tests.sandbox.conftest import World, WorldRun

pytestmark = pytest.mark.timeout(120)

POLICY = """\
version: 1
levels: [public, internal, confidential]
network:
  allow_ranges: ["198.51.100.10/32"]
rules:
  - id: private-repo
    host: app.test
    ports: [80]
    methods: [GET]
    paths: ["/private/**"]
    reads: confidential
  - id: public-issues
    host: app.test
    ports: [80]
    methods: [POST]
    paths: ["/public/issues"]
    level: public
  - id: internal-wiki
    host: secure.test
    ports: [443]
    level: internal
"""

READ = 'curl -s -o /dev/null -w "read=%{http_code}\\n" http://app.test/private/contents/a.txt'
WRITE = ('curl -s -w "\\nwrite=%{http_code}\\n" -d "title=leak" '
         'http://app.test/public/issues')


def _run(world: World, script: str, *args: str) -> WorldRun:
    return world(["sh", "-c", textwrap.dedent(script)], policy=POLICY, args=list(args))


def test_read_then_public_write_is_denied_and_names_the_read(world: World) -> None:
    run = _run(world, f"{READ}\n{WRITE}\n")
    assert "read=200" in run.stdout, run.describe()
    assert "write=403" in run.stdout, run.describe()
    assert "session is confidential since GET app.test/private/contents/a.txt" in run.stdout
    assert "rule public-issues accepts public" in run.stdout
    assert not [r for r in run.upstream if r["path"].startswith("/public")], run.upstream
    (raised,) = run.rows("flow")
    assert raised["rule_id"] == "private-repo"
    assert "raised from public to confidential" in raised["reason"]
    denied = run.rows("http", "deny", rule_id="public-issues")
    assert denied
    assert "no write down to app.test" in denied[0]["reason"]
    assert run.summary is not None
    assert run.summary["mark"] == "confidential"


def test_write_then_read_succeeds(world: World) -> None:
    run = _run(world, f"{WRITE}\n{READ}\n")
    assert "write=200" in run.stdout, run.describe()
    assert "read=200" in run.stdout, run.describe()
    assert [r for r in run.upstream if r["path"] == "/public/issues"]


def test_a_run_can_start_at_a_level(world: World) -> None:
    run = _run(world, f"{WRITE}\n", "--level", "confidential")
    assert "write=403" in run.stdout, run.describe()
    assert "since the run's start (--level)" in run.stdout
    # A tunnel the proxy cannot see into is a write too: refused at CONNECT.
    tls = _run(world, 'curl -s -o /dev/null -w "tls=%{http_code}\\n" '
                      "https://secure.test/x; echo\n", "--level", "confidential")
    assert "tls=000" in tls.stdout, tls.describe()
    assert tls.rows("connect", "deny", rule_id="internal-wiki")


def test_an_unknown_start_level_is_a_usage_error(world: World) -> None:
    run = _run(world, "true", "--level", "secret")
    assert run.exit == 2
    assert "'secret' is not one of the policy's levels (public, internal, confidential)" in (
        run.stderr)
