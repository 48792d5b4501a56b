"""The nftables and iptables targets against the real kernel, in throwaway network namespaces.

Integration tests: each runs ``nft`` or ``iptables-restore`` inside ``unshare --net`` (with a
user namespace when the machine allows one, so root is not required), where the only interface
is ``lo`` and every address belongs to the namespace. First the tools' own checks (``nft -c``,
``iptables-restore --test``) over every golden case, then the rulesets applied for real: the
proxy stand-in must answer, every other address must receive nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from egresslock.compile import CompileResult
from tests.compile.helpers import ROOT, compile_example, compile_text
from tests.compile.test_golden import CASES
from tests.conftest import require_sandbox, require_tool

pytestmark = [pytest.mark.integration, pytest.mark.sandbox]

PROXY = "198.51.100.7"
OUTSIDE = "203.0.113.5"
MIRROR = "203.0.113.9"
OUTSIDE6 = "2001:db8::5"
# A policy whose mirror lives in a documentation range, so block_private must be told about it.
POLICY = """version: 1
network: {allow_ranges: ["203.0.113.0/24"]}
rules:
  - {id: mirror, host: mirror.test, ports: [443]}
  - {id: api, host: api.test, ports: [80], methods: [GET], dynamic_links: allow}
"""


@cache
def _unshare_prefix() -> tuple[list[str] | None, str]:
    """The unshare command line that gives us a network namespace we may configure."""
    if shutil.which("unshare") is None:
        return None, "unshare is not installed (util-linux)"
    for prefix in (["unshare", "--user", "--map-root-user", "--net"], ["unshare", "--net"]):
        done = subprocess.run([*prefix, "true"], capture_output=True, check=False)
        if done.returncode == 0:
            return prefix, ""
    return None, "cannot create a network namespace here (needs root or user namespaces)"


def in_namespace(*argv: str) -> subprocess.CompletedProcess[str]:
    prefix, reason = _unshare_prefix()
    require_sandbox(prefix is not None, reason)
    assert prefix is not None
    return subprocess.run([*prefix, "--", *argv], capture_output=True, text=True, check=False,
                          cwd=ROOT, timeout=60,
                          env={**os.environ, "XTABLES_LOCKFILE": "/tmp/egresslock-xt.lock"})


def write(result: CompileResult, folder: Path) -> list[str]:
    paths = []
    for artifact in result.artifacts:
        path = folder / artifact.name
        path.write_text(artifact.text, encoding="utf-8")
        paths.append(str(path))
    return paths


NETFILTER_CASES = [(key, stem, target, options) for key, stem, target, options in CASES
                   if target in ("nftables", "iptables")]


@pytest.mark.parametrize(("key", "stem", "target", "options"), NETFILTER_CASES,
                         ids=[c[0] for c in NETFILTER_CASES])
def test_the_tools_accept_every_generated_ruleset(key: str, stem: str, target: str,
                                                  options: dict[str, Any],
                                                  tmp_path: Path) -> None:
    files = write(compile_example(stem, target, **options), tmp_path)
    if target == "nftables":
        require_tool("nft")
        commands = [["nft", "-c", "-f", files[0]]]
    else:
        require_tool("iptables-restore")
        commands = [["iptables-restore", "--test", files[0]],
                    ["ip6tables-restore", "--test", files[1]]]
    for command in commands:
        done = in_namespace(*command)
        assert done.returncode == 0, f"{' '.join(command)}: {done.stderr}"


def probe(target: str, files: list[str], attempts: list[tuple[str, str, int]],
          tmp_path: Path) -> dict[str, Any]:
    require_tool("nft" if target == "nftables" else "iptables-restore")
    require_tool("ip")
    servers = [("tcp", PROXY, 3128), ("tcp", PROXY, 80), ("tcp", OUTSIDE, 443),
               ("tcp", OUTSIDE, 80), ("udp", OUTSIDE, 53), ("tcp", MIRROR, 443),
               ("tcp", MIRROR, 80), ("tcp", OUTSIDE6, 443)]
    spec = {"kind": target, "files": files, "servers": servers, "attempts": attempts,
            "addresses": [f"{PROXY}/32", f"{OUTSIDE}/32", f"{MIRROR}/32", f"{OUTSIDE6}/128"]}
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    done = in_namespace(sys.executable, "-m", "tests.compile.netns_probe", str(spec_path))
    assert done.returncode == 0, f"the probe failed:\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)
    return result


ATTEMPTS = [("tcp", PROXY, 3128), ("tcp", PROXY, 80), ("tcp", OUTSIDE, 443),
            ("tcp", OUTSIDE, 80), ("udp", OUTSIDE, 53), ("tcp", MIRROR, 443),
            ("tcp", OUTSIDE6, 443)]


@pytest.mark.parametrize("target", ["nftables", "iptables"])
def test_only_the_proxy_is_reachable(target: str, tmp_path: Path) -> None:
    result = compile_text(POLICY, target, proxy_host=PROXY, proxy_port=3128)
    seen = probe(target, write(result, tmp_path), ATTEMPTS, tmp_path)
    attempts, received = seen["attempts"], seen["received"]
    assert attempts[f"tcp {PROXY} 3128"] == "ok", seen
    assert received[f"tcp {PROXY} 3128"] == {"connections": 1, "bytes": 5}
    # Refused at once with a reset, never a timeout; UDP is refused by the kernel.
    for key in (f"tcp {PROXY} 80", f"tcp {OUTSIDE} 443", f"tcp {OUTSIDE} 80",
                f"tcp {MIRROR} 443", f"tcp {OUTSIDE6} 443"):
        assert attempts[key] == "ECONNREFUSED", (key, seen["attempts"])
    assert attempts[f"udp {OUTSIDE} 53"] == "EPERM"
    for key, counts in received.items():
        if key != f"tcp {PROXY} 3128":
            assert counts == {"connections": 0, "bytes": 0}, (key, counts)
    if target == "nftables":
        assert 'log prefix "egresslock-drop: "' in seen["counters"]
        resets = re.search(r"meta l4proto tcp counter packets (\d+)", seen["counters"])
        assert resets is not None, seen["counters"]
        assert int(resets.group(1)) >= 5, seen["counters"]
    else:
        assert '--log-prefix "egresslock-drop: "' in seen["counters"]


@pytest.mark.parametrize("target", ["nftables", "iptables"])
def test_allow_direct_opens_the_pinned_address_and_port_only(target: str,
                                                             tmp_path: Path) -> None:
    result = compile_text(POLICY, target, proxy_host=PROXY, proxy_port=3128, allow_direct=True,
                          resolved={"mirror.test": (MIRROR,)})
    assert [r.rule_id for r in result.via_proxy] == ["api"]
    attempts = [*ATTEMPTS, ("tcp", MIRROR, 80)]
    seen = probe(target, write(result, tmp_path), attempts, tmp_path)
    assert seen["attempts"][f"tcp {MIRROR} 443"] == "ok", seen
    assert seen["received"][f"tcp {MIRROR} 443"] == {"connections": 1, "bytes": 5}
    assert seen["attempts"][f"tcp {MIRROR} 80"] == "ECONNREFUSED"
    assert seen["attempts"][f"tcp {OUTSIDE} 443"] == "ECONNREFUSED"
    assert seen["received"][f"tcp {OUTSIDE} 443"] == {"connections": 0, "bytes": 0}


def test_report_mode_logs_and_lets_everything_through(tmp_path: Path) -> None:
    result = compile_text("version: 1\nmode: report\n", "nftables", proxy_host=PROXY)
    seen = probe("nftables", write(result, tmp_path), ATTEMPTS[:3], tmp_path)
    assert seen["attempts"][f"tcp {OUTSIDE} 443"] == "ok"
    assert 'log prefix "egresslock-report: "' in seen["counters"]
