"""Benchmark of ``egresslock run`` start-up: the wall time of wrapping a command that does nothing.

    .venv/bin/python bench/bench_run.py            # the table
    .venv/bin/python bench/bench_run.py --json     # the same numbers as JSON
    .venv/bin/python bench/bench_run.py --runs 10  # fewer runs, for a smoke run

Rows, each the wall time of one process from spawn to exit, ``--runs`` times (default 50) after a
few warm-up runs:

* ``/bin/true`` bare, the baseline;
* ``bwrap --unshare-net --dev-bind / / /bin/true`` (skipped when bwrap is not installed);
* ``egresslock run -p <minimal policy> -- /bin/true`` cold (``EGRESSLOCK_WARM=off``: every run
  imports egresslock and parses the policy), transparent capture on (the default) and with
  ``--no-transparent``;
* the same through a warm server (``egresslock warm serve``, started by this script under a name
  of its own and stopped at the end): what a user who wraps every tool call gets;
* ``python -c pass``, ``python -c "import egresslock.cli.warm_client"`` and
  ``python -c "import egresslock.cli.main"``: how much of the overhead is the interpreter's own
  start-up, the warm client's imports, and the import of the CLI a cold run pays.

The target (issue 5) is under 60 ms of overhead over bare ``/bin/true`` at p50. As root,
``egresslock run`` runs the command as nobody; the audit database goes to a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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


def time_command(argv: list[str], runs: int, warmup: int, cwd: str,
                 env: dict[str, str]) -> list[float]:
    """Wall time of each run in ms; a run that fails stops the benchmark (it measures nothing)."""
    samples: list[float] = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
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


COLD = "cold: egresslock run -- /bin/true"
WARM = "warm: egresslock run -- /bin/true"
PYTHON = "python -c pass"
CLIENT = "python -c 'import egresslock.cli.warm_client'"
CLI = "python -c 'import egresslock.cli.main'"


def commands(work: Path) -> list[tuple[str, list[str] | None, bool]]:
    """(row name, argv or None when not installed, whether it runs with the warm server)."""
    policy = work / "policy.yaml"
    policy.write_text(MINIMAL_POLICY)
    audit = work / "audit.db"
    python = str(BIN / "python")
    egresslock = [str(BIN / "egresslock"), "run", "-q", "-p", str(policy), "--audit", str(audit)]
    bwrap = shutil.which("bwrap")
    return [
        ("/bin/true", ["/bin/true"], False),
        ("bwrap --unshare-net /bin/true",
         [bwrap, "--unshare-net", "--dev-bind", "/", "/", "/bin/true"] if bwrap else None, False),
        (COLD, [*egresslock, "--", "/bin/true"], False),
        ("cold: egresslock run --no-transparent -- /bin/true",
         [*egresslock, "--no-transparent", "--", "/bin/true"], False),
        (WARM, [*egresslock, "--", "/bin/true"], True),
        ("warm: egresslock run --no-transparent -- /bin/true",
         [*egresslock, "--no-transparent", "--", "/bin/true"], True),
        (PYTHON, [python, "-c", "pass"], False),
        (CLIENT, [python, "-c", "import egresslock.cli.warm_client"], False),
        (CLI, [python, "-c", "import egresslock.cli.main"], False),
    ]


@contextlib.contextmanager
def warm_server(env: dict[str, str]) -> Iterator[None]:
    """A warm server of this benchmark's own, for the rows that use one."""
    server = subprocess.Popen([str(BIN / "egresslock"), "warm", "serve", "--idle", "10m"],
                              env=env, cwd="/", stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert server.stderr is not None
    line = server.stderr.readline().decode()
    if not line.startswith("listening on"):
        server.kill()
        raise SystemExit(f"bench: the warm server did not start: {line}")
    try:
        yield
    finally:
        server.terminate()
        server.wait(timeout=10)


def check_warm(env: dict[str, str], expected: int) -> None:
    """The warm rows were warm: the server took every one of their runs."""
    done = subprocess.run([str(BIN / "egresslock"), "warm", "status", "--json"], env=env,
                          capture_output=True, text=True, check=False)
    runs = json.loads(done.stdout).get("runs") if done.stdout.strip() else None
    if runs != expected:
        raise SystemExit(f"bench: the warm server took {runs} runs, not {expected}: the warm "
                         "rows would time cold runs")


def print_table(rows: list[Row], skipped: list[str], runs: int) -> None:
    print(f"egresslock run start-up, {runs} runs each, Python {platform.python_version()} on "
          f"{platform.machine()} ({platform.system()} {platform.release()}), "
          f"uid {os.geteuid()}")
    print()
    head = f"{'command':<52} {'p50':>9} {'p99':>9} {'mean':>9} {'min':>9} {'overhead p50':>13}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r.name:<52} {r.p50_ms:>7.1f}ms {r.p99_ms:>7.1f}ms {r.mean_ms:>7.1f}ms "
              f"{r.min_ms:>7.1f}ms {r.overhead_p50_ms:>+11.1f}ms")
    for name in skipped:
        print(f"{name:<52} skipped (not installed)")
    by = {r.name: r for r in rows}
    py = by[PYTHON].overhead_p50_ms
    for name in (WARM, COLD):
        run = by[name]
        ok = "met" if run.overhead_p50_ms < TARGET_OVERHEAD_MS else "MISSED"
        print(f"target: overhead under {TARGET_OVERHEAD_MS:.0f} ms at p50, {name.split(':')[0]}: "
              f"{ok} ({run.overhead_p50_ms:.1f} ms)")
    warm, cold = by[WARM].overhead_p50_ms, by[COLD].overhead_p50_ms
    client = by[CLIENT].overhead_p50_ms
    cli = by[CLI].overhead_p50_ms
    print(f"warm, {warm:.1f} ms: the interpreter's start-up {py:.1f} ms "
          f"({_share(py, warm)}), the client's imports {client - py:.1f} ms, the rest (the "
          f"server's checks and fork, sandbox set-up, proxy start, audit log, end of run) "
          f"{warm - client:.1f} ms")
    print(f"cold, {cold:.1f} ms: the interpreter's start-up {py:.1f} ms ({_share(py, cold)}), "
          f"importing the CLI {cli - py:.1f} ms, the rest (the run's own imports, the policy, "
          f"sandbox set-up, proxy start, audit log, end of run) {cold - cli:.1f} ms")


def _share(part: float, whole: float) -> str:
    return f"{part / whole * 100:.0f}%" if whole > 0 else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per command (50)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs first (3)")
    args = parser.parse_args(argv)

    rows: list[Row] = []
    skipped: list[str] = []
    cold_env = {**os.environ, "EGRESSLOCK_WARM": "off"}
    warm_env = {**os.environ, "EGRESSLOCK_WARM_NAME": f"bench{os.getpid()}"}
    warm_env.pop("EGRESSLOCK_WARM", None)
    with tempfile.TemporaryDirectory(prefix="egresslock-bench-") as tmp, warm_server(warm_env):
        work = Path(tmp)
        work.chmod(0o755)  # as root the command runs as nobody, in this directory
        warm_runs = 0
        for name, cmd, warm in commands(work):
            if cmd is None:
                skipped.append(name)
                continue
            env = warm_env if warm else cold_env
            rows.append(row(name, time_command(cmd, args.runs, args.warmup, tmp, env)))
            if warm:
                warm_runs += args.runs + args.warmup
                check_warm(warm_env, warm_runs)
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
