"""``egresslock check``: what the policy decides for one request, without sending it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from egresslock.errors import InputError, PolicyError


def _parse_resolve(values: tuple[str, ...]) -> dict[str, list[str]]:
    from egresslock.proxy.resolver import parse_pins

    try:
        return parse_pins(values)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--resolve") from exc


@click.command()
@click.option("-p", "--policy", "policy_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Policy file.")
@click.option("-X", "--method", default="GET", show_default=True, help="HTTP method.")
@click.option("-H", "--header", "headers", multiple=True, metavar="K:V",
              help="A request header (repeatable).")
@click.option("--body-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A file whose size is the request body size.")
@click.option("--resolve", "resolve", multiple=True, metavar="HOST:ADDR",
              help="Treat HOST as resolving to ADDR (repeatable); check does no DNS itself.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
@click.argument("url")
@click.pass_context
def check(ctx: click.Context, policy_file: Path, method: str, headers: tuple[str, ...],
          body_file: Path | None, resolve: tuple[str, ...], as_json: bool, url: str) -> None:
    """Print what the policy decides for a request to URL, as the proxy would decide it.

    Exit 0 when allowed, 1 when denied, 2 for a bad policy or bad usage. For an https URL the
    tunnel is decided first; if its rule inspects, the request inside is decided too.
    """
    from egresslock.policy import compile_policy, load_policy
    from egresslock.policy.probe import probe

    try:
        compiled = compile_policy(load_policy(policy_file))
    except PolicyError as exc:
        for p in exc.problems:
            click.echo(f"error: {p}", err=True)
        ctx.exit(2)
    header_names = []
    for h in headers:
        name, sep, _ = h.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"{h!r} must be NAME:VALUE", param_hint="--header")
        header_names.append(name.strip().lower())
    body_size = body_file.stat().st_size if body_file else None
    try:
        result = probe(compiled, url, method.upper(), tuple(header_names), body_size,
                       _parse_resolve(resolve))
    except InputError as exc:
        if as_json:
            click.echo(json.dumps({"verdict": "deny", "rule_id": "default",
                                   "reason": f"refused as ambiguous: {exc}", "url": url}))
        else:
            click.echo(f"DENY  {method.upper()} {url}\nrule:   default\nreason: refused as "
                       f"ambiguous: {exc}")
        ctx.exit(1)
    d = result.decision
    if as_json:
        click.echo(json.dumps({
            "verdict": d.verdict.value, "rule_id": d.rule_id, "reason": d.reason,
            "layer": result.layer.value, "inspect": d.inspect, "url": str(result.url),
            "method": method.upper(), "notes": result.notes,
        }, indent=2))
    else:
        color = {"allow": "green", "deny": "red", "report": "yellow"}[d.verdict.value]
        click.echo(click.style(d.verdict.value.upper(), fg=color, bold=True)
                   + f"  {method.upper()} {result.url}")
        click.echo(f"rule:   {d.rule_id}\nreason: {d.reason}\nlayer:  {result.layer.value}")
        for note in result.notes:
            click.echo(f"note:   {note}")
    ctx.exit(0 if d.allowed else 1)
