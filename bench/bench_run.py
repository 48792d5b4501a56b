"""Benchmark of ``egresslock run`` start-up: the wall time of wrapping a command that does nothing.

    .venv/bin/python bench/bench_run.py            # the table
    .venv/bin/python bench/bench_run.py --json     # the same numbers as JSON
    .venv/bin/python bench/bench_run.py --runs 10  # fewer runs, for a smoke run

Rows, each the wall time of one process from spawn to exit, ``--runs`` times (default 50) after a
few warm-up runs:

* ``/bin/true`` bare, the baseline;
* ``bwrap --unshare-net --dev-bind / / /bin/true`` (skipped when bwrap is not installed);
* ``egresslock run -p <minimal policy> -- /bin/true``, transparent capture on (the default) and
  with ``--no-transparent``;
* ``python -c pass`` and ``python -c "import egresslock.cli.main"``: how much of egresslock's
  overhead is the interpreter's own start-up and the import of the CLI.

The target (issue 5) is under 60 ms of overhead over bare ``/bin/true`` at p50. As root,
``egresslock run`` runs the command as nobody; the audit database goes to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / ".venv" / "bin"
TARGET_OVERHEAD_MS = 60.0
MINIMAL_POLICY = "version: 1\nrules:\n  - id: nothing\n    host: example.invalid\n"


@dataclass
class Row:
    name: str
    runs: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    overhead_p50_ms: float = 0.0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_command(argv: list[str], runs: int, warmup: int, cwd: str) -> list[float]:
    """Wall time of each run in ms; a run that fails stops the benchmark (it measures nothing)."""
    samples: list[float] = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        elapsed = (time.perf_counter() - start) * 1000
        if done.returncode != 0:
            raise SystemExit(f"bench: {' '.join(argv)} exited {done.returncode}: "
                             f"{done.stderr.decode(errors='replace').strip()}")
        if i >= warmup:
            samples.append(elapsed)
    return samples


def row(name: str, samples: list[float]) -> Row:
    return Row(name, len(samples), statistics.median(samples), _percentile(samples, 0.99),
               statistics.fmean(samples), min(samples))


def commands(work: Path) -> list[tuple[str, list[str] | None]]:
    policy = work / "policy.yaml"
    policy.write_text(MINIMAL_POLICY)
    audit = work / "audit.db"
    python = str(BIN / "python")
    egresslock = [str(BIN / "egresslock"), "run", "-q", "-p", str(policy), "--audit", str(audit)]
    bwrap = shutil.which("bwrap")
    return [
        ("/bin/true", ["/bin/true"]),
        ("bwrap --unshare-net /bin/true",
         [bwrap, "--unshare-net", "--dev-bind", "/", "/", "/bin/true"] if bwrap else None),
        ("egresslock run -- /bin/true", [*egresslock, "--", "/bin/true"]),
        ("egresslock run --no-transparent -- /bin/true",
         [*egresslock, "--no-transparent", "--", "/bin/true"]),
        ("python -c pass", [python, "-c", "pass"]),
        ("python -c 'import egresslock.cli.main'", [python, "-c", "import egresslock.cli.main"]),
    ]


def print_table(rows: list[Row], skipped: list[str], runs: int) -> None:
    print(f"egresslock run start-up, {runs} runs each, Python {platform.python_version()} on "
          f"{platform.machine()} ({platform.system()} {platform.release()}), "
          f"uid {os.geteuid()}")
    print()
    head = f"{'command':<46} {'p50':>9} {'p99':>9} {'mean':>9} {'min':>9} {'overhead p50':>13}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.name:<46} {r.p50_ms:>7.1f}ms {r.p99_ms:>7.1f}ms {r.mean_ms:>7.1f}ms "
              f"{r.min_ms:>7.1f}ms {r.overhead_p50_ms:>+11.1f}ms")
    for name in skipped:
        print(f"{name:<46} skipped (not installed)")
    by = {r.name: r for r in rows}
    run = by["egresslock run -- /bin/true"]
    ok = "met" if run.overhead_p50_ms < TARGET_OVERHEAD_MS else "MISSED"
    print(f"target: overhead of egresslock run under {TARGET_OVERHEAD_MS:.0f} ms at p50: {ok}")
    py = by["python -c pass"].overhead_p50_ms
    imp = by["python -c 'import egresslock.cli.main'"].overhead_p50_ms
    share = (py / run.overhead_p50_ms * 100) if run.overhead_p50_ms > 0 else 0.0
    print(f"of egresslock's {run.overhead_p50_ms:.1f} ms: the interpreter's start-up is "
          f"{py:.1f} ms ({share:.0f}%), importing the CLI adds {imp - py:.1f} ms, the rest "
          f"(sandbox set-up, proxy start, audit log, end of run) {run.overhead_p50_ms - imp:.1f} "
          "ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per command (50)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (3)")
    args = parser.parse_args(argv)

    rows: list[Row] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="egresslock-bench-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # as root the command runs as nobody, in this directory
        for name, cmd in commands(work):
            if cmd is None:
                skipped.append(name)
                continue
            rows.append(row(name, time_command(cmd, args.runs, args.warmup, tmp)))
    base = rows[0].p50_ms
    for r in rows:
        r.overhead_p50_ms = r.p50_ms - base
    if args.json:
        json.dump({"python": platform.python_version(), "machine": platform.machine(),
                   "uid": os.geteuid(), "runs": args.runs,
                   "rows": [asdict(r) for r in rows], "skipped": skipped,
                   "target_overhead_ms": TARGET_OVERHEAD_MS}, sys.stdout, indent=2)
        print()
    else:
        print_table(rows, skipped, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
