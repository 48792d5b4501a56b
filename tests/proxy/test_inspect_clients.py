"""Real package and source clients through the inspecting proxy: pip, git and Node's fetch.

One static-file TLS server on loopback plays two hosts (``pypi.test`` with a PEP 503 simple
index, ``git.test`` with a bare repository served over git's dumb HTTP protocol); its
certificate is signed by a test CA the proxy trusts through ``--upstream-ca``. Every client
trusts the egresslock CA made by ``egresslock ca init`` only through the variables ``egresslock
env`` prints, and reaches the server only through the proxy: both names exist only in the
proxy's ``--resolve`` pins. The rules inspect and allow only GET and HEAD on a few paths, so each
test shows an allowed download arriving byte for byte and a refused request stopped with the
rule and the reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.proxy.conftest import RunningProxy, start_proxy
from tests.proxy.servers import StaticServer, make_ca, make_wheel, tls_static_server

pytestmark = pytest.mark.integration

POLICY = """\
version: 1
network: {{allow_ranges: ["127.0.0.1/32"]}}
rules:
  - id: pypi-read
    host: pypi.test
    ports: [{port}]
    methods: [GET, HEAD]
    paths: ["/simple/**", "/files/**"]
    inspect: true
  - id: git-read
    host: git.test
    ports: [{port}]
    methods: [GET, HEAD]
    paths: ["/repo.git/**"]
    inspect: true
"""

WHEEL_NAME = "tinypkg-1.0-py3-none-any.whl"
SECRET_WHEEL = "secretpkg-1.0-py3-none-any.whl"
README = "hello from the egresslock dumb-HTTP test repository\n"

# Variables of this machine that would let a client find trust, proxies or packages some other
# way than the ones a test gives it.
_LEAKY = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy",
          "NO_PROXY", "no_proxy", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
          "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "GIT_SSL_CAINFO", "HTTPLIB2_CA_CERTS",
          "NODE_OPTIONS", "NODE_USE_ENV_PROXY", "EGRESSLOCK_CA_DIR")


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without proxy, trust, pip, git or npm settings, HOME moved."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LEAKY and not k.startswith(("PIP_", "GIT_", "NPM_CONFIG_", "npm_config_"))}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), GIT_CONFIG_NOSYSTEM="1",
               GIT_TERMINAL_PROMPT="0", PIP_CONFIG_FILE=os.devnull)
    env.update(extra)
    return env


def simple_page(name: str, href: str, data: bytes) -> str:
    sha = hashlib.sha256(data).hexdigest()
    file = href.rsplit("/", 1)[1]
    return (f"<!DOCTYPE html>\n<html><body>\n<a href=\"{href}#sha256={sha}\">{file}</a>\n"
            f"</body></html>\n")


def git(*args: str, cwd: Path, env: dict[str, str], timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("git"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@dataclass
class Site:
    proxy: RunningProxy
    server: StaticServer
    port: int
    trust: dict[str, str]  # what ``egresslock env --json`` printed
    wheel: bytes
    tmp: Path

    @property
    def bundle(self) -> str:
        return self.trust["PIP_CERT"]

    def audit_row(self, timeout: float = 10.0, **match: object) -> dict[str, object]:
        """The first audit row whose fields equal ``match``, waiting for it to be committed."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.proxy.rows()
            found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                seen = [(r["layer"], r["verdict"], r["method"], r["path"], r["reason"])
                        for r in rows]
                raise AssertionError(f"no audit row with {match}; rows: {seen}")
            time.sleep(0.1)


