"""``egresslock warm``: a server that makes ``egresslock run`` start in tens of milliseconds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import click

STARTUP_TIMEOUT = 20.0


def _idle(value: str) -> float:
    from egresslock.audit.reader import parse_duration

    if value.strip() in ("0", "never"):
        return float("inf")
    seconds = parse_duration(value)
    if seconds is None or seconds <= 0:
        raise click.BadParameter(f"{value!r} is not a duration: use a number and s, m, h or d "
                                 "(90s, 30m, 8h), or 'never'", param_hint="--idle")
    return seconds


_IDLE_OPTION = click.option(
    "--idle", "idle", default="30m", show_default=True, metavar="DURATION",
    help="Exit after this long without a run (90s, 30m, 8h; 'never' to stay).")


@click.group()
def warm() -> None:
    """A warm server for `egresslock run`: imports and parsed policies kept in memory.

    A cold `egresslock run` spends a few hundred milliseconds importing Python modules and
    parsing the policy before the command starts. With a warm server of this user running,
    `egresslock run` hands the run to it and the command starts in a few tens of
    milliseconds; the run is otherwise the same (options, sandbox, audit rows, summary, exit
    code). Runs with a terminal on stdin, stdout or stderr, and clients the server cannot vouch
    for (another uid, namespaces, capabilities, seccomp, limits it cannot give), start cold.
    EGRESSLOCK_WARM=off makes every run cold; EGRESSLOCK_WARM=start makes a run that finds
    no server start one in the background for the runs after it.

    \b
      egresslock warm start          start one in the background
      egresslock warm status         is one running, how many runs it served
      egresslock warm stop           stop it
      egresslock warm serve          run one in the foreground (for a service manager)
    """


@warm.command()
@_IDLE_OPTION
def serve(idle: str) -> None:
    """Run the warm server in the foreground until SIGTERM, Ctrl-C or the idle time.

    Prints `listening on @SOCKET` when it takes runs; its log (one line per declined client or
    failed request) goes to stderr.
    """
    from egresslock.cli.warm_server import WarmError, WarmServer, log, preload

    seconds = _idle(idle)
    preload()
    try:
        server = WarmServer(seconds)
    except WarmError as exc:
        click.echo(f"egresslock: {exc}", err=True)
        sys.exit(1)
    click.echo(f"listening on @{server.name[1:]}", err=True)
    log(f"serving, idle timeout {idle}")
    server.serve_forever()
    log("stopped")


@warm.command()
@_IDLE_OPTION
@click.option("--log", "log_path", type=click.Path(dir_okay=False, path_type=Path),
              help="The server's log (default: warm.log next to the default audit log).")
@click.option("--json", "as_json", is_flag=True, help="Print the server's status as JSON.")
def start(idle: str, log_path: Path | None, as_json: bool) -> None:
    """Start a warm server in the background, unless one is running. Exit 0 when one runs."""
    from egresslock.audit import default_db_path

    _idle(idle)
    status = ask("status")
    if status is None:
        log_path = log_path or default_db_path().parent / "warm.log"
        child = spawn_server(idle, log_path)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while status is None:
            if child.poll() is not None:
                raise click.ClickException(
                    f"the warm server exited with code {child.returncode}; its log is "
                    f"{log_path}:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                child.kill()
                raise click.ClickException(f"the warm server did not answer within "
                                           f"{STARTUP_TIMEOUT:.0f} s; its log is {log_path}")
            time.sleep(0.05)
            status = ask("status")
    _show(status, as_json, "running")


@warm.command()
@click.option("--json", "as_json", is_flag=True, help="Print the server's status as JSON.")
def status(as_json: bool) -> None:
    """Say whether a warm server of this user and installation runs. Exit 0 if so, 1 if not."""
    found = ask("status")
    if found is None:
        _none(as_json, "no warm server runs: every 'egresslock run' starts cold "
                       "('egresslock warm start' starts one)")
        sys.exit(1)
    _show(found, as_json, "running")


@warm.command()
@click.option("--json", "as_json", is_flag=True, help="Print the server's last status as JSON.")
def stop(as_json: bool) -> None:
    """Stop the warm server (runs in progress finish). Exit 0 also when none was running."""
    found = ask("stop")
    if found is None:
        _none(as_json, "no warm server was running")
        return
    deadline = time.monotonic() + 5.0
    while ask("status") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    _show(found, as_json, "stopped")


# What a server started in the background keeps of its starter's environment: where things are,
# how Python runs, and which server it is. Runs bring their own environment; the server's own
# need not hold the starter's tokens for as long as it lives.
KEPT_VARIABLES = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "LC_CTYPE", "TZ",
                  "TMPDIR")
KEPT_PREFIXES = ("XDG_", "PYTHON", "EGRESSLOCK_")


def spawn_server(idle: str, log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``egresslock warm serve`` detached (its own session, stdio closed, its log
    appended to ``log_path``), with a trimmed environment; do not wait for it."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k in KEPT_VARIABLES or k.startswith(KEPT_PREFIXES)}
    env.pop("EGRESSLOCK_WARM", None)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "egresslock", "warm", "serve", "--idle", idle],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log_file,
            start_new_session=True, cwd="/", env=env)


def ask(op: str) -> dict[str, object] | None:
    """Send a control request to this user's warm server; None when none answers (or the socket
    belongs to another user, who is told nothing)."""
    from egresslock.cli.warm_client import frame, peer_credentials, read_frame, socket_name

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        try:
            sock.connect(socket_name())
            if peer_credentials(sock)[1] != os.geteuid():
                return None
            sock.sendall(frame(json.dumps({"op": op}).encode()))
            answer = read_frame(sock)
        except OSError:
            return None
    if answer is None:
        return None
    found = json.loads(answer)
    return found if isinstance(found, dict) else None


def _none(as_json: bool, message: str) -> None:
    click.echo(json.dumps({"running": False}) if as_json else message)


def _show(status: dict[str, object], as_json: bool, state: str) -> None:
    if as_json:
        click.echo(json.dumps({"running": state == "running", **status}))
        return
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(str(status["started_at"]))))
    idle = status["idle_timeout"]
    idle_text = "never" if idle is None else f"{float(str(idle)):.0f} s"
    click.echo(f"warm server {state}: pid {status['pid']}, socket {status['socket']}, "
               f"egresslock {status['version']}, since {started}; {status['runs']} runs, "
               f"{status['declined']} declined, {status['active']} active; "
               f"exits after {idle_text} idle")


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(unreadable)"
