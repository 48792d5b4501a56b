"""Turning generated objects into text: YAML documents with a comment header, and JSON.

PyYAML is used with a dumper of our own rather than by changing its global representers, so
importing this module changes nothing for the policy loader. Multi-line strings (the policy in a
ConfigMap) are written as literal blocks, so a reviewer reads the policy as it was written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import yaml

from egresslock.compile.common import Artifact, comment_block


class _Dumper(yaml.SafeDumper):
    """Safe YAML; block style; lists indented under their key, as kubectl prints them."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)

    def ignore_aliases(self, data: Any) -> bool:
        return True  # an '&id001' anchor in a manifest helps no reader


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(document: Any) -> str:
    """One YAML document, keys in the order the generator built them; long values (regexes,
    shell lines) stay on one line rather than being folded."""
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     width=4096, allow_unicode=True)


def yaml_artifact(name: str, header: Iterable[str], document: Any) -> Artifact:
    return Artifact(name, comment_block(header) + to_yaml(document), "yaml")


def to_json(document: Any) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def object_file_name(document: dict[str, Any]) -> str:
    """``kind-name.yaml`` for a Kubernetes object: ``deployment-egresslock-proxy.yaml``."""
    return f"{document['kind'].lower()}-{document['metadata']['name']}.yaml"


def join_for_stdout(artifacts: Iterable[Artifact]) -> str:
    """All artifacts as one text: YAML as one multi-document stream (``kubectl apply -f -``
    reads it), other kinds each under a ``# ==> name <==`` line, as ``head`` prints files."""
    items = list(artifacts)
    if len(items) == 1:
        return items[0].text
    if all(a.kind == "yaml" for a in items):
        return "---\n".join(a.text for a in items)
    return "\n".join(f"# ==> {a.name} <==\n{a.text}" for a in items)
