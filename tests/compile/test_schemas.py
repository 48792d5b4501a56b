"""Every generated object validates against the schema of the engine that reads it.

The schemas are upstream's, copied unchanged into tests/compile/schemas (see its README): the
CiliumNetworkPolicy CRD and a strict copy, Kubernetes' NetworkPolicy (and kubernetes-validate for
every object), the OCI runtime spec's seccomp section, and the Compose specification. The negative
tests prove each validator is awake: a misspelt key must fail.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import yaml

from tests.compile.helpers import (
    EXAMPLE_POLICIES,
    compile_example,
    compile_text,
    validate_cilium,
    validate_compose,
    validate_kubernetes,
    validate_seccomp,
    yaml_documents,
)
from tests.compile.test_golden import VARIANTS

CILIUM_CASES: list[tuple[str, dict[str, Any]]] = [(stem, {}) for stem in EXAMPLE_POLICIES] + [
    (stem, options) for stem, target, options in VARIANTS.values() if target == "cilium"]
KUBERNETES_CASES: list[tuple[str, dict[str, Any]]] = [(stem, {}) for stem in EXAMPLE_POLICIES] + [
    (stem, options) for stem, target, options in VARIANTS.values() if target == "kubernetes"]


@pytest.mark.parametrize(("stem", "options"), CILIUM_CASES)
def test_cilium_policy_validates_against_the_crd(stem: str, options: dict[str, Any]) -> None:
    documents = yaml_documents(compile_example(stem, "cilium", **options))
    assert len(documents) == 1
    validate_cilium(documents[0])


@pytest.mark.parametrize(("stem", "options"), KUBERNETES_CASES)
def test_kubernetes_objects_validate(stem: str, options: dict[str, Any]) -> None:
    documents = yaml_documents(compile_example(stem, "kubernetes", **options))
    kinds = {d["kind"] for d in documents}
    assert {"NetworkPolicy", "ConfigMap", "Deployment", "Service"} <= kinds
    for document in documents:
        validate_kubernetes(document)


@pytest.mark.parametrize("stem", EXAMPLE_POLICIES)
def test_seccomp_profile_validates_against_the_oci_schema(stem: str) -> None:
    result = compile_example(stem, "seccomp")
    validate_seccomp(json.loads(result.artifacts[0].text))


@pytest.mark.parametrize("stem", EXAMPLE_POLICIES)
def test_compose_file_validates_against_the_compose_spec(stem: str) -> None:
    result = compile_example(stem, "compose")
    validate_compose(yaml.safe_load(result.artifacts[0].text))
    validate_seccomp(json.loads(result.artifacts[1].text))


def test_every_yaml_artifact_is_one_document_that_parses_back() -> None:
    for stem in EXAMPLE_POLICIES:
        for target in ("cilium", "kubernetes", "compose"):
            for artifact in compile_example(stem, target).artifacts:
                if artifact.kind == "yaml":
                    assert len(list(yaml.safe_load_all(artifact.text))) == 1, artifact.name


# --- the validators reject what they should ----------------------------------------------------

def _cilium() -> dict[str, Any]:
    return yaml_documents(compile_example("internal-api", "cilium"))[0]


def test_cilium_validation_rejects_a_misspelt_key() -> None:
    document = _cilium()
    document["spec"]["egress"][2]["toFQDN"] = document["spec"]["egress"][2].pop("toFQDNs")
    with pytest.raises(jsonschema.ValidationError):
        validate_cilium(document)


def test_cilium_validation_rejects_a_bad_dns_pattern() -> None:
    document = _cilium()
    document["spec"]["egress"][0]["toPorts"][0]["rules"]["dns"].append(
        {"matchName": "bad name"})
    with pytest.raises(jsonschema.ValidationError):
        validate_cilium(document)


def test_networkpolicy_validation_rejects_a_cilium_key() -> None:
    documents = yaml_documents(compile_example("basic", "kubernetes"))
    allow = next(d for d in documents if d["metadata"]["name"] == "egresslock-agent-allow")
    allow["spec"]["egress"][0]["toPorts"] = allow["spec"]["egress"][0].pop("ports")
    with pytest.raises(jsonschema.ValidationError):
        validate_kubernetes(allow)


def test_kubernetes_validate_rejects_a_misspelt_deployment_key() -> None:
    import kubernetes_validate

    documents = yaml_documents(compile_example("basic", "kubernetes"))
    deployment = next(d for d in documents if d["kind"] == "Deployment")
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_kubernetes(deployment)


def test_seccomp_validation_rejects_an_unknown_action() -> None:
    profile = json.loads(compile_example("basic", "seccomp").artifacts[0].text)
    profile["syscalls"][0]["action"] = "SCMP_ACT_MAYBE"
    with pytest.raises(jsonschema.ValidationError):
        validate_seccomp(profile)


def test_compose_validation_rejects_an_unknown_service_key() -> None:
    document = yaml.safe_load(compile_example("basic", "compose").artifacts[0].text)
    document["services"]["agent"]["network"] = document["services"]["agent"].pop("networks")
    with pytest.raises(jsonschema.ValidationError):
        validate_compose(document)


def test_a_policy_with_a_dollar_sign_survives_compose_interpolation() -> None:
    text = ("version: 1\nrules:\n  - id: a\n    host: a.example\n    ports: [80]\n"
            "    paths: ['/price/$5']\n")
    result = compile_text(text, "compose")
    document = yaml.safe_load(result.artifacts[0].text)
    validate_compose(document)
    assert "/price/$$5" in document["configs"]["egresslock-policy"]["content"]
