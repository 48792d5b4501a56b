"""``egresslock ca`` and ``egresslock env``: the inspection CA and the trust it needs."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import click

CA_DIR_HELP = "CA directory (default: $EGRESSLOCK_CA_DIR or ~/.local/share/egresslock/ca)."


@click.group()
def ca() -> None:
    """The local certificate authority used for inspect: true rules.

    The root key stays in its directory (mode 0600) and never enters a sandbox. Each proxy
    start mints a one-day intermediate name-constrained to the hosts its policy inspects, so
    the proxy can impersonate no other host to a client that checks name constraints.
    """


@ca.command("init")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help=CA_DIR_HELP)
@click.option("--force", is_flag=True, help="Replace an existing CA.")
def ca_init(directory: Path | None, force: bool) -> None:
    """Create the CA (EC P-256) and the trust bundle."""
    from egresslock.proxy.ca import init_ca

    made = init_ca(directory, force)
    click.echo(f"created {made.cert_path} (key {made.directory / 'ca.key'}, mode 600)")
    click.echo(f"fingerprint SHA-256 {made.fingerprint()}")
    click.echo(f"trust bundle {made.bundle_path}; see: egresslock env")


@ca.command("show")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help=CA_DIR_HELP)
@click.option("--json", "as_json", is_flag=True)
def ca_show(directory: Path | None, as_json: bool) -> None:
    """Print where the CA is, its subject, validity and fingerprint."""
    from egresslock.proxy.ca import load_ca

    loaded = load_ca(directory)
    info = {
        "directory": str(loaded.directory), "certificate": str(loaded.cert_path),
        "bundle": str(loaded.bundle_path), "subject": loaded.cert.subject.rfc4514_string(),
        "not_after": loaded.cert.not_valid_after_utc.isoformat(),
        "sha256": loaded.fingerprint(),
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            click.echo(f"{k + ':':13} {v}")


@ca.command("export")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help=CA_DIR_HELP)
@click.option("--bundle", is_flag=True, help="Print the bundle (system roots + CA) instead.")
def ca_export(directory: Path | None, bundle: bool) -> None:
    """Print the CA certificate (PEM) for clients to trust; never the key."""
    from egresslock.proxy.ca import load_ca

    loaded = load_ca(directory)
    path = loaded.bundle_path if bundle else loaded.cert_path
    click.echo(path.read_text(), nl=False)


@click.command("env")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help=CA_DIR_HELP)
@click.option("--proxy", "proxy_url", metavar="URL",
              help="Also export HTTP_PROXY/HTTPS_PROXY/ALL_PROXY (both cases) as URL and clear "
                   "NO_PROXY.")
@click.option("--json", "as_json", is_flag=True)
def env(directory: Path | None, proxy_url: str | None, as_json: bool) -> None:
    """Print the environment clients need to trust the inspection CA (eval it in a shell).

    Sets SSL_CERT_FILE, REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE, PIP_CERT and GIT_SSL_CAINFO to the
    bundle (system roots + CA) and NODE_EXTRA_CA_CERTS to the CA.
    """
    from egresslock.proxy.ca import load_ca, trust_environment, write_bundle

    loaded = load_ca(directory)
    write_bundle(loaded)  # refresh: the system roots may have changed since init
    variables = trust_environment(loaded)
    if proxy_url:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
            variables[name] = variables[name.lower()] = proxy_url
        variables["NO_PROXY"] = variables["no_proxy"] = ""
    if as_json:
        click.echo(json.dumps(variables, indent=2))
        return
    for k, v in variables.items():
        click.echo(f"export {k}={shlex.quote(v)}")
