"""The run's process tree and mount plan, with real processes and real paths."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from egresslock.sandbox.mounts import plan_mounts
from egresslock.sandbox.process import descendants, end_tree, exit_code


def test_exit_code_follows_the_shell_convention() -> None:
    assert exit_code(7 << 8) == 7
    assert exit_code(signal.SIGTERM) == 128 + signal.SIGTERM
    assert exit_code(0) == 0


def test_end_tree_kills_detached_grandchildren() -> None:
    # A child that starts a detached grandchild and exits at once: only the tree walk, not the
    # pid we started, can find the grandchild.
    script = ("import os,subprocess,sys,time\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
              " start_new_session=True)\n"
              "print(p.pid, flush=True)\n"
              "time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    grandchild = int(child.stdout.readline())
    assert grandchild in descendants(os.getpid())
    # Only below the child: the test suite's own other processes must survive.
    assert end_tree(child.pid) >= 1
    child.kill()
    child.wait(timeout=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        try:
            state = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state == "Z":  # killed, waiting for its parent (init) to reap it
            break
        time.sleep(0.02)
    else:
        raise AssertionError(f"grandchild {grandchild} still alive")
    assert grandchild not in descendants(os.getpid())


HAS_CHILDREN = """
import subprocess, sys, time
from egresslock.sandbox.process import _has_children, end_tree
before = _has_children()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
during = _has_children()
ended = end_tree()
after = _has_children()
print(before, during, ended, after)
"""


def test_end_tree_of_a_process_without_children_is_quick_and_with_them_ends_them() -> None:
    done = subprocess.run([sys.executable, "-c", HAS_CHILDREN], capture_output=True, text=True,
                          timeout=30, check=True)
    assert done.stdout.split() == ["False", "True", "1", "False"], done.stderr


def test_plan_hides_socket_directories_and_carries_the_working_directory(tmp_path: Path
                                                                         ) -> None:
    work = tmp_path / "work"
    work.mkdir()
    plan = plan_mounts(str(work), [], {}, hide=[str(tmp_path), "/nonexistent-dir"])
    assert plan.hide == (str(tmp_path.resolve()),)
    assert plan.share == (str(work.resolve()),)


def test_plan_masks_an_agent_socket_outside_hidden_directories(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "agent.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    try:
        plan = plan_mounts("/", [], {"SSH_AUTH_SOCK": str(path)}, hide=["/run"])
        assert plan.mask_files == (str(path.resolve()),)
        hidden = plan_mounts("/", [], {"SSH_AUTH_SOCK": str(path)}, hide=[str(tmp_path)])
        assert hidden.mask_files == ()  # already under a hidden directory
    finally:
        s.close()


def test_plan_refuses_files_outside_hidden_directories() -> None:
    import pytest

    with pytest.raises(ValueError, match="must lie in a directory the sandbox hides"):
        plan_mounts("/", [], {}, hide=["/run"], files=[("/etc/x", "y")])
