"""Benchmark of the content checks: secret-scan throughput, and the latency scanning adds to a
proxied 1 MB POST.

    .venv/bin/python bench/bench_content.py            # the table, about a minute
    .venv/bin/python bench/bench_content.py --quick    # 10 MB and 10 POSTs: a smoke run

Throughput: 100 bodies of 1 MiB (about 105 MB), a mix of JSON chat payloads, prose, form-urlencoded
data, base64 blobs and HTML. 100 declared secrets, each planted once in one body, in an encoding
that cycles through all the scanner reads (plain, upper-case, base64 and base64url at every
alignment inside a random blob, hex in both cases, percent-encoding of a random subset once and
twice, '+' for space, JSON \\u escapes). The scanner holds those 100 secrets and every built-in
detector, as a policy with ``secrets:`` would. Two ways are timed on one core:
``Scanner.scan`` of each whole body, and ``StreamScanner`` fed 64 KiB chunks, as the proxy feeds
it. Before any number is printed, each planted secret must have been found in its body, so the
benchmark cannot time wrong answers. Target (issue 6): 300 MB/s on one core.

Latency: a loopback sink (a separate process: reads the body, answers 200) and two real proxies
(``egresslock proxy``), one with the same 100 secrets and the detectors on, one with no secrets
and every detector off (its scanner is empty, so bodies pass unscanned). Each round POSTs the
same clean 1 MB body directly, through the proxy without scanning and through the one with,
each on its own keep-alive connection, in rotating order. Reported: p50, p90 and mean, the
scanning proxy's p50 over the non-scanning one's, and the difference.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench_proxy import read_line
from bench_proxy import stop_process as stop
from egresslock.content.detectors import DETECTORS
from egresslock.content.scanner import Kind, Needle, Scanner, StreamScanner

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
CHUNK = 64 * 1024
TARGET_MBPS = 300.0
LOOPBACK = "127.0.0.1"

_WORDS = ("the", "request", "model", "agent", "token", "proxy", "policy", "summary", "data",
          "network", "value", "report", "error", "status", "update", "file", "user", "build",
          "release", "package", "version", "review", "change", "test", "deploy", "config",
          "service", "region", "cluster", "metric", "latency", "throughput", "queue", "worker")


# -- secrets and their encodings --------------------------------------------------------------

def make_secrets(n: int, rng: random.Random) -> list[tuple[str, bytes]]:
    """``n`` secrets shaped like API keys and passwords; every tenth holds spaces."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    out = []
    for i in range(n):
        if i % 10 == 9:
            value = " ".join(rng.choice(_WORDS) for _ in range(4)) + f" {rng.randrange(10**6)}"
        else:
            prefix = rng.choice(("sk-live-", "tok_", "key-", "pat_", ""))
            value = prefix + "".join(rng.choice(alphabet) for _ in range(rng.randint(20, 40)))
        out.append((f"secret-{i:03d}", value.encode()))
    return out


def _percent(data: bytes, rng: random.Random, twice: bool) -> bytes:
    return "".join((f"%25{b:02X}" if twice else f"%{b:02X}") if rng.random() < 0.5 else chr(b)
                   for b in data).encode("latin-1")


def _b64_blob(data: bytes, rng: random.Random, urlsafe: bool) -> bytes:
    blob = rng.randbytes(rng.randint(0, 300)) + data + rng.randbytes(rng.randint(0, 300))
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(blob)


ENCODINGS: list[tuple[str, Callable[[bytes, random.Random], bytes]]] = [
    ("plain", lambda s, r: s),
    ("upper-case", lambda s, r: s.upper()),
    ("base64 in a blob", lambda s, r: _b64_blob(s, r, urlsafe=False)),
    ("base64url in a blob", lambda s, r: _b64_blob(s, r, urlsafe=True)),
    ("hex", lambda s, r: s.hex().encode()),
    ("HEX", lambda s, r: s.hex().upper().encode()),
    ("percent-encoded subset", lambda s, r: _percent(s, r, twice=False)),
    ("percent-encoded twice", lambda s, r: _percent(s, r, twice=True)),
    ("'+' for space", lambda s, r: s.replace(b" ", b"+") if b" " in s else _percent(s, r, False)),
    ("JSON \\u escapes", lambda s, r: "".join(f"\\u{b:04x}" for b in s).encode()),
]


# -- bodies -------------------------------------------------------------------------------------

def _prose(rng: random.Random, size: int) -> str:
    words: list[str] = []
    length = 0
    while length < size:
        sentence = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(6, 18))).capitalize()
        words.append(sentence + ".")
        length += len(sentence) + 2
    return " ".join(words)[:size]


