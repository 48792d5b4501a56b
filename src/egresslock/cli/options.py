"""The options of every command that runs something in a sandboxed session.

``egresslock run`` and ``egresslock mcp`` take the same policy, audit, DNS pin, CA, sandbox and
summary options; one decorator keeps their spelling, defaults and help the same. The values
arrive as keyword arguments, which :func:`session_options_from` turns into
:class:`~egresslock.cli.session.SessionOptions`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from egresslock.cli.session import SessionOptions

F = TypeVar("F", bound=Callable[..., Any])

_SANDBOX_OPTIONS = (
    click.option("-p", "--policy", "policy_file", required=True,
                 type=click.Path(dir_okay=False, path_type=Path), help="Policy file."),
    click.option("--audit", "audit_path", type=click.Path(dir_okay=False, path_type=Path),
                 help="Audit database (default: $EGRESSLOCK_AUDIT or "
                      "~/.local/state/egresslock/audit.db)."),
    click.option("--resolve", multiple=True, metavar="HOST:ADDR",
                 help="Pin HOST to ADDR instead of asking DNS (repeatable)."),
    click.option("--upstream-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                 help="Verify inspected upstreams against this CA file instead of the system "
                      "trust store."),
    click.option("--ca-dir", type=click.Path(file_okay=False, path_type=Path),
                 help="Inspection CA directory (default: $EGRESSLOCK_CA_DIR or "
                      "~/.local/share/egresslock/ca)."),
    click.option("--connect-timeout", type=click.FloatRange(0.1), default=10.0,
                 show_default=True),
    click.option("--transparent/--no-transparent", default=True, show_default=True,
                 help="Capture connections of programs that ignore HTTP_PROXY with nftables. "
                      "Off: such connections are dropped, and Landlock limits TCP connect to "
                      "the proxy's port."),
    click.option("--share", multiple=True, type=click.Path(exists=True, path_type=Path),
                 help="Keep this path visible although it lies in a hidden directory "
                      "(/tmp, /run...). The working directory is always kept. Repeatable."),
    click.option("--user", metavar="USER",
                 help="As root: the user the command runs as (default: $SUDO_UID, else "
                      "nobody)."),
    click.option("--level", metavar="LEVEL",
                 help="Start the session's mark at LEVEL (one of the policy's levels), for an "
                      "agent handed private data up front: destinations below it are "
                      "refused."),
    click.option("-q", "--quiet", is_flag=True, help="No summary at the end."),
    click.option("--json", "as_json", is_flag=True,
                 help="Print the end-of-run summary as one JSON object on stderr."),
    click.option("--no-uvloop", is_flag=True, help="Use asyncio's own event loop."),
)


def sandbox_options(function: F) -> F:
    """Add the sandboxed-session options, in ``egresslock run``'s order."""
    for option in reversed(_SANDBOX_OPTIONS):
        function = option(function)
    return function


def session_options_from(values: dict[str, Any]) -> SessionOptions:
    """The :class:`SessionOptions` among a command's keyword arguments."""
    return SessionOptions(values["policy_file"], values["audit_path"], values["resolve"],
                          values["upstream_ca"], values["ca_dir"], values["connect_timeout"],
                          values["level"], values["quiet"])


def command_identity(user: str | None) -> tuple[int, int]:
    """The uid and gid the command runs as. Never root: as root, --user, else the user sudo
    came from, else nobody."""
    from egresslock.sandbox.spawn import default_identity

    if user is None:
        return default_identity()
    if os.geteuid() != 0:
        raise click.BadParameter("only root can choose the user a command runs as",
                                 param_hint="--user")
    import pwd

    try:
        entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        if not user.isdigit():
            raise click.BadParameter(f"no user called {user!r}; give a name from /etc/passwd "
                                     "or a numeric uid", param_hint="--user") from None
        uid = gid = int(user)
    if uid == 0:
        raise click.BadParameter("the command may not run as root (uid 0): root inside the "
                                 "sandbox could leave it; choose another user",
                                 param_hint="--user")
    return uid, gid
