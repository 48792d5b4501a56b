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
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from egresslock.errors import InputError
from egresslock.policy.glob import parse_host_pattern, parse_path_pattern

_RULE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_METHOD = re.compile(r"^[A-Z][A-Z0-9-]{0,31}$")
_HEADER = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_UPGRADE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,31}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_PERIOD = re.compile(r"^([1-9][0-9]*)([smhd])$")
_PERIOD_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_POINTER = re.compile(r"^(/([^/~]|~[01])*)+$")
_LEVEL = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

# The detectors of well-known credential shapes (egresslock.content.detectors), each on by default.
DETECTORS = ("aws", "github", "slack", "private_key", "jwt", "connection_string")


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


def parse_size(value: int | str) -> int:
    """Bytes from ``1048576``, ``"512KB"``, ``"1 MiB"``, ``"2.5GB"``; ValueError names the value."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"size {value} must not be negative")
        return value
    m = _SIZE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"size {value!r} must be a number of bytes or a number with a unit "
                         "(B, KB, MB, GB, KiB, MiB, GiB), like 1048576 or '1MiB'")
    return int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])


def parse_period(value: str) -> float | None:
    """Seconds of a budget window ('30s', '1m', '1h', '1d'), or None for 'run'."""
    if value == "run":
        return None
    m = _PERIOD.match(value)
    if m is None:
        raise ValueError(f"per {value!r} must be 'run' or a duration like '30s', '1m', '1h' "
                         "or '1d'")
    return float(int(m.group(1)) * _PERIOD_SECONDS[m.group(2)])


def _check_size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"size must be a number of bytes or a string like '1MiB' "
                         f"(got {value!r})")
    return parse_size(value)


def _check_period(value: str) -> str:
    parse_period(value)
    return value


def _check_pointer(value: str) -> str:
    if not _POINTER.match(value):
        raise ValueError(f"{value!r} is not a JSON pointer: write '/key/0/name' (RFC 6901; "
                         "'~1' for '/', '~0' for '~', '*' for every member or element)")
    return value


HostPatternStr = Annotated[str, AfterValidator(_check_host)]
UpgradeStr = Annotated[str, AfterValidator(_check_upgrade)]
PathPatternStr = Annotated[str, AfterValidator(_check_path)]
MethodStr = Annotated[str, AfterValidator(_check_method)]
CIDRStr = Annotated[str, AfterValidator(_check_cidr)]
HeaderStr = Annotated[str, AfterValidator(_check_header)]
SizeValue = Annotated[int, BeforeValidator(_check_size), WithJsonSchema({
    "anyOf": [{"type": "integer", "minimum": 0},
              {"type": "string", "pattern": _SIZE.pattern}],
    "description": "Bytes, or a number with a unit: '512KB', '1MiB'."})]
PeriodStr = Annotated[str, AfterValidator(_check_period)]
PointerStr = Annotated[str, AfterValidator(_check_pointer)]


class HeaderTransform(_Strict):
    """Which request headers reach the destination: only ``allow``, or all but ``strip``.

    In both forms Cookie and Authorization are removed unless ``allow`` names them; headers that
    the proxy itself writes (Host, framing, a credential it inserts) are never touched.
    """

    allow: list[HeaderStr] | None = Field(
        default=None, description="Only these request headers are sent; the rest are removed.")
    strip: list[HeaderStr] | None = Field(
        default=None, description="These request headers are removed (and Cookie and "
        "Authorization always).")

    @model_validator(mode="after")
    def _one_form(self) -> HeaderTransform:
        if (self.allow is None) == (self.strip is None):
            raise ValueError("headers must have exactly one of allow or strip, like "
                             "{allow: [Accept, Content-Type]} or {strip: [User-Agent]}")
        return self


class Budget(_Strict):
    """How much a rule (or the whole run) may send: requests and request bytes per window."""

    requests: Annotated[int, Field(ge=1)] | None = Field(
        default=None, description="Requests (or tunnels) allowed per window.")
    bytes_out: SizeValue | None = Field(
        default=None, description="Request bytes (target, headers and body) allowed per "
        "window: a number or a size like '1MiB'.")
    per: PeriodStr = Field(
        default="run", description="'run' (the whole run or proxy lifetime) or a sliding "
        "window like '1m', '1h'.")

    @model_validator(mode="after")
    def _something(self) -> Budget:
        if self.requests is None and self.bytes_out is None:
            raise ValueError("budget must set requests, bytes_out or both, like "
                             "{requests: 100, per: 1m}")
        return self


class DynamicLinkLimits(_Strict):
    """Thresholds of the dynamic-link detector (see docs/content.md)."""

    max_data_bytes: Annotated[int, Field(ge=0)] = Field(
        default=32, description="Most bytes of encoded-looking data (hex, base64, random "
        "tokens) one URL may carry in its path, query and wildcard labels.")
    min_token_len: Annotated[int, Field(ge=8, le=256)] = Field(
        default=16, description="Shortest run of characters judged as possible data.")


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
    headers: HeaderTransform | None = Field(
        default=None, description="{allow: [...]} or {strip: [...]}: request headers sent.")
    hash_query: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, description="Query parameters whose values are replaced by a keyed "
        "HMAC: the receiver can correlate them, not read them.")
    hash_json: list[PointerStr] | None = Field(
        default=None, description="JSON pointers into the request body whose values are "
        "replaced by a keyed HMAC.")
    redact_json: list[PointerStr] | None = Field(
        default=None, description="JSON pointers into the request body whose values are "
        "replaced by '[redacted]'.")
    dynamic_links: Literal["deny", "allow"] | DynamicLinkLimits = Field(
        default="deny", description="deny (default): refuse URLs whose path, query or "
        "wildcard labels carry data; allow; or thresholds {max_data_bytes: N}.")
    budget: Budget | None = Field(
        default=None, description="{requests: N, bytes_out: SIZE, per: 1m|run}.")
    via: Literal["any", "courier"] = Field(
        default="any", description="courier: only the courier's requests may use this rule, "
        "so the agent cannot send what the courier's action schemas would refuse.")
    reads: str | None = Field(
        default=None, description="The level of what this destination's responses carry: a "
        "response raises the session's mark to it (one of the policy's levels).")
    level: str | None = Field(
        default=None, description="The highest level this destination may receive: once the "
        "session's mark is above it, requests to it are denied (no write down).")

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

    @field_validator("dynamic_links", mode="before")
    @classmethod
    def _dynamic(cls, value: object) -> object:
        if isinstance(value, dict) or value in ("allow", "deny"):
            return value
        raise ValueError(f"dynamic_links must be 'deny', 'allow' or a mapping like "
                         f"{{max_data_bytes: 64}} (got {value!r})")

    def transform_keys(self) -> list[str]:
        """The keys that change requests; each needs the proxy to see inside them."""
        return [k for k in ("headers", "hash_query", "hash_json", "redact_json")
                if getattr(self, k) is not None]

    @property
    def constrains_requests(self) -> bool:
        """True when the rule looks inside requests (needs HTTP, or inspection for HTTPS)."""
        return (
            self.methods is not None
            or self.paths is not None
            or self.query != "allow"
            or self.max_body_bytes is not None
            or bool(self.transform_keys())
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
        return keys + self.transform_keys()


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

    name: str = Field(min_length=1, description="The environment variable that holds the "
                      "placeholder inside the sandbox.")
    env: str | None = Field(default=None, description="Where the real value is: an "
                            "environment variable of egresslock (removed from the sandbox)...")
    value: str | None = Field(default=None, description="...the value itself...")
    file: str | None = Field(default=None, description="...or a file (hidden behind a "
                             "placeholder file inside the sandbox).")
    hosts: list[HostPatternStr] = Field(
        min_length=1, description="Hosts whose requests get the real value.")
    headers: list[HeaderStr] = Field(
        min_length=1, description="Request headers in which the placeholder is replaced.")

    @model_validator(mode="after")
    def _one_source(self) -> Credential:
        if not _ENV.match(self.name):
            raise ValueError(f"credential name {self.name!r} must be an environment variable "
                             "name (letters, digits, '_'), like GITHUB_TOKEN: the sandbox "
                             "gets the placeholder in that variable")
        given = [k for k in ("value", "env", "file") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"credential {self.name!r} must have exactly one of value, env or file "
                f"(has {', '.join(given) or 'none'})"
            )
        if self.env is not None and not _ENV.match(self.env):
            raise ValueError(f"env {self.env!r} is not an environment variable name")
        return self


class Detectors(_Strict):
    """Built-in detectors of well-known credential shapes; each is on unless set to false."""

    aws: bool = Field(default=True, description="AWS access key ids (AKIA..., ASIA...) and "
                      "aws_secret_access_key assignments.")
    github: bool = Field(default=True, description="GitHub tokens (ghp_, gho_, ghu_, ghs_, "
                         "ghr_, github_pat_).")
    slack: bool = Field(default=True, description="Slack tokens (xoxb-, xoxp-, ...) and "
                        "incoming-webhook URLs.")
    private_key: bool = Field(default=True, description="PEM private-key blocks.")
    jwt: bool = Field(default=True, description="JSON Web Tokens (eyJ...eyJ...sig).")
    connection_string: bool = Field(default=True, description="Database URLs with a password "
                                    "and Azure storage/service-bus connection strings.")


class Content(_Strict):
    """How request content is scanned: detectors, decompression and dynamic-link limits."""

    detectors: Detectors = Field(default_factory=Detectors)
    max_decoded_bytes: SizeValue = Field(
        default=64 * 2**20, description="Largest decompressed size of a gzip/deflate/br "
        "request body; a body that expands past it is denied (decompression bomb).")
    dynamic_links: DynamicLinkLimits = Field(
        default_factory=DynamicLinkLimits, description="Default thresholds of the "
        "dynamic-link detector for rules with dynamic_links: deny.")


class OutputTarget(_Strict):
    """A place rendered output may load images from or link to."""

    host: HostPatternStr
    paths: list[PathPatternStr] | None = None

class Output(_Strict):
    """Where an agent's rendered markdown/HTML may load images from and link to."""

    images: list[OutputTarget] = Field(default_factory=list)
    links: list[OutputTarget] = Field(default_factory=list)


