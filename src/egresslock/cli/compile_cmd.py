"""``egresslock compile``: the policy as nftables, iptables, Cilium, Kubernetes, seccomp or Compose.

The targets are pure; this command does their I/O: it reads the policy, resolves names for
``--allow-direct`` (pins from ``--resolve`` first, DNS only for names without one), and writes or
prints what the target produced. Nothing but click is imported until the command runs.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from egresslock.compile import CompileOptions, CompileResult
    from egresslock.policy.model import Policy

# Which option each target reads (egresslock.compile.TARGETS says the same; a test keeps them
# equal). Kept here as plain data so that `--help` imports nothing.
_OPTION_FLAGS = {
    "proxy": "--proxy", "proxy_uid": "--proxy-uid", "allow_direct": "--allow-direct",
    "resolve": "--resolve", "namespace": "--namespace", "agent_label": "--agent-label",
    "cluster_domain": "--cluster-domain", "proxy_only": "--proxy-only", "image": "--image",
    "replicas": "--replicas", "with_cilium": "--with-cilium", "agent_image": "--agent-image",
}


@click.command("compile")
@click.option("-p", "--policy", "policy_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Policy file.")
@click.option("-t", "--target", "target_name", required=True, metavar="TARGET",
              help="nftables, iptables, cilium, kubernetes, seccomp or compose.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write one file per object into DIR (made if missing) instead of printing.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON summary: files, rules left to the proxy, warnings.")
@click.option("--proxy", metavar="HOST:PORT",
              help="[nftables, iptables] Where the egresslock proxy listens, an IP address "
                   "[default: 127.0.0.1:3128].")
@click.option("--proxy-uid", metavar="USER",
              help="[nftables, iptables] Also let this user (the proxy's, on the same machine) "
                   "send anywhere.")
@click.option("--allow-direct", is_flag=True, default=None,
              help="[nftables, iptables] Also open host-only rules by the addresses their "
                   "names resolve to now (see the caveat it prints).")
@click.option("--resolve", multiple=True, metavar="HOST:ADDR",
              help="[nftables, iptables] Use ADDR for HOST instead of DNS (repeatable).")
@click.option("--namespace", metavar="NS",
              help="[cilium, kubernetes] Namespace of the agents and the proxy [default: "
                   "default].")
@click.option("--agent-label", multiple=True, metavar="KEY=VALUE",
              help="[cilium, kubernetes] Label that selects agent pods (repeatable) "
                   "[default: egresslock.dev/agent=true].")
@click.option("--cluster-domain", metavar="DOMAIN",
              help="[cilium, kubernetes] The cluster's DNS domain [default: cluster.local].")
@click.option("--proxy-only", is_flag=True, default=None,
              help="[cilium] Open nothing directly: every rule through the proxy, every "
                   "request in its audit log.")
@click.option("--image", metavar="IMAGE",
              help="[kubernetes, compose] Image with egresslock in it [default: "
                   "egresslock:VERSION].")
@click.option("--replicas", type=click.IntRange(1, 100), help="[kubernetes] Proxy replicas "
              "[default: 2].")
@click.option("--with-cilium", is_flag=True, default=None,
              help="[kubernetes] Leave out the agent NetworkPolicies; the cilium target's "
                   "policy replaces them.")
@click.option("--agent-image", metavar="IMAGE",
              help="[compose] The agent's image [default: ${AGENT_IMAGE}, required at up].")
def compile_(policy_file: Path, target_name: str, out_dir: Path | None, as_json: bool,
             **given: Any) -> None:
    """Compile a policy into the configuration of another enforcement engine.

    Each target is pure: the same policy and options give the same bytes. Every file starts
    with a header naming the policy and its sha256, and the rules that target cannot express;
    those are reachable only through the egresslock proxy, which enforces the whole policy.

    \b
    Targets, and what enforces what:
      nftables    default-deny OUTPUT for a container or VM: loopback and the proxy only
                  (kernel), every other packet logged ("egresslock-drop: ") and dropped
      iptables    the same as iptables-restore files (IPv4 and IPv6)
      cilium      CiliumNetworkPolicy for agent pods: DNS limited to allowed names (Cilium
                  DNS proxy), toFQDNs, TLS SNI and HTTP method/path/Host (Envoy), private
                  ranges denied (eBPF); inspection, secrets, body and query limits: the proxy
      kubernetes  default-deny egress NetworkPolicy for agent pods (proxy and kube-dns only),
                  and the proxy as a Deployment, Service, ConfigMaps; every rule: the proxy
      seccomp     the sandbox's syscall filter as an OCI/Docker profile: no raw, packet,
                  netlink or vsock sockets, io_uring, namespaces (runtime)
      compose     agent on an internal network, proxy as its only bridge (Docker); every
                  rule: the proxy

    \b
    Examples:
      egresslock compile -p policy.yaml -t nftables --proxy 10.0.0.2:3128
      egresslock compile -p policy.yaml -t kubernetes --namespace agents --out k8s/
      egresslock compile -p policy.yaml -t cilium --namespace agents | kubectl apply -f -
    """
    from egresslock.compile import PolicySource, compile_target, target
    from egresslock.errors import InputError
    from egresslock.policy import parse_policy

    try:
        chosen = target(target_name)
    except InputError as exc:
        raise click.BadParameter(str(exc), param_hint="--target") from exc
    _refuse_foreign_options(chosen.name, chosen.options, given)
    if given["resolve"] and not given["allow_direct"]:
        raise click.UsageError("--resolve pins addresses for --allow-direct; pass both")
    text = _read(policy_file)
    loaded = parse_policy(text, str(policy_file))
    source = PolicySource.from_text(policy_file.name, text)
    options = _options(loaded, given)
    result = compile_target(chosen.name, loaded, source, options)
    for warning in result.warnings:
        click.echo(f"egresslock: warning: {warning}", err=True)
    if out_dir is not None:
        _write(result, out_dir, as_json)
    elif as_json:
        summary = result.summary()
        summary["files"] = [{"name": a.name, "content": a.text} for a in result.artifacts]
        click.echo(json.dumps(summary, indent=2))
    else:
        from egresslock.compile.render import join_for_stdout

        click.echo(join_for_stdout(result.artifacts), nl=False)
        if len(result.artifacts) > 1 and any(a.kind != "yaml" for a in result.artifacts):
            click.echo(f"egresslock: {len(result.artifacts)} files above; --out DIR writes "
                       "them separately", err=True)


def _refuse_foreign_options(name: str, accepted: tuple[str, ...], given: dict[str, Any]) -> None:
    for key, value in given.items():
        if value in (None, ()) or key in accepted:
            continue
        from egresslock.compile import TARGETS

        users = [t.name for t in TARGETS if key in t.options]
        raise click.UsageError(f"{_OPTION_FLAGS[key]} applies to {', '.join(users)}, "
                               f"not to --target {name}")


def _read(path: Path) -> str:
    """The file's text, newlines untranslated, so the header's sha256 is ``sha256sum``'s."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"{path} cannot be read: {exc}", param_hint="--policy") from exc


