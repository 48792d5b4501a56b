"""``egresslock courier check``: are a policy's actions safe to hand to an agent?"""

from __future__ import annotations

import json
from pathlib import Path

import click

from egresslock.errors import PolicyError


@click.group()
def courier() -> None:
    """The courier: declared external calls an agent makes through egresslock (docs/courier.md)."""


@courier.command()
@click.option("-p", "--policy", "policy_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Policy file.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def check(ctx: click.Context, policy_file: Path, as_json: bool) -> None:
    """Check the action definitions of a policy, as `egresslock run` does before it starts.

    Exit 0 when every action is valid, 1 when some action is not (each problem is printed with
    the action's name, the key, the bad value and what would be valid), 2 when the policy file
    itself is refused. Warnings (a rule that lets the agent reach an action's host around the
    action, an https host the proxy cannot see into) do not change the exit code.
    """
    from egresslock.courier.definitions import compile_actions
    from egresslock.policy import compile_policy, load_policy

    try:
        policy = load_policy(policy_file)
    except PolicyError as exc:
        if as_json:
            click.echo(json.dumps({"valid": False, "policy_problems": [
                str(p) for p in exc.problems]}, indent=2))
        else:
            for p in exc.problems:
                click.echo(f"error: {p}", err=True)
            click.echo(f"{policy_file}: policy refused; fix it first (egresslock policy "
                       "validate)", err=True)
        ctx.exit(2)
    templates, problems, warnings = compile_actions(policy, compile_policy(policy))
    if as_json:
        click.echo(json.dumps({
            "valid": not problems, "actions": len(policy.actions), "ok": sorted(templates),
            "problems": [{"action": a.action, "key": a.key, "message": a.message}
                         for a in problems],
            "warnings": warnings}, indent=2))
    else:
        for problem in problems:
            click.echo(f"error: {policy_file}: {problem}", err=True)
        for w in warnings:
            click.echo(f"warning: {policy_file}: {w}", err=True)
        if problems:
            bad = len({problem.action for problem in problems})
            click.echo(f"{policy_file}: {bad} of {len(policy.actions)} action(s) refused",
                       err=True)
        else:
            click.echo(f"{policy_file}: {len(policy.actions)} action(s) valid")
    if problems:
        ctx.exit(1)
