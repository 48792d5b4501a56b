"""docs/kubernetes.md stays true: its console transcript is what the commands print, and its
example agent pod is a valid Kubernetes object."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.compile.helpers import EXAMPLES, ROOT, validate_kubernetes

DOC = ROOT / "docs" / "kubernetes.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_the_console_transcript_is_what_egresslock_prints(tmp_path: Path) -> None:
    (tmp_path / "examples").mkdir()
    shutil.copy(EXAMPLES / "basic.yaml", tmp_path / "examples" / "basic.yaml")
    transcript = next(b for b in _blocks("console") if "egresslock compile" in b)
    expected: list[str] = []
    printed: list[str] = []
    for line in transcript.splitlines():
        if not line.startswith("$ "):
            expected.append(line)
            continue
        argv = shlex.split(line[2:])
        assert argv[0] == "egresslock"
        done = subprocess.run([sys.executable, "-m", "egresslock", *argv[1:]], cwd=tmp_path,
                              capture_output=True, text=True, check=True, timeout=60)
        printed += (done.stdout + done.stderr).splitlines()
    assert printed == expected


def test_the_example_agent_pod_is_a_valid_pod() -> None:
    pod_text = next(b for b in _blocks("yaml") if b.startswith("# agent-pod.yaml"))
    pod = yaml.safe_load(pod_text)
    validate_kubernetes(pod)
    assert pod["metadata"]["labels"] == {"egresslock.dev/agent": "true"}
    assert pod["spec"]["containers"][0]["envFrom"][0]["configMapRef"]["name"] == (
        "egresslock-agent-env")