def build_repo(root: Path, tmp: Path) -> None:
    """``root/repo.git``: a bare repository with one commit, ready for dumb HTTP."""
    env = clean_env(tmp / "git-home", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
                    GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")
    (tmp / "git-home").mkdir()
    work = tmp / "work"
    work.mkdir()
    bare = root / "repo.git"
    for args, cwd in [(("init", "-q", "-b", "main", "."), work),
                      (("init", "-q", "--bare", "-b", "main", str(bare)), tmp)]:
        r = git(*args, cwd=cwd, env=env)
        assert r.returncode == 0, r.stderr
    (work / "README.txt").write_text(README)
    (work / "src").mkdir()
    (work / "src" / "data.bin").write_bytes(bytes(range(256)) * 64)
    for args in (("add", "-A"), ("commit", "-q", "-m", "first"),
                 ("push", "-q", str(bare), "main")):
        r = git(*args, cwd=work, env=env)
        assert r.returncode == 0, (args, r.stderr)
    r = git("update-server-info", cwd=bare, env=env)
    assert r.returncode == 0, r.stderr
    assert (bare / "info" / "refs").read_text().strip().endswith("refs/heads/main")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    tmp = tmp_path_factory.mktemp("clients")
    root = tmp / "www"
    (root / "files").mkdir(parents=True)
    (root / "private").mkdir()
    wheel = make_wheel("tinypkg", "1.0", "tinypkg", f"MARKER = {'tiny'!r}\n")
    secret = make_wheel("secretpkg", "1.0", "secretpkg", f"MARKER = {'secret'!r}\n")
    (root / "files" / WHEEL_NAME).write_bytes(wheel)
    (root / "private" / SECRET_WHEEL).write_bytes(secret)
    for name, href, data in [("tinypkg", f"/files/{WHEEL_NAME}", wheel),
                             ("secretpkg", f"/private/{SECRET_WHEEL}", secret)]:
        (root / "simple" / name).mkdir(parents=True)
        (root / "simple" / name / "index.html").write_text(simple_page(name, href, data))
    build_repo(root, tmp)

    upstream_ca, leaf, key = make_ca(tmp, ["pypi.test", "git.test"])
    ca_dir = tmp / "ca"
    subprocess.run([sys.executable, "-m", "egresslock", "ca", "init", "--dir", str(ca_dir)],
                   check=True, capture_output=True, timeout=60)
    with tls_static_server(root, leaf, key) as server:
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY.format(port=server.port))
        pins = ["--resolve", "pypi.test:127.0.0.1", "--resolve", "git.test:127.0.0.1"]
        os.environ["EGRESSLOCK_CA_DIR"] = str(ca_dir)
        try:
            proxy = start_proxy(policy, tmp / "audit.db", *pins, "--upstream-ca",
                                str(upstream_ca))
        finally:
            del os.environ["EGRESSLOCK_CA_DIR"]
        try:
            r = subprocess.run([sys.executable, "-m", "egresslock", "env", "--dir", str(ca_dir),
                                "--json", "--proxy", proxy.url], capture_output=True, text=True,
                               timeout=60, check=True)
            yield Site(proxy, server, server.port, json.loads(r.stdout), wheel, tmp)
        finally:
            proxy.stop()


def _pip(site: Site, dest: Path, package: str) -> subprocess.CompletedProcess[str]:
    home = site.tmp / "pip-home"
    home.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--isolated",
         "--disable-pip-version-check", "--only-binary", ":all:", "--retries", "0",
         "--timeout", "20", "--index-url", f"https://pypi.test:{site.port}/simple/",
         "--proxy", site.proxy.url, "--cert", site.bundle, "-d", str(dest), package],
        env=clean_env(home), capture_output=True, text=True, timeout=120, check=False)


def test_pip_config_of_this_machine_does_not_leak(site: Site) -> None:
    """The machine's pip.conf files and PIP_* variables (constraints, find-links, extra index
    URLs, cert) would make pip look elsewhere; the pip tests' environment leaves none of them,
    even before ``--isolated``."""
    for isolated in ([], ["--isolated"]):
        r = subprocess.run([sys.executable, "-m", "pip", "config", "list", *isolated],
                           env=clean_env(site.tmp), capture_output=True, text=True, timeout=60,
                           check=False)
        assert r.returncode == 0, r.stderr
        expected = "" if isolated else f":env:.config-file='{os.devnull}'"
        assert r.stdout.strip() == expected, r.stdout


