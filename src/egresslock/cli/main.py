"""``egresslock``: the entry point. Subcommands import their subsystems lazily, so that a wrapped
tool call pays only for what it uses."""

from __future__ import annotations

import sys

import click

from egresslock import __version__
from egresslock.errors import EgresslockError

# Exit codes shared by every command.
EXIT_DENIED = 1
EXIT_USAGE = 2


# Each command's module, imported only when that command runs (or --help lists them all):
# `egresslock run` wrapping a tool call must not pay for the compilers, the sanitizer's parsers
# or the MCP SDK.
COMMANDS = {
    "policy": ("egresslock.cli.policy_cmd", "policy"),
    "check": ("egresslock.cli.check_cmd", "check"),
    "audit": ("egresslock.cli.audit_cmd", "audit"),
    "run": ("egresslock.cli.run_cmd", "run"),
    "mcp": ("egresslock.cli.mcp_cmd", "mcp"),
    "courier": ("egresslock.cli.courier_cmd", "courier"),
    "proxy": ("egresslock.cli.proxy_cmd", "proxy"),
    "ca": ("egresslock.cli.ca_cmd", "ca"),
    "env": ("egresslock.cli.ca_cmd", "env"),
    "doctor": ("egresslock.cli.doctor_cmd", "doctor"),
    "sanitize": ("egresslock.cli.sanitize_cmd", "sanitize"),
    "compile": ("egresslock.cli.compile_cmd", "compile_"),
    "warm": ("egresslock.cli.warm_cmd", "warm"),
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        found = COMMANDS.get(cmd_name)
        if found is None:
            return None
        import importlib

        command = getattr(importlib.import_module(found[0]), found[1])
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="egresslock")
def cli() -> None:
    """egresslock: a no-exfiltration channel for AI agents.

    Run an agent so that its only way out is a proxy that allows what a policy names, and
    logs every decision.

    \b
    Start here:
      egresslock policy init policy.yaml      write a commented starter policy
      egresslock policy validate policy.yaml  check it, with file and line for every problem
      egresslock check -p policy.yaml URL     ask what the policy decides for one request
      egresslock run -p policy.yaml -- CMD    run CMD with egresslock as its only way out
    """


def main() -> None:
    """Console-script entry point: egresslock errors become one clear line and exit code 2."""
    try:
        # Outside standalone mode click returns the code given to ctx.exit() instead of exiting.
        code = cli.main(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except EgresslockError as exc:
        click.echo(f"egresslock: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    sys.exit(code if isinstance(code, int) else 0)
