"""``python -m egresslock`` is the ``egresslock`` command."""

from egresslock.cli.main import main

main()
