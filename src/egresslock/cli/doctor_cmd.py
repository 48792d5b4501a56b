"""``egresslock doctor``: can this machine build the sandbox, and if not, what to change."""

from __future__ import annotations

import json

import click

STATUS_OK = "ok"
STATUS_MISSING = "MISSING"
STATUS_OPTIONAL = "optional-missing"


@click.command()
@click.option("--json", "as_json", is_flag=True,
              help="Print the features as JSON: {ok, features: [{name, status, ok, required, "
                   "detail, fix, what_fails}]}.")
@click.option("--seccomp-rules", is_flag=True,
              help="Also list what the seccomp filter refuses, and why.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool, seccomp_rules: bool) -> None:
    """Check that this machine can run `egresslock run`, by trying each feature.

    A forked child does what the sandbox does, in miniature: user, network and mount
    namespaces, nftables NAT and log rules, an NFLOG group, the seccomp filter. Landlock,
    bubblewrap and curl are checked too. Nothing outside that child's throwaway namespaces is
    changed. As root, namespaces are tried as the user `egresslock run` would drop to.

    \b
    status:  ok                 works here
             MISSING            required: `egresslock run` refuses to start without it
             optional-missing   the sandbox still works; the row says what is lost

    Exit 0 when every required feature works, 1 otherwise.
    """
    from egresslock.sandbox.features import check_features

    features = check_features()
    all_required = all(f.ok for f in features if f.required)
    rows = [{
        "name": f.name,
        "status": _status(f.ok, f.required),
        "ok": f.ok,
        "required": f.required,
        "detail": f.detail,
        "fix": f.fix,
        "what_fails": f.what_fails,
    } for f in features]
    if as_json:
        report: dict[str, object] = {"ok": all_required, "features": rows}
        if seccomp_rules:
            report["seccomp_rules"] = _seccomp_rules()
        click.echo(json.dumps(report, indent=2))
        ctx.exit(0 if all_required else 1)
    _print_table(rows)
    if seccomp_rules:
        click.echo("\nseccomp filter:")
        for line in _seccomp_rules():
            click.echo(f"  {line}")
    click.echo()
    if all_required:
        click.echo("ready: every required feature works")
    else:
        missing = ", ".join(str(r["name"]) for r in rows if r["status"] == STATUS_MISSING)
        click.echo(click.style(f"not ready: {missing} missing; egresslock run will refuse to "
                               "start", fg="red", bold=True))
    ctx.exit(0 if all_required else 1)


def _status(ok: bool, required: bool) -> str:
    if ok:
        return STATUS_OK
    return STATUS_MISSING if required else STATUS_OPTIONAL


def _print_table(rows: list[dict[str, object]]) -> None:
    width = max(len(str(r["name"])) for r in rows)
    colors = {STATUS_OK: "green", STATUS_MISSING: "red", STATUS_OPTIONAL: "yellow"}
    for r in rows:
        status = str(r["status"])
        label = click.style(f"{status:16}", fg=colors[status], bold=status == STATUS_MISSING)
        click.echo(f"{r['name']!s:{width}}  {label}  {r['detail']}")
        if status != STATUS_OK:
            indent = " " * (width + 2)
            click.echo(f"{indent}what fails: {r['what_fails']}")
            click.echo(f"{indent}fix:        {r['fix']}")


def _seccomp_rules() -> list[str]:
    from egresslock.sandbox.seccomp import describe_filter

    return describe_filter()
