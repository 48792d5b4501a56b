"""The command line: the only package that wires subsystems together."""
