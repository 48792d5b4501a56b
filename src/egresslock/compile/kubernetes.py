"""``--target kubernetes``: lock agent pods down with NetworkPolicy and run the proxy for them.

NetworkPolicy matches pods, addresses and ports, never names, so on its own it can only make the
proxy the agents' one way out; the proxy then decides every request by the policy. The objects:

- ``egresslock-agent-default-deny``: agent pods may send nothing (policyTypes: [Egress], no rule).
- ``egresslock-agent-allow``: except to the proxy pods and to kube-dns. NetworkPolicies add up,
  so these two read as "deny all, then these". Left out with ``--with-cilium``, where the cilium
  target's policy takes their place (an L4 allow of DNS beside it would lift its name limits).
- ``egresslock-proxy`` (NetworkPolicy): the proxy takes connections from agent pods, and metrics
  scrapes; it may reach kube-dns, and the internet on the policy's ports, but not the ranges
  ``network.block_private`` refuses (the proxy refuses them too; this is the second lock).
- ConfigMaps with the policy and with the agents' environment (proxy and CA variables).
- The proxy's Deployment (replicated, spread over nodes, probes, Prometheus annotations, audit
  rows as JSON lines on stdout) with its Service and a PodDisruptionBudget.

Kubernetes' DNS resolves any name for the agents, so a DNS query can still carry data to a
resolver outside the cluster: NetworkPolicy cannot limit names. The cilium target can.
"""

from __future__ import annotations

from typing import Any

from egresslock.compile.common import (
    PROXY_LABELS,
    PROXY_NAME,
    Artifact,
    CompileOptions,
    CompileResult,
    PolicySource,
    all_via_proxy,
    allow_rules,
    blocked_ranges,
    header_lines,
    inspects,
    proxy_environment,
    trust_environment,
    uses_keyed_hashes,
)
from egresslock.compile.render import object_file_name, yaml_artifact
from egresslock.policy.model import Policy

POLICY_MAP = "egresslock-policy"
ENV_MAP = "egresslock-agent-env"
CA_SECRET = "egresslock-ca"  # noqa: S105 - the Secret's name, not its content
CA_BUNDLE_MAP = "egresslock-ca-bundle"
AGENT_CA_DIR = "/etc/egresslock/ca"
AUDIT_DB = "/var/lib/egresslock/audit.db"
# A non-root uid with no entry in most images (distroless's "nonroot").
NONROOT_UID = 65532
KUBE_DNS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}
DNS_PORTS = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]


def compile_kubernetes(policy: Policy, source: PolicySource,
                       options: CompileOptions) -> CompileResult:
    """Every object, one artifact each, in the order ``kubectl apply`` should see them."""
    via_proxy = all_via_proxy(policy, "NetworkPolicy matches addresses and ports, not names")
    objects: list[tuple[dict[str, Any], str]] = []
    if not options.with_cilium:
        objects += [
            (_agent_default_deny(options), "agent pods may send nothing but what the next "
                                           "policy allows"),
            (_agent_allow(options), "agent pods may reach the egresslock proxy and kube-dns"),
        ]
    objects += [
        (_proxy_network_policy(policy, options), "the proxy's own ingress and egress"),
        (_policy_map(source, options), "the policy the proxy enforces"),
        (_env_map(policy, options), "the agents' proxy and CA variables (envFrom)"),
        (_deployment(policy, source, options), "the egresslock proxy, replicated"),
        (_service(options), "the proxy's address for agents, and its metrics"),
    ]
    if options.replicas > 1:
        objects.append((_disruption_budget(options), "keeps a proxy up during node drains"))
    warnings = []
    if policy.mode == "report":
        warnings.append("mode is 'report': the proxy allows and logs, but the NetworkPolicies "
                        "still confine agent pods to the proxy and DNS")
    artifacts: list[Artifact] = []
    for document, role in objects:
        notes = ["", f"This object: {role}.", *_usage(policy, options), *warnings]
        header = header_lines(source, "kubernetes", via_proxy, notes)
        artifacts.append(yaml_artifact(object_file_name(document), header, document))
    return CompileResult("kubernetes", tuple(artifacts), via_proxy, tuple(warnings))


