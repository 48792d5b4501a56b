"""Benchmark of the policy core: decisions per second, decision latency, and compile time.

    .venv/bin/python bench/bench_policy.py            # the table
    .venv/bin/python bench/bench_policy.py --json     # the same numbers as JSON
    .venv/bin/python bench/bench_policy.py --quick    # fewer iterations, for a smoke run

Decisions: policies of 10, 1,000 and 10,000 rules, a realistic mix (exact hosts, ``*.`` wildcards,
rules with methods/paths constraints, a few deny rules), asked a mix of requests that are allowed,
denied by a rule's constraint, and denied by default. Throughput is measured in a tight loop;
latency by timing every call with ``time.perf_counter_ns`` (whose own cost, measured and printed,
is included in each sample).

Compile: 100,000 host rules, timed in stages: ``Policy.model_validate`` of the plain data,
``compile_policy`` of the validated Policy, and ``parse_policy`` of the YAML text (YAML + checks +
validation). Targets: p50 under 5 µs at 10,000 rules; ``compile_policy`` of 100,000 rules under 1 s.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from egresslock.policy import (
    CompiledPolicy,
    Layer,
    Policy,
    Request,
    Verdict,
    compile_policy,
    decide,
    parse_policy,
)

TARGET_P50_NS = 5_000
TARGET_COMPILE_S = 1.0

_WORDS = ("api", "cdn", "data", "auth", "login", "static", "files", "hooks", "media", "ws", "img",
          "docs", "status", "admin", "upload", "search", "git", "pkg", "rpc", "edge")
_TLDS = ("com", "net", "org", "io", "dev", "cloud", "example")
_PATH_ROOTS = ("repos", "v1", "v2", "users", "orgs", "projects", "packages", "simple")


def _domain(i: int) -> str:
    return f"svc{i}-{_WORDS[i % len(_WORDS)]}.{_TLDS[i % len(_TLDS)]}"


def rules_data(n: int, seed: int = 7) -> list[dict[str, Any]]:
    """``n`` rules as plain data: 60% exact hosts, 20% wildcards, 18% constrained, 2% deny.

    Kinds follow the index (every run, and every size, gets the same mix, and even 10 rules hold
    each allow kind); the details within a kind are drawn from a seeded generator.
    """
    rng = random.Random(seed)
    rules: list[dict[str, Any]] = []
    for i in range(n):
        slot = i % 50
        rule: dict[str, Any] = {"id": f"r{i}"}
        if slot == 49:
            rule["host"] = f"gist.{_domain(i)}"
            rule["action"] = "deny"
        elif slot % 10 < 6:
            rule["host"] = f"{_WORDS[i % len(_WORDS)]}.{_domain(i)}"
            rule["ports"] = [443]
        elif slot % 10 < 8:
            rule["host"] = f"*.{_domain(i)}"
        else:
            rule["host"] = f"api.{_domain(i)}"
            rule["ports"] = [443]
            rule["inspect"] = True
            rule["methods"] = ["GET", "HEAD"] if rng.random() < 0.7 else ["GET", "POST"]
            root = _PATH_ROOTS[i % len(_PATH_ROOTS)]
            rule["paths"] = [f"/{root}/acme-{i}/**", f"/{root}/*/public/*.json"]
            if rng.random() < 0.5:
                rule["query"] = {"params": ["page", "per_page"], "max_value_len": 32}
                rule["max_body_bytes"] = 65536
        rules.append(rule)
    return rules


def policy_data(n: int) -> dict[str, Any]:
    return {"version": 1, "rules": rules_data(n)}


def policy_yaml(rules: list[dict[str, Any]]) -> str:
    """The policy as a user would write it: block YAML, one key per line."""
    out = ["version: 1", "mode: enforce", "network:", "  block_private: true", "rules:"]
    for rule in rules:
        out.append(f"  - id: {rule['id']}")
        for key, value in rule.items():
            if key != "id":
                out.append(f"    {key}: {json.dumps(value)}")
    return "\n".join(out) + "\n"


@dataclass(frozen=True, slots=True)
class Case:
    kind: str
    request: Request
    expect: Verdict


def request_mix(rules: list[dict[str, Any]], count: int, seed: int = 11) -> list[Case]:
    """Requests against ``rules``: ~45% allowed, ~25% denied by a constraint, ~30% by default."""
    rng = random.Random(seed)
    allow_rules = [r for r in rules if r.get("action") != "deny"]
    constrained = [r for r in allow_rules if "methods" in r]
    cases: list[Case] = []
    for k in range(count):
        roll = rng.random()
        if roll < 0.45:
            rule = rng.choice(allow_rules)
            host = rule["host"].replace("*", f"x{k % 97}.deep", 1)
            if "methods" in rule:
                path = rule["paths"][0].replace("**", f"issues/{k}")
                req = Request(host, 443, "https", "GET", path, "page=2", (), 0, (), Layer.HTTP)
            else:
                req = Request(host, 443, "https", layer=Layer.CONNECT)
            cases.append(Case("allowed", req, Verdict.ALLOW))
        elif roll < 0.70 and constrained:
            rule = rng.choice(constrained)
            if rng.random() < 0.5:
                req = Request(rule["host"], 443, "https", "DELETE", "/repos/acme/x", None, (),
                              None, (), Layer.HTTP)
            else:
                req = Request(rule["host"], 443, "https", "GET", f"/private/{k}/secrets", None,
                              (), None, (), Layer.HTTP)
            cases.append(Case("denied-by-constraint", req, Verdict.DENY))
        else:
            host = f"exfil{k}.{_domain(k + 1_000_003)}"
            req = Request(host, 443, "https", layer=Layer.CONNECT)
            cases.append(Case("default-denied", req, Verdict.DENY))
    return cases


@dataclass
class DecideResult:
    rules: int
    requests: int
    decisions_per_s: float
    p50_ns: int
    p99_ns: int
    p50_allowed_ns: int
    p50_constraint_ns: int
    p50_default_ns: int
    compile_s: float


def _percentile(sorted_ns: list[int], q: float) -> int:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))]


def bench_decide(n: int, iterations: int, mix_size: int) -> DecideResult:
    rules = rules_data(n)
    policy = Policy.model_validate(policy_data(n))
    start = time.perf_counter()
    compiled = compile_policy(policy)
    compile_s = time.perf_counter() - start
    cases = request_mix(rules, mix_size)
    _check_mix(compiled, cases)
    requests = [c.request for c in cases]

    # Throughput: a tight loop, no timer per call.
    for req in requests:
        decide(compiled, req)
    rounds = max(1, iterations // len(requests))
    start_ns = time.perf_counter_ns()
    for _ in range(rounds):
        for req in requests:
            decide(compiled, req)
    elapsed_ns = time.perf_counter_ns() - start_ns
    per_s = rounds * len(requests) / (elapsed_ns / 1e9)

    # Latency: every call timed on its own.
    samples: dict[str, list[int]] = {c.kind: [] for c in cases}
    every: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for case in cases:
            req = case.request
            t0 = clock()
            decide(compiled, req)
            t1 = clock()
            samples[case.kind].append(t1 - t0)
            every.append(t1 - t0)
    every.sort()
    for values in samples.values():
        values.sort()

    def p50(kind: str) -> int:
        return _percentile(samples[kind], 0.5) if samples.get(kind) else 0

    return DecideResult(n, len(every), per_s, _percentile(every, 0.5), _percentile(every, 0.99),
                        p50("allowed"), p50("denied-by-constraint"), p50("default-denied"),
                        compile_s)


def _check_mix(compiled: CompiledPolicy, cases: list[Case]) -> None:
    """The mix must be what it says: a benchmark of the wrong answers measures nothing."""
    for case in cases:
        got = decide(compiled, case.request).verdict
        if got is not case.expect:
            raise SystemExit(f"bench mix is wrong: {case.kind} request {case.request} got {got}")


@dataclass
class CompileResult:
    """Seconds, the median of ``repeat`` runs (``*_min_s``: the fastest), GC enabled as in use."""

    rules: int
    yaml_bytes: int
    repeat: int
    model_validate_s: float
    model_validate_min_s: float
    compile_policy_s: float
    compile_policy_min_s: float
    parse_policy_s: float
    parse_policy_min_s: float
    parse_and_compile_s: float


def _timed(repeat: int, fn: Any) -> tuple[float, float, Any]:
    """Median and minimum seconds of ``repeat`` calls of ``fn``, and its last result."""
    times: list[float] = []
    value = None
    for _ in range(repeat):
        value = None
        gc.collect()
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), value


def bench_compile(n: int, repeat: int) -> CompileResult:
    data = policy_data(n)
    data["rules"] = [{"id": f"h{i}", "host": (f"*.{_domain(i)}" if i % 5 == 0 else
                                               f"{_WORDS[i % len(_WORDS)]}.{_domain(i)}"),
                      "ports": [443]} for i in range(n)]
    text = policy_yaml(data["rules"])
    validate_s, validate_min, policy = _timed(repeat, lambda: Policy.model_validate(data))
    compile_s, compile_min, _ = _timed(repeat, lambda: compile_policy(policy))
    parse_s, parse_min, parsed = _timed(repeat, lambda: parse_policy(text, "bench.yaml"))
    if len(parsed.rules) != n or parsed != policy:
        raise SystemExit("bench: the YAML text and the plain data give different policies")
    return CompileResult(n, len(text.encode()), repeat, validate_s, validate_min, compile_s,
                         compile_min, parse_s, parse_min, parse_s + compile_s)


def _timer_cost_ns() -> int:
    clock = time.perf_counter_ns
    samples = []
    for _ in range(100_000):
        t0 = clock()
        t1 = clock()
        samples.append(t1 - t0)
    samples.sort()
    return samples[len(samples) // 2]


def _us(ns: float) -> str:
    return f"{ns / 1000:.2f} µs"


def print_table(results: list[DecideResult], comp: CompileResult, timer_ns: int) -> None:
    print(f"egresslock policy core, Python {platform.python_version()} on {platform.machine()}"
          f" ({platform.system()}); perf_counter_ns cost {timer_ns} ns per sample")
    print()
    head = (f"{'rules':>7} {'decisions/s':>12} {'p50':>9} {'p99':>9} {'p50 allow':>10} "
            f"{'p50 constr':>11} {'p50 default':>12} {'compile':>9}")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r.rules:>7,} {r.decisions_per_s:>12,.0f} {_us(r.p50_ns):>9} {_us(r.p99_ns):>9} "
              f"{_us(r.p50_allowed_ns):>10} {_us(r.p50_constraint_ns):>11} "
              f"{_us(r.p50_default_ns):>12} {r.compile_s * 1000:>7.1f}ms")
    big = results[-1]
    ok = "met" if big.p50_ns < TARGET_P50_NS else "MISSED"
    print(f"target p50 < {_us(TARGET_P50_NS)} at {big.rules:,} rules: {ok}")
    print()
    print(f"compile of {comp.rules:,} host rules ({comp.yaml_bytes / 1e6:.1f} MB of YAML), "
          f"median of {comp.repeat} runs (fastest):")
    rows = [
        ("compile_policy (validated Policy -> CompiledPolicy)", comp.compile_policy_s,
         comp.compile_policy_min_s),
        ("Policy.model_validate (plain data -> Policy)", comp.model_validate_s,
         comp.model_validate_min_s),
        ("parse_policy (YAML text -> Policy, all checks)", comp.parse_policy_s,
         comp.parse_policy_min_s),
        ("parse_policy + compile_policy (file to decisions)", comp.parse_and_compile_s, None),
    ]
    for label, median, fastest in rows:
        extra = f"  ({fastest:.3f} s)" if fastest is not None else ""
        print(f"  {label:<52} {median:>7.3f} s{extra}")
    ok = "met" if comp.compile_policy_s < TARGET_COMPILE_S else "MISSED"
    print(f"target compile_policy < {TARGET_COMPILE_S:.0f} s: {ok}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    parser.add_argument("--iterations", type=int, default=None,
                        help="decisions per policy size (default 300,000; --quick 30,000)")
    parser.add_argument("--compile-rules", type=int, default=100_000,
                        help="rules in the compile benchmark (default 100,000)")
    args = parser.parse_args(argv)
    iterations = args.iterations or (30_000 if args.quick else 300_000)
    repeat = 1 if args.quick else 5

    timer_ns = _timer_cost_ns()
    results = [bench_decide(n, iterations, 3_000) for n in (10, 1_000, 10_000)]
    comp = bench_compile(args.compile_rules, repeat)
    if args.json:
        json.dump({
            "python": platform.python_version(),
            "machine": platform.machine(),
            "timer_cost_ns": timer_ns,
            "decide": [asdict(r) for r in results],
            "compile": asdict(comp),
            "targets": {
                "p50_ns_at_10000_rules": TARGET_P50_NS,
                "p50_met": results[-1].p50_ns < TARGET_P50_NS,
                "compile_policy_s": TARGET_COMPILE_S,
                "compile_met": comp.compile_policy_s < TARGET_COMPILE_S,
            },
        }, sys.stdout, indent=2)
        print()
    else:
        print_table(results, comp, timer_ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
