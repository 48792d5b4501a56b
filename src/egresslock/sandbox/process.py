"""The sandboxed process tree: wait for the command, pass signals on, leave nothing behind.

egresslock becomes a child subreaper (prctl(2), PR_SET_CHILD_SUBREAPER), so whatever the command
starts and abandons (a daemon that double-forks, a language server) is re-parented to egresslock
instead of init, and can be found and ended when the run ends: a background process left running
would keep a way out open in a sandbox whose proxy is gone, or hold a file the user expects closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

from egresslock.fdwait import wait_fd
from egresslock.sandbox.syscalls import PR_SET_CHILD_SUBREAPER, prctl


def become_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def exit_code(status: int) -> int:
    """The shell's convention: the command's exit code, or 128 + the signal that ended it."""
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


async def wait_exit(pid: int) -> int:
    """Wait without a thread or SIGCHLD handler: a pidfd becomes readable when ``pid`` exits."""
    fd = os.pidfd_open(pid)
    try:
        await wait_fd(asyncio.get_running_loop(), fd, writable=False)
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return exit_code(status)


def descendants(root: int) -> list[int]:
    """Every live process below ``root``, from /proc (parents before children)."""
    children: dict[int, list[int]] = {}
    zombies: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        children.setdefault(int(fields[1]), []).append(int(entry))
        if fields[0] == b"Z":
            zombies.add(int(entry))
    found: list[int] = []
    queue = [root]
    while queue:
        for child in children.get(queue.pop(), []):
            if child not in zombies:
                found.append(child)
            queue.append(child)
    return found


def end_tree(root: int | None = None, rounds: int = 20) -> int:
    """SIGKILL every process below ``root`` (default: this process) and reap those that were
    ours. Returns how many were ended. Repeats, since a dying parent hands its children to us."""
    ours = root is None or root == os.getpid()
    root = os.getpid() if root is None else root
    if ours and not _has_children():
        return 0  # nothing below us: no need to read every process in /proc
    ended = 0
    for _ in range(rounds):
        pids = descendants(root)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                ended += 1
        time.sleep(0.005)
        if ours:
            reap_all()
    if ours:
        reap_all()
    return ended


def _has_children() -> bool:
    """Whether this process has a child, live or not yet reaped: without one it has no
    descendant. True when the kernel does not say (no /proc/PID/task/TID/children, a
    CONFIG_PROC_CHILDREN feature), so that callers look further."""
    try:
        tasks = os.listdir("/proc/self/task")
        for tid in tasks:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                if f.read().strip():
                    return True
    except OSError:
        return True
    return False


def reap_all() -> None:
    """Collect every exited child (re-parented orphans included), without waiting."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
