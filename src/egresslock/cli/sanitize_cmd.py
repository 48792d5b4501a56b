"""``egresslock sanitize``: make an agent's markdown or HTML safe to render, as a filter.

Markdown is streamed: each chunk read from the input is passed through the
:class:`~egresslock.sanitize.Sanitizer` and what it releases is written and flushed at once, so
the command can sit between a model's streamed answer and a renderer. HTML is read whole (nh3
needs the whole document). markdown-it and nh3 are imported only when the command runs, so
``egresslock run`` does not pay for them at start-up.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import json
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, TYPE_CHECKING

import click

if TYPE_CHECKING:
    from egresslock.audit import AuditLog
    from egresslock.sanitize import Removal

EXIT_REMOVED = 1
_CHUNK = 65536
_HTML_SUFFIXES = frozenset({".html", ".htm", ".xhtml"})
_MARKDOWN_SUFFIXES = frozenset({".md", ".markdown", ".mdown", ".mkd", ".txt"})
_HTML_STARTS = ("<!doctype html", "<html", "<head", "<body")


@click.command()
@click.option("-p", "--policy", "policy_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Policy file.")
@click.option("--format", "fmt", type=click.Choice(["markdown", "html", "auto"]),
              default="auto", show_default=True,
              help="auto: HTML for .html/.htm files and input that begins like an HTML "
                   "document, markdown otherwise (raw HTML inside markdown is cleaned too).")
@click.option("--audit", "audit_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Audit database for the removals (default: $EGRESSLOCK_AUDIT or "
                   "~/.local/state/egresslock/audit.db); opened at the first removal.")
@click.option("--no-audit", is_flag=True, help="Do not log removals to the audit database.")
@click.option("--report", is_flag=True, help="Print each removal to stderr.")
@click.option("--json", "as_json", is_flag=True,
              help="Print each removal to stderr as one JSON object per line.")
@click.argument("file", required=False,
                type=click.Path(exists=True, dir_okay=False, allow_dash=True, path_type=Path))
@click.pass_context
def sanitize(ctx: click.Context, policy_file: Path, fmt: str, audit_path: Path | None,
             no_audit: bool, report: bool, as_json: bool, file: Path | None) -> None:
    """Remove from markdown or HTML every URL the policy's output section does not allow.

    Reads FILE (or stdin) and writes the result to stdout. Images stay only when
    output.images allows them, links only when output.links does, only over https, and never
    with a secret or encoded data in them; scripts, forms, frames, styles and the like are
    removed. Link text and alt text stay. Each removal is logged (layer sanitize).

    Exit status: 0 nothing removed, 1 something removed (or, with mode: report, would have
    been), 2 bad policy or usage.
    """
    from egresslock.policy import load_policy
    from egresslock.sanitize import SanitizePolicy, Sanitizer

    policy = load_policy(policy_file)
    compiled = SanitizePolicy.from_policy(policy)
    for warning in compiled.warnings:
        click.echo(f"egresslock: warning: {warning}", err=True)
    source = "stdin" if file is None or str(file) == "-" else str(file)
    sink = _RemovalSink(audit_path, no_audit, report, as_json, source,
                        "report" if compiled.report_only else "deny")
    out = sys.stdout.buffer
    try:
        with _open_input(file) as stream:
            chunks = _chunks(stream)
            first = next(chunks, b"")
            chosen = _choose_format(fmt, file, first)
            sink.fmt = chosen
            sanitizer = Sanitizer(compiled, fmt="html" if chosen == "html" else "markdown",
                                  on_removal=sink)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            for chunk in itertools.chain([first], chunks):
                _write(out, sanitizer.feed(decoder.decode(chunk)))
            _write(out, sanitizer.feed(decoder.decode(b"", final=True)) + sanitizer.close())
    finally:
        sink.finish()
    ctx.exit(EXIT_REMOVED if sink.count else 0)


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    """What the input has, as soon as it has it: ``read1`` returns after one read, so a
    model's answer piped in token by token is sanitised token by token."""
    read = getattr(stream, "read1", stream.read)
    while chunk := read(_CHUNK):
        yield chunk


def _open_input(file: Path | None) -> AbstractContextManager[IO[bytes]]:
    if file is None or str(file) == "-":
        # The process's stdin is borrowed, not closed, when the with-block ends.
        return contextlib.nullcontext(sys.stdin.buffer)
    return open(file, "rb")


def _choose_format(fmt: str, file: Path | None, first: bytes) -> str:
    if fmt != "auto":
        return fmt
    if file is not None and str(file) != "-":
        suffix = file.suffix.lower()
        if suffix in _HTML_SUFFIXES:
            return "html"
        if suffix in _MARKDOWN_SUFFIXES:
            return "markdown"
    head = first[:512].decode("utf-8", "replace").lstrip().lower()
    return "html" if head.startswith(_HTML_STARTS) else "markdown"


def _write(out: IO[bytes], text: str) -> None:
    if text:
        out.write(text.encode("utf-8"))
        out.flush()


class _RemovalSink:
    """Receives each removal as it is decided: audit row, report line, count."""

    def __init__(self, audit_path: Path | None, no_audit: bool, report: bool, as_json: bool,
                 source: str, verdict: str) -> None:
        self.audit_path = audit_path
        self.no_audit = no_audit
        self.report = report
        self.as_json = as_json
        self.source = source
        self.verdict = verdict
        self.fmt = "markdown"
        self.count = 0
        self.audit: AuditLog | None = None

    def __call__(self, removal: Removal) -> None:
        self.count += 1
        if not self.no_audit:
            self._record(removal)
        if self.as_json:
            click.echo(json.dumps({**removal.as_dict(), "verdict": self.verdict}), err=True)
        elif self.report:
            click.echo(f"egresslock: {removal.describe()}", err=True)

    def _record(self, removal: Removal) -> None:
        from egresslock.audit import AuditLog, AuditRecord, default_db_path

        if self.audit is None:
            self.audit = AuditLog(self.audit_path or default_db_path())
        self.audit.record(AuditRecord(
            layer="sanitize", verdict=self.verdict, rule_id=removal.rule, reason=removal.reason,
            host=removal.host, port=removal.port, path=removal.logged_path,
            extra={"element": removal.element, "source": self.source, "format": self.fmt}))

    def finish(self) -> None:
        where = ""
        if self.audit is not None:
            self.audit.close()
            where = f"; audit log {self.audit.path} (run {self.audit.run_id})"
        if self.count:
            what = "would remove" if self.verdict == "report" else "removed"
            click.echo(f"egresslock: sanitize {what} {self.count} "
                       f"URL{'s' if self.count != 1 else ''} or element"
                       f"{'s' if self.count != 1 else ''}{where}", err=True)
        sys.stderr.flush()