_ACTION_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_TOOL_PATTERN = re.compile(r"^[A-Za-z0-9_*.:/-]{1,128}$")


class ActionRequest(_Strict):
    """The request an action sends: everything but the declared parameters is fixed here."""

    method: MethodStr
    url: str = Field(description="https:// or http:// URL; '{param}' may stand for a whole "
                     "path segment or query value, and is percent-encoded when filled in.")
    headers: dict[HeaderStr, str] = Field(
        default_factory=dict, description="Fixed headers; '{credential.NAME}' inserts the "
        "placeholder of a credential, which the proxy replaces on the wire.")
    body: Any = Field(default=None, description="JSON body template: a string that is "
                      "exactly '{param}' becomes the parameter's JSON value.")


class Action(_Strict):
    """A call the courier makes for the agent: a request template and a parameter schema."""

    name: str = Field(description="How the agent calls it: POST /actions/NAME.")
    description: str = Field(default="", description="Shown to the agent in GET /actions.")
    request: ActionRequest
    params: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON Schema (2020-12) of the parameters: an object whose string "
        "properties need enum, const or pattern, or 'x-free-text: true' with maxLength.")
    reads: str | None = Field(default=None, description="Level the response carries.")
    level: str | None = Field(default=None, description="Highest level the destination may "
                              "receive (no write down).")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _ACTION_NAME.match(value):
            raise ValueError(f"action name {value!r} must be 1-64 lower-case letters, digits "
                             "and '_', beginning with a letter, like create_issue")
        return value