def test_pip_downloads_through_inspection_and_is_refused_a_denied_path(site: Site) -> None:
    dest = site.tmp / "pip-ok"
    r = _pip(site, dest, "tinypkg")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in dest.iterdir()) == [WHEEL_NAME]
    assert (dest / WHEEL_NAME).read_bytes() == site.wheel
    assert ("GET", "/simple/tinypkg/") in site.server.seen
    assert ("GET", f"/files/{WHEEL_NAME}") in site.server.seen
    site.audit_row(verdict="allow", layer="http", rule_id="pypi-read", method="GET",
                   host="pypi.test", path=f"/files/{WHEEL_NAME}")

    # The index of secretpkg is allowed, but it points under /private/, which no rule allows.
    denied_dest = site.tmp / "pip-denied"
    r = _pip(site, denied_dest, "secretpkg")
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert (f"HTTP error 403 while getting https://pypi.test:{site.port}/private/{SECRET_WHEEL}"
            in out), out
    assert not denied_dest.exists() or not any(denied_dest.iterdir())
    assert ("GET", "/simple/secretpkg/") in site.server.seen
    assert not any(path.startswith("/private") for _, path in site.server.seen)
    site.audit_row(verdict="deny", layer="http", rule_id="pypi-read", method="GET",
                   host="pypi.test", path=f"/private/{SECRET_WHEEL}",
                   reason=f"path /private/{SECRET_WHEEL} not allowed by rule pypi-read")