def _usage(policy: Policy, options: CompileOptions) -> list[str]:
    ns = options.namespace
    lines: list[str] = []
    keys = _secret_keys(policy)
    if keys:
        files = " ".join(f"--from-file={k}" for k in keys)
        lines.append(f"Before applying: kubectl -n {ns} create secret generic {CA_SECRET} {files} "
                     "(from the directory of egresslock ca init; the proxy makes transform.key "
                     "there on first use).")
    if inspects(policy):
        lines.append(f"And: kubectl -n {ns} create configmap {CA_BUNDLE_MAP} "
                     f"--from-file=bundle.pem --from-file=ca.pem, mounted by agent pods at "
                     f"{AGENT_CA_DIR}.")
    labels = ", ".join(f"{k}={v}" for k, v in options.agent_labels.items())
    lines.append(f"Agent pods: label {labels}; envFrom configMapRef {ENV_MAP}. See "
                 "docs/kubernetes.md.")
    if not options.with_cilium:
        lines.append("kube-dns resolves any name for agents, so DNS can still carry data out; "
                     "the cilium target limits names.")
    return lines


def _secret_keys(policy: Policy) -> list[str]:
    """The files of the proxy's Secret: the CA to inspect, the key of keyed hashes (shared by
    every replica, so that one value hashes alike whichever replica sends it)."""
    keys = ["ca.pem", "ca.key"] if inspects(policy) else []
    if uses_keyed_hashes(policy):
        keys.append("transform.key")
    return keys


def _metadata(name: str, options: CompileOptions, labels: dict[str, str] | None = None,
              ) -> dict[str, Any]:
    return {"name": name, "namespace": options.namespace,
            "labels": {**(labels or {}), "app.kubernetes.io/managed-by": "egresslock"}}


def _agent_default_deny(options: CompileOptions) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata("egresslock-agent-default-deny", options),
        "spec": {"podSelector": {"matchLabels": dict(options.agent_labels)},
                 "policyTypes": ["Egress"]},
    }


def _agent_allow(options: CompileOptions) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata("egresslock-agent-allow", options),
        "spec": {
            "podSelector": {"matchLabels": dict(options.agent_labels)},
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [{"podSelector": {"matchLabels": dict(PROXY_LABELS)}}],
                 "ports": [{"protocol": "TCP", "port": options.proxy_port}]},
                {"to": [KUBE_DNS_PEER], "ports": DNS_PORTS},
            ],
        },
    }


def _proxy_network_policy(policy: Policy, options: CompileOptions) -> dict[str, Any]:
    ports = sorted({p for r in allow_rules(policy) for p in r.ports})
    egress: list[dict[str, Any]] = [{"to": [KUBE_DNS_PEER], "ports": DNS_PORTS}]
    if ports:
        egress.append({"to": _world_peers(policy),
                       "ports": [{"protocol": "TCP", "port": p} for p in ports]})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(PROXY_NAME, options, dict(PROXY_LABELS)),
        "spec": {
            "podSelector": {"matchLabels": dict(PROXY_LABELS)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": dict(options.agent_labels)}}],
                 "ports": [{"protocol": "TCP", "port": options.proxy_port}]},
                {"from": [{"namespaceSelector": {}}],
                 "ports": [{"protocol": "TCP", "port": options.metrics_port}]},
            ],
            "egress": egress,
        },
    }


def _world_peers(policy: Policy) -> list[dict[str, Any]]:
    """Everything but the refused ranges, plus the policy's allow_ranges (peers add up)."""
    peers: list[dict[str, Any]] = []
    for version, everything in ((4, "0.0.0.0/0"), (6, "::/0")):
        refused = [r.cidr for r in blocked_ranges(policy, version)]
        block: dict[str, Any] = {"cidr": everything}
        if refused:
            block["except"] = refused
        peers.append({"ipBlock": block})
    if policy.network.block_private:
        peers += [{"ipBlock": {"cidr": c}} for c in policy.network.allow_ranges]
    return peers


def _policy_map(source: PolicySource, options: CompileOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(POLICY_MAP, options, dict(PROXY_LABELS)),
        "data": {"policy.yaml": source.text},
    }


def proxy_url(options: CompileOptions) -> str:
    """The fully qualified Service name: the one the cilium target lets agents resolve."""
    return (f"http://{PROXY_NAME}.{options.namespace}.svc.{options.cluster_domain}:"
            f"{options.proxy_port}")


def _env_map(policy: Policy, options: CompileOptions) -> dict[str, Any]:
    data = proxy_environment(proxy_url(options))
    if inspects(policy):
        data.update(trust_environment(f"{AGENT_CA_DIR}/bundle.pem", f"{AGENT_CA_DIR}/ca.pem"))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(ENV_MAP, options),
        "data": data,
    }


