"""Change the sandbox's own network: routes, addresses and nftables rules, by tool."""
import subprocess

from _common import attempt, report


def run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if done.returncode != 0:
        raise OSError(1, f"{argv[0]} exited {done.returncode}: {done.stderr.strip()[:200]}")
    return done.stdout


attempt("ip-route-add", lambda: run("ip", "route", "add", "203.0.113.0/24", "dev", "lo"))
attempt("ip-addr-add", lambda: run("ip", "addr", "add", "203.0.113.7/32", "dev", "lo"))
attempt("nft-add-table", lambda: run("nft", "add", "table", "inet", "x"))
attempt("nft-flush", lambda: run("nft", "flush", "ruleset"))
attempt("nft-list", lambda: run("nft", "list", "ruleset"))
report()
