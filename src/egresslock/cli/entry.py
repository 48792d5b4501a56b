"""The ``egresslock`` program. ``egresslock run`` first offers itself to a warm server, which
runs it without paying Python's imports again (see :mod:`egresslock.cli.warm_client`); every
other command, and a run that no warm server takes, goes to the command line in
:mod:`egresslock.cli.main`. Nothing is imported here before that choice.

``EGRESSLOCK_WARM``: ``auto`` (the default) uses a warm server when one runs; ``off`` never
does; ``start`` also starts one in the background when none runs, for the runs after this one.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    argv = sys.argv[1:]
    mode = os.environ.get("EGRESSLOCK_WARM", "auto")
    if argv[:1] == ["run"] and mode != "off":
        from egresslock.cli import warm_client

        code = warm_client.try_run(argv)
        if code is not None:
            sys.exit(code)
        if mode == "start" and warm_client.no_server():
            _start_server()
    from egresslock.cli.main import main as cli_main

    cli_main()


def _start_server() -> None:
    """EGRESSLOCK_WARM=start: this run finds no warm server, so it starts one for the next runs
    (in the background, exiting after the default idle time) and runs cold itself."""
    from egresslock.audit import default_db_path
    from egresslock.cli.warm_cmd import spawn_server

    # Started from a child that exits at once, so the server is nobody's child here: this run
    # becomes a subreaper and ends every descendant when its command exits.
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the short-lived middle process
        code = 0
        try:
            spawn_server("30m", default_db_path().parent / "warm.log")
        except OSError as exc:
            print(f"egresslock: warning: cannot start a warm server: {exc}", file=sys.stderr)
            code = 1
        finally:
            os._exit(code)
    os.waitpid(pid, 0)
