"""Real clients inside ``egresslock run``, allowed and denied, in the test world.

The world (tests/sandbox/world.py) pins app.test, secure.test, pypi.test and git.test to its
upstream server on 198.51.100.10 and runs an attacker on 203.0.113.5; the default policy allows
the four names and nothing else. Each test asserts what the client got, the audit rows, and for
denials that neither the attacker nor the upstream saw the request. Then the run's contract:
exit codes, signals, stdin/stdout, leftovers, the file system view and the ``--json`` summary.
"""

from __future__ import annotations

import os
import signal
import textwrap
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.sandbox.conftest import PYTHON, World, WorldRun, make_workdir

pytestmark = pytest.mark.timeout(120)


def sh(script: str) -> list[str]:
    return ["sh", "-c", textwrap.dedent(script)]


def upstream_paths(run: WorldRun) -> set[str]:
    return {f"{r['host']}{r['path']}" for r in run.upstream}


def assert_clean_deny(run: WorldRun, host: str) -> None:
    assert run.rows(verdict="deny", host=host), f"no deny row for {host}\n{run.describe()}"
    assert not [r for r in run.upstream if r["host"] == host], run.upstream
    run.assert_nothing_escaped()


def test_curl_http_and_https_through_the_proxy_variables(cold_or_warm: World) -> None:
    run = cold_or_warm(sh("""
        curl -sS http://app.test/curl-http; echo
        curl -sS --cacert ca.pem https://secure.test/curl-https; echo
        curl -sS -D - http://evil.test/curl-denied; echo "rc=$?"
        curl -sS --cacert ca.pem https://evil.test/curl-denied-tls; echo "rc=$?"
    """))
    assert run.exit == 0, run.describe()
    assert '"path": "/curl-http"' in run.stdout
    assert '"path": "/curl-https"' in run.stdout
    assert "X-Egresslock-Deny: default; no rule allows host evil.test" in run.stdout
    assert "rc=56" in run.stdout  # curl: CONNECT refused with 403
    assert upstream_paths(run) == {"app.test/curl-http", "secure.test/curl-https"}
    assert run.rows("http", "allow", host="app.test", rule_id="app")
    assert run.rows("connect", "allow", host="secure.test", rule_id="secure")
    assert run.rows("http", "deny", host="evil.test")
    assert run.rows("connect", "deny", host="evil.test")
    assert_clean_deny(run, "evil.test")


def test_wget(world: World) -> None:
    run = world(sh("""
        wget -qO- http://app.test/wget; echo
        wget -qO- --ca-certificate=ca.pem https://secure.test/wget-tls; echo
        wget -qO- http://evil.test/wget-denied; echo "rc=$?"
    """))
    assert run.exit == 0, run.describe()
    assert '"path": "/wget"' in run.stdout
    assert '"path": "/wget-tls"' in run.stdout
    assert "rc=8" in run.stdout  # wget: the server answered with an error (403)
    assert upstream_paths(run) == {"app.test/wget", "secure.test/wget-tls"}
    assert_clean_deny(run, "evil.test")


PYTHON_CLIENTS = """
import json, ssl, sys, urllib.error, urllib.request
import httpx, requests

ca = "ca.pem"
out = {}
out["urllib"] = json.load(urllib.request.urlopen("http://app.test/urllib"))["path"]
out["urllib_tls"] = json.load(urllib.request.urlopen(
    "https://secure.test/urllib-tls", context=ssl.create_default_context(cafile=ca)))["path"]
try:
    urllib.request.urlopen("http://evil.test/urllib-denied")
except urllib.error.HTTPError as exc:
    out["urllib_denied"] = [exc.code, exc.headers.get("X-Egresslock-Deny")]
out["requests"] = requests.get("http://app.test/requests").json()["path"]
out["requests_tls"] = requests.get("https://secure.test/requests-tls", verify=ca).json()["path"]
r = requests.get("http://evil.test/requests-denied")
out["requests_denied"] = [r.status_code, r.headers.get("X-Egresslock-Deny")]
try:
    requests.get("https://evil.test/requests-denied-tls", verify=ca)
except requests.exceptions.ProxyError as exc:
    out["requests_denied_tls"] = "ProxyError"
out["httpx"] = httpx.get("http://app.test/httpx").json()["path"]
out["httpx_tls"] = httpx.get("https://secure.test/httpx-tls", verify=ca).json()["path"]
out["httpx_denied"] = httpx.get("http://evil.test/httpx-denied").status_code
try:
    httpx.get("https://evil.test/httpx-denied-tls", verify=ca)
except httpx.ProxyError:
    out["httpx_denied_tls"] = "ProxyError"
print(json.dumps(out))
"""


