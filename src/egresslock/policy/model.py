"""The policy file, version 1, as a schema: the user-facing contract of egresslock.

The models are strict (no coercion: ``inspect: "yes"`` is an error, not True) and closed (an
unknown key is an error, since a misspelt ``method:`` silently allowing every method is exactly
the failure a security policy must not have). Field validators check each value on its own;
checks that need several fields (duplicate ids, HTTPS constraints without inspection) live in
:mod:`egresslock.policy.loader`, which knows the file and line to blame.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from egresslock.errors import InputError
from egresslock.policy.glob import parse_host_pattern, parse_path_pattern

_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_METHOD = re.compile(r"^[A-Z][A-Z0-9-]{0,31}$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_UPGRADE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,31}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _check_host(value: str) -> str:
    try:
        parse_host_pattern(value)
    except InputError as exc:
        raise ValueError(str(exc)) from exc
    return value


def _check_path(value: str) -> str:
    try:
        parse_path_pattern(value)
    except InputError as exc:
        raise ValueError(str(exc)) from exc
    return value


def _check_method(value: str) -> str:
    if not _METHOD.match(value):
        raise ValueError(f"method {value!r} must be an upper-case HTTP method name, like GET")
    return value


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as exc:
        raise ValueError(
            f"{value!r} is not a valid CIDR ({exc}); write a network address and prefix "
            "length with no host bits set, like '10.0.0.0/8' or 'fd00::/8'"
        ) from exc
    return value


def _check_header(value: str) -> str:
    if not _HEADER.match(value):
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value


def _check_upgrade(value: str) -> str:
    if value.lower() in ("h2c", "http/2", "http/2.0"):
        raise ValueError(
            f"upgrade {value!r} cannot be allowed: requests after a switch to HTTP/2 would not "
            "be decided one by one; allow HTTP/1.1 protocols such as websocket"
        )
    if not _UPGRADE.match(value):
        raise ValueError(f"upgrade {value!r} must be a protocol token, like websocket")
    return value.lower()


HostPatternStr = Annotated[str, AfterValidator(_check_host)]
UpgradeStr = Annotated[str, AfterValidator(_check_upgrade)]
PathPatternStr = Annotated[str, AfterValidator(_check_path)]
MethodStr = Annotated[str, AfterValidator(_check_method)]
CIDRStr = Annotated[str, AfterValidator(_check_cidr)]
HeaderStr = Annotated[str, AfterValidator(_check_header)]


class QueryLimits(_Strict):
    """Query strings allowed only with these parameter names and value lengths."""

    params: list[str] | None = Field(
        default=None, description="Parameter names allowed; others are denied. Omit for any."
    )
    max_value_len: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Longest decoded value allowed for any parameter."
    )


class Rule(_Strict):
    """One destination and what may be sent to it."""

    id: str = Field(description="Unique name; appears in every decision and log row.")
    host: HostPatternStr = Field(
        description="Exact host, IP literal, or '*.example.com' (subdomains only, not the apex)."
    )
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(
        default_factory=lambda: [80, 443], min_length=1, description="Allowed ports."
    )
    methods: list[MethodStr] | None = Field(
        default=None, min_length=1, description="Allowed methods; omit for any."
    )
    paths: list[PathPatternStr] | None = Field(
        default=None,
        min_length=1,
        description="Path globs on the normalised path: '*' within a segment, '**' across.",
    )
    query: Literal["allow", "deny"] | QueryLimits = Field(
        default="allow", description="allow, deny, or {params: [...], max_value_len: N}."
    )
    max_body_bytes: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description="Largest request body allowed, in bytes."
    )
    inspect: bool = Field(
        default=False,
        description="Decrypt HTTPS so methods, paths, queries and bodies can be enforced.",
    )
    upgrades: list[UpgradeStr] | None = Field(
        default=None,
        description="Protocols a request may switch to with Upgrade, e.g. [websocket]; the "
        "frames are relayed and counted against max_body_bytes. Default: none.",
    )
    action: Literal["allow", "deny"] = Field(
        default="allow", description="allow or deny; a matching deny always wins."
    )

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not _RULE_ID.match(value):
            raise ValueError(
                f"rule id {value!r} must be 1-64 characters of letters, digits, '.', '_' and "
                "'-', beginning with a letter or digit"
            )
        return value

    @field_validator("query", mode="before")
    @classmethod
    def _query(cls, value: object) -> object:
        if isinstance(value, dict) or value in ("allow", "deny"):
            return value
        raise ValueError(
            f"query must be 'allow', 'deny' or a mapping like {{params: [page], "
            f"max_value_len: 64}} (got {value!r})"
        )

    @property
    def constrains_requests(self) -> bool:
        """True when the rule looks inside requests (needs HTTP, or inspection for HTTPS)."""
        return (
            self.methods is not None
            or self.paths is not None
            or self.query != "allow"
            or self.max_body_bytes is not None
        )

    def constrained_keys(self) -> list[str]:
        keys = []
        if self.methods is not None:
            keys.append("methods")
        if self.paths is not None:
            keys.append("paths")
        if self.query != "allow":
            keys.append("query")
        if self.max_body_bytes is not None:
            keys.append("max_body_bytes")
        return keys


class Network(_Strict):
    """Network-level limits that apply to every rule."""

    block_private: bool = Field(
        default=True,
        description="Refuse loopback, link-local, RFC 1918, CGNAT, ULA, multicast, broadcast, "
        "0/8, documentation ranges and IPv6 that embeds IPv4.",
    )
    allow_ranges: list[CIDRStr] = Field(
        default_factory=list, description="CIDRs exempt from block_private."
    )


class Secret(_Strict):
    """Data that must never leave, named by value, environment variable or file."""

    name: str = Field(min_length=1)
    value: str | None = None
    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Secret:
        given = [k for k in ("value", "env", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"secret {self.name!r} must have exactly one of value, env or file "
                f"(has {', '.join(given) or 'none'})"
            )
        if self.env is not None and not _ENV.match(self.env):
            raise ValueError(f"env {self.env!r} is not an environment variable name")
        return self


class Credential(_Strict):
    """A credential the agent sees only as a placeholder; the proxy inserts the real value."""

    name: str = Field(min_length=1)
    env: str | None = None
    value: str | None = None
    file: str | None = None
    hosts: list[HostPatternStr] = Field(min_length=1)
    headers: list[HeaderStr] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> Credential:
        given = [k for k in ("value", "env", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"credential {self.name!r} must have exactly one of value, env or file "
                f"(has {', '.join(given) or 'none'})"
            )
        return self


class OutputTarget(_Strict):
    """A place rendered output may load images from or link to."""

    host: HostPatternStr
    paths: list[PathPatternStr] | None = None

class Output(_Strict):
    """Where an agent's rendered markdown/HTML may load images from and link to."""

    images: list[OutputTarget] = Field(default_factory=list)
    links: list[OutputTarget] = Field(default_factory=list)


class Policy(_Strict):
    """An egresslock policy file, version 1."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        json_schema_extra={
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://egresslock.dev/schema/policy-v1.json",
        },
    )

    version: Literal[1] = Field(description="Policy file format version; only 1 exists.")
    mode: Literal["enforce", "report"] = Field(
        default="enforce",
        description="enforce denies; report allows but logs what enforce would deny.",
    )
    network: Network = Field(default_factory=Network)
    rules: list[Rule] = Field(default_factory=list)
    secrets: list[Secret] = Field(default_factory=list)
    credentials: list[Credential] = Field(default_factory=list)
    output: Output = Field(default_factory=Output)

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: object) -> object:
        # Literal[1] compares by equality, so True and 1.0 would pass as 1 even in strict mode.
        if type(value) is not int:
            raise ValueError(f"version must be the integer 1 (got {value!r})")
        return value
