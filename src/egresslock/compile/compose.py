"""``--target compose``: the agent in Docker Compose, with the proxy as its only way out.

The agent's only network is ``internal: true``: Docker gives it no gateway, so no packet of the
agent's can leave the host, whatever the agent does with its sockets. The proxy is on that network
and on a default one, and is the only bridge between them. The agent gets the proxy variables
(and, when the policy inspects HTTPS, the CA variables of ``egresslock env``), no capabilities,
no_new_privs, and the sandbox's seccomp profile, written next to this file.

The policy travels inside the Compose file (``configs.content``), so the file and its header's
hash always describe the same policy. ``$`` is doubled there, since Compose interpolates
variables in every string of the file.
"""

from __future__ import annotations

from typing import Any

from egresslock.compile.common import (
    Artifact,
    CompileOptions,
    CompileResult,
    PolicySource,
    all_via_proxy,
    header_lines,
    inspects,
    proxy_environment,
    trust_environment,
    uses_keyed_hashes,
)
from egresslock.compile.render import yaml_artifact
from egresslock.compile.seccomp import FILE_NAME as SECCOMP_FILE
from egresslock.compile.seccomp import compile_seccomp
from egresslock.policy.model import Policy

FILE_NAME = "compose.yaml"
AGENT_IMAGE = "${AGENT_IMAGE:?set AGENT_IMAGE to the image of your agent}"
CA_DIR = "/etc/egresslock/ca"


def compile_compose(policy: Policy, source: PolicySource,
                    options: CompileOptions) -> CompileResult:
    """``compose.yaml`` and the seccomp profile it names."""
    via_proxy = all_via_proxy(policy, "the agent's network is internal: the proxy is its only "
                              "way out")
    notes = [
        "",
        "Run: docker compose up (AGENT_IMAGE=... unless --agent-image was given). "
        f"{SECCOMP_FILE} must sit next to this file.",
        "Docker Engine 26 and later resolve no outside names for a container on internal "
        "networks only; older engines forward its DNS queries, a channel for data. Check: "
        "docker compose run --rm agent getent hosts example.com must fail.",
    ]
    if inspects(policy):
        notes.append("Inspection: create the CA with egresslock ca init --dir ./ca; the proxy "
                     "reads ./ca, the agent gets only ca.pem and bundle.pem.")
    if uses_keyed_hashes(policy):
        notes.append("Keyed hashes: ./ca (read-only to the proxy) must hold transform.key, 32 "
                     "random bytes: head -c 32 /dev/urandom > ca/transform.key; chmod 600.")
    document = compose_document(policy, source, options)
    header = header_lines(source, "compose", via_proxy, notes)
    profile = compile_seccomp(policy, source, options).artifacts[0]
    artifacts = (yaml_artifact(FILE_NAME, header, document),
                 Artifact(SECCOMP_FILE, profile.text, profile.kind))
    warnings: tuple[str, ...] = ()
    if policy.mode == "report":
        warnings = ("mode is 'report': the proxy allows and logs everything, and the internal "
                    "network still confines the agent to the proxy",)
    return CompileResult("compose", artifacts, via_proxy, warnings)


def compose_document(policy: Policy, source: PolicySource,
                     options: CompileOptions) -> dict[str, Any]:
    return {
        "services": {"proxy": _proxy(policy, options), "agent": _agent(policy, options)},
        "networks": {"agent": {"internal": True}, "egress": {}},
        "volumes": {"audit": {}},
        "configs": {"egresslock-policy": {"content": source.text.replace("$", "$$")}},
    }


def _proxy(policy: Policy, options: CompileOptions) -> dict[str, Any]:
    port = options.proxy_port
    command = ["proxy", "-p", "/etc/egresslock/policy.yaml", "--listen", f"0.0.0.0:{port}",
               "--audit", "/var/lib/egresslock/audit.db"]
    volumes = ["audit:/var/lib/egresslock"]
    cap_add: list[str] = []
    if inspects(policy) or uses_keyed_hashes(policy):
        command += ["--ca-dir", CA_DIR]
        volumes.append(f"./ca:{CA_DIR}:ro")
        # The key is yours, mode 600; root without capabilities could not read it.
        cap_add = ["DAC_READ_SEARCH"]
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 2).close()"
    service: dict[str, Any] = {
        "image": options.image,
        "entrypoint": ["egresslock"],
        "command": command,
        "configs": [{"source": "egresslock-policy", "target": "/etc/egresslock/policy.yaml"}],
        "volumes": volumes,
        "networks": ["agent", "egress"],
        "read_only": True,
        "tmpfs": ["/tmp"],  # noqa: S108 - the container's own /tmp, a fresh tmpfs
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "healthcheck": {"test": ["CMD", "python3", "-c", probe], "interval": "5s",
                        "timeout": "3s", "retries": 5},
        "restart": "unless-stopped",
    }
    if cap_add:
        service["cap_add"] = cap_add
    return service


def _agent(policy: Policy, options: CompileOptions) -> dict[str, Any]:
    environment = proxy_environment(f"http://proxy:{options.proxy_port}")
    volumes: list[str] = []
    if inspects(policy):
        environment.update(trust_environment(f"{CA_DIR}/bundle.pem", f"{CA_DIR}/ca.pem"))
        volumes = [f"./ca/ca.pem:{CA_DIR}/ca.pem:ro", f"./ca/bundle.pem:{CA_DIR}/bundle.pem:ro"]
    service: dict[str, Any] = {
        "image": options.agent_image or AGENT_IMAGE,
        "networks": ["agent"],
        "environment": environment,
        "depends_on": {"proxy": {"condition": "service_healthy"}},
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true", f"seccomp={SECCOMP_FILE}"],
    }
    if volumes:
        service["volumes"] = volumes
    return service