def test_python_urllib_requests_httpx(cold_or_warm: World) -> None:
    run = cold_or_warm([PYTHON, "-c", PYTHON_CLIENTS])
    assert run.exit == 0, run.describe()
    out = run.json_stdout()
    assert out["urllib"] == "/urllib"
    assert out["urllib_tls"] == "/urllib-tls"
    assert out["requests"] == "/requests"
    assert out["requests_tls"] == "/requests-tls"
    assert out["httpx"] == "/httpx"
    assert out["httpx_tls"] == "/httpx-tls"
    assert out["urllib_denied"][0] == 403
    assert out["urllib_denied"][1].startswith("default;")
    assert out["requests_denied"][0] == 403
    assert out["httpx_denied"] == 403
    assert out["requests_denied_tls"] == out["httpx_denied_tls"] == "ProxyError"
    assert len(run.rows(verdict="allow")) == 6, run.describe()
    assert len(run.rows(verdict="deny", host="evil.test")) == 5, run.describe()
    assert_clean_deny(run, "evil.test")


def test_pip_installs_from_a_local_index(world: World) -> None:
    pip = (f"{PYTHON} -m pip install --no-cache-dir --disable-pip-version-check -q "
           "--target ./site --trusted-host {host} --index-url http://{host}/simple egl-demo")
    run = world(sh(f"""
        export HOME=$PWD
        {pip.format(host="pypi.test")} || exit 3
        PYTHONPATH=site {PYTHON} -c 'import egl_demo; print(egl_demo.MESSAGE)'
        {pip.format(host="evil.test")} --retries 0 --timeout 5 >/dev/null 2>&1; echo "rc=$?"
    """), timeout=60)
    assert run.exit == 0, run.describe()
    assert "installed through egresslock" in run.stdout
    assert "rc=1" in run.stdout
    assert any(p.startswith("pypi.test/simple/egl-demo") for p in upstream_paths(run))
    assert run.rows("http", "allow", host="pypi.test", rule_id="pypi")
    assert_clean_deny(run, "evil.test")


def test_git_clone_over_http_and_https(world: World) -> None:
    require_tool("git")
    run = world(sh("""
        export HOME=$PWD GIT_CONFIG_NOSYSTEM=1 GIT_SSL_CAINFO=$PWD/ca.pem
        git clone -q http://git.test/demo.git over-http || exit 3
        git clone -q https://git.test/demo.git over-https || exit 4
        cat over-http/README over-https/README
        git clone -q http://evil.test/demo.git denied 2>&1; echo "rc=$?"
    """), git=True, timeout=60)
    assert run.exit == 0, run.describe()
    assert run.stdout.count("cloned through egresslock") == 2, run.describe()
    assert "rc=128" in run.stdout
    assert "git.test/demo.git/info/refs?service=git-upload-pack" in upstream_paths(run)
    assert run.rows("http", "allow", host="git.test")
    assert run.rows("connect", "allow", host="git.test")
    assert_clean_deny(run, "evil.test")


NODE_FETCH = """
const show = (tag, p) => p.then(async r => console.log(tag, r.status, await r.text()))
  .catch(e => console.log(tag, "ERR", (e.cause && (e.cause.code || e.cause.message)) || e));
(async () => {
  await show("allowed-http", fetch("http://app.test/node-http"));
  await show("allowed-https", fetch("https://secure.test/node-https"));
  await show("denied-name", fetch("http://evil.test/node-denied"));
  await show("denied-ip", fetch("http://203.0.113.5:8080/node-denied-ip"));
  await show("denied-ip-tls", fetch("https://203.0.113.5/node-denied-tls"));
})();
"""


