"""``python -m egresslock`` is the ``egresslock`` command."""

from egresslock.cli.entry import main

main()
