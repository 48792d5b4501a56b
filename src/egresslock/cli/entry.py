"""The ``egresslock`` program. ``egresslock run`` first offers itself to a warm server, which
runs it without paying Python's imports again (see :mod:`egresslock.cli.warm_client`); every
other command, and a run that no warm server takes, goes to the command line in
:mod:`egresslock.cli.main`. Nothing is imported here before that choice."""

from __future__ import annotations

import os
import sys


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["run"] and os.environ.get("EGRESSLOCK_WARM", "auto") != "off":
        from egresslock.cli.warm_client import try_run

        code = try_run(argv)
        if code is not None:
            sys.exit(code)
    from egresslock.cli.main import main as cli_main

    cli_main()