def test_node_fetch_ignores_http_proxy_and_meets_transparent_capture(cold_or_warm: World
                                                                     ) -> None:
    require_tool("node")
    workdir = make_workdir()
    run = cold_or_warm(["node", "-e", NODE_FETCH], workdir=workdir,
                env={"NODE_EXTRA_CA_CERTS": str(workdir / "ca.pem")})
    assert run.exit == 0, run.describe()
    lines = {ln.split(" ", 1)[0]: ln for ln in run.stdout.splitlines()}
    assert lines["allowed-http"].startswith("allowed-http 200"), run.describe()
    assert '"path": "/node-http"' in lines["allowed-http"]
    assert lines["allowed-https"].startswith("allowed-https 200"), run.describe()
    assert "ERR" in lines["denied-name"]  # the DNS stub refused the name
    assert " 403 " in lines["denied-ip"] or "ERR" in lines["denied-ip"]
    assert "ERR" in lines["denied-ip-tls"]  # TLS without an allowed SNI: reset
    assert upstream_paths(run) == {"app.test/node-http", "secure.test/node-https"}
    assert run.rows("dns", "allow", host="app.test")
    assert run.rows("dns", "deny", host="evil.test")
    assert run.rows("http", "allow", host="app.test")
    assert run.rows("tls", "allow", host="secure.test")
    assert [r for r in run.rows(verdict="deny") if r.get("port") == 8080]
    run.assert_nothing_escaped()


def test_without_transparent_capture_node_fetch_fails_and_is_logged(world: World) -> None:
    require_tool("node")
    run = world(sh("""
        node -e 'fetch("http://app.test/direct").then(r => console.log("GOT", r.status))
                 .catch(e => console.log("ERR", e.cause && e.cause.code))'
        curl -sS http://app.test/via-proxy; echo
    """), args=["--no-transparent"])
    assert run.exit == 0, run.describe()
    assert "ERR" in run.stdout, run.describe()
    assert "GOT" not in run.stdout, run.describe()
    assert '"path": "/via-proxy"' in run.stdout  # the proxy variables still work
    assert upstream_paths(run) == {"app.test/via-proxy"}
    # Node asked DNS (answered), then its direct connection was refused: Landlock in the
    # command (EACCES) or the filter's drop, which is logged.
    assert run.rows("http", "allow", host="app.test")
    refused = [r for r in run.audit if r.get("verdict") == "deny"
               and "198.51.100.10" in f"{r.get('address')} {r.get('reason')}"]
    assert refused or "EACCES" in run.stdout or "EPERM" in run.stdout, run.describe()
    run.assert_nothing_escaped()


@pytest.mark.parametrize(("script", "code"), [
    ("exit 7", 7),
    ("exit 0", 0),
    ("kill -KILL $$", 128 + signal.SIGKILL),
    ("kill -TERM $$", 128 + signal.SIGTERM),
])
def test_exit_code_passes_through(cold_or_warm: World, script: str, code: int) -> None:
    run = cold_or_warm(["sh", "-c", script], args=["--quiet"])
    assert run.exit == code, run.describe()


def test_stdin_and_stdout_pass_through(cold_or_warm: World) -> None:
    data = "line one\nline two ünïcode\n" * 200
    run = cold_or_warm(["sh", "-c", "cat; echo done >&2"], stdin=data, args=["--quiet"])
    assert run.exit == 0
    assert run.stdout == data
    assert run.stderr.splitlines()[0] == "done"  # then the world's --json summary


def test_sigterm_to_egresslock_reaches_the_command(cold_or_warm: World) -> None:
    run = cold_or_warm(sh("""
        trap 'echo got-term; exit 42' TERM
        touch ready
        sleep 30 & wait $!
        echo not-signalled
    """), signal={"signum": int(signal.SIGTERM), "after_file": "ready", "wait": 10,
                  "delay": float(os.environ.get("EGRESSLOCK_TEST_SIGNAL_DELAY", "0"))},
        args=["--quiet"])
    assert run.raw["signal_sent"] == signal.SIGTERM
    assert run.exit == 42, run.describe()
    assert "got-term" in run.stdout
    assert "not-signalled" not in run.stdout
    assert run.raw["elapsed"] < 10


DAEMON = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        with open("bg.pid", "w") as f:
            f.write(str(os.getpid()))
        time.sleep(60)
        os._exit(0)
    os._exit(0)
while not os.path.exists("bg.pid"):
    time.sleep(0.01)
