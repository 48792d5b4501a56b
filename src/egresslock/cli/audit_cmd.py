"""``egresslock audit``: list and follow the audit log. ``egresslock audit verify``: check it."""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from egresslock.audit import AuditRow

# Kept literal so that `egresslock --help` does not import the audit package (and sqlite3);
# tests/audit/test_cli.py checks that they equal egresslock.audit.LAYERS and VERDICTS.
LAYER_CHOICES = ("connect", "courier", "dns", "drop", "flow", "http", "mcp", "sanitize", "tls")
VERDICT_CHOICES = ("allow", "deny", "report")

_DB_HELP = ("Audit database [default: $EGRESSLOCK_AUDIT, else "
            "$XDG_STATE_HOME/egresslock/audit.db, else ~/.local/state/egresslock/audit.db].")
_VERDICT_COLORS = {"allow": "green", "deny": "red", "report": "yellow"}


def _db_path(db: Path | None) -> Path:
    from egresslock.audit import default_db_path

    return db if db is not None else default_db_path()


def _check_host(host: str | None) -> str | None:
    if host is None:
        return None
    bare = host[2:] if host.startswith("*.") else host
    if not bare or "*" in bare:
        raise click.BadParameter(f"{host!r}: give an exact host (api.github.com) or "
                                 f"'*.example.com' for its subdomains", param_hint="--host")
    return host


def format_time(when: float) -> str:
    """A row's time as ISO-8601 UTC with milliseconds, the form ``--since`` accepts back."""
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _target(row: AuditRow) -> str:
    host = row.host or row.address or "-"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    where = f"{host}:{row.port}" if row.port is not None else host
    verb = row.method or (row.protocol.upper() if row.protocol else None)
    return " ".join(part for part in (verb, where, row.path) if part)


class _Table:
    """Aligned lines, one per row. Widths only grow, so followed output stays aligned."""

    def __init__(self) -> None:
        self.target_width, self.rule_width = 20, 8

    def lines(self, rows: list[AuditRow]) -> Iterable[str]:
        targets = [_target(r) for r in rows]
        self.target_width = max(self.target_width, *(min(len(t), 60) for t in targets))
        self.rule_width = max(self.rule_width, *(min(len(r.rule_id), 24) for r in rows))
        for row, target in zip(rows, targets, strict=True):
            verdict = click.style(f"{row.verdict.upper():<6}", fg=_VERDICT_COLORS.get(row.verdict))
            yield (f"{format_time(row.time)}  {verdict}  {row.layer:<8}  "
                   f"{target:<{self.target_width}}  {row.rule_id:<{self.rule_width}}  {row.reason}")


def _print(rows: list[AuditRow], as_json: bool, table: _Table) -> None:
    if not rows:
        return
    out: Iterable[str] = (
        (json.dumps(r.as_dict(), ensure_ascii=False) for r in rows) if as_json
        else table.lines(rows))
    click.echo("\n".join(out))


def _stdout_gone() -> None:
    # `egresslock audit | head`: the reader left; exit quietly rather than with a traceback.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


@click.group(invoke_without_command=True)
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help=_DB_HELP)
@click.option("--verdict", type=click.Choice(VERDICT_CHOICES), help="Only rows with this verdict.")
@click.option("--host", metavar="HOST", help="Only this host, or '*.example.com' for subdomains.")
@click.option("--layer", type=click.Choice(LAYER_CHOICES), help="Only rows of this layer.")
@click.option("--run", "run_id", metavar="ID", help="Only rows of this run id.")
@click.option("--since", metavar="WHEN",
              help="Only rows since 10m, 2h, 1d ago, or an ISO-8601 time (UTC if no offset).")
@click.option("--limit", type=click.IntRange(min=0), default=100, show_default=True,
              help="Show the newest N matching rows; 0 shows all.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new rows until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.01), default=0.5, show_default=True,
              metavar="SECONDS", help="How often --follow looks for new rows.")
