"""The MCP gateway's end-to-end tests run in the sandbox tests' world (tests/sandbox/world.py)."""

from tests.sandbox.conftest import world

__all__ = ["world"]
