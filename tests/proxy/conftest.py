"""Fixtures that run the real proxy (``python -m egresslock proxy``) against loopback servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.proxy.servers import EchoServer, echo_server, make_ca, tls_echo_server


@dataclass
class RunningProxy:
    """A proxy process, its address, and its audit database."""

    proc: subprocess.Popen[str]
    port: int
    audit: Path
    policy: Path
    stderr: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rows(self, expect: int | None = None, timeout: float = 10.0) -> list[dict[str, object]]:
        """Audit rows of this proxy, waiting until at least ``expect`` are committed."""
        deadline = time.monotonic() + timeout
        while True:
            r = subprocess.run([sys.executable, "-m", "egresslock", "audit", "--db",
                                str(self.audit), "--json", "--limit", "1000000"],
                               capture_output=True, text=True, timeout=60, check=False)
            rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
            if expect is None or len(rows) >= expect or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_proxy(policy: Path, audit: Path, *extra: str) -> RunningProxy:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY",
                "all_proxy", "NO_PROXY", "no_proxy"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "egresslock", "proxy", "-p", str(policy), "--listen",
         "127.0.0.1:0", "--audit", str(audit), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening on "):
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"proxy did not start: {line!r} {err}")
    port = int(line.rsplit(":", 1)[1])
    return RunningProxy(proc, port, audit, policy)


@dataclass
class Upstreams:
    http: EchoServer
    tls: EchoServer
    ca: Path


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    d = tmp_path_factory.mktemp("tls")
    ca, leaf, key = make_ca(d, ["secure.test", "other.test"])
    with echo_server() as http_srv, tls_echo_server(leaf, key) as tls_srv:
        yield Upstreams(http_srv, tls_srv, ca)


POLICY = """\
version: 1
network:
  block_private: true
  allow_ranges: ["127.0.0.1/32"]
rules:
  - id: app-read
    host: app.test
    ports: [{http}]
    methods: [GET, HEAD]
    paths: ["/echo/**", "/redirect", "/chunked", "/big"]
    query: {{params: [page, n], max_value_len: 16}}
  - id: app-write
    host: write.test
    ports: [{http}]
    methods: [POST, PUT]
    paths: ["/upload/*"]
    max_body_bytes: 1000
  - id: no-admin
    host: write.test
    ports: [{http}]
    paths: ["/upload/admin"]
    action: deny
  - id: secure
    host: secure.test
    ports: [{tls}]
  - id: meta
    host: meta.test
    ports: [80, {http}]
  - id: ipv4-literal
    host: 127.0.0.1
    ports: [{http}]
"""

PINS = ["app.test:127.0.0.1", "write.test:127.0.0.1", "secure.test:127.0.0.1",
        "other.test:127.0.0.1", "meta.test:169.254.169.254"]


class Proxies:
    """``egresslock proxy`` processes of one test module, each in a directory of its own with
    its policy (``default_policy`` unless given) and audit log, pinned with ``pins``."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory, default_policy: str,
                 pins: list[str]) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.default_policy = default_policy
        self.pins = pins
        self.started: list[RunningProxy] = []

    def start(self, policy_text: str | None = None, *extra: str) -> RunningProxy:
        d = self.tmp_path_factory.mktemp("proxy")
        policy = d / "policy.yaml"
        policy.write_text(policy_text or self.default_policy)
        pins = [arg for pin in self.pins for arg in ("--resolve", pin)]
        p = start_proxy(policy, d / "audit.db", *pins, *extra)
        self.started.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.started:
            p.stop()


@pytest.fixture(scope="module")
def proxy_factory(upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[Callable[..., RunningProxy]]:
    proxies = Proxies(tmp_path_factory,
                      POLICY.format(http=upstreams.http.port, tls=upstreams.tls.port), PINS)
    yield proxies.start
    proxies.stop_all()


@pytest.fixture(scope="module")
def proxy(proxy_factory: Callable[..., RunningProxy]) -> RunningProxy:
    return proxy_factory()
