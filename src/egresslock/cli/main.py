"""``egresslock``: the entry point. Subcommands import their subsystems lazily, so that a wrapped
tool call pays only for what it uses."""

from __future__ import annotations

import sys

import click

from egresslock import __version__
from egresslock.cli.audit_cmd import audit
from egresslock.cli.ca_cmd import ca, env
from egresslock.cli.check_cmd import check
from egresslock.cli.compile_cmd import compile_
from egresslock.cli.doctor_cmd import doctor
from egresslock.cli.mcp_cmd import mcp
from egresslock.cli.policy_cmd import policy
from egresslock.cli.proxy_cmd import proxy
from egresslock.cli.run_cmd import run
from egresslock.errors import EgresslockError

# Exit codes shared by every command.
EXIT_DENIED = 1
EXIT_USAGE = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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


cli.add_command(policy)
cli.add_command(check)
cli.add_command(audit)
cli.add_command(run)
cli.add_command(mcp)
cli.add_command(proxy)
cli.add_command(ca)
cli.add_command(env)
cli.add_command(doctor)
cli.add_command(compile_)


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