def _options(policy: Policy, given: dict[str, Any]) -> CompileOptions:
    from egresslock.compile import CompileOptions

    kwargs: dict[str, Any] = {}
    if given["proxy"] is not None:
        from egresslock.cli.proxy_cmd import parse_listen

        kwargs["proxy_host"], kwargs["proxy_port"] = parse_listen(given["proxy"])
    for key in ("proxy_uid", "namespace", "cluster_domain", "image", "replicas",
                "agent_image", "allow_direct", "proxy_only", "with_cilium"):
        if given[key] is not None:
            kwargs[key] = given[key]
    if given["agent_label"]:
        kwargs["agent_labels"] = _labels(given["agent_label"])
    if given["allow_direct"]:
        kwargs["resolved"] = _resolved(policy, given["resolve"])
    return CompileOptions(**kwargs)


def _labels(values: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} must be KEY=VALUE, like app=agent",
                                     param_hint="--agent-label")
        out[key] = value
    return out


def _resolved(policy: Policy, pins_given: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Addresses of the names host-only rules may be opened for: pins first, DNS for the rest.

    Only names that could be opened are looked up, so a policy whose other rules name hosts
    the machine cannot resolve compiles all the same.
    """
    from egresslock.policy import normalize_host, parse_ip_literal
    from egresslock.proxy.resolver import parse_pins

    try:
        pins = {normalize_host(h): tuple(a) for h, a in parse_pins(pins_given).items()}
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--resolve") from exc
    out = dict(pins)
    for rule in policy.rules:
        if (rule.action != "allow" or rule.inspect or rule.constrains_requests
                or "*" in rule.host):
            continue
        name = normalize_host(rule.host)
        if name in out or parse_ip_literal(name) is not None:
            continue
        out[name] = lookup(name)
    return out


def lookup(name: str) -> tuple[str, ...]:
    """The addresses DNS gives for ``name`` now, or none (with a warning) when it fails."""
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        click.echo(f"egresslock: warning: cannot resolve {name} ({exc}); its rule stays "
                   "behind the proxy (pass --resolve to pin it)", err=True)
        return ()
    return tuple(sorted({str(info[4][0]) for info in infos}))


def _write(result: CompileResult, out_dir: Path, as_json: bool) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for artifact in result.artifacts:
            path = out_dir / artifact.name
            path.write_text(artifact.text, encoding="utf-8")
            written.append(str(path))
    except OSError as exc:
        raise click.ClickException(f"cannot write to {out_dir}: {exc}") from exc
    if as_json:
        summary = result.summary()
        summary["files"] = written
        click.echo(json.dumps(summary, indent=2))
        return
    for name in written:
        click.echo(f"wrote {name}")
    if result.via_proxy:
        ids = ", ".join(r.rule_id for r in result.via_proxy)
        click.echo(f"only through the proxy ({len(result.via_proxy)}): {ids}; the file "
                   "header says why", err=True)
