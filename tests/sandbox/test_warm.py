"""Warm start (``egresslock warm``): a run handed to a warm server behaves as a cold run.

The escape suite and the client tests run through a warm server too (their ``warm`` and
``cold_or_warm`` parameters, in the test world). These tests cover what is particular to the
hand-over: the client's environment, directory, umask and limits reach the command; a client
that dies or whose worker dies leaves no command running; clients the server cannot vouch for,
and runs on a terminal, start cold; a socket held by another user is not trusted; an edited
policy is read again; and the ``warm`` commands themselves.

Each test starts its own server under a name of its own (``EGRESSLOCK_WARM_NAME``), so a warm
server a developer runs is never used, and runs elsewhere in the suite never reach these.
"""

from __future__ import annotations

import ctypes
import json
import os
import pty
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_sandbox
from tests.sandbox.conftest import make_workdir
from tests.sandbox.world import EGRESSLOCK, start_warm_server, stop_warm_server, warm_status

pytestmark = pytest.mark.timeout(60)

POLICY = """version: 1
levels: [public, secret]
rules:
  - id: nothing
    host: example.invalid
"""


@dataclass
class Warm:
    """One warm server of this test, and how to run egresslock against it."""

    env: dict[str, str]
    workdir: Path
    server: subprocess.Popen[bytes]

    @property
    def policy(self) -> Path:
        return self.workdir / "policy.yaml"

    def run(self, *command: str, options: tuple[str, ...] = ("-q",), cold: bool = False,
            **popen: Any) -> subprocess.CompletedProcess[bytes]:
        env = {**self.env, **popen.pop("env", {})}
        if cold:
            env["EGRESSLOCK_WARM"] = "off"
        popen.setdefault("stdin", subprocess.DEVNULL)
        popen.setdefault("capture_output", True)
        return subprocess.run(self.argv(*command, options=options), env=env, cwd=self.workdir,
                              timeout=30, check=False, **popen)

    def argv(self, *command: str, options: tuple[str, ...] = ("-q",)) -> list[str]:
        return [EGRESSLOCK, "run", "-p", str(self.policy), "--audit",
                str(self.workdir / "audit.db"), *options, "--", *command]

    def status(self) -> dict[str, Any]:
        return warm_status(self.env)


def _sandbox_works(env: dict[str, str], workdir: Path) -> tuple[bool, str]:
    done = subprocess.run([EGRESSLOCK, "run", "-q", "-p", str(workdir / "policy.yaml"),
                           "--audit", str(workdir / "audit.db"), "--", "true"],
                          env={**env, "EGRESSLOCK_WARM": "off"}, cwd=workdir,
                          capture_output=True, text=True, timeout=30, check=False)
    return done.returncode == 0, f"egresslock run does not work here: {done.stderr.strip()}"


@pytest.fixture
def warm() -> Iterator[Warm]:
    workdir = make_workdir()
    (workdir / "policy.yaml").write_text(POLICY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["EGRESSLOCK_WARM_NAME"] = f"test{os.getpid()}-{time.monotonic_ns()}"
    env["EGRESSLOCK_CA_DIR"] = str(workdir / "ca")
    ok, reason = _sandbox_works(env, workdir)
    require_sandbox(ok, reason)
    server, _ = start_warm_server(env, "--idle", "120s")
    try:
        yield Warm(env, workdir, server)
    finally:
        stop_warm_server(server)
        shutil.rmtree(workdir, ignore_errors=True)


def _limits_and_umask() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (300, 400))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.umask(0o027)


SHOW = ("echo out; echo err >&2; cat; umask; ulimit -Sc; ulimit -Hn; pwd; "
        "echo \"var=$WARM_TEST_VAR\"; exit 7")


def test_a_warm_run_is_the_cold_run(warm: Warm) -> None:
    results = []
    for cold in (True, False):
        results.append(warm.run("sh", "-c", SHOW, cold=cold, input=b"from stdin\n",
                                stdin=None, env={"WARM_TEST_VAR": "client-value"},
                                preexec_fn=_limits_and_umask))
    cold_run, warm_run = results
    assert cold_run.returncode == warm_run.returncode == 7, (cold_run, warm_run)
    assert warm_run.stdout == cold_run.stdout, (cold_run.stdout, warm_run.stdout)
    assert warm_run.stderr == cold_run.stderr == b"err\n"
    lines = warm_run.stdout.decode().splitlines()
    assert lines[:2] == ["out", "from stdin"]
    assert lines[2] == "0027"  # the client's umask
    assert lines[3:5] == ["0", "400"]  # the client's core and hard open-files limits
    assert lines[5] == str(warm.workdir)
    assert lines[6] == "var=client-value"
    status = warm.status()
    assert status["runs"] == 1, status  # the cold one never asked
    assert status["declined"] == 0, status


def test_the_summary_reaches_the_clients_stderr(warm: Warm) -> None:
    done = warm.run("true", options=("--json",))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stderr.decode().strip().splitlines()[-1])
    assert summary["start"] == "warm"
    assert summary["exit_code"] == 0
    assert summary["audit"] == str(warm.workdir / "audit.db")
    assert warm.status()["runs"] == 1