"""


def test_background_processes_end_with_the_run(cold_or_warm: World) -> None:
    run = cold_or_warm([PYTHON, "-c", DAEMON], args=["--quiet"])
    assert run.exit == 0, run.describe()
    pid = int((run.workdir / "bg.pid").read_text())
    # egresslock ended it; the world only reaps what egresslock failed to end.
    assert run.raw["leftovers"] == [], run.raw["leftovers"]
    assert not Path(f"/proc/{pid}").exists() or \
        Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_working_directory_is_writable_and_tmp_is_private(cold_or_warm: World) -> None:
    marker = Path("/tmp") / f"egresslock-host-marker-{os.getpid()}"
    marker.write_text("host only")
    workdir = make_workdir()
    try:
        run = cold_or_warm(sh("""
            id -u
            echo written > out.txt && echo write-ok
            echo "tmp: $(ls -A /tmp | tr '\\n' ' ')"
            echo "vartmp: $(ls -A /var/tmp | tr '\\n' ' ')"
            echo "shm: $(ls -A /dev/shm | tr '\\n' ' ')"
            echo "run: $(ls -A /run | tr '\\n' ' ')"
            echo scratch > /tmp/scratch && echo tmp-write-ok
            env | grep -E '^(HTTP_PROXY|https_proxy|ALL_PROXY|NO_PROXY|no_proxy)=' | sort
            env | grep -E '^(EGRESSLOCK_SANDBOX|SSH_AUTH_SOCK)=' | sort
        """), workdir=workdir, args=["--quiet"])
    finally:
        marker.unlink()
    assert run.exit == 0, run.describe()
    lines = run.stdout.splitlines()
    assert lines[0] == "65534"
    assert "write-ok" in lines
    assert (workdir / "out.txt").read_text() == "written\n"
    assert (workdir / "out.txt").stat().st_uid == 65534
    tmp_line = next(ln for ln in lines if ln.startswith("tmp:"))
    # Only what is carried through: the cwd, and the checkout when it lies in /tmp (the test
    # world shares it, for the venv and the scripts).
    carried = {workdir.name}
    checkout = Path(__file__).resolve().parents[2]
    if checkout.parts[:2] == ("/", "tmp"):
        carried.add(checkout.parts[2])
    assert set(tmp_line.split()[1:]) == carried, tmp_line
    assert next(ln for ln in lines if ln.startswith("vartmp:")).split() == ["vartmp:"]
    assert next(ln for ln in lines if ln.startswith("shm:")).split() == ["shm:"]
    assert "egresslock-relay" not in next(ln for ln in lines if ln.startswith("run:"))
    assert "tmp-write-ok" in lines
    assert not Path("/tmp/scratch").exists()
    assert "HTTP_PROXY=http://127.0.0.1:3128" in lines
    assert "https_proxy=http://127.0.0.1:3128" in lines
    assert "ALL_PROXY=http://127.0.0.1:3128" in lines
    assert "EGRESSLOCK_SANDBOX=1" in lines
    assert not [ln for ln in lines if ln.startswith(("NO_PROXY=", "no_proxy=", "SSH_AUTH_SOCK="))]


def test_json_summary_shape(cold_or_warm: World) -> None:
    run = cold_or_warm(sh("""
        curl -sS -o /dev/null http://app.test/one
        curl -sS -o /dev/null http://app.test/two
        curl -sS -o /dev/null http://evil.test/x
        curl -sS -o /dev/null http://evil.test/y
        curl -sS -o /dev/null http://other.test/z
        exit 3
    """))
    assert run.exit == 3
    s = run.summary
    assert s is not None, run.describe()
    assert isinstance(s["run_id"], str)
    assert s["run_id"]
    assert s["audit"].endswith("audit.db")
    assert s["allowed"] == 2, s
    assert s["denied"] == 3, s
    assert s.get("exit_code") == 3
    top = s["top_denied"]
    assert isinstance(top, list)
    assert top
    assert top[0]["destination"] == "evil.test:80", top
    assert top[0]["count"] == 2, top
    assert {"layer", "destination", "reason", "count"} <= set(top[0])
    assert {r.get("run_id") for r in run.audit} <= {s["run_id"], None}
    assert len(run.rows(verdict="allow")) == 2
    assert len(run.rows(verdict="deny")) == 3
