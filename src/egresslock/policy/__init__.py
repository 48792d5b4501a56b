"""The policy core: parse, validate, compile, decide. Pure: nothing here does network I/O.

Every enforcement point (proxy, DNS stub, sanitizer, courier, MCP gateway, compilers) asks the
same compiled policy, so one file means one behaviour everywhere.
"""

from egresslock.policy.address import AddressClass, AddressPolicy, classify_address
from egresslock.policy.compiled import CompiledPolicy, compile_policy
from egresslock.policy.decide import Decision, Layer, Request, Verdict, decide
from egresslock.policy.loader import load_policy, parse_policy, strict_warnings
from egresslock.policy.model import Policy
from egresslock.policy.normalize import (
    URL,
    normalize_host,
    normalize_path,
    parse_ip_literal,
    parse_url,
)

__all__ = [
    "URL",
    "AddressClass",
    "AddressPolicy",
    "CompiledPolicy",
    "Decision",
    "Layer",
    "Policy",
    "Request",
    "Verdict",
    "classify_address",
    "compile_policy",
    "decide",
    "load_policy",
    "normalize_host",
    "normalize_path",
    "parse_ip_literal",
    "parse_policy",
    "parse_url",
    "strict_warnings",
]
