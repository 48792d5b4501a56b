"""The guide's runnable example (examples/sanitize_stream.py) runs and does what docs/sanitize.md
says: the attacked answer streams through, the safe parts are rendered, every injected URL is
gone, and each removal is reported as it is decided."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_streaming_example_renders_no_attacker_url() -> None:
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "sanitize_stream.py")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    rendered = done.stdout
    assert "## Quarterly summary" in rendered
    assert "https://docs.acme-corp.example/finance" in rendered  # an allowed link stays
    assert "https://cdn.acme-corp.example/img/q3-revenue.png" in rendered  # an allowed image
    # Only inside the code block, where it is text, may an attacker host appear.
    outside_code = rendered.split("```")[0] + rendered.split("```")[-1]
    assert "attacker.example" not in outside_code
    assert "demo-canary" not in rendered
    removals = [line for line in done.stderr.splitlines() if "[egresslock] removed" in line]
    assert len(removals) >= 3, done.stderr
    assert "secret demo-canary" in done.stderr
