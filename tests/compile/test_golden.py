"""Golden files: every target over every example policy, byte for byte.

A change to a generator shows up here as a diff a reviewer can read. After a deliberate change,
regenerate with ``EGRESSLOCK_UPDATE_GOLDEN=1 scripts/test.sh tests/compile/test_golden.py`` and
review ``git diff tests/compile/golden``.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.compile.helpers import EXAMPLE_POLICIES, GOLDEN, TARGETS, compile_example, rendered

# Options a user would pass, for the targets whose output they change.
VARIANTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "package-mirrors/nftables-direct": ("package-mirrors", "nftables", {
        "proxy_host": "10.0.0.2", "proxy_port": 3128, "proxy_uid": "998", "allow_direct": True,
        "resolved": {"pypi.org": ("151.101.0.223", "2a04:4e42::223"),
                     "files.pythonhosted.org": ("151.101.64.223",),
                     # A documentation address: block_private leaves it out, with a note.
                     "registry.npmjs.org": ("192.0.2.10",)}}),
    "package-mirrors/iptables-direct": ("package-mirrors", "iptables", {
        "proxy_host": "10.0.0.2", "proxy_port": 3128, "proxy_uid": "nobody",
        "allow_direct": True,
        "resolved": {"pypi.org": ("151.101.0.223", "2a04:4e42::223"),
                     "files.pythonhosted.org": ("151.101.64.223",)}}),
    "internal-api/kubernetes-with-cilium": ("internal-api", "kubernetes", {
        "namespace": "agents", "with_cilium": True, "image": "registry.example/egresslock:0.1.0",
        "agent_labels": {"app": "agent"}}),
    "internal-api/cilium-agents": ("internal-api", "cilium", {
        "namespace": "agents", "agent_labels": {"app": "agent"}}),
    "package-mirrors/cilium-proxy-only": ("package-mirrors", "cilium", {"proxy_only": True}),
}
EXTENSIONS = {"nftables": "nft", "iptables": "txt", "cilium": "yaml", "kubernetes": "yaml",
              "seccomp": "json", "compose": "yaml"}

CASES: list[tuple[str, str, str, dict[str, Any]]] = [
    (f"{stem}/{target}", stem, target, {}) for stem in EXAMPLE_POLICIES for target in TARGETS]
CASES += [(key, stem, target, options) for key, (stem, target, options) in VARIANTS.items()]


@pytest.mark.parametrize(("key", "stem", "target", "options"), CASES, ids=[c[0] for c in CASES])
def test_output_matches_the_golden_file(key: str, stem: str, target: str,
                                        options: dict[str, Any]) -> None:
    result = compile_example(stem, target, **options)
    # compose also writes the seccomp profile, whose golden files are the seccomp target's.
    text = result.artifacts[0].text if target == "compose" else rendered(result)
    golden = GOLDEN / f"{key}.{EXTENSIONS[target]}"
    if os.environ.get("EGRESSLOCK_UPDATE_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text, encoding="utf-8")
    assert golden.exists(), f"no golden file {golden}; run with EGRESSLOCK_UPDATE_GOLDEN=1"
    assert text == golden.read_text(encoding="utf-8"), (
        f"{key} differs from {golden}; if the change is intended, regenerate with "
        "EGRESSLOCK_UPDATE_GOLDEN=1 and review the diff")


def test_no_golden_file_is_left_over() -> None:
    expected = {f"{key}.{EXTENSIONS[target]}" for key, _, target, _ in CASES}
    found = {str(p.relative_to(GOLDEN)) for p in GOLDEN.rglob("*") if p.is_file()}
    assert found == expected, f"stale golden files: {sorted(found - expected)}"


def test_compiling_twice_gives_the_same_bytes() -> None:
    for target in TARGETS:
        first = rendered(compile_example("internal-api", target))
        assert rendered(compile_example("internal-api", target)) == first
