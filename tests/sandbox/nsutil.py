"""Run a test scenario in a fresh user + network namespace, in a forked child.

The child calls ``unshare(CLONE_NEWUSER|CLONE_NEWNET)``, maps its own uid and gid (so this
works both as root and unprivileged, and the test process itself never changes namespace),
runs the scenario and writes its JSON-able result to a pipe. The parent returns the result,
and re-raises a failure of the child as an AssertionError carrying the child's traceback.

Whatever the scenario sends goes nowhere: the namespace holds only ``lo``.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Callable
from functools import cache
from typing import Any

from egresslock.sandbox.spawn import map_ids
from egresslock.sandbox.syscalls import CLONE_NEWNET, CLONE_NEWUSER, unshare


def enter_namespace() -> None:
    """Move the calling process into a new user + network namespace, mapped to its own ids."""
    uid, gid = os.getuid(), os.getgid()
    unshare(CLONE_NEWUSER | CLONE_NEWNET)
    map_ids(uid, gid)


def run_in_namespace(scenario: Callable[[], Any]) -> Any:
    """Run ``scenario`` in a forked child inside a new namespace and return its result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 0
        try:
            os.close(read_fd)
            enter_namespace()
            reply: dict[str, Any] = {"ok": True, "result": scenario()}
        except BaseException:  # the child must report everything, then exit
            reply = {"ok": False, "error": traceback.format_exc()}
            status = 1
        try:
            with os.fdopen(write_fd, "w", encoding="utf-8") as out:
                json.dump(reply, out)
        finally:
            os._exit(status)
    os.close(write_fd)
    with os.fdopen(read_fd, encoding="utf-8") as inp:
        text = inp.read()
    os.waitpid(pid, 0)
    if not text:
        raise AssertionError("the namespace child died without a report")
    reply = json.loads(text)
    if not reply["ok"]:
        raise AssertionError(f"scenario failed in the namespace child:\n{reply['error']}")
    return reply["result"]


@cache
def namespaces_available() -> tuple[bool, str]:
    """Whether this machine lets us make a user + network namespace; detected by trying."""
    try:
        run_in_namespace(lambda: None)
    except AssertionError as exc:
        return False, f"cannot create a user + network namespace here: {exc}"
    return True, ""