def test_git_clone_over_dumb_https_and_receive_pack_is_denied(site: Site) -> None:
    home = site.tmp / "git-clone-home"
    home.mkdir()
    env = clean_env(home, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
                    GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")
    through = ["-c", f"http.proxy={site.proxy.url}", "-c", f"http.sslCAInfo={site.bundle}"]
    dest = site.tmp / "clone"
    url = f"https://git.test:{site.port}/repo.git"
    before = len(site.server.seen)
    r = git(*through, "clone", "-q", url, str(dest), cwd=site.tmp, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (dest / "README.txt").read_text() == README
    assert (dest / "src" / "data.bin").read_bytes() == bytes(range(256)) * 64
    log = git("log", "--format=%s", cwd=dest, env=env)
    assert log.stdout.strip() == "first"
    # The dumb protocol really was used: the smart-protocol probe, then plain files.
    fetched = site.server.seen[before:]
    assert fetched[0] == ("GET", "/repo.git/info/refs?service=git-upload-pack")
    assert ("GET", "/repo.git/HEAD") in fetched
    assert any(path.startswith("/repo.git/objects/") for _, path in fetched), fetched
    site.audit_row(verdict="allow", layer="http", rule_id="git-read", method="GET",
                   host="git.test", path="/repo.git/HEAD")

    # git push over dumb HTTP is WebDAV: its first PROPFIND is refused inside the tunnel.
    (dest / "new.txt").write_text("pushed\n")
    for args in (("add", "-A"), ("commit", "-q", "-m", "second")):
        assert git(*args, cwd=dest, env=env).returncode == 0
    push = git(*through, "push", "origin", "main", cwd=dest, env=env, timeout=120)
    assert push.returncode != 0, push.stdout + push.stderr
    site.audit_row(verdict="deny", layer="http", rule_id="git-read", method="PROPFIND",
                   host="git.test", path="/repo.git/",
                   reason="method PROPFIND not allowed by rule git-read (allows GET, HEAD)")
    assert {method for method, _ in site.server.seen} <= {"GET", "HEAD"}

    # A smart push would POST to git-receive-pack: refused inside the tunnel by the method list.
    before = len(site.server.seen)
    curl = require_tool("curl")
    r2 = subprocess.run(
        [curl, "-sS", "-i", "--cacert", site.bundle, "-x", site.proxy.url, "-X", "POST",
         "-H", "Content-Type: application/x-git-receive-pack-request",
         "--data-binary", "0000", f"{url}/git-receive-pack"],
        env=env, capture_output=True, text=True, timeout=30, check=False)
    assert r2.returncode == 0, r2.stderr
    assert "HTTP/1.1 403" in r2.stdout, r2.stdout[:500]
    deny = [line.split(":", 1)[1].strip() for line in r2.stdout.splitlines()
            if line.lower().startswith("x-egresslock-deny:")]
    assert deny == ["git-read; method POST not allowed by rule git-read (allows GET, HEAD)"], \
        r2.stdout[:500]
    site.audit_row(verdict="deny", layer="http", rule_id="git-read", method="POST",
                   host="git.test", path="/repo.git/git-receive-pack")
    assert len(site.server.seen) == before


NODE_SCRIPT = r"""
const { ProxyAgent, fetch } = require(process.env.UNDICI_PATH);
const crypto = require("crypto");
(async () => {
  const dispatcher = new ProxyAgent(process.env.TEST_PROXY);
  const base = process.env.TEST_BASE;
  const get = await fetch(base + "/files/" + process.env.TEST_WHEEL, { dispatcher });
  const body = Buffer.from(await get.arrayBuffer());
  const post = await fetch(base + "/files/upload", { method: "POST", body: "payload", dispatcher });
  const postText = await post.text();
  console.log(JSON.stringify({
    get: { status: get.status, length: body.length,
           sha256: crypto.createHash("sha256").update(body).digest("hex") },
    post: { status: post.status, deny: post.headers.get("x-egresslock-deny"), body: postText },
  }));
  await dispatcher.close();
})().catch((e) => { console.error(e, e.cause); process.exit(2); });
"""


@pytest.fixture(scope="module")
def undici(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """undici 6 installed from the npm registry: Node 20's own fetch ignores proxy variables
    (NODE_USE_ENV_PROXY arrived in later releases), so the client uses undici's ProxyAgent."""
    require_tool("node")
    npm = require_tool("npm")
    d = tmp_path_factory.mktemp("undici")
    env = {k: v for k, v in os.environ.items() if k not in ("NODE_OPTIONS",)}
    try:
        r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--no-save",
                            "--loglevel=error", "--prefix", str(d), "undici@6"],
                           env=env, capture_output=True, text=True, timeout=180, check=False)
    except subprocess.TimeoutExpired:
        pytest.skip("npm install undici@6 timed out: the npm registry is not reachable")
    path = d / "node_modules" / "undici"
    if r.returncode != 0 or not (path / "package.json").exists():
        pytest.skip(f"npm install undici@6 failed (npm registry not reachable?): "
                    f"{r.stderr.strip()[-500:]}")
    return path


def test_node_fetch_through_inspection(site: Site, undici: Path) -> None:
    node = require_tool("node")
    home = site.tmp / "node-home"
    home.mkdir()
    before = len(site.server.seen)
    env = clean_env(home, NODE_EXTRA_CA_CERTS=site.trust["NODE_EXTRA_CA_CERTS"],
                    UNDICI_PATH=str(undici), TEST_PROXY=site.proxy.url,
                    TEST_BASE=f"https://pypi.test:{site.port}", TEST_WHEEL=WHEEL_NAME)
    r = subprocess.run([node, "-e", NODE_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["get"] == {"status": 200, "length": len(site.wheel),
                          "sha256": hashlib.sha256(site.wheel).hexdigest()}
    deny = "pypi-read; method POST not allowed by rule pypi-read (allows GET, HEAD)"
    assert out["post"]["status"] == 403
    assert out["post"]["deny"] == deny
    assert deny in out["post"]["body"]
    assert site.server.seen[before:] == [("GET", f"/files/{WHEEL_NAME}")]
    site.audit_row(verdict="deny", layer="http", rule_id="pypi-read", method="POST",
                   host="pypi.test", path="/files/upload")
