"""Shared by the compile tests: the example policies, compiling them, and the schema validators.

The schemas are third-party data files, copied unchanged into ``tests/compile/schemas`` (its
README gives the source and git blob id of each); ``EGRESSLOCK_SCHEMAS`` points elsewhere.
Where they are missing, validation skips with the
reason (or fails under ``EGRESSLOCK_REQUIRE_SANDBOX=1``, like every other skipped check).
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from egresslock.compile import CompileOptions, CompileResult, PolicySource, compile_target
from egresslock.compile.render import join_for_stdout
from egresslock.policy import parse_policy
from tests.conftest import require_sandbox

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"
SCHEMAS = Path(os.environ.get("EGRESSLOCK_SCHEMAS", Path(__file__).parent / "schemas"))
EXAMPLE_POLICIES = ("basic", "local-demo", "package-mirrors", "internal-api", "private-data")
TARGETS = ("nftables", "iptables", "cilium", "kubernetes", "seccomp", "compose")


def compile_text(text: str, target: str, name: str = "policy.yaml",
                 **options: Any) -> CompileResult:
    """Compile policy ``text`` as the command line would, with ``options`` for CompileOptions."""
    return compile_target(target, parse_policy(text, name), PolicySource.from_text(name, text),
                          CompileOptions(**options))


def compile_example(stem: str, target: str, **options: Any) -> CompileResult:
    path = EXAMPLES / f"{stem}.yaml"
    return compile_text(path.read_text(encoding="utf-8"), target, path.name, **options)


def rendered(result: CompileResult) -> str:
    return join_for_stdout(result.artifacts)


def yaml_documents(result: CompileResult) -> list[dict[str, Any]]:
    """Every YAML artifact, parsed (the header comments are ignored by YAML)."""
    return [yaml.safe_load(a.text) for a in result.artifacts if a.kind == "yaml"]


# --- schemas -----------------------------------------------------------------------------------

def schema_dir(kind: str) -> Path:
    path = SCHEMAS / kind
    require_sandbox(path.is_dir(), f"the {kind} schemas are not at {path} (set "
                                   "EGRESSLOCK_SCHEMAS to the shared schemas directory)")
    return path


@cache
def _cilium_validators() -> tuple[Any, ...]:
    folder = schema_dir("cilium")
    crd = yaml.safe_load((folder / "ciliumnetworkpolicies.yaml").read_text())
    from_crd = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    strict = json.loads((folder / "ciliumnetworkpolicy_v2.json").read_text())
    # validator_for() would pick by $schema; both are Draft 7 documents without a usable one.
    return (jsonschema.Draft7Validator(from_crd), jsonschema.Draft7Validator(strict))


def validate_cilium(document: dict[str, Any]) -> None:
    """Against the CRD's own schema (Cilium ~1.15) and datreeio's strict one (1.18): the first
    is what an API server checks, the second rejects misspelt keys the first would drop."""
    for validator in _cilium_validators():
        validator.validate(document)


@cache
def _networkpolicy_validators() -> tuple[Any, ...]:
    folder = schema_dir("kubernetes")
    return tuple(jsonschema.Draft7Validator(json.loads((folder / name).read_text()))
                 for name in ("networkpolicy-networking-v1.json",
                              "networkpolicy-networking-v1.k8s-v1.34-standalone.json"))


def validate_kubernetes(document: dict[str, Any]) -> None:
    """NetworkPolicies against both shared schemas; every object with kubernetes-validate."""
    if document["kind"] == "NetworkPolicy":
        for validator in _networkpolicy_validators():
            validator.validate(document)
    import kubernetes_validate

    kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)


@cache
def _compose_validator() -> Any:
    schema = json.loads((schema_dir("compose") / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)


def validate_compose(document: dict[str, Any]) -> None:
    _compose_validator().validate(document)


@cache
def _seccomp_validator() -> Any:
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4

    folder = schema_dir("oci")
    base = "https://opencontainers.example/schema/"
    resources = [(base + name, Resource.from_contents(json.loads((folder / name).read_text()),
                                                      default_specification=DRAFT4))
                 for name in ("config-linux.json", "defs-linux.json", "defs.json")]
    registry = Registry().with_resources(resources)
    # The fragments are Draft 4 with relative $refs between the three files.
    schema = {"$ref": base + "config-linux.json#/linux/properties/seccomp"}
    return jsonschema.Draft4Validator(schema, registry=registry)


def validate_seccomp(profile: dict[str, Any]) -> None:
    _seccomp_validator().validate(profile)