class McpTool(_Strict):
    """What the MCP gateway lets through for tools whose name matches ``name``."""

    name: str = Field(description="Tool name, or a pattern with '*' (any characters).")
    action: Literal["allow", "deny"] = "allow"
    reads: str | None = Field(default=None, description="Level of what its results carry: "
                              "a result raises the session's mark.")
    level: str | None = Field(default=None, description="Highest level its arguments may "
                              "carry: denied once the session's mark is above.")
    arguments: dict[str, Any] | None = Field(
        default=None, description="JSON Schema (2020-12) the call's arguments must satisfy.")
    scan: bool = Field(default=True, description="Refuse arguments holding a secret or a "
                       "dynamic link.")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _TOOL_PATTERN.match(value):
            raise ValueError(f"tool pattern {value!r} must be 1-128 characters of letters, "
                             "digits, '_', '-', '.', ':', '/' and '*'")
        return value


class Mcp(_Strict):
    """The MCP gateway's per-tool policy. The first matching entry decides."""

    tools: list[McpTool] = Field(default_factory=list)
    default: Literal["allow", "deny"] = Field(
        default="deny", description="For tools no entry matches.")


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
    content: Content = Field(default_factory=Content)
    budget: Budget | None = Field(
        default=None, description="A budget for the whole run, over every rule.")
    levels: list[str] | None = Field(
        default=None, min_length=2, description="Ordered data levels, lowest first, like "
        "[public, internal, confidential]; rules name them in reads and level.")
    actions: list[Action] = Field(
        default_factory=list, description="Calls the courier makes for the agent.")
    mcp: Mcp = Field(default_factory=Mcp, description="The MCP gateway's per-tool policy.")

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        for name in value:
            if not _LEVEL.match(name):
                raise ValueError(f"level {name!r} must be a lower-case name of up to 32 "
                                 "letters, digits, '_' and '-', like confidential")
        seen = [n for i, n in enumerate(value) if n in value[:i]]
        if seen:
            raise ValueError(f"level {seen[0]!r} is listed twice; levels are an order, "
                             "lowest first")
        return value

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: object) -> object:
        # Literal[1] compares by equality, so True and 1.0 would pass as 1 even in strict mode.
        if type(value) is not int:
            raise ValueError(f"version must be the integer 1 (got {value!r})")
        return value
