"""The published JSON Schema of policy files, generated from the model so they cannot drift."""

from __future__ import annotations

from typing import Any

from egresslock.policy.model import Policy


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) that editors can use to check policy files."""
    schema = Policy.model_json_schema(mode="validation")
    return {
        "$schema": schema.pop("$schema"),
        "$id": schema.pop("$id"),
        **schema,
    }