@click.pass_context
def audit(ctx: click.Context, db: Path | None, verdict: str | None, host: str | None,
          layer: str | None, run_id: str | None, since: str | None, limit: int, as_json: bool,
          follow: bool, interval: float) -> None:
    """Show the audit log: one line per decision of every layer, newest last.

    Columns: time (UTC), verdict, layer, what was asked (method host:port path), the rule that
    decided, and why. Filters combine with AND.

    \b
    Examples:
      egresslock audit --verdict deny --since 1h
      egresslock audit --host '*.github.com' --json
      egresslock audit -f                     watch decisions as they happen
      egresslock audit verify                 check that no row was altered or removed
    """
    ctx.ensure_object(dict)["db"] = db
    if ctx.invoked_subcommand is not None:
        return
    from egresslock.audit import AuditQuery, open_reader, parse_since

    since_time = None
    if since is not None:
        try:
            since_time = parse_since(since)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from exc
    query = AuditQuery(verdict=verdict, host=_check_host(host), layer=layer, run_id=run_id,
                       since=since_time, limit=limit or None)
    path = _db_path(db)
    table = _Table()
    with open_reader(path) as reader:
        try:
            if follow:
                _follow(reader.follow(query, interval), as_json, table)
                return
            rows = reader.iter_rows(query)
            shown = 0
            while chunk := list(itertools.islice(rows, 1000)):
                _print(chunk, as_json, table)
                shown += len(chunk)
        except BrokenPipeError:
            _stdout_gone()
            return
        if not shown:
            click.echo(f"no matching rows in {path}", err=True)
        elif limit and shown == limit and (total := reader.count(query)) > limit:
            click.echo(f"(the newest {limit} of {total} matching rows; --limit 0 shows all)",
                       err=True)


def _follow(rows: Iterable[AuditRow], as_json: bool, table: _Table) -> None:
    try:
        for row in rows:
            _print([row], as_json, table)
    except KeyboardInterrupt:
        return


@audit.command("verify", short_help="Check that no row was altered, removed or reordered.")
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path), help=_DB_HELP)
@click.option("--expect-head", metavar="HASH",
              help="A head hash recorded earlier; if no row has it, the log lost its tail.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def verify_cmd(ctx: click.Context, db: Path | None, expect_head: str | None,
               as_json: bool) -> None:
    """Check the hash chain: exit 0 intact, 1 broken, 2 unreadable or bad usage.

    Each row holds the hash of the row before it and a hash over its own content, so an edited,
    deleted, inserted or reordered row breaks the chain; the first such row is reported. Rows cut
    from the end leave a valid chain: record the printed head hash somewhere else and pass it
    back with --expect-head to detect that.
    """
    from egresslock.audit import verify

    if expect_head is not None:
        expect_head = expect_head.strip().lower()
        if len(expect_head) != 64 or any(c not in "0123456789abcdef" for c in expect_head):
            raise click.BadParameter(f"{expect_head!r} is not a SHA-256 hash (64 hex digits, as "
                                     f"printed by 'egresslock audit verify')",
                                     param_hint="--expect-head")
    path = _db_path(db if db is not None else ctx.obj.get("db"))
    result = verify(path, expect_head=expect_head)
    if as_json:
        click.echo(json.dumps({"db": str(path), **result.as_dict()}, indent=2))
    else:
        state = (click.style("intact", fg="green") if result.ok
                 else click.style("BROKEN", fg="red", bold=True))
        click.echo(f"{path}: {state}")
        if not result.ok:
            click.echo(f"first bad row: {result.first_bad_id if result.first_bad_id else '-'}")
        click.echo(f"reason: {result.reason}")
        click.echo(f"rows:   {result.rows}")
        click.echo(f"head:   {result.head}")
        if result.ok:
            click.echo("record the head hash elsewhere; later, --expect-head HASH shows whether "
                       "rows were cut from the end", err=True)
    ctx.exit(0 if result.ok else 1)