def _wait_for(path: Path, proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError(f"{path} never appeared")


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.02)
    return False


def _popen(warm: Warm, script: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(warm.argv("sh", "-c", script), env=warm.env, cwd=warm.workdir,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_a_killed_client_ends_the_command(warm: Warm) -> None:
    client = _popen(warm, "echo $$ > cmd.pid; exec sleep 60")
    command = _wait_for(warm.workdir / "cmd.pid", client)
    assert warm.status()["active"] == 1
    client.kill()
    client.wait()
    assert _gone(command), f"the command {command} outlived its client"


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_a_killed_worker_fails_the_client_and_ends_the_command(warm: Warm) -> None:
    client = _popen(warm, "echo $$ > cmd.pid; exec sleep 60")
    command = _wait_for(warm.workdir / "cmd.pid", client)
    workers = _children(warm.status()["pid"])
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)
    _, err = client.communicate(timeout=10)
    assert client.returncode == 125, err
    assert b"worker ended without an exit code" in err
    assert _gone(command), "the command outlived the worker that was its proxy"


def test_sigterm_to_the_client_reaches_the_command(warm: Warm) -> None:
    client = _popen(warm, "trap 'echo got-term; exit 42' TERM; echo $$ > cmd.pid; "
                          "sleep 30 & wait $!")
    _wait_for(warm.workdir / "cmd.pid", client)
    time.sleep(0.2)  # the trap is set before the pid file is written; give sh a moment more
    client.send_signal(signal.SIGTERM)
    out, _ = client.communicate(timeout=10)
    assert client.returncode == 42
    assert b"got-term" in out


def _no_new_privs() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS


@pytest.mark.parametrize(("why", "preexec"), [
    ("nice value", lambda: os.nice(3)),
    ("NoNewPrivs", _no_new_privs),
])
def test_a_client_the_server_cannot_vouch_for_runs_cold(warm: Warm, why: str,
                                                         preexec: Callable[[], None]) -> None:
    # A worker would run the command less confined, or scheduled otherwise, than the client
    # could itself: the server declines, and the client runs the same command cold.
    done = warm.run("sh", "-c", "cat /proc/self/status | grep NoNewPrivs; nice", input=b"",
                    stdin=None, preexec_fn=preexec)
    assert done.returncode == 0, done.stderr
    status = warm.status()
    assert status["runs"] == 0, (why, status)
    assert status["declined"] == 1, (why, status)
    if why == "nice value":
        assert done.stdout.decode().split()[-1] == "3"  # the client's niceness, cold


def test_a_run_on_a_terminal_starts_cold(warm: Warm) -> None:
    # The command of a warm worker could not have the terminal as its controlling terminal.
    controller, terminal = pty.openpty()
    try:
        done = warm.run("sh", "-c", "tty; test -t 0", stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)
    assert done.returncode == 0, done
    assert done.stdout.startswith(b"/dev/pts/"), done.stdout
    assert warm.status()["runs"] == 0


def test_an_edited_policy_is_read_again(warm: Warm) -> None:
    assert warm.run("true", options=("-q", "--level", "secret")).returncode == 0
    warm.policy.write_text(POLICY.replace("levels: [public, secret]\n", ""))
    done = warm.run("true", options=("-q", "--level", "secret"))
    assert done.returncode == 2, done
    assert b"'secret' is not one of the policy's levels (none" in done.stderr
    warm.policy.write_text("version: 1\nrules:\n  - id: x\n    hots: a.test\n")
    warm_error = warm.run("true")
    cold_error = warm.run("true", cold=True)
    assert warm_error.returncode == cold_error.returncode == 2
    assert warm_error.stderr == cold_error.stderr
    assert b"hots" in warm_error.stderr
    assert warm.status()["runs"] == 3


SQUATTER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\\0" + sys.argv[1])  # abstract: the argument is the name after the NUL
s.listen(8)
s.settimeout(20)
print("ready", flush=True)
received = 0
try:
    conn, _ = s.accept()
    conn.settimeout(2)
    try:
        while chunk := conn.recv(65536):
            received += len(chunk)
    except OSError:
        pass
except OSError:
    pass
print(received, flush=True)
"""


def test_a_socket_held_by_another_user_is_not_trusted(warm: Warm) -> None:
    require_sandbox(os.geteuid() == 0, "needs root to hold a socket as another user")
    from egresslock.cli.warm_client import socket_name

    env = {**warm.env, "EGRESSLOCK_WARM_NAME": warm.env["EGRESSLOCK_WARM_NAME"] + "-squat"}
    saved = os.environ.get("EGRESSLOCK_WARM_NAME")
    os.environ["EGRESSLOCK_WARM_NAME"] = env["EGRESSLOCK_WARM_NAME"]
    try:
        name = socket_name(0)
    finally:
        if saved is None:
            del os.environ["EGRESSLOCK_WARM_NAME"]
        else:
            os.environ["EGRESSLOCK_WARM_NAME"] = saved
    squatter = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 sys.executable, "-c", SQUATTER, name[1:]],
                                stdout=subprocess.PIPE, text=True)
    assert squatter.stdout is not None
    assert squatter.stdout.readline().strip() == "ready"
    done = warm.run("sh", "-c", "echo ran", env={**env, "SECRET_IN_ENV": "do-not-send"})
    out, _ = squatter.communicate(timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"ran\n"  # cold
    assert b"held by uid 65534" in done.stderr
    assert out.strip() == "0", "the client sent the squatter something"


def test_warm_start_status_stop(warm: Warm) -> None:
    env = {**warm.env, "EGRESSLOCK_WARM_NAME": warm.env["EGRESSLOCK_WARM_NAME"] + "-cli"}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([EGRESSLOCK, "warm", *args], env=env, capture_output=True,
                              text=True, timeout=30, check=False)

    none = cli("status", "--json")
    assert none.returncode == 1
    assert json.loads(none.stdout) == {"running": False}
    started = cli("start", "--json", "--log", str(warm.workdir / "warm.log"))
    assert started.returncode == 0, started.stderr
    info = json.loads(started.stdout)
    assert info["running"] is True
    assert info["socket"].endswith("-cli")
    again = cli("start")  # already running: says so, starts no second one
    assert again.returncode == 0
    assert f"pid {info['pid']}" in again.stdout
    shown = cli("status")
    assert shown.returncode == 0
    assert "warm server running" in shown.stdout
    stopped = cli("stop")
    assert stopped.returncode == 0
    assert "stopped" in stopped.stdout
    assert cli("status").returncode == 1
    assert _gone(info["pid"])


def test_an_idle_server_exits(warm: Warm) -> None:
    env = {**warm.env, "EGRESSLOCK_WARM_NAME": warm.env["EGRESSLOCK_WARM_NAME"] + "-idle"}
    server, _ = start_warm_server(env, "--idle", "1s")
    try:
        assert server.wait(timeout=10) == 0
    finally:
        stop_warm_server(server)
    assert server.stderr is not None
    assert b"idle for 1 s: exiting" in server.stderr.read()


def test_a_bad_idle_value_names_what_is_valid() -> None:
    done = subprocess.run([EGRESSLOCK, "warm", "serve", "--idle", "soon"], capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 2
    assert "'soon' is not a duration" in done.stderr


def test_a_changed_installation_stops_the_server(warm: Warm) -> None:
    # Only the file's time changes (and is put back): the server must not run code older than
    # what is on disk, so it declines the run, which starts cold, and exits.
    import egresslock

    target = Path(egresslock.__file__).with_name("paths.py")
    before = target.stat()
    try:
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        done = warm.run("sh", "-c", "echo ran")
    finally:
        os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"ran\n"
    assert warm.server.wait(timeout=10) == 0
    assert warm.server.stderr is not None
    assert b"egresslock changed on disk" in warm.server.stderr.read()


def test_concurrent_runs_each_get_their_own_worker(warm: Warm) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> subprocess.CompletedProcess[bytes]:
        return warm.run("sh", "-c", f"sleep 0.3; echo run-{i}; exit {i}")

    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(one, range(8)))
    assert [d.returncode for d in done] == list(range(8)), [d.stderr for d in done]
    assert [d.stdout for d in done] == [f"run-{i}\n".encode() for i in range(8)]
    status = warm.status()
    assert status["runs"] == 8, status
    assert status["declined"] == 0, status


def test_warm_start_mode_starts_a_server_for_the_next_runs(warm: Warm) -> None:
    env = {**warm.env, "EGRESSLOCK_WARM_NAME": warm.env["EGRESSLOCK_WARM_NAME"] + "-auto",
           "EGRESSLOCK_WARM": "start", "XDG_STATE_HOME": str(warm.workdir / "state"),
           "SECRET_OF_THE_FIRST_RUN": "not-for-the-server"}
    first = warm.run("true", options=("--json",), env=env)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stderr.splitlines()[-1])["start"] == "cold"
    asked = {**env, "EGRESSLOCK_WARM": "auto"}
    deadline = time.monotonic() + 20
    while not warm_status(asked).get("running"):
        assert time.monotonic() < deadline, (warm.workdir / "state").rglob("warm.log")
        time.sleep(0.1)
    server = warm_status(asked)["pid"]
    try:
        second = warm.run("true", options=("--json",), env=env)
        assert second.returncode == 0, second.stderr
        assert json.loads(second.stderr.splitlines()[-1])["start"] == "warm"
        # The server keeps a trimmed copy of its starter's environment, not its tokens.
        assert b"not-for-the-server" not in Path(f"/proc/{server}/environ").read_bytes()
        assert (warm.workdir / "state" / "egresslock" / "warm.log").exists()
    finally:
        subprocess.run([EGRESSLOCK, "warm", "stop"], env=asked, capture_output=True,
                       timeout=30, check=False)
    assert _gone(server)