def body_json(rng: random.Random, size: int) -> bytes:
    messages, length = [], 0
    while length < size:
        text = _prose(rng, rng.randint(200, 2000)) + "\n\n- café, naïve, ✓"
        messages.append({"role": rng.choice(("user", "assistant")), "content": text})
        length += len(text) + 40
    return json.dumps({"model": "m-1", "messages": messages}).encode()[:size]


def body_prose(rng: random.Random, size: int) -> bytes:
    return _prose(rng, size).encode()


def body_form(rng: random.Random, size: int) -> bytes:
    parts, length = [], 0
    while length < size:
        value = _prose(rng, rng.randint(10, 80)).replace(" ", "+").replace(".", "%2E")
        part = f"{rng.choice(_WORDS)}_{rng.randrange(100)}={value}&email=a%40b.example"
        parts.append(part)
        length += len(part) + 1
    return "&".join(parts).encode()[:size]


def body_base64(rng: random.Random, size: int) -> bytes:
    return base64.b64encode(rng.randbytes(size * 3 // 4 + 3))[:size]


def body_html(rng: random.Random, size: int) -> bytes:
    parts, length = ["<!doctype html><html><body>"], 0
    while length < size:
        p = (f"<div class=\"c{rng.randrange(50)}\"><a href=\"/docs/{rng.choice(_WORDS)}\">"
             f"{rng.choice(_WORDS)}</a><p>{_prose(rng, rng.randint(80, 400))}</p></div>\n")
        parts.append(p)
        length += len(p)
    return "".join(parts).encode()[:size]


KINDS: list[tuple[str, Callable[[random.Random, int], bytes]]] = [
    ("JSON", body_json), ("prose", body_prose), ("form-urlencoded", body_form),
    ("base64 blob", body_base64), ("HTML", body_html),
]


@dataclass(frozen=True)
class Body:
    kind: str
    data: bytes
    secret: str    # the name of the secret planted in it
    encoding: str


def build_bodies(count: int, secrets: list[tuple[str, bytes]], rng: random.Random) -> list[Body]:
    """``count`` bodies of about 1 MiB, kinds and encodings in rotation, one secret in each.

    Three distinct templates per kind are made and reused: the scanner's speed depends on the
    bytes' shape, not on their being new, and making 100 MB of text in Python would take longer
    than scanning it.
    """
    templates = {name: [make(rng, MiB) for _ in range(3)] for name, make in KINDS}
    bodies = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)][0]
        base = templates[kind][(i // len(KINDS)) % 3]
        name, value = secrets[i % len(secrets)]
        enc_name, encode = ENCODINGS[i % len(ENCODINGS)]
        at = rng.randrange(len(base))
        bodies.append(Body(kind, base[:at] + b" " + encode(value, rng) + b" " + base[at:], name,
                           enc_name))
    return bodies


# -- throughput ---------------------------------------------------------------------------------

def scan_whole(scanner: Scanner, bodies: list[Body]) -> tuple[float, dict[str, float],
                                                              list[set[str]]]:
    """Seconds for ``Scanner.scan`` of every body, seconds per kind, names found per body."""
    per_kind: dict[str, float] = {}
    found = []
    total = 0.0
    for body in bodies:
        t0 = time.perf_counter()
        hits = scanner.scan(body.data)
        dt = time.perf_counter() - t0
        total += dt
        per_kind[body.kind] = per_kind.get(body.kind, 0.0) + dt
        found.append({h.name for h in hits})
    return total, per_kind, found


def scan_stream(scanner: Scanner, bodies: list[Body]) -> tuple[float, dict[str, float],
                                                               list[set[str]]]:
    """The same through ``StreamScanner`` in 64 KiB chunks, fed to the end after a hit (a proxy
    would stop there; the benchmark times the whole body)."""
    per_kind: dict[str, float] = {}
    found = []
    total = 0.0
    for body in bodies:
        data = body.data
        names: set[str] = set()
        t0 = time.perf_counter()
        stream = StreamScanner(scanner)
        for off in range(0, len(data), CHUNK):
            _, hits = stream.feed(data[off:off + CHUNK])
            names.update(h.name for h in hits)
        stream.finish()
        dt = time.perf_counter() - t0
        total += dt
        per_kind[body.kind] = per_kind.get(body.kind, 0.0) + dt
        found.append(names)
    return total, per_kind, found


def check_found(bodies: list[Body], found: list[set[str]], how: str) -> None:
    missed = [f"{b.secret} ({b.encoding}, {b.kind})" for b, f in zip(bodies, found, strict=True)
              if b.secret not in f]
    if missed:
        raise SystemExit(f"{how}: {len(missed)} planted secrets not found: {missed[:10]}")


def throughput(bodies: list[Body], secrets: list[tuple[str, bytes]], passes: int
               ) -> dict[str, object]:
    t0 = time.perf_counter()
    scanner = Scanner([Needle(n, v, Kind.SECRET) for n, v in secrets], DETECTORS)
    build_s = time.perf_counter() - t0
    size = sum(len(b.data) for b in bodies)
    out: dict[str, object] = {"bytes": size, "build_ms": build_s * 1000,
                              "hold_back": scanner.hold_back}
    for mode, run in (("scan", scan_whole), ("stream", scan_stream)):
        runs = []
        for _ in range(passes):
            total, per_kind, found = run(scanner, bodies)
            check_found(bodies, found, mode)
            runs.append((total, per_kind))
        best_total, best_kind = min(runs, key=lambda r: r[0])
        kind_bytes = {k: sum(len(b.data) for b in bodies if b.kind == k) for k in best_kind}
        out[mode] = {"mbps": size / best_total / 1e6,
                     "median_mbps": size / statistics.median(r[0] for r in runs) / 1e6,
                     "kinds": {k: kind_bytes[k] / t / 1e6 for k, t in best_kind.items()}}
    return out


# -- latency through the proxy --------------------------------------------------------------------

async def _sink_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _sink_main() -> None:
    server = await asyncio.start_server(_sink_conn, LOOPBACK, 0)
    print(f"listening on {LOOPBACK}:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def start(argv: list[str], procs: list[subprocess.Popen[bytes]]) -> int:
    """Start ``argv``, wait for its ``listening on HOST:PORT`` line, return the port."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    procs.append(proc)
    line = read_line(proc, 30)
    if not line.startswith("listening on "):
        raise RuntimeError(f"{argv[0]}: unexpected first line {line!r}")
    return int(line.rsplit(":", 1)[1])


def policy_text(port: int, secrets: list[tuple[str, bytes]] | None) -> str:
    text = f"""version: 1
network: {{allow_ranges: [127.0.0.0/8]}}
rules:
  - {{id: sink, host: {LOOPBACK}, ports: [{port}], dynamic_links: allow}}
"""
    if secrets is None:
        detectors = ", ".join(f"{d}: false" for d in ("aws", "github", "slack", "private_key",
                                                      "jwt", "connection_string"))
        return text + f"content: {{detectors: {{{detectors}}}}}\n"
    return text + "secrets:\n" + "".join(
        f"  - {{name: {name}, value: {json.dumps(value.decode())}}}\n" for name, value in secrets)


def _stats(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    return {"p50": statistics.median(ms), "p90": ms[int(0.9 * (len(ms) - 1))],
            "mean": statistics.fmean(ms)}


def latency(secrets: list[tuple[str, bytes]], posts: int, rng: random.Random
            ) -> dict[str, object]:
    import requests

    exe = ROOT / ".venv" / "bin" / "egresslock"
    egl = [str(exe)] if exe.exists() else [sys.executable, "-m", "egresslock"]
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="bench-content-") as tmp:
        try:
            sink = start([sys.executable, __file__, "_sink"], procs)
            ports = {}
            for mode, with_secrets in (("off", None), ("on", secrets)):
                policy = Path(tmp) / f"policy-{mode}.yaml"
                policy.write_text(policy_text(sink, with_secrets))
                ports[mode] = start([*egl, "proxy", "-p", str(policy), "--listen",
                                     f"{LOOPBACK}:0", "--audit", f"{tmp}/audit-{mode}.db"], procs)
            sessions = {"direct": requests.Session()}
            for mode, port in ports.items():
                s = requests.Session()
                s.proxies = {"http": f"http://{LOOPBACK}:{port}"}
                sessions[f"proxy, scanning {mode}"] = s
            for s in sessions.values():
                s.trust_env = False
            url = f"http://{LOOPBACK}:{sink}/upload"
            body = body_json(rng, 1_000_000)
            # Scanning must really be on: the same POST with a secret in it is refused.
            leak = body[:500_000] + secrets[0][1].hex().encode() + body[500_000:]
            refused = sessions["proxy, scanning on"].post(url, data=leak, timeout=60)
            passed = sessions["proxy, scanning off"].post(url, data=leak, timeout=60)
            if refused.status_code != 403 or passed.status_code != 200:
                raise SystemExit(f"sanity check failed: scanning proxy answered "
                                 f"{refused.status_code}, non-scanning {passed.status_code}")
            names = list(sessions)
            samples: dict[str, list[float]] = {n: [] for n in names}
            for i in range(posts + 5):
                for name in names[i % 3:] + names[:i % 3]:
                    t0 = time.perf_counter()
                    r = sessions[name].post(url, data=body, timeout=60)
                    dt = time.perf_counter() - t0
                    if r.status_code != 200:
                        raise SystemExit(f"{name}: POST answered {r.status_code}: {r.text[:200]}")
                    if i >= 5:  # five rounds of warm-up
                        samples[name].append(dt)
            return {"body_bytes": len(body), "posts": posts,
                    "sanity": f"1 MB POST with a hex secret: {refused.status_code} scanning, "
                              f"{passed.status_code} not",
                    "rows": {n: _stats(v) for n, v in samples.items()}}
        finally:
            for proc in reversed(procs):
                stop(proc)


# -- output ---------------------------------------------------------------------------------------

def print_table(tp: dict[str, object], lat: dict[str, object] | None, n_secrets: int,
                planted: int) -> None:
    print(f"egresslock content checks, Python {platform.python_version()} on "
          f"{platform.machine()} ({platform.system()}), one core\n")
    size = tp["bytes"]
    assert isinstance(size, int)
    print(f"scan throughput: {len(KINDS)} body kinds, {size / 1e6:.1f} MB, {planted} secrets "
          f"planted in {min(planted, len(ENCODINGS))} encodings, all found; scanner of "
          f"{n_secrets} secrets + {len(DETECTORS)} detectors built in {tp['build_ms']:.0f} ms, "
          f"hold-back {tp['hold_back']} bytes\n")
    scan, stream = tp["scan"], tp["stream"]
    assert isinstance(scan, dict)
    assert isinstance(stream, dict)
    print(f"{'body kind':<18}{'Scanner.scan MB/s':>20}{'StreamScanner 64 KiB MB/s':>28}")
    print("-" * 66)
    for kind in scan["kinds"]:
        print(f"{kind:<18}{scan['kinds'][kind]:>20.0f}{stream['kinds'][kind]:>28.0f}")
    print("-" * 66)
    print(f"{'mixed (best)':<18}{scan['mbps']:>20.0f}{stream['mbps']:>28.0f}")
    print(f"{'mixed (median)':<18}{scan['median_mbps']:>20.0f}{stream['median_mbps']:>28.0f}")
    met = "met" if min(scan["mbps"], stream["mbps"]) >= TARGET_MBPS else "MISSED"
    print(f"target {TARGET_MBPS:.0f} MB/s on one core: {met}\n")
    if lat is None:
        return
    rows = lat["rows"]
    assert isinstance(rows, dict)
    print(f"proxied POST of {lat['body_bytes']:,} bytes, {lat['posts']} per row after 5 warm-up "
          f"rounds, keep-alive, loopback sink; {lat['sanity']}\n")
    print(f"{'path':<24}{'p50 ms':>10}{'p90 ms':>10}{'mean ms':>10}")
    print("-" * 54)
    for name, st in rows.items():
        print(f"{name:<24}{st['p50']:>10.2f}{st['p90']:>10.2f}{st['mean']:>10.2f}")
    on, off = rows["proxy, scanning on"]["p50"], rows["proxy, scanning off"]["p50"]
    print("-" * 54)
    print(f"scanning on / off, p50: {on / off:.2f}x ({on - off:+.2f} ms added by scanning)")


def main() -> None:
    if sys.argv[1:] == ["_sink"]:
        asyncio.run(_sink_main())
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="10 MB, 1 pass, 10 POSTs")
    ap.add_argument("--mb", type=int, help="bodies of 1 MiB to scan (default 100)")
    ap.add_argument("--passes", type=int, help="timed passes per scan mode (default 3)")
    ap.add_argument("--posts", type=int, help="timed POSTs per row (default 100)")
    ap.add_argument("--no-proxy", action="store_true", help="skip the latency part")
    args = ap.parse_args()
    count = args.mb or (10 if args.quick else 100)
    passes = args.passes or (1 if args.quick else 3)
    posts = args.posts or (10 if args.quick else 100)
    rng = random.Random(6)
    secrets = make_secrets(100, rng)
    print(f"building {count} bodies...", file=sys.stderr)
    bodies = build_bodies(count, secrets, rng)
    print("timing scans...", file=sys.stderr)
    tp = throughput(bodies, secrets, passes)
    lat = None
    if not args.no_proxy:
        print("timing proxied POSTs...", file=sys.stderr)
        lat = latency(secrets, posts, rng)
    print_table(tp, lat, len(secrets), len(bodies))


if __name__ == "__main__":
    main()