def _deployment(policy: Policy, source: PolicySource, options: CompileOptions,
                ) -> dict[str, Any]:
    # The CA key comes from a Secret volume: owned by root, mode 0400. The proxy refuses a key
    # that group or others can read, so fsGroup (which adds group read) cannot help a non-root
    # user read it; with the Secret the proxy runs as uid 0 holding no capability at all.
    uid = 0 if _secret_keys(policy) else NONROOT_UID
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(PROXY_NAME, options, dict(PROXY_LABELS)),
        "spec": {
            "replicas": options.replicas,
            "selector": {"matchLabels": dict(PROXY_LABELS)},
            "template": {
                "metadata": {
                    "labels": dict(PROXY_LABELS),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(options.metrics_port),
                        "prometheus.io/path": "/metrics",
                        # A new policy changes the pod template, so applying it rolls the pods.
                        "egresslock.dev/policy-sha256": source.sha256,
                    },
                },
                "spec": _pod_spec(policy, options, uid),
            },
        },
    }


def _pod_spec(policy: Policy, options: CompileOptions, uid: int) -> dict[str, Any]:
    volumes: list[dict[str, Any]] = [
        {"name": "policy", "configMap": {"name": POLICY_MAP}},
        {"name": "audit", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    keys = _secret_keys(policy)
    if keys:
        volumes.append({"name": "ca", "secret": {
            "secretName": CA_SECRET, "defaultMode": 0o400,
            "items": [{"key": k, "path": k} for k in keys],
        }})
    return {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": uid != 0, "runAsUser": uid, "runAsGroup": uid,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "topologySpreadConstraints": [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": dict(PROXY_LABELS)},
        }],
        "containers": [_proxy_container(policy, options), _audit_container(options)],
        "volumes": volumes,
    }


_CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                       "capabilities": {"drop": ["ALL"]}}


def _proxy_container(policy: Policy, options: CompileOptions) -> dict[str, Any]:
    args = ["proxy", "-p", "/etc/egresslock/policy/policy.yaml",
            "--listen", f"0.0.0.0:{options.proxy_port}",
            "--metrics", f"0.0.0.0:{options.metrics_port}", "--audit", AUDIT_DB]
    mounts = [{"name": "policy", "mountPath": "/etc/egresslock/policy", "readOnly": True},
              {"name": "audit", "mountPath": "/var/lib/egresslock"},
              {"name": "tmp", "mountPath": "/tmp"}]  # noqa: S108 - an emptyDir of its own
    if _secret_keys(policy):
        args += ["--ca-dir", "/etc/egresslock/ca"]
        mounts.append({"name": "ca", "mountPath": "/etc/egresslock/ca", "readOnly": True})
    return {
        "name": "proxy",
        "image": options.image,
        "command": ["egresslock"],
        "args": args,
        "ports": [{"name": "proxy", "containerPort": options.proxy_port, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": options.metrics_port, "protocol": "TCP"}],
        "readinessProbe": {"tcpSocket": {"port": "proxy"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": "proxy"}, "initialDelaySeconds": 5,
                          "periodSeconds": 10, "failureThreshold": 3},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"memory": "512Mi"}},
        "securityContext": dict(_CONTAINER_SECURITY),
        "volumeMounts": mounts,
    }


def _audit_container(options: CompileOptions) -> dict[str, Any]:
    # `egresslock proxy` writes its audit log to SQLite only; this sidecar follows it and prints
    # each row as one JSON line on its stdout, where the cluster's log pipeline collects it. It
    # waits for the proxy to create the database, which `egresslock audit` refuses to do.
    follow = (f"until [ -e {AUDIT_DB} ]; do sleep 1; done; "
              f"exec egresslock audit --db {AUDIT_DB} --follow --json --limit 0")
    return {
        "name": "audit-log",
        "image": options.image,
        "command": ["sh", "-c", follow],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"},
                      "limits": {"memory": "128Mi"}},
        "securityContext": dict(_CONTAINER_SECURITY),
        "volumeMounts": [{"name": "audit", "mountPath": "/var/lib/egresslock"}],
    }


def _service(options: CompileOptions) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(PROXY_NAME, options, dict(PROXY_LABELS)),
        "spec": {
            "selector": dict(PROXY_LABELS),
            "ports": [
                {"name": "proxy", "port": options.proxy_port, "targetPort": "proxy",
                 "protocol": "TCP"},
                {"name": "metrics", "port": options.metrics_port, "targetPort": "metrics",
                 "protocol": "TCP"},
            ],
        },
    }


def _disruption_budget(options: CompileOptions) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(PROXY_NAME, options, dict(PROXY_LABELS)),
        "spec": {"minAvailable": 1, "selector": {"matchLabels": dict(PROXY_LABELS)}},
    }
