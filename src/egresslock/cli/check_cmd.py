"""``egresslock check``: what the policy decides for one request, without sending it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from egresslock.errors import InputError, PolicyError

if TYPE_CHECKING:
    from egresslock.policy import CompiledPolicy, Decision, Layer
    from egresslock.policy.probe import Probe


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
              help="The request body: its size is checked, and its content is scanned for "
                   "secrets and transformed as the proxy would.")
@click.option("--resolve", "resolve", multiple=True, metavar="HOST:ADDR",
              help="Treat HOST as resolving to ADDR (repeatable); check does no DNS itself.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision as JSON.")
@click.argument("url")
@click.pass_context
def check(ctx: click.Context, policy_file: Path, method: str, headers: tuple[str, ...],
          body_file: Path | None, resolve: tuple[str, ...], as_json: bool, url: str) -> None:
    """Print what the policy decides for a request to URL, as the proxy would decide it.

    Exit 0 when allowed, 1 when denied, 2 for a bad policy or bad usage. A URL the proxy would
    refuse as ambiguous or malformed (userinfo, a scheme other than http or https, a dot
    segment, a backslash) is a deny by rule default, exit 1, as in the proxy: not bad usage.

    For an https URL the tunnel is decided first; if its rule inspects, the request inside is
    decided too. Then the content checks run as in the proxy: secrets in any encoding in the
    name, URL, headers and --body-file, dynamic links, and what the rule's transforms would
    change.
    """
    from egresslock.policy import compile_policy, load_policy
    from egresslock.policy.decide import DEFAULT_RULE, Decision, Layer, Verdict
    from egresslock.policy.probe import probe

    try:
        compiled = compile_policy(load_policy(policy_file))
    except PolicyError as exc:
        for p in exc.problems:
            click.echo(f"error: {p}", err=True)
        ctx.exit(2)
    header_names = []
    header_pairs: list[tuple[bytes, bytes]] = []
    for h in headers:
        name, sep, value = h.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(f"{h!r} must be NAME:VALUE", param_hint="--header")
        header_names.append(name.strip().lower())
        header_pairs.append((name.strip().encode("latin-1"),
                             value.strip().encode("utf-8", "surrogateescape")))
    body_size = body_file.stat().st_size if body_file else None
    try:
        result = probe(compiled, url, method.upper(), tuple(header_names), body_size,
                       _parse_resolve(resolve))
    except InputError as exc:
        # The proxy parses a URL as a forward proxy receives it (layer http) and answers 403
        # with this reason before any rule is asked (proxy/forward.py): so a deny, not a usage
        # error, and printed in the shape of every other decision.
        refused = Decision(Verdict.DENY, DEFAULT_RULE, f"refused as ambiguous: {exc}")
        _echo(as_json, refused, Layer.HTTP, False, url, method.upper(),
              ["no rule was asked: the proxy refuses this URL before deciding"])
        ctx.exit(1)
    d = result.decision
    changes: list[str] = []
    if d.allowed:
        d, changes = _content(compiled, result, header_pairs, body_file)
    result.notes.extend(f"would change: {c}" for c in changes)
    _echo(as_json, d, result.layer, result.inspect, str(result.url), method.upper(),
          result.notes)
    ctx.exit(0 if d.allowed else 1)


def _echo(as_json: bool, d: Decision, layer: Layer, inspect: bool, url: str, method: str,
          notes: list[str]) -> None:
    """Print one decision; every path of check prints through here, so JSON has one shape."""
    if as_json:
        click.echo(json.dumps({
            "verdict": d.verdict.value, "rule_id": d.rule_id, "reason": d.reason,
            "layer": layer.value, "inspect": inspect, "url": url, "method": method,
            "notes": notes,
        }, indent=2))
        return
    color = {"allow": "green", "deny": "red", "report": "yellow"}[d.verdict.value]
    click.echo(click.style(d.verdict.value.upper(), fg=color, bold=True) + f"  {method} {url}")
    click.echo(f"rule:   {d.rule_id}\nreason: {d.reason}\nlayer:  {layer.value}")
    for note in notes:
        click.echo(f"note:   {note}")


def _content(compiled: CompiledPolicy, result: Probe, headers: list[tuple[bytes, bytes]],
             body_file: Path | None) -> tuple[Decision, list[str]]:
    """The content checks the proxy runs after the rules allowed: names for a tunnel, URL,
    headers and body for a request it can read. Returns the final decision and what the
    transforms would change. Hashes use a throwaway key: check never creates the real one."""
    import secrets as random

    from egresslock.content.engine import ContentPolicy, ContentRefusal
    from egresslock.policy.decide import Decision, Layer, Verdict

    d = result.decision
    content = ContentPolicy(compiled.source, key=lambda: random.token_bytes(32))
    for warning in content.warnings:
        result.notes.append(f"warning: {warning}")
    url = result.url
    if result.layer is not Layer.HTTP:
        why = content.name_refusal(url.host, d.rule_id)
        reported = [why] if why is not None else []
        changes: list[str] = []
    else:
        body = body_file.read_bytes() if body_file is not None else None
        encoding = next((v for n, v in headers if n.lower() == b"content-encoding"), None)
        try:
            prepared = content.prepare(d.rule_id, url.host, url.path, url.query, headers,
                                       encoding, body is not None,
                                       len(body) if body is not None else None)
            if prepared.body is not None and body is not None:
                prepared.body.feed(body)
                prepared.body.finish()
        except ContentRefusal as exc:
            return Decision(Verdict.DENY, exc.rule_id, exc.reason), []
        reported, changes = prepared.reported, prepared.changes
    if reported and content.report_only:
        return Decision(Verdict.REPORT, d.rule_id,
                        f"report mode, enforce would deny: {reported[0]}"), changes
    if reported:
        return Decision(Verdict.DENY, d.rule_id, reported[0]), changes
    return d, changes
