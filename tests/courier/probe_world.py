"""The test world (tests/sandbox/world.py) with a probe: root looks at the courier's worker.

Run like the world itself (as root, in a fresh network and mount namespace)::

    unshare --net --mount -- .venv/bin/python -m tests.courier.probe_world SCENARIO.json

While ``egresslock run`` runs, a thread waits for the agent to create ``probe-now`` in its
working directory, then inspects the worker from outside, with root's eyes, through ``/proc``:

- ``/proc/<worker>/environ``: the names of the worker's environment variables;
- ``/proc/<worker>/root/<path>``: whether the agent's files (``agent-notes.txt`` in its working
  directory) exist in the worker's mount namespace, resolved by the kernel as the worker would
  resolve them;
- ``/proc/<worker>/status``: NoNewPrivs and Seccomp;
- the owner of ``/proc/<worker>/environ`` (root when the worker is not dumpable).

The findings go into the world's JSON result under ``"probe"``; then ``probe-done`` tells the
agent to go on.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.sandbox import world

_ORIGINAL = world.run_egresslock


def worker_pid() -> int | None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.split(b"\0")[1:4] == [b"-I", b"-m", b"egresslock.courier.worker"]:
            return int(entry)
    return None


def probe(workdir: Path, found: dict[str, Any]) -> None:
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline and not (workdir / "probe-now").exists():
        time.sleep(0.02)
    try:
        pid = worker_pid()
        found["pid"] = pid
        if pid is None:
            return
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        found["env"] = sorted(e.split(b"=", 1)[0].decode() for e in environ if e)
        found["env_values"] = [e.decode("latin-1") for e in environ if e]
        found["environ_owner"] = os.stat(f"/proc/{pid}/environ").st_uid
        status = Path(f"/proc/{pid}/status").read_text()
        found["status"] = {ln.split(":")[0]: ln.split(":", 1)[1].strip()
                           for ln in status.splitlines()
                           if ln.startswith(("NoNewPrivs", "Seccomp", "Uid"))}
        root = f"/proc/{pid}/root"
        notes = workdir / "agent-notes.txt"
        found["agent_file_here"] = notes.exists()  # the control: the file does exist
        found["agent_file_in_worker"] = os.path.exists(f"{root}{notes}")
        found["agent_dir_listing_in_worker"] = (
            sorted(os.listdir(f"{root}{workdir}")) if os.path.isdir(f"{root}{workdir}") else None)
        found["worker_cwd"] = os.readlink(f"/proc/{pid}/cwd")
    except OSError as exc:
        found["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        (workdir / "probe-done").touch()


def run_with_probe(scenario: dict[str, Any], workdir: Path, state: Path,
                   relays: list[str]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    thread = threading.Thread(target=probe, args=(workdir, found), daemon=True)
    thread.start()
    result = _ORIGINAL(scenario, workdir, state, relays)
    thread.join(5)
    result["probe"] = found
    return result


if __name__ == "__main__":
    world.run_egresslock = run_with_probe
    sys.exit(world.main(sys.argv))
