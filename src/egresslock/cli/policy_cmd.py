"""``egresslock policy``: validate, schema, init."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import click

from egresslock.errors import PolicyError


@click.group()
def policy() -> None:
    """Write, check and describe policy files."""


@policy.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--strict", is_flag=True, help="Also warn about every limit a rule leaves unstated.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def validate(ctx: click.Context, file: Path, strict: bool, as_json: bool) -> None:
    """Check a policy FILE. Exit 0 when valid, 2 when not.

    Every problem is listed with file, line and key, the bad value and what would be valid.
    With --strict, warnings (not errors) name each rule that leaves methods, paths, query or
    body size open.
    """
    from egresslock.policy import load_policy, strict_warnings

    try:
        loaded = load_policy(file)
    except PolicyError as exc:
        if as_json:
            click.echo(json.dumps({"valid": False, "problems": [
                {"file": p.file, "line": p.line, "key": p.key, "message": p.message}
                for p in exc.problems]}, indent=2))
        else:
            for p in exc.problems:
                click.echo(f"error: {p}", err=True)
            click.echo(f"{file}: {len(exc.problems)} problem(s); policy refused", err=True)
        ctx.exit(2)
    warnings = strict_warnings(loaded) if strict else []
    if as_json:
        click.echo(json.dumps({"valid": True, "rules": len(loaded.rules),
                               "warnings": warnings}, indent=2))
        return
    for w in warnings:
        click.echo(f"warning: {file}: {w}", err=True)
    click.echo(f"{file}: valid ({len(loaded.rules)} rules, mode {loaded.mode})")


@policy.command()
def schema() -> None:
    """Print the JSON Schema of policy files (version 1), for editors and CI checks."""
    from egresslock.policy.schema import policy_json_schema

    click.echo(json.dumps(policy_json_schema(), indent=2))


@policy.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path), default="policy.yaml")
@click.option("--force", is_flag=True, help="Overwrite FILE if it exists.")
def init(file: Path, force: bool) -> None:
    """Write a commented starter policy to FILE (default: policy.yaml)."""
    text = resources.files("egresslock.policy").joinpath("starter.yaml").read_text("utf-8")
    if file.exists() and not force:
        raise click.ClickException(f"{file} exists; pass --force to overwrite it")
    file.write_text(text, encoding="utf-8")
    click.echo(f"wrote {file}; check it with: egresslock policy validate --strict {file}")
